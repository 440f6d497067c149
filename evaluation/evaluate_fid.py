"""The paper's evaluation: FID (and IS for ImageNet) of a model's samples against the official statistics or a
folder of images, and rFID of a stage 1 on an image folder, with the Inception features the official
statistics were made with (evaluation.fid).

    python -m evaluation.evaluate_fid --weights DIR|official:NAME --num_samples 50000 --out DIR \
        (--ref STATS.npz | --ref official:NAME | --ref_dir IMAGES) [--inception_weights FILE]
    python -m evaluation.evaluate_fid --rqvae DIR|official:NAME --ref_dir IMAGES --out DIR      # rFID
    accelerate launch -m evaluation.evaluate_fid ...                                       # several GPUs

Samples are PNGs in OUT/samples/, batch j of --batch_size drawn with seed --seed + j (class i % C for sample
i of a class model), so a killed run continues where it stopped and never samples a batch twice; OUT/run.json
records the settings a resume must share. Batches are spread over the processes (batch j on rank
j % world size), and so are the Inception features. The result: OUT/metrics.json and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import fid

RUN_NAME = "run.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--weights", help="a pipeline folder, or official:NAME (a paper release, fetched once)")
    what.add_argument("--rqvae", help="rFID: an RQ-VAE or pipeline folder, or official:NAME (its stage 1)")
    ref = p.add_mutually_exclusive_group(required=True)
    ref.add_argument("--ref", help="reference statistics: an .npz (mu, sigma), or official:NAME / a key such as "
                                   "ffhq_256_train (the official fid_stats, fetched once)")
    ref.add_argument("--ref_dir", help="a folder of reference images (rFID: the images to reconstruct)")
    p.add_argument("--out", required=True, help="where samples, features and metrics.json go (resumable)")
    p.add_argument("--num_samples", type=int, default=50000, help="samples to draw (the paper: 50,000)")
    p.add_argument("--batch_size", type=int, default=50, help="images per sampling batch (fixed for a run)")
    p.add_argument("--seed", type=int, default=0, help="batch j is drawn with seed + j")
    p.add_argument("--inception_weights", help=f"the FID Inception's weights ({fid.FID_WEIGHTS_NAME}), for "
                                               "machines without a network; read by a weights-only load")
    p.add_argument("--inception_score", action="store_true", help="also the IS (default: 1,000-class models)")
    p.add_argument("--max_batches", type=int, help="stop after this many new batches (a run in legs)")
    p.add_argument("--cache_dir", help="the cache of official releases and statistics (see official.fetch_official)")
    return p.parse_args(argv)


def check_args(args) -> None:
    from pipelines.inputs import MAX_IMAGES_LIMIT

    for flag in ("num_samples", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.batch_size > MAX_IMAGES_LIMIT:
        raise ValueError(f"--batch_size must be at most {MAX_IMAGES_LIMIT} (the pipeline's cap per call), "
                         f"got {args.batch_size}")
    if args.num_samples < 2 and args.weights:
        raise ValueError("--num_samples must be at least 2: FID compares covariances")
    if args.max_batches is not None and args.max_batches < 0:
        raise ValueError(f"--max_batches must be 0 or more, got {args.max_batches}")
    if args.rqvae and not args.ref_dir:
        raise ValueError("rFID (--rqvae) reconstructs the images of --ref_dir: give it")
    if args.ref_dir and not Path(args.ref_dir).is_dir():
        raise ValueError(f"--ref_dir {args.ref_dir} is not a folder")


def resolve(path: str, cache_dir) -> Path:
    """A folder, or official:NAME fetched and converted into the cache."""
    if path.startswith("official:"):
        from official.fetch_official import fetch_official

        return fetch_official(path.removeprefix("official:"), cache_dir=cache_dir)
    if not Path(path).is_dir():
        raise ValueError(f"{path} is not a folder (or official:NAME)")
    return Path(path)


def check_run(out: Path, settings: dict, is_main: bool) -> None:
    """OUT/run.json: a resume must share the settings that decide which images are drawn."""
    file = out / RUN_NAME
    if file.is_file():
        saved = json.loads(file.read_text(encoding="utf-8"))
        differ = sorted(k for k in settings if saved.get(k) != settings[k])
        if differ:
            was = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            raise ValueError(f"--out {out} holds a run with other settings ({was}): resume with the same ones, "
                             "or choose another --out")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(RUN_NAME + ".tmp")
        tmp.write_text(json.dumps(settings, indent=1), encoding="utf-8")
        os.replace(tmp, file)


def rank_batches(num_batches: int, rank: int, world: int) -> list[int]:
    """The batches process `rank` of `world` draws: j % world == rank (every batch once, over all ranks)."""
    return list(range(rank, num_batches, world))


def save_png(image, file: Path) -> None:
    tmp = file.with_name(file.stem + ".tmp.png")
    image.save(tmp)
    os.replace(tmp, file)  # a killed save leaves no half image under the final name


def sample_files(out: Path, num_samples: int) -> list[Path]:
    return [out / "samples" / f"{i:06d}.png" for i in range(num_samples)]


def draw_samples(pipe, args, out: Path, rank: int, world: int) -> int:
    """The missing samples of this rank's batches -> how many batches were drawn now."""
    files, B = sample_files(out, args.num_samples), args.batch_size
    (out / "samples").mkdir(parents=True, exist_ok=True)
    mine = rank_batches(-(-args.num_samples // B), rank, world)
    todo = [j for j in mine if not all(f.is_file() for f in files[j * B:(j + 1) * B])]
    if rank == 0 and len(todo) < len(mine):
        have = sum(f.is_file() for f in files)
        print(f"resuming: {have} of {args.num_samples} samples exist", flush=True)
    if args.max_batches is not None:
        todo = todo[:args.max_batches]
    C = pipe.transformer.config.num_classes
    for j in tqdm(todo, desc=f"sampling (rank {rank})", disable=not todo):
        rows = range(j * B, min((j + 1) * B, args.num_samples))
        labels = [i % C for i in rows] if C else None
        gen = torch.Generator(pipe.device).manual_seed(args.seed + j)
        with torch.autocast("cuda", torch.bfloat16, enabled=pipe.device.type == "cuda"):
            images = pipe(class_labels=labels, num_images=None if labels else len(rows), generator=gen).images
        for i, image in zip(rows, images):
            save_png(image, files[i])
    return len(todo)


def reconstruct(vae, args, out: Path, rank: int, world: int) -> tuple[int, list[Path], list[Path]]:
    """rFID's two sets: each --ref_dir image prepared at the model's resolution (originals/) and its
    reconstruction (reconstructions/), resumable by batch -> (batches done now, reconstructions, originals)."""
    from PIL import Image

    from rqcore.images import image_transform, load_image, to_pil

    sources, B = fid.image_files(args.ref_dir), args.batch_size
    names = [f"{i:06d}.png" for i in range(len(sources))]
    for sub in ("originals", "reconstructions"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    prepare, device = image_transform(vae.config.resolution), next(vae.parameters()).device
    todo = [j for j in rank_batches(-(-len(sources) // B), rank, world)
            if not all((out / "reconstructions" / n).is_file() for n in names[j * B:(j + 1) * B])]
    for j in tqdm(todo[:args.max_batches] if args.max_batches is not None else todo, desc="reconstructing"):
        part = range(j * B, min((j + 1) * B, len(sources)))
        try:
            x = torch.stack([prepare(load_image(sources[i])) for i in part]).to(device)  # [b,3,R,R] in [-1,1]
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"--ref_dir: unreadable image among {sources[part[0]].name}...: {e}") from None
        with torch.inference_mode():
            y = vae.decode(vae.encode(x))
        for i, a, b in zip(part, to_pil(x), to_pil(y)):
            save_png(a, out / "originals" / names[i])
            save_png(b, out / "reconstructions" / names[i])
    return len(todo), [out / "reconstructions" / n for n in names], [out / "originals" / n for n in names]


def gathered_activations(net: fid.Inception, files: list[Path], out: Path, tag: str, accelerator) -> np.ndarray:
    """[N, 2048] features of `files`, each process taking every world-th file; rank 0 gets them in order."""
    rank, world = accelerator.process_index, accelerator.num_processes
    acts = net.activations(files[rank::world]).astype(np.float32)
    if world == 1:
        return acts  # nothing to gather (50,000 features are 400 MB to write and read back)
    np.save(out / f"acts-{tag}-rank{rank}.npy", acts)
    accelerator.wait_for_everyone()
    if rank:
        return acts
    parts = [np.load(out / f"acts-{tag}-rank{r}.npy", allow_pickle=False) for r in range(world)]
    merged = np.zeros((len(files), fid.DIMS), np.float32)
    for r, a in enumerate(parts):
        merged[r::world] = a
    return merged


def reference_stats(args):
    """(mu, sigma) of --ref: an .npz, or the official statistics by release name or key (fetched once)."""
    if args.ref.endswith(".npz"):
        return fid.read_stats(args.ref)
    from official.fetch_official import fid_stats_file

    return fid.read_stats(fid_stats_file(args.ref.removeprefix("official:"), cache_dir=args.cache_dir))


def main(argv=None) -> None:
    from accelerate import Accelerator

    args = parse_args(argv)
    check_args(args)
    accelerator, out, t0 = Accelerator(), Path(args.out), time.perf_counter()
    rank, world, main_process = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    source = resolve(args.weights or args.rqvae, args.cache_dir)
    net = fid.Inception(args.inception_weights, accelerator.device)  # refuses a bad weights file before sampling
    ref = reference_stats(args) if args.ref else None
    settings = {"weights": str(source.resolve()), "num_samples": args.num_samples, "batch_size": args.batch_size,
                "seed": args.seed, "rfid": bool(args.rqvae)}
    check_run(out, settings, main_process)
    metrics = {}
    if args.rqvae:
        from rqvae import RQVAE

        vae = RQVAE.from_pretrained(source / "rqvae" if (source / "rqvae").is_dir() else source)
        vae.to(accelerator.device).eval()
        drawn, *sets = reconstruct(vae, args, out, rank, world)  # by name: a killed save's .tmp.png is no image
    else:
        from pipelines import EXACT_CPU, RQPipeline

        # the model as trained (the paper's protocol), not the CPU's faster rounded paths
        pipe = RQPipeline.from_pretrained(source, device=accelerator.device, **EXACT_CPU)
        pipe.max_images = max(pipe.max_images, args.batch_size)  # the app's cap per request, not this run's
        if pipe.has_text:
            raise ValueError("text models are evaluated on captions (CC-3M's validation set), which this command "
                             "does not take: evaluate class or unconditional models")
        drawn = draw_samples(pipe, args, out, rank, world)
        sets = [sample_files(out, args.num_samples), None]
        metrics["num_classes"] = pipe.transformer.config.num_classes
    accelerator.wait_for_everyone()
    if any(not f.is_file() for f in sets[0]):
        if main_process:
            print(f"stopped after --max_batches {args.max_batches}: run the same command again to go on", flush=True)
        return
    acts = gathered_activations(net, sets[0], out, "gen", accelerator)
    if ref is None:  # rFID's originals, or --ref_dir's images as pytorch-fid reads a folder (one size, e.g. 256 px)
        files = sets[1] if sets[1] is not None else fid.image_files(args.ref_dir)
        ref = fid.statistics(gathered_activations(net, files, out, "ref", accelerator))
    if main_process:
        finish(args, net, acts, ref, metrics, out, drawn, time.perf_counter() - t0)


def finish(args, net, acts, ref, metrics: dict, out: Path, drawn: int, seconds: float) -> None:
    metrics.update({("rfid" if args.rqvae else "fid"): fid.frechet(fid.statistics(acts), ref),
                    "num_images": len(acts), "batches_drawn_now": drawn, "seconds": round(seconds, 1)})
    if args.inception_score or metrics.get("num_classes") == 1000:
        splits = min(10, len(acts))  # the official 10 splits; fewer only for runs under 10 images
        metrics["is_mean"], metrics["is_std"] = fid.inception_score(net.class_probabilities(acts), splits)
    for f in out.glob("acts-*-rank*.npy"):
        f.unlink()
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    os.replace(tmp, out / "metrics.json")
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    from training.cli import run_cli

    run_cli(main)
