"""What RQPipeline's calls return."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image


@dataclass
class RQPipelineOutput:
    images: Any                      # list of PIL images, or a tensor/array [B,3,H,W] in [0,1]
    codes: torch.Tensor              # LongTensor [B,h,w,D]
    class_labels: list[int] | None = None
    prompts: list[str] | None = None          # the prompt of each image (None: no prompt given)
    truncated_prompts: list[str] = field(default_factory=list)  # prompts cut to max_text_len tokens
    done: float = 1.0                # fraction of positions sampled (previews < 1)
    keep_mask: torch.Tensor | None = None     # complete(): BoolTensor [h,w], True = code position kept
    input_image: Image.Image | None = field(repr=False, default=None)  # complete(): the input as the model saw it


@dataclass
class Reconstruction:
    images: list[Image.Image]        # one per depth 1..D
    psnr: list[float]                # dB against the (resized) input, per depth
    codes: torch.Tensor              # LongTensor [h,w,D]
    input_image: Image.Image = field(repr=False, default=None)  # the input as the model saw it
