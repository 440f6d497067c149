"""Evaluate a saved pipeline on held-out images; prints one JSON object and writes a report.

    python -m evaluation.evaluate --weights weights/emoji-64 --data_dir data/emoji/test \\
        --train_dir data/emoji/train --out runs/eval

Measures: reconstruction PSNR at each depth 1..D and codebook usage on the test images; stage-2 test
negative log-likelihood and perplexity per depth; class consistency of class-conditional samples,
judged by a small CNN classifier trained here on --train_dir (its accuracy on the real test images
is printed beside it, as the ceiling the samples can be compared with).

Captioned folders (a metadata.jsonl with a `category` column: emoji drawn in styles, the styles being the
model's classes and the names its prompts) are evaluated as in evaluation/text.py: per-style PSNR, NLL
given the test prompts, retrieval of held-out (emoji, style) pairs and category consistency of samples.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn as nn
from torchvision.utils import save_image
from tqdm.auto import tqdm

from pipelines import EXACT_CPU, RQPipeline
from rqtransformer.losses import per_depth_nll

from training.cli import non_negative_int, positive_int, run_cli
from training.data import has_captions, image_folder
from training.reconstruction import depth_report, psnr_per_image

# the measures evaluation.text shares live in evaluation.common, so imports run one way
from .common import accuracy, fit_classifier, judge, nll_report
from .text import evaluate_captioned


def train_classifier(train_dir: str, classes: list[str], resolution: int, steps: int, seed: int = 0):
    ds = image_folder(train_dir, resolution, hflip=True)
    if ds.classes != classes:
        raise ValueError(f"{train_dir} has classes {ds.classes}, the model was trained on {classes}")
    return fit_classifier(ds, len(classes), steps, seed)


def per_class_accuracy(classifier: nn.Module, images, labels, names: list[str]) -> dict[str, float]:
    return {name: round(accuracy(classifier, images[labels == c], labels[labels == c]), 3)
            for c, name in enumerate(names) if bool((labels == c).any())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a saved RQPipeline folder")
    p.add_argument("--data_dir", required=True,
                   help="held-out ImageFolder (same class folders as training), or a captioned test split")
    p.add_argument("--train_dir", default=None, help="training split: the judge classifier is trained on it")
    p.add_argument("--out", default=None, help="folder for report.json, report.md and sample grids")
    p.add_argument("--classifier", default=None,
                   help="safetensors file: the judge classifier is loaded from it if it exists, else trained and saved")
    p.add_argument("--classifier_steps", type=positive_int, default=1500)
    p.add_argument("--samples_per_class", type=positive_int, default=32)
    p.add_argument("--guidance_scale", type=float, default=None, help="default: the pipeline's")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    c = p.add_argument_group("captioned test splits (a metadata.jsonl with a category column)")
    c.add_argument("--max_pairs", type=positive_int, default=None,
                   help="held-out (emoji, style) pairs sampled, spread over all (default: all)")
    c.add_argument("--max_heldout_emoji", type=positive_int, default=None,
                   help="test images of held-out emoji sampled, spread over all (default: all)")
    c.add_argument("--trained_pairs", type=non_negative_int, default=320,
                   help="(emoji, style) pairs of --train_dir sampled by name, the same share from each category "
                        "(0: none)")
    return p.parse_args(argv)


def evaluate_classes(args, pipe: RQPipeline) -> dict:
    """The metrics of a class-conditional (or unconditional) model on an ImageFolder."""
    vae, tf = pipe.rqvae, pipe.transformer
    test = image_folder(args.data_dir, vae.config.resolution)
    images = torch.stack([test[i][0] for i in range(len(test))])  # [N,3,R,R]
    labels = torch.tensor(test.targets)
    report: dict = {"weights": str(args.weights), "test_images": len(test)}
    psnrs, codes = psnr_per_image(vae, images, desc="reconstruction")  # [N,D], [N,h,w,D]: each image once
    report.update(depth_report(psnrs, codes, vae.config.codebook_size))  # psnr_depth1..D, codebook_usage

    conditional = tf.config.num_classes > 0
    if conditional and test.classes != pipe.class_names:
        raise ValueError(f"{args.data_dir} has classes {test.classes}, the model knows {pipe.class_names}")
    nll = per_depth_nll(tf, codes, labels if conditional else torch.full_like(labels, tf.null_class))
    report.update(nll_report(nll))

    if conditional and args.train_dir:
        resolution = vae.config.resolution
        classifier = judge(args, len(pipe.class_names), lambda: train_classifier(
            args.train_dir, pipe.class_names, resolution, args.classifier_steps, args.seed))
        report["classifier_test_accuracy"] = accuracy(classifier, images, labels)
        report["classifier_test_accuracy_per_class"] = per_class_accuracy(classifier, images, labels,
                                                                          pipe.class_names)
        report["classifier_accuracy_on_reconstructions"] = accuracy(
            classifier, torch.cat([vae.decode(c) for c in codes.split(64)]), labels)
        g = torch.Generator().manual_seed(args.seed)
        samples, sample_labels = [], []
        for c in tqdm(range(tf.config.num_classes), desc="sampling"):
            for n in range(0, args.samples_per_class, pipe.max_images):
                k = min(pipe.max_images, args.samples_per_class - n)
                out = pipe(c, num_images=k, guidance_scale=args.guidance_scale, temperature=args.temperature,
                           top_k=args.top_k, generator=g, output_type="pt")
                samples.append(out.images * 2 - 1)
                sample_labels += [c] * k
        samples, sample_labels = torch.cat(samples), torch.tensor(sample_labels)
        report["sample_class_consistency"] = accuracy(classifier, samples, sample_labels)
        report["sample_class_consistency_per_class"] = per_class_accuracy(classifier, samples, sample_labels,
                                                                          pipe.class_names)
        report["guidance_scale"] = pipe.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            save_image(samples * 0.5 + 0.5, Path(args.out) / "samples.png", nrow=args.samples_per_class)
    return report


def rounded(value):
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def write_report(report: dict, out: Path) -> None:
    """report.json, and report.md: a table of the scalar figures, then one table per dict of dicts
    (e.g. per style: one row each)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v} |" for k, v in report.items() if not isinstance(v, dict))
    md = f"| metric | value |\n|---|---|\n{rows}\n"
    for key, table in report.items():
        if isinstance(table, dict) and table and all(isinstance(v, dict) for v in table.values()):
            cols = list(dict.fromkeys(c for v in table.values() for c in v))
            md += f"\n| {key} | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
            md += "".join(f"| {name} | " + " | ".join(str(v.get(c, "")) for c in cols) + " |\n"
                          for name, v in table.items())
    (out / "report.md").write_text(md)


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    # the model itself, not the CPU's faster rounded paths
    pipe = RQPipeline.from_pretrained(args.weights, device="cpu", **EXACT_CPU)
    if has_captions(args.data_dir):
        report = evaluate_captioned(args, pipe)
    else:
        report = evaluate_classes(args, pipe)
    report["seconds"] = round(time.time() - start, 1)
    report = rounded(report)
    print(json.dumps(report))
    if args.out:
        write_report(report, Path(args.out))
    return report


if __name__ == "__main__":
    run_cli(main)
