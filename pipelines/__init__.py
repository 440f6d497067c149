"""Pipelines over the two stages: `RQPipeline` (generate, stream, reconstruct, complete)."""
from .rq_pipeline import EXACT_CPU, RQPipeline, RQPipelineOutput, Reconstruction

__all__ = ["EXACT_CPU", "RQPipeline", "RQPipelineOutput", "Reconstruction"]
