"""Evaluation of a text+class model on captioned style folders, run by evaluation.evaluate when --data_dir has
a metadata.jsonl:

    <root>/{train,test}/<style>/<file>.png, and per split a metadata.jsonl: file_name, text (the emoji's name:
    the prompt), category, and on test rows heldout: "emoji" (the emoji is in no style in training) or
    "pair" (this (emoji, style) pair is held out; the emoji is trained in its other styles).

The styles are the model's classes. Reported: reconstruction PSNR per depth (overall and per style) and
codebook usage; test NLL per depth given each image's prompt and style, and per held-out kind the prompt's
information (NLL with the empty prompt minus NLL with the name, nats per code); a judge CNN trained on the train
split to tell the category (its accuracy on the real test images); held-out pairs: SAMPLES samples of
(name, style) each, retrieved when the real image is among the TOP_K nearest of all real images of that
style (train + test) to the samples' mean feature (cosine, the judge's penultimate features; goal >= 50 %),
and for reference the same retrieval of the RQ-VAE's reconstructions of the real images (the ceiling stage 1
allows) and of the emoji's real images in its other styles (knowing the emoji, not the style's drawing);
category consistency of the pair samples and of held-out emoji samples, and its ratio to the judge's
accuracy on real test images (goal >= 0.9); trained (emoji, style) pairs sampled by name, ranked as the
held-out pairs, with references and NLL (evaluation/trained.py); sampling seconds per image at batch 4 on this CPU.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipelines import RQPipeline
from rqcore.images import image_transform
from rqcore.machine import cpu_model
from rqtransformer.losses import per_image_nll

from training.captions import spread
from training.data import METADATA, CaptionedImageFolder, captioned_image_folder, has_captions, metadata_rows
from training.reconstruction import depth_report, psnr_per_image

from .common import (SAMPLES, accuracy, fit_classifier, judge, judged, nll_report,  # noqa: F401
                     retrieval_ranks, sample, sample_query, save_rows)
from .trained import evaluate_trained

TOP_K = 10  # a pair is retrieved when its real image is among this many nearest real images of its style
TIMED_BATCH, TIMED_CALLS = 4, 3  # the app's default batch; the median of 3 calls after a warm-up
HELDOUT = ("emoji", "pair")


@dataclass
class Split:
    """The distinct images of a captioned split, with their columns; styles as the model's class indices."""
    ds: CaptionedImageFolder
    styles: torch.Tensor  # [N]
    names: list[str]
    categories: list[str]
    heldout: list[str | None]

    def held_out(self, kind: str) -> list[int]:
        """Indices of the images held out as `kind` ("emoji" or "pair")."""
        return [i for i, h in enumerate(self.heldout) if h == kind]


class _Labeled(Dataset):
    """(image, label) items: a folder's images with other labels (the judge learns categories, not styles)."""

    def __init__(self, ds, labels: list[int]):
        self.ds, self.labels = ds, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.ds[i][0], self.labels[i]


def read_columns(meta: Path) -> dict[str, tuple[str, str | None]]:
    """metadata.jsonl (rows already checked by captioned_image_folder) -> {file_name (normalised): (category,
    heldout)} of each image's first row; a missing or bad category or heldout value is one ValueError line."""
    columns = {}
    for n, row in metadata_rows(meta):
        category, heldout = row.get("category"), row.get("heldout")
        if "category" not in row:
            raise ValueError(f"{meta} line {n}: column 'category' is missing (columns: {', '.join(row)}); a captioned "
                             f"test split is evaluated by each emoji's category")
        if not isinstance(category, str) or not category.strip():
            raise ValueError(f"{meta} line {n}: category must be a non-empty string, got {json.dumps(category)[:60]}")
        if heldout not in (None, *HELDOUT):
            raise ValueError(f"{meta} line {n}: heldout must be \"emoji\", \"pair\" or absent, "
                             f"got {json.dumps(heldout)[:60]}")
        columns.setdefault(os.path.normpath(row["file_name"]), (category, heldout))
    return columns


def load_split(folder: str, resolution: int, pipe: RQPipeline) -> Split:
    ds = captioned_image_folder(folder, resolution).images()[0]  # each file once, with its first caption
    if not ds.classes:
        raise ValueError(f"{folder}: expected style sub-folders <style>/<image> (the model's classes "
                         f"{pipe.class_names}), found images at the root only")
    unknown = [c for c in ds.classes if c not in pipe.class_names]
    if unknown:
        raise ValueError(f"{folder} has styles {unknown} the model does not know (its classes: {pipe.class_names})")
    columns = read_columns(Path(folder) / METADATA)
    rows = [columns[os.path.normpath(os.path.relpath(path, ds.root))] for path, _ in ds.samples]
    styles = torch.tensor([pipe.class_names.index(ds.classes[t]) for t in ds.targets])
    return Split(ds, styles, list(ds.captions), [c for c, _ in rows], [h for _, h in rows])


@torch.no_grad()
def folder_features(classifier, ds) -> torch.Tensor:
    loader = DataLoader(ds, batch_size=128, num_workers=1)
    return torch.cat([judged(classifier, x)[0] for x, *_ in tqdm(loader, desc="judge features")])


