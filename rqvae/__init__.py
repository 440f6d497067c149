"""Stage 1: RQ-VAE, images <-> residual code stacks [B,h,w,D]."""
__all__ = ["RQVAE", "RQVAEConfig", "PRESETS"]


def __getattr__(name):  # imported on first use, so `python -m emoji_data.build` does not load torch
    if name in __all__:
        from . import model
        return getattr(model, name)
    raise AttributeError(f"module 'rqvae' has no attribute {name!r}")
