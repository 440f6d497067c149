"""Stage-2 losses: cross-entropy of the codes (hard or soft targets) and held-out NLL per depth."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def code_loss(logits: torch.Tensor, codes: torch.Tensor, soft_targets: torch.Tensor | None = None):
    """logits [B, h, w, D, K], codes [B, h, w, D] -> (mean cross-entropy, per-depth accuracy [D]).

    soft_targets [B, h, w, D, K] (rows summing to 1, e.g. RQVAE.soft_targets): cross-entropy against
    them instead of the one-hot codes (the paper's soft labels); accuracy is still against `codes`."""
    codes = codes.long()
    # float(): under bf16 autocast the log-softmax over K codes would otherwise run in bf16
    flat = rearrange(logits.float(), "b h w d k -> (b h w d) k")
    if soft_targets is None:
        loss = F.cross_entropy(flat, codes.reshape(-1))
    else:
        loss = F.cross_entropy(flat, rearrange(soft_targets.float(), "b h w d k -> (b h w d) k"))
    hits = (logits.detach().argmax(-1) == codes).float()  # [B, h, w, D]
    return loss, rearrange(hits, "b h w d -> (b h w) d").mean(0)


@torch.no_grad()
def per_image_nll(model, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 64,
                  text_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Negative log-likelihood (nats) of each image at each depth [N, D], the mean over its h*w positions,
    of codes [N,h,w,D] given labels [N] (and, for a text model, text_tokens [N, max_text_len]; None = the
    empty prompt). Per image, so one pass gives the means of any subsets."""
    device = model.head.weight.device
    out = []
    for i in range(0, len(codes), batch_size):
        c = codes[i:i + batch_size].to(device).long()
        text = None if text_tokens is None else text_tokens[i:i + batch_size].to(device)
        logits = model(c, labels[i:i + batch_size].to(device), text)  # [B, h, w, D, K]
        ce = F.cross_entropy(rearrange(logits, "b h w d k -> b k h w d"), c, reduction="none")  # [B, h, w, D]
        out.append(ce.float().mean((1, 2)).cpu())
    return torch.cat(out) if out else torch.zeros(0, codes.shape[-1])


def per_depth_nll(model, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 64,
                  text_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean negative log-likelihood (nats) of each depth [D] over codes [N,h,w,D] (see per_image_nll)."""
    return per_image_nll(model, codes, labels, batch_size, text_tokens).mean(0)
