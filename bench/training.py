"""Training figures: stage-2 step (ours vs the reference module) and stage-1 step, encode and decode.

    .venv/bin/python -m bench.training            # reference configuration (part of `make bench`)
    .venv/bin/python -m bench.training --quick    # tiny sizes: checks the script runs

A step is forward + loss + backward + AdamW step (zero_grad(set_to_none) first), on one fixed random
batch, in train mode (no dropout in either model). Stage 2: ours `code_loss(model(codes), codes)`,
the reference `forward(ids [B, h*w, D], return_loss=True)` on the same codes (its loss ignores
code 0, its pad id; the work is the same). Stage 1: `RQVAE(RQVAEConfig(**PRESETS["emoji-64"]))`,
L1 + commitment, on random images; the first (warm-up) step also runs the k-means codebook init.

Both stages run with the training scripts' allocator setting (`keep_freed_memory`), which the
reference gets too since it runs in the same process. Beside the fp32 step, stage 2 is timed under
bf16 autocast (ours and the reference alike) where the CPU multiplies bf16 natively, and the
"stage2_matmul_bound" figure times the step's Linear-layer matrix products alone: the fastest an fp32
step of this model can be, whatever else is optimised.
"""
from __future__ import annotations

import torch

from bench.common import (build_ours, build_reference, emit, median_time, parse_args, random_codes, rnd, run_main,
                          sizes)
from rqcore.machine import native_bf16

REPEATS = 5         # steps are short: a few more repeats for a steadier median


def bf16(step):
    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            step()
    return run


def linear_products(model, run) -> list[tuple[int, int, int]]:
    """(rows, in, out) of every nn.Linear call during `run()`."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, args, out: shapes.append((args[0].numel() // m.in_features,
                                                                           m.in_features, m.out_features)))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return shapes


def matmul_bound(shapes: list[tuple[int, int, int]]) -> dict:
    """Time the forward product of every Linear shape; backward has two of the same size each, so the
    step's matrix products take 3x that. FLOPs: 2 * rows * in * out per product."""
    g = torch.Generator().manual_seed(0)
    ops = [(torch.randn(r, i, generator=g), torch.randn(o, i, generator=g)) for r, i, o in shapes]
    t = median_time(lambda: [x @ w.t() for x, w in ops], REPEATS, warmup=2)
    flops = 3 * sum(2 * r * i * o for r, i, o in shapes)
    return {"seconds": 3 * t["seconds"], "gflop": flops / 1e9, "gflop_per_s": flops / (3 * t["seconds"]) / 1e9}


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
    from rqtransformer.losses import code_loss

    cfg = sizes(quick)
    batch = 4 if quick else 32
    codes = random_codes(cfg, batch)  # [B, h, w, D]
    h, w, D = cfg["code_shape"]
    ours, ref = build_ours(cfg), build_reference(cfg)
    ids = codes.reshape(batch, h * w, D)  # the reference's [B, spatial, depth] layout
    ours_step = train_step(ours, lambda: code_loss(ours(codes), codes)[0])
    ref_step = train_step(ref, lambda: ref(ids, return_loss=True))
    t_ours = median_time(ours_step, REPEATS, warmup=2)
    t_ref = median_time(ref_step, REPEATS, warmup=2)
    speedup = t_ref["seconds"] / t_ours["seconds"]
    # no fp32 goal: this step is bound by its matrix products (the matmul_bound figure below)
    out = [emit({"figure": "stage2_train_step", "batch": batch, "precision": "fp32",
                 "ours_seconds": rnd(t_ours["seconds"]), "reference_seconds": rnd(t_ref["seconds"]),
                 "speedup": rnd(speedup, 3), "ours_runs": t_ours["runs"], "reference_runs": t_ref["runs"],
                 "repeats": REPEATS, "goal": None, "met": None})]
    bound = matmul_bound(linear_products(ours, lambda: ours(codes)))
    out.append(emit({"figure": "stage2_matmul_bound", "batch": batch, "matmul_seconds": rnd(bound["seconds"]),
                     "matmul_gflop": rnd(bound["gflop"], 2), "gflop_per_s": rnd(bound["gflop_per_s"], 1),
                     "share_of_ours": rnd(bound["seconds"] / t_ours["seconds"], 3),
                     "max_speedup": rnd(t_ref["seconds"] / bound["seconds"], 3), "goal": None, "met": None}))
    # both ways on every CPU: without AVX512-BF16/AMX bf16 is emulated, and the slower one there
    b_ours = median_time(bf16(ours_step), REPEATS, warmup=2)
    b_ref = median_time(bf16(ref_step), REPEATS, warmup=2)
    out.append(emit({"figure": "stage2_train_step", "batch": batch, "precision": "bf16 autocast",
                     "ours_seconds": rnd(b_ours["seconds"]), "reference_seconds": rnd(b_ref["seconds"]),
                     "speedup": rnd(b_ref["seconds"] / b_ours["seconds"], 3),
                     "ours_vs_ours_fp32": rnd(t_ours["seconds"] / b_ours["seconds"], 3),
                     "native_bf16": native_bf16(),
                     "ours_runs": b_ours["runs"], "reference_runs": b_ref["runs"], "repeats": REPEATS,
                     "goal": None, "met": None}))
    return out


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