def seconds_per_image(pipe: RQPipeline, prompt: str, style: int, args) -> tuple[float, int]:
    """Median seconds per image of TIMED_CALLS calls at the app's batch (after a warm-up call), and the batch."""
    batch = min(TIMED_BATCH, pipe.max_images)

    def call():  # PIL images out, as the app asks for them
        pipe(style, prompt=prompt, num_images=batch, guidance_scale=args.guidance_scale,
             temperature=args.temperature, top_k=args.top_k, generator=torch.Generator().manual_seed(args.seed))

    call()
    times = []
    for _ in tqdm(range(TIMED_CALLS), desc="timing"):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch, batch


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def mean(x: torch.Tensor) -> float | None:
    return float(x.float().mean()) if x.numel() else None


def evaluate_captioned(args, pipe: RQPipeline) -> dict:
    """evaluation.evaluate's report for a captioned --data_dir (and --train_dir): see the module's docstring."""
    vae, tf = pipe.rqvae, pipe.transformer
    if not (pipe.has_text and tf.config.num_classes > 0):
        has = "no text conditioning" if not pipe.has_text else "no style classes"
        raise ValueError(f"--data_dir {args.data_dir} is captioned ({METADATA}): its evaluation needs a model with "
                         f"prompts and style classes, {args.weights} has {has}")
    R, names = vae.config.resolution, pipe.class_names
    test, train = load_split(args.data_dir, R, pipe), None
    if args.train_dir:  # checked in full before anything is measured
        if not has_captions(args.train_dir):
            raise ValueError(f"--train_dir {args.train_dir} has no {METADATA}: with a captioned --data_dir it must "
                             f"be the captioned train split")
        train = load_split(args.train_dir, R, pipe)
        if any(train.heldout):
            raise ValueError(f"--train_dir {args.train_dir} has held-out rows (a heldout column): pass the train "
                             f"split there and the test split as --data_dir")
    images = torch.stack([test.ds[i][0] for i in range(len(test.ds))])  # [N,3,R,R]
    report: dict = {"weights": str(args.weights), "test_images": len(images)}
    psnrs, codes = psnr_per_image(vae, images, desc="reconstruction")  # [N,D], [N,h,w,D]: each image once
    K = vae.config.codebook_size
    report.update(depth_report(psnrs, codes, K))  # psnr_depth1..D, codebook_usage
    per_style = {}
    for s in test.styles.unique().tolist():
        m = test.styles == s
        per_style[names[s]] = {"test_images": int(m.sum()), **depth_report(psnrs[m], codes[m], K)}

    # NLL given each test image's prompt and style (as training's validation loss on captioned data), per
    # image: the means by held-out kind come from the same pass
    text = tf.tokenizer.encode(test.names, tf.config.max_text_len)[0]  # [N,L]
    nll = per_image_nll(tf, codes, test.styles, text_tokens=text)  # [N,D]
    report.update(nll_report(nll.mean(0)))
    kinds = {kind: m for kind in HELDOUT if (m := test.held_out(kind))}
    if kinds:  # nats per code the prompt is worth: the same codes and styles with the empty prompt
        rows = sorted(i for m in kinds.values() for i in m)
        empty = torch.zeros_like(nll)
        empty[rows] = per_image_nll(tf, codes[rows], test.styles[rows], text_tokens=None)
        for kind, m in kinds.items():
            report[f"nll_mean_heldout_{kind}"] = float(nll[m].mean())
            report[f"prompt_information_heldout_{kind}"] = float(empty[m].mean() - nll[m].mean())

    if train is not None:
        report.update(judge_samples(args, pipe, test, train, images, codes, per_style))
    report["per_style"] = per_style
    return report


@torch.no_grad()
def retrieval_references(vae, classifier, test: Split, train: Split, codes, pairs, targets, gallery,
                         gallery_styles) -> dict:
    """Pair retrieval of queries that are not samples, to read the samples' figure against:
    - reconstruction: the RQ-VAE's reconstruction of the real held-out image (what a stage 2 that drew that
      image's own codes would score: the ceiling this stage 1 allows);
    - other_styles: the mean feature of the same emoji's real training images in its other styles (what a
      model that knows the emoji but not how this style draws it would score).
    codes [N,h,w,D]: the test images' codes; pairs [P]: the held-out pairs' test rows, targets [P] their gallery rows."""
    if not pairs:
        return {}
    styles = gallery_styles[targets]  # [P]
    recon = torch.cat([vae.decode(c).float().cpu() for c in codes[pairs].split(128)])
    report = {f"pair_retrieval_top{TOP_K}_reconstruction":
              mean(retrieval_ranks(judged(classifier, recon)[0], gallery, gallery_styles, styles, targets) <= TOP_K)}
    rows_of = {}
    for i, name in enumerate(train.names):
        rows_of.setdefault(name, []).append(i)
    known = [k for k, i in enumerate(pairs) if test.names[i] in rows_of]  # pairs whose emoji is in training
    if known:
        query = torch.stack([gallery[rows_of[test.names[pairs[k]]]].mean(0) for k in known])  # train rows lead
        ranks = retrieval_ranks(F.normalize(query, dim=1), gallery, gallery_styles, styles[known], targets[known])
        report[f"pair_retrieval_top{TOP_K}_other_styles"] = mean(ranks <= TOP_K)
    return report


