"""Ours vs the official RQ-Transformer sampler (kakaobrain/rq-vae-transformer): same weights, one process.

    .venv/bin/python -m bench.vs_official --official DIR          # DIR: a checkout or export of the official repository
    RQ_OFFICIAL_TREE=DIR .venv/bin/python -m bench.run --only official
    .venv/bin/python -m bench.vs_official --official DIR --quick  # tiny sizes: checks the script runs

Without a tree (neither --official nor RQ_OFFICIAL_TREE) this prints one "skipped" line and measures nothing.
The official package is also named `rqvae`, so its `rqvae/` is copied to a temporary folder as
`official_rqvae` (its absolute imports rewritten to that name, and its rqtransformer/configs.py given
`field(default_factory=...)` for the dataclass defaults Python 3.11 refuses; nothing else changes) and
imported from there. Needs omegaconf and easydict (bench/requirements.txt).

Method: the official RQTransformer (built through its own `augment_arch_defaults` / `get_rqtransformer`,
random weights) and a small official RQ-VAE whose codebook it embeds (only `get_code_emb_with_depth` runs
while sampling) are converted to our format in memory with official.layout's functions, so both
samplers run the same weights. Greedy codes (top_k=1) are compared once. Then the official
`sample(zeros, model_aux, cond=labels, top_k=None, top_p=None, cached=True)` (its KV cache, float32) and
our `generate(class_labels=labels)` (float32, defaults: no filter, num_threads="auto") run in alternating
rounds (`paired_times`, warm-up excluded, median of 3), with the copy of our model in the CPU's default weights
(`quantized_for_cpu(default_cpu_weights(model))`, what RQPipeline's cpu_weights="auto" gives) in the same
rounds; same torch thread setting for all (the "threads" field; ours samples on "ours_sampling_threads" of them). ratio = official seconds / ours. When one official warm-up
run takes longer than SLOW_S, a single timed round is made (the record says so).
Configurations: the reference one (bench.common FULL, 10 classes, batch 1 and 16; goals for float32: >= 4x at
batch 1, >= 6x at batch 16) and the official FFHQ 355M one (unconditional, batch 1 and 4; goal for the default
CPU weights: >= 8x at batch 1).
"""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from bench.common import REPEATS, emit, paired_times, parse_args, rnd, run_main, sizes, with_goal
from bench.sampling_speed import default_weights, ours_fn, threads_used
import torch

ENV = "RQ_OFFICIAL_TREE"
PKG = "official_rqvae"  # the copy's top-level name
SOURCE = "kakaobrain/rq-vae-transformer"
SLOW_S = 120.0  # one official warm-up run longer than this: 1 timed round instead of REPEATS
FAST_GOALS = {("ffhq-355m", 1): 8.0}  # (config, batch): goal of the default CPU weights against the official sampler
CONFIGS = {  # name: (extra sizes, batches, goals per batch)
    "reference": (dict(input_embed_dim=256, num_classes=10), (1, 16), (4.0, 6.0)),
    "ffhq-355m": (dict(codebook_size=2048, code_shape=(8, 8, 4), dim=1024, heads=16, spatial_layers=24,
                       depth_layers=4, input_embed_dim=256, num_classes=0), (1, 4), (None, None)),
}
QUICK_EXTRA = {"reference": dict(input_embed_dim=32, num_classes=10),  # --quick: bench.common QUICK sizes
               "ffhq-355m": dict(input_embed_dim=32, num_classes=0)}
CONFIG_PATCHES = [  # official rqtransformer/configs.py under Python 3.11: dataclass instances as field defaults
    ("from dataclasses import dataclass\n", "from dataclasses import dataclass, field\n"),
    ("block: AttentionBlockConfig = AttentionBlockConfig()",
     "block: AttentionBlockConfig = field(default_factory=AttentionBlockConfig)"),
    ("body: AttentionStackConfig = AttentionStackConfig()",
     "body: AttentionStackConfig = field(default_factory=AttentionStackConfig)"),
    ("head: AttentionStackConfig = AttentionStackConfig()",
     "head: AttentionStackConfig = field(default_factory=AttentionStackConfig)"),
]
_IMPORT = re.compile(r"^(\s*)(from|import) rqvae\b", re.M)


def import_official(tree: Path, folder: Path):
    """Copy tree/rqvae to folder/official_rqvae (imports renamed, configs.py patched) and import it."""
    src = tree / "rqvae"
    if not (src / "models" / "rqtransformer" / "transformers.py").is_file():
        raise ValueError("the official tree has no rqvae/models/rqtransformer/transformers.py")
    dst = folder / PKG
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    for file in dst.rglob("*.py"):
        text = file.read_text(encoding="utf-8")
        new = _IMPORT.sub(lambda m: f"{m[1]}{m[2]} {PKG}", text)
        if file == dst / "models" / "rqtransformer" / "configs.py":
            for old, fix in CONFIG_PATCHES:
                if new.count(old) != 1:
                    raise ValueError(f"official configs.py: {old!r} not found once (another version?)")
                new = new.replace(old, fix)
        if new != text:
            file.write_text(new, encoding="utf-8")
    sys.path.insert(0, str(folder))
    try:
        return {m: importlib.import_module(f"{PKG}.{m}") for m in ("models", "utils.config")}
    finally:
        sys.path.remove(str(folder))


