"""The trained-pairs section of the captioned evaluation (evaluation.text's judge_samples calls it with
--train_dir): what a visitor who types a name the model was trained on sees.

A fixed sample of --trained_pairs (emoji, style) pairs of the training split, the same share from each category
(spread over its rows, so over its styles and emoji too), is sampled by name in that style (SAMPLES each).
Reported overall and per category: the rank of the real image among every real image of that style (train +
test) to the samples' mean judge feature: top-1, top-10 and the median; beside it, as references, the ranks of
the RQ-VAE's reconstruction of the real image (the ceiling stage 1 allows; also from its first 1..D-1 codes
alone, top-10 only) and of the same emoji's real images in its other styles; and the teacher-forced NLL of the
pairs with the name (per depth and mean) and with the empty prompt (their difference: the prompt's
information, nats per code). --out also gets trained_pairs.png (real image, then its
samples) and trained_pairs.json (each pair's name, style, category and ranks: the app's examples are chosen
from it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rqtransformer.losses import per_image_nll

from training.captions import spread
from .common import judged, retrieval_ranks, sample, sample_query, save_rows

TOP = (1, 10)  # retrieval within the top-1 and the top-10


def trained_pairs(categories: list[str], count: int) -> list[int]:
    """A fixed sample of at most `count` rows, the same share (ceil(count / categories)) from each category,
    spread over that category's rows in folder order; sorted."""
    rows_of: dict[str, list[int]] = {}
    for i, c in enumerate(categories):
        rows_of.setdefault(c, []).append(i)
    share = math.ceil(count / max(len(rows_of), 1))
    return sorted(i for rows in rows_of.values() for i in spread(rows, share))


def rank_figures(ranks: torch.Tensor, prefix: str) -> dict:
    """ranks [P] (1 = nearest) -> {<prefix>top1, <prefix>top10, <prefix>median_rank}; None for no pairs."""
    out = {f"{prefix}top{k}": float((ranks <= k).float().mean()) if len(ranks) else None for k in TOP}
    out[f"{prefix}median_rank"] = float(ranks.float().median()) if len(ranks) else None
    return out


def other_style_queries(names: list[str], styles: torch.Tensor, rows: list[int], feats: torch.Tensor):
    """For each trained pair, the unit mean judge feature of its emoji's training images in its other styles
    (rows with the same name and another style); (queries [Q,F], the pairs' indices k that have one [Q])."""
    rows_of: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows_of.setdefault(name, []).append(i)
    known, query = [], []
    for k, i in enumerate(rows):
        others = [j for j in rows_of[names[i]] if styles[j] != styles[i]]
        if others:
            known.append(k)
            query.append(feats[others].mean(0))
    if not query:
        return torch.zeros(0, feats.shape[1]), []
    return F.normalize(torch.stack(query), dim=1), known


@torch.no_grad()
def evaluate_trained(args, pipe, classifier, train, gallery: torch.Tensor, gallery_styles: torch.Tensor,
                     generator: torch.Generator) -> dict:
    """The trained-pairs figures (see the module's docstring). train: evaluation.text's Split of --train_dir;
    gallery [M,F] the unit judge features of every real image, train rows first; gallery_styles [M]."""
    vae, tf = pipe.rqvae, pipe.transformer
    rows = trained_pairs(train.categories, args.trained_pairs)
    images = torch.stack([train.ds[i][0] for i in rows])  # [P,3,R,R]
    codes = torch.cat([vae.encode(x) for x in images.split(128)])  # [P,h,w,D]
    styles, targets = train.styles[rows], torch.tensor(rows, dtype=torch.long)  # the real images' gallery rows

    samples = sample(pipe, [(train.names[i], int(train.styles[i])) for i in rows], args, generator,
                     "trained pairs")
    query = sample_query(judged(classifier, samples)[0], len(rows))
    ranks = retrieval_ranks(query, gallery, gallery_styles, styles, targets)
    D = codes.shape[-1]
    depth_ranks = []  # the reconstruction from the first d codes, d = 1..D: how much of the stack identity needs
    for d in range(1, D + 1):
        recon = torch.cat([vae.decode(c, depth=d).float().cpu() for c in codes.split(128)])
        depth_ranks.append(retrieval_ranks(judged(classifier, recon)[0], gallery, gallery_styles, styles, targets))
    recon_ranks = depth_ranks[-1]
    query, known = other_style_queries(train.names, train.styles, rows, gallery[:len(train.names)])
    other_ranks = retrieval_ranks(query, gallery, gallery_styles, styles[known], targets[known])

    text = tf.tokenizer.encode([train.names[i] for i in rows], tf.config.max_text_len)[0]  # [P,L]
    nll_depths = per_image_nll(tf, codes, styles, text_tokens=text)  # [P,D]
    nll, empty = nll_depths.mean(1), per_image_nll(tf, codes, styles, text_tokens=None).mean(1)  # [P]

    def figures(m: torch.Tensor) -> dict:  # m: a boolean mask over the pairs
        out = {"pairs": int(m.sum()), **rank_figures(ranks[m], ""),
               **rank_figures(recon_ranks[m], "reconstruction_"), **rank_figures(other_ranks[m[known]], "other_styles_")}
        out["top10_share_of_reconstruction"] = (out["top10"] / out["reconstruction_top10"]
                                                if out["reconstruction_top10"] else None)
        return out

    report = {f"trained_pairs_{k}" if k != "pairs" else "trained_pairs": v
              for k, v in figures(torch.ones(len(rows), dtype=torch.bool)).items()}
    report.update({f"trained_pairs_reconstruction_depth{d + 1}_top{TOP[-1]}": float((r <= TOP[-1]).float().mean())
                   for d, r in enumerate(depth_ranks[:-1])})
    report.update({f"trained_pairs_nll_depth{d + 1}": float(v) for d, v in enumerate(nll_depths.mean(0))})
    report.update({"trained_pairs_nll_mean": float(nll.mean()),
                   "trained_pairs_prompt_information": float((empty - nll).mean())})
    category = [train.categories[i] for i in rows]
    report["trained_pairs_per_category"] = {
        c: figures(torch.tensor([x == c for x in category])) for c in sorted(set(category))}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_rows(images, samples, list(range(len(rows))), out / "trained_pairs.png")
        listed = [{"text": train.names[i], "style": pipe.class_names[int(train.styles[i])], "category": category[k],
                   "file_name": str(Path(train.ds.samples[i][0]).relative_to(train.ds.root)), "rank": int(ranks[k]),
                   "reconstruction_rank": int(recon_ranks[k])} for k, i in enumerate(rows)]
        (out / "trained_pairs.json").write_text(json.dumps(listed, indent=1) + "\n")
    return report
