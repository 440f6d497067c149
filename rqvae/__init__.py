"""Stage 1: RQ-VAE, images <-> residual code stacks [B,h,w,D]."""
from .model import PRESETS, RQVAE, RQVAEConfig

__all__ = ["RQVAE", "RQVAEConfig", "PRESETS"]
