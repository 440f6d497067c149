"""Pipelines over the two stages: `RQPipeline` (generate, stream, reconstruct, complete)."""
from .rq_pipeline import RQPipeline, RQPipelineOutput, Reconstruction

__all__ = ["RQPipeline", "RQPipelineOutput", "Reconstruction"]