def paper_training(quick: bool) -> list[dict]:
    """Issue 16: what --stochastic_codes + --soft_labels add to a stage-2 step of the bundled sizes
    (emoji-64 RQ-VAE and transformer, batch 32): drawing codes and soft targets from cached latents
    every step, and the soft-target cross-entropy."""
    from rqtransformer.losses import code_loss
    from rqtransformer.model import PRESETS as TF_PRESETS, RQTransformer, RQTransformerConfig
    from rqvae.model import PRESETS, RQVAE, RQVAEConfig

    preset = "tiny" if quick else "emoji-64"
    batch, tau = (4, 0.5) if quick else (32, 0.5)
    torch.manual_seed(0)
    vae = RQVAE(RQVAEConfig(**PRESETS[preset]))
    res = vae.config.resolution
    vae(torch.rand(16, 3, res, res) * 2 - 1)  # k-means init of the codebook
    vae.eval()
    tf = RQTransformer(RQTransformerConfig(codebook_size=vae.config.codebook_size, code_shape=vae.config.code_shape,
                                           num_classes=9, **TF_PRESETS[preset]))
    g = torch.Generator().manual_seed(0)
    latents = vae.encode_latents(torch.rand(batch, 3, res, res, generator=g) * 2 - 1)  # [B, h, w, C]
    codes = vae.quantize_latents(latents)
    labels = torch.randint(0, 9, (batch,), generator=g)

    def draw():  # as training does with both flags: one walk over the depths
        return vae.quantize_latents(latents, tau, generator=g, return_targets=True)

    def paper_loss():
        drawn, targets = draw()
        return code_loss(tf(drawn, labels), drawn, targets)[0]

    plain = median_time(train_step(tf, lambda: code_loss(tf(codes, labels), codes)[0]), REPEATS, warmup=2)
    paper = median_time(train_step(tf, paper_loss), REPEATS, warmup=2)
    drawing = median_time(draw, REPEATS, warmup=1)
    return [emit({"figure": "stage2_paper_training_step", "preset": preset, "batch": batch, "precision": "fp32",
                  "plain_seconds": rnd(plain["seconds"]), "stochastic_soft_seconds": rnd(paper["seconds"]),
                  "draw_seconds": rnd(drawing["seconds"]), "overhead": rnd(paper["seconds"] / plain["seconds"] - 1, 3),
                  "plain_runs": plain["runs"], "paper_runs": paper["runs"], "repeats": REPEATS,
                  "goal": None, "met": None})]


def _paper_stage1_child(preset: str, repeats: int, queue) -> None:
    """In a fresh process, so that its peak resident memory is this step's alone."""
    import resource

    from rqvae.model import PRESETS, RQVAE, RQVAEConfig
    from training.trainer import keep_freed_memory

    keep_freed_memory()
    torch.manual_seed(0)
    config = RQVAEConfig(**PRESETS[preset])
    model = RQVAE(config)
    x = torch.rand(1, 3, config.resolution, config.resolution) * 2 - 1  # [1, 3, 256, 256]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def loss():
        recon, terms = model(x)
        return (recon - x).abs().mean() + terms["commitment"]

    t = median_time(train_step(model, loss), repeats, warmup=1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    queue.put({"preset": preset, "resolution": config.resolution, "code_shape": list(config.code_shape),
               "parameters_m": rnd(sum(p.numel() for p in model.parameters()) / 1e6, 4), **t,
               "threads": torch.get_num_threads(), "peak_rss_mib": rnd(peak / 1024, 4),
               "model_and_imports_rss_mib": rnd(before / 1024, 4)})


def paper_stage1(quick: bool) -> list[dict]:
    """Issue 18: one training step (L1 + commitment, AdamW) of the paper's 256-px RQ-VAE (ffhq-256:
    82 M parameters, 8x8x4 codes) at batch 1 on this CPU, and the peak memory of a process doing it."""
    import multiprocessing

    preset, repeats = ("tiny", 2) if quick else ("ffhq-256", 3)
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_paper_stage1_child, args=(preset, repeats, queue))
    child.start()
    r = queue.get(timeout=1800)
    child.join()
    return [emit({"figure": "stage1_paper_train_step", **r, "batch": 1, "precision": "fp32",
                  "seconds": rnd(r["seconds"]), "repeats": repeats, "goal": None, "met": None})]


def figures(quick: bool = False) -> list[dict]:
    from training.trainer import keep_freed_memory

    keep_freed_memory()  # as the training scripts do (and for the reference alike: same process)
    return stage2(quick) + paper_training(quick) + stage1(quick) + paper_stage1(quick)


if __name__ == "__main__":
    run_main(figures, parse_args(__doc__.splitlines()[0]))