def judge_samples(args, pipe: RQPipeline, test: Split, train: Split, images: torch.Tensor, codes: torch.Tensor,
                  per_style: dict) -> dict:
    """The judge's figures: its accuracy on real test images, held-out pair retrieval, category
    consistency of samples, and the sampling time. codes [N,h,w,D]: the test images' codes."""
    names, R = pipe.class_names, pipe.resolution
    categories = sorted(set(train.categories))
    index = {c: i for i, c in enumerate(categories)}
    flipped = copy.copy(train.ds)
    flipped.transform = image_transform(R, hflip=True)
    classifier = judge(args, len(categories), lambda: fit_classifier(
        _Labeled(flipped, [index[c] for c in train.categories]), len(categories), args.classifier_steps, args.seed))
    test_cats = torch.tensor([index.get(c, -1) for c in test.categories])  # -1: a category no train image has
    report: dict = {"train_images": len(train.ds), "judge_categories": len(categories),
                    "judge_test_accuracy": accuracy(classifier, images, test_cats)}
    for kind in HELDOUT:
        if m := test.held_out(kind):
            report[f"judge_accuracy_heldout_{kind}"] = accuracy(classifier, images[m], test_cats[m])

    # every real image of every style (train, then test): the retrieval gallery
    test_feats = judged(classifier, images)[0]
    gallery = torch.cat([folder_features(classifier, train.ds), test_feats])  # [M,F]
    gallery_styles = torch.cat([train.styles, test.styles])  # [M]
    g = torch.Generator().manual_seed(args.seed)

    def held_out_samples(kind: str, limit: int | None, desc: str):
        """(the test images of `kind`, up to `limit` spread over all; their samples; the samples' judge
        features; whether each sample's category is its emoji's [rows, SAMPLES])."""
        rows = test.held_out(kind)
        rows = spread(rows, limit) if limit else rows
        samples = sample(pipe, [(test.names[i], int(test.styles[i])) for i in rows], args, g, desc)
        feats, preds = judged(classifier, samples)
        right = (preds == test_cats[rows].repeat_interleave(SAMPLES)).view(len(rows), SAMPLES)
        return rows, samples, feats, right

    pairs, samples, feats, right = held_out_samples("pair", args.max_pairs, "pair samples")
    styles = test.styles[pairs]  # [P]
    targets = len(train.ds) + torch.tensor(pairs, dtype=torch.long)  # the real images' gallery rows [P]
    query = sample_query(feats, len(pairs))  # [P,F]
    ranks = retrieval_ranks(query, gallery, gallery_styles, styles, targets)
    hits = ranks <= TOP_K
    report.update({"pairs": len(pairs), f"pair_retrieval_top{TOP_K}": mean(hits),
                   "pair_median_rank": float(ranks.float().median()) if len(pairs) else None,
                   "pair_category_consistency": mean(right)})
    report.update(retrieval_references(pipe.rqvae, classifier, test, train, codes, pairs, targets, gallery,
                                       gallery_styles))
    report["pair_category_consistency_ratio"] = ratio(report["pair_category_consistency"],
                                                      report["judge_test_accuracy"])

    if args.trained_pairs:  # what a visitor typing a trained name sees: evaluation/trained.py
        report.update(evaluate_trained(args, pipe, classifier, train, gallery, gallery_styles, g))
    emoji, emoji_samples, _, emoji_right = held_out_samples("emoji", args.max_heldout_emoji, "held-out emoji")
    report.update({"heldout_emoji": len(emoji), "heldout_emoji_category_consistency": mean(emoji_right)})
    report["heldout_emoji_category_consistency_ratio"] = ratio(report["heldout_emoji_category_consistency"],
                                                               report["judge_test_accuracy"])
    for s, name in enumerate(names):
        if name in per_style:
            p, e = styles == s, test.styles[emoji] == s
            per_style[name].update({"pairs": int(p.sum()), f"pair_retrieval_top{TOP_K}": mean(hits[p]),
                                    "pair_category_consistency": mean(right[p]), "heldout_emoji": int(e.sum()),
                                    "heldout_emoji_category_consistency": mean(emoji_right[e])})
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_rows(images, samples, pairs, Path(args.out) / "pairs.png")
        save_rows(images, emoji_samples, emoji, Path(args.out) / "heldout_emoji.png")

    seconds, batch = seconds_per_image(pipe, test.names[0], int(test.styles[0]), args)
    report.update({"samples_per_prompt": SAMPLES, "guidance_scale": pipe.default_guidance_scale
                   if args.guidance_scale is None else args.guidance_scale,
                   "sampling_seconds_per_image": seconds, "sampling_batch": batch, "cpu": cpu_model(),
                   "threads": torch.get_num_threads()})
    return report
