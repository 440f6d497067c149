"""Make the README pictures from a saved pipeline.

    python -m evaluation.figures --weights weights/emoji-64 --data_dir data/emoji/test --out docs

Writes samples.png (one row per class; for a text model one row per prompt, one column per class),
depths.png (test images, then their reconstruction at depth 1..D, one column each) and completion.png
(image, masked region, completions).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.utils import save_image

from pipelines import EXACT_CPU, RQPipeline

from training.cli import positive_int, run_cli
from training.data import any_image_folder


def upscale(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour upscaling so that 64 px images stay crisp on a web page."""
    return x.repeat_interleave(factor, -1).repeat_interleave(factor, -2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="weights/emoji-64")
    p.add_argument("--data_dir", required=True, help="ImageFolder to take reconstruction/completion inputs from")
    p.add_argument("--out", default="docs")
    p.add_argument("--per_class", type=positive_int, default=8)
    p.add_argument("--prompts", default=None,
                   help="text models: comma-separated prompts, one row each (default: the first 8 example prompts)")
    p.add_argument("--scale", type=positive_int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pipe = RQPipeline.from_pretrained(args.weights, device="cpu", **EXACT_CPU)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)

    classes = list(range(max(1, pipe.transformer.config.num_classes)))
    if pipe.has_text:  # a row per prompt, a column per class (or per_class columns without classes)
        prompts = [p.strip() for p in args.prompts.split(",")] if args.prompts else pipe.prompts[:8]
        labels = classes if pipe.class_names else None
        rows = [pipe(labels, prompt=p, num_images=None if labels else args.per_class, generator=g,
                     output_type="pt").images for p in prompts]
        nrow = len(classes) if labels else args.per_class
    else:
        rows = [pipe(c, num_images=args.per_class, generator=g, output_type="pt").images for c in classes]
        nrow = args.per_class
    save_image(upscale(torch.cat(rows), args.scale), out / "samples.png", nrow=nrow, padding=4, pad_value=1)

    ds = any_image_folder(args.data_dir, pipe.resolution, check=False)
    picks = torch.linspace(0, len(ds) - 1, 6).long().tolist()
    originals = torch.stack([ds[i][0] for i in picks])  # [6,3,R,R] in [-1,1]
    codes = pipe.rqvae.encode(originals)
    D = pipe.rqvae.config.code_depth
    columns = [originals] + [pipe.rqvae.decode(codes, depth=k) for k in range(1, D + 1)]
    grid = torch.stack(columns, 1).flatten(0, 1) * 0.5 + 0.5  # rows: one image, columns: input, depth 1..D
    save_image(upscale(grid, args.scale), out / "depths.png", nrow=D + 1, padding=4, pad_value=1)

    image = originals[:1]
    mask = torch.zeros(1, pipe.resolution, pipe.resolution)
    half = pipe.resolution // 2
    mask[:, half:, :] = 1  # regenerate the bottom half
    label = ds.targets[picks[0]] if pipe.transformer.config.num_classes else None
    prompt = ds.captions[picks[0]] if pipe.has_text and hasattr(ds, "captions") else None
    done = pipe.complete(image, mask, class_labels=label, prompt=prompt, num_images=4, generator=g,
                         output_type="pt").images
    shown = (image * 0.5 + 0.5).clone()
    masked = shown.clone()
    masked[:, :, half:, :] = 0.5
    save_image(upscale(torch.cat([shown, masked, done]), args.scale), out / "completion.png", nrow=6, padding=4,
               pad_value=1)
    print(f"wrote {out / 'samples.png'}, {out / 'depths.png'}, {out / 'completion.png'}")


if __name__ == "__main__":
    run_cli(main)
