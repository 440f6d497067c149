"""Training figures: stage-2 step (ours vs the reference module) and stage-1 step, encode and decode.

    .venv/bin/python -m bench.training            # reference configuration (part of `make bench`)
    .venv/bin/python -m bench.training --quick    # tiny sizes: checks the script runs

A step is forward + loss + backward + AdamW step (zero_grad(set_to_none) first), on one fixed random
batch, in train mode (no dropout in either model). Stage 2: ours `code_loss(model(codes), codes)`,
the reference `forward(ids [B, h*w, D], return_loss=True)` on the same codes (its loss ignores
code 0, its pad id; the work is the same). Stage 1: `RQVAE(RQVAEConfig(**PRESETS["emoji-64"]))`,
L1 + commitment, on random images; the first (warm-up) step also runs the k-means codebook init.
"""
from __future__ import annotations

import torch

from bench.common import (build_ours, build_reference, emit, median_time, parse_args, random_codes, rnd, run_main,
                          sizes, with_goal)

STAGE2_GOAL = 1.3   # ours >= 1.3x faster than the reference per step
REPEATS = 5         # steps are short: a few more repeats for a steadier median


def train_step(model, loss_fn, lr: float = 3e-4):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
    return step


def stage2(quick: bool) -> list[dict]:
    from rqtransformer.model import code_loss

    cfg = sizes(quick)
    batch = 4 if quick else 32
    codes = random_codes(cfg, batch)  # [B, h, w, D]
    h, w, D = cfg["code_shape"]
    ours, ref = build_ours(cfg), build_reference(cfg)
    t_ours = median_time(train_step(ours, lambda: code_loss(ours(codes), codes)[0]), REPEATS, warmup=2)
    ids = codes.reshape(batch, h * w, D)  # the reference's [B, spatial, depth] layout
    t_ref = median_time(train_step(ref, lambda: ref(ids, return_loss=True)), REPEATS, warmup=2)
    speedup = t_ref["seconds"] / t_ours["seconds"]
    return [emit(with_goal({"figure": "stage2_train_step", "batch": batch,
                            "ours_seconds": rnd(t_ours["seconds"]), "reference_seconds": rnd(t_ref["seconds"]),
                            "speedup": rnd(speedup, 3), "ours_runs": t_ours["runs"], "reference_runs": t_ref["runs"],
                            "repeats": REPEATS}, f">= {STAGE2_GOAL:g}x faster than reference", speedup >= STAGE2_GOAL))]


def stage1(quick: bool) -> list[dict]:
    from rqvae.model import PRESETS, RQVAE, RQVAEConfig

    preset = "tiny" if quick else "emoji-64"
    torch.manual_seed(0)
    config = RQVAEConfig(**PRESETS[preset])
    model = RQVAE(config)
    res = config.resolution
    train_batch, batch = (4, 8) if quick else (16, 64)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, res, res, generator=g) * 2 - 1  # [B, 3, H, W] in [-1, 1]
    x = images[:train_batch]

    def loss():
        recon, terms = model(x)
        return (recon - x).abs().mean() + terms["commitment"]

    t = median_time(train_step(model, loss), REPEATS, warmup=2)
    out = [emit({"figure": "stage1_train_step", "preset": preset, "resolution": res, "batch": train_batch,
                 "seconds": rnd(t["seconds"]), "images_per_s": rnd(train_batch / t["seconds"]), "runs": t["runs"],
                 "repeats": REPEATS, "goal": None, "met": None})]
    model.eval()
    with torch.inference_mode():
        enc = median_time(lambda: model.encode(images), REPEATS)
        codes = model.encode(images)  # [B, h, w, D]
        dec = median_time(lambda: model.decode(codes), REPEATS)
    for name, m in (("stage1_encode", enc), ("stage1_decode", dec)):
        out.append(emit({"figure": name, "preset": preset, "resolution": res, "batch": batch,
                         "seconds": rnd(m["seconds"]), "images_per_s": rnd(batch / m["seconds"]), "runs": m["runs"],
                         "repeats": REPEATS, "goal": None, "met": None}))
    return out


def figures(quick: bool = False) -> list[dict]:
    return stage2(quick) + stage1(quick)


if __name__ == "__main__":
    run_main(figures, parse_args(__doc__.splitlines()[0]))
