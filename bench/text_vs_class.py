"""Does a prompt condition as well as a class label? A paired toy: the same 16-px images of four colours,
once as class folders (class = the colour) and once as captions ("a red circle"), the same tiny RQ-VAE, and
stage 2 trained through the real entry point for the same steps; then 16 samples per colour at guidance 1
and 3, scored by their dominant colour. Variants: the class path, the plain text path (the prompt is
an attention prefix), and the text path with --text_pool (the prompt's pooled embedding also joins the
start token, as a class embedding does).

    python -m bench.text_vs_class [--seeds 3]     # seeds x 2 step counts x 3 variants
    python -m bench.text_vs_class --quick         # one seed, few steps: checks the script
"""
from __future__ import annotations

import contextlib
import io
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import emit, parse_args, run_main
from training.colour_toy import COLOURS, SHAPES, colour_image, colour_rqvae, dominant_colour

PER_COLOUR = 16  # samples per colour and setting


def caption(colour: str, shape: str, words: str) -> str:
    """The caption of an image: "a red circle" (full), or the class's information alone: "red" (colour)."""
    return f"a {colour} {shape}" if words == "full" else colour


def make_images(root: Path, words: str = "full", per_shape: int = 4, seed: int = 0) -> list[tuple[str, str, str]]:
    """16-px images: a shape in a darker shade of the colour's background -> [(file, colour, shape)]."""
    rng = np.random.default_rng(seed)
    items = []
    for colour, rgb in COLOURS.items():
        (root / "classes" / colour).mkdir(parents=True)
        for shape in SHAPES:
            for i in range(per_shape):
                name = f"{colour}-{shape}-{i}.png"
                Image.fromarray(colour_image(rgb, shape, rng)).save(root / "classes" / colour / name)
                items.append((f"{colour}/{name}", colour, shape))
    rows = [{"file_name": f, "text": caption(c, s, words)} for f, c, s in items]  # the same files, captioned
    (root / "classes" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return items


def train_vae(root: Path, steps: int, seed: int) -> Path:
    from training.data import image_folder

    ds = image_folder(root / "classes", 16)
    vae = colour_rqvae(torch.stack([ds[i][0] for i in range(len(ds))]), steps, seed)
    folder = root / f"vae-{seed}"
    vae.save_pretrained(folder)
    return folder


def train_stage2(root: Path, vae: Path, variant: str, steps: int, seed: int) -> Path:
    from training.train_rqtransformer import main

    out = root / f"{variant}-{steps}-{seed}"
    data = root / "classes"
    args = ["--rqvae", str(vae), "--output_dir", str(out), "--config", "tiny", "--train_batch_size", "16",
            "--max_train_steps", str(steps), "--learning_rate", "3e-3", "--lr_warmup_steps", "10",
            "--ema_decay", "0", "--report_to", "none", "--validation_steps", "100000", "--checkpointing_steps",
            "100000", "--seed", str(seed), "--mixed_precision", "no", "--samples_per_class", "1"]
    if variant == "class":  # class folders; captions ignored by stripping them to a copy without metadata
        plain = root / f"plain-{seed}"
        if not plain.exists():
            for f in data.rglob("*.png"):
                (plain / f.parent.name).mkdir(parents=True, exist_ok=True)
                (plain / f.parent.name / f.name).write_bytes(f.read_bytes())
        args += ["--data_dir", str(plain), "--cfg_dropout", "0.1"]
    else:
        args += ["--data_dir", str(data), "--unconditional", "--caption_dropout", "0.1", "--max_text_len", "8",
                 "--text_vocab_size", "300"] + (["--text_pool"] if variant == "text_pool" else [])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        main(args)
    return out


def accuracy(folder: Path, variant: str, guidance: float, seed: int, words: str) -> float:
    from pipelines import RQPipeline

    pipe = RQPipeline.from_pretrained(folder, device="cpu")
    pipe.max_images = 64
    names = list(COLOURS)
    target = torch.arange(len(names)).repeat_interleave(PER_COLOUR)
    kw = dict(guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="pt")
    if variant == "class":
        images = pipe([names[i] for i in target.tolist()], **kw).images
    else:  # the training captions of that colour, half of each shape
        images = pipe(prompt=[caption(names[i], SHAPES[k % 2], words) for k, i in enumerate(target.tolist())],
                      **kw).images
    return (dominant_colour(images) == target).float().mean().item()


def figures(quick: bool, seeds: int = 3, words: str = "full") -> list[dict]:
    torch.set_num_threads(1)
    seeds, steps = ((0,), (40,)) if quick else (tuple(range(seeds)), (150, 300))
    out, table = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_images(root, words)
        for seed in seeds:
            vae = train_vae(root, 60 if quick else 600, seed)
            for n in steps:
                for variant in ("class", "text", "text_pool"):
                    folder = train_stage2(root, vae, variant, n, seed)
                    for g in (1.0, 3.0):
                        acc = accuracy(folder, variant, g, seed, words)
                        table.setdefault((variant, n, g), []).append(acc)
                        out.append(emit({"figure": "text_vs_class", "captions": words, "variant": variant,
                                         "steps": n, "guidance": g,
                                         "seed": seed, "accuracy": round(acc, 4)}))
    for (variant, n, g), accs in sorted(table.items()):
        out.append(emit({"figure": "text_vs_class_mean", "captions": words, "variant": variant, "steps": n,
                         "guidance": g,
                         "seeds": len(accs), "accuracy": round(statistics.mean(accs), 4),
                         "min": round(min(accs), 4), "max": round(max(accs), 4)}))
    return out


def main(argv=None) -> list[dict]:
    def extra(p):
        p.add_argument("--seeds", type=int, default=3)
        p.add_argument("--captions", choices=["full", "colour"], default="full",
                       help='"a red circle", or the colour alone (the class\'s information, no more)')
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    return run_main(lambda quick: figures(quick, args.seeds, args.captions), args)


if __name__ == "__main__":
    main()