def official_archs(c: dict) -> tuple[dict, dict]:
    """(stage-1 arch, stage-2 arch) as plain dicts, in the official config.yaml layout."""
    (h, w, D), K, C = c["code_shape"], c["codebook_size"], c["input_embed_dim"]
    stage1 = {"type": "rq-vae", "checkpointing": False,  # tiny encoder/decoder: sampling uses only the codebook
              "hparams": {"bottleneck_type": "rq", "embed_dim": C, "n_embed": K, "latent_shape": [h, w, C],
                          "code_shape": [h, w, D], "shared_codebook": True, "decay": 0.99,
                          "restart_unused_codes": True, "loss_type": "mse", "latent_loss_weight": 0.25},
              "ddconfig": {"double_z": False, "z_channels": 32, "resolution": h, "in_channels": 3, "out_ch": 3,
                           "ch": 32, "ch_mult": [1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}
    stage2 = {"type": "rq-transformer", "block_size": [h, w, D], "embed_dim": c["dim"], "input_embed_dim": C,
              "shared_tok_emb": True, "shared_cls_emb": True, "input_emb_vqvae": True, "head_emb_vqvae": True,
              "cumsum_depth_ctx": True, "vocab_size_cond": max(c["num_classes"], 1), "block_size_cond": 1,
              "body": {"n_layer": c["spatial_layers"], "block": {"n_head": c["heads"]}},
              "head": {"n_layer": c["depth_layers"], "block": {"n_head": c["heads"]}}, "vocab_size": K}
    return stage1, stage2


def build_pair(off: dict, c: dict, seed: int = 0):
    """-> (official stage 1, official stage 2, ours): random official weights, converted in memory."""
    from omegaconf import OmegaConf

    from rqtransformer import RQTransformer
    from rqvae import RQVAE
    from official import layout as conv

    models, config = off["models"], off["utils.config"]
    arch1, arch2 = official_archs(c)
    torch.manual_seed(seed)
    with contextlib.redirect_stdout(io.StringIO()):  # its decoder prints a line: stdout carries JSON only
        stage1 = models.rqvae.get_rqvae(config.augment_arch_defaults(OmegaConf.create(arch1))).eval()
    stage2 = models.get_rqtransformer(config.augment_arch_defaults(OmegaConf.create(arch2))).eval()

    vc = conv.rqvae_config({"arch": arch1})
    vae = RQVAE(vc)
    state = conv.rqvae_state(vae, vc, stage1.state_dict())
    conv.check_shapes(vae, state, "stage 1")
    vae.load_state_dict(state, strict=True)
    tc = conv.transformer_config({"arch": arch2}, vc)
    ours = RQTransformer(tc)
    state = conv.transformer_state(tc, stage2.state_dict(), vae.quantizer.codebooks[0].detach())
    conv.check_shapes(ours, state, "stage 2")
    ours.load_state_dict(state, strict=True)
    return stage1, stage2, ours.eval()


def official_fn(model, aux, batch: int, labels, top_k=None):
    zeros = torch.zeros(batch, *model.block_size, dtype=torch.long)

    def run():
        torch.manual_seed(0)
        with warnings.catch_warnings():  # its torch.cuda.amp.autocast(enabled=False): a deprecation notice
            warnings.simplefilter("ignore", FutureWarning)
            return model.sample(zeros, aux, cond=labels, top_k=top_k, top_p=None, cached=True)
    return run


def greedy_check(stage1, stage2, ours, c: dict, batch: int) -> dict:
    labels = torch.arange(batch) % c["num_classes"] if c["num_classes"] else None
    theirs = official_fn(stage2, stage1, batch, labels, top_k=1)()
    mine = ours_fn(ours, batch, 1, labels=labels)()
    return {"same_greedy_codes": bool(torch.equal(theirs, mine)), "greedy_batch": batch,
            "greedy_codes_differing": rnd(float((theirs != mine).float().mean()), 3),
            "greedy_distinct_codes": int(theirs.unique().numel())}


def measure(name: str, c: dict, batch: int, goal, stage1, stage2, ours, fast, parity: dict) -> list[dict]:
    labels = torch.arange(batch) % c["num_classes"] if c["num_classes"] else None
    fns = {"official": official_fn(stage2, stage1, batch, labels), "ours": ours_fn(ours, batch, None, labels=labels)}
    weights, fast = fast
    if fast is not None:
        fns["fast"] = ours_fn(fast, batch, None, labels=labels)
    warm = {}
    for k, fn in fns.items():  # warm-up, timed only to choose the number of rounds
        t0 = time.perf_counter()
        fn()
        warm[k] = time.perf_counter() - t0
    repeats = 1 if warm["official"] > SLOW_S else REPEATS
    t = paired_times(fns, repeats, warmup=0)
    o, m = t["official"], t["ours"]
    ratio = o["seconds"] / m["seconds"]
    h, w, D = c["code_shape"]
    base = {"config": name, "batch": batch, "codes": f"{h}x{w}x{D}", "codebook_size": c["codebook_size"],
            "dim": c["dim"], "heads": c["heads"], "spatial_layers": c["spatial_layers"],
            "depth_layers": c["depth_layers"], "num_classes": c["num_classes"], "threads": torch.get_num_threads(),
            "repeats": repeats, "official_warmup_seconds": rnd(warm["official"])}
    if repeats < REPEATS:
        base["note"] = f"one official run took {warm['official']:.0f} s > {SLOW_S:.0f} s: 1 timed round, not a median"
    rec = {"figure": "official_sampling", **base, "official_seconds": rnd(o["seconds"]),
           "ours_seconds": rnd(m["seconds"]), "ratio": rnd(ratio, 3), "official_runs": o["runs"],
           "ours_runs": m["runs"], "official_cpu_seconds": o["cpu_seconds"], "ours_cpu_seconds": m["cpu_seconds"],
           "ours_sampling_threads": threads_used(batch, True), "official_images_per_s": rnd(batch / o["seconds"]),
           "ours_images_per_s": rnd(batch / m["seconds"]), "ours_params": sum(p.numel() for p in ours.parameters()),
           "official_source": SOURCE, **parity}
    out = [emit(with_goal(rec, f">= {goal:g}x the official sampler" if goal else None,
                          ratio >= goal if goal else None))]
    fig = {"figure": "official_sampling_default_cpu_weights", **base, "weights": weights}
    if fast is None:
        out.append(emit({**fig, "skipped": f"no {weights} kernels on this CPU"}))
    else:
        f, fast_goal = t["fast"], FAST_GOALS.get((name, batch))
        ratio = o["seconds"] / f["seconds"]
        out.append(emit(with_goal({**fig, "seconds": rnd(f["seconds"]), "official_seconds": rnd(o["seconds"]),
                                   "ratio": rnd(ratio, 3), "speedup_vs_float32": rnd(m["seconds"] / f["seconds"], 3),
                                   "runs": f["runs"], "cpu_seconds": f["cpu_seconds"]},
                                  f">= {fast_goal:g}x the official sampler" if fast_goal else None,
                                  ratio >= fast_goal if fast_goal else None)))
    return out


def tree_of(tree) -> str | None:
    return tree or os.environ.get(ENV) or None


def figures(quick: bool = False, tree: str | None = None) -> list[dict]:
    tree = tree_of(tree)
    reason = None if tree else f"no official source tree: pass --official DIR or set {ENV}"
    if not reason and not Path(tree).is_dir():
        reason = "the official source tree given is not a folder"
    if not reason:
        try:
            import easydict  # noqa: F401  (the official config loader's imports)
            import omegaconf  # noqa: F401
        except ImportError as e:
            reason = f"{e.name} is not installed (bench/requirements.txt)"
    if reason:
        emit({"figure": "official", "skipped": reason})
        return []
    out = []
    with tempfile.TemporaryDirectory(prefix="official-bench-") as tmp:
        try:
            off = import_official(Path(tree), Path(tmp))
        except (ValueError, ImportError) as e:
            emit({"figure": "official", "skipped": f"cannot import the official code: {e}"})
            return []
        for name, (extra, bs, goals) in CONFIGS.items():
            c = {**sizes(quick), **(QUICK_EXTRA[name] if quick else extra)}
            bs = (1, 2) if quick else bs
            stage1, stage2, ours = build_pair(off, c)
            parity = greedy_check(stage1, stage2, ours, c, batch=min(4, bs[-1]) if name == "reference" else 1)
            fast = default_weights(ours)
            for b, goal in zip(bs, goals):
                out += measure(name, c, b, goal, stage1, stage2, ours, fast, parity)
            del stage1, stage2, ours, fast
    return out


def main(argv=None):
    def extra(p):
        p.add_argument("--official", default=None, help=f"the official source tree (default: ${ENV})")
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    if not tree_of(args.official):
        return figures(args.quick, None)  # one "skipped" line
    return run_main(lambda quick: figures(quick, args.official), args)


if __name__ == "__main__":
    main()
