"""The paper's evaluation on this machine: how fast `python -m evaluation.evaluate_fid` draws samples at the
FFHQ-355M size (random weights, saved as PNGs by the evaluation's own code) and computes their Inception
features (pytorch-fid's network, random weights in its layout), and the 50,000-sample run that implies.

    python -m bench.evaluation_speed                    # 1,000 samples, batch 50 (a GPU: part of make gpu-check)
    python -m bench.evaluation_speed --num_samples 8 --batch_size 4   # a CPU: a few, then the estimate
    python -m bench.evaluation_speed --quick            # tiny sizes: checks the script

Method: one warm-up batch untimed, then one timed pass over all samples (bf16 autocast on CUDA, as the
evaluation samples), then one over their features; the Frechet distance of 2,048-d statistics timed once.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import emit, machine_info, rnd

FULL_RUN = 50_000  # the paper's sample count


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def evaluation_figures(quick: bool, device: torch.device | None = None, num_samples: int | None = None,
                       batch_size: int | None = None) -> list[dict]:
    from bench.paper_size import build
    from evaluation import fid
    from evaluation.evaluate_fid import draw_samples, sample_files

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n, b = num_samples or (8 if quick else 1000), batch_size or (4 if quick else 50)
    pipe = build(quick, device)
    pipe.max_images = max(pipe.max_images, b)
    with tempfile.TemporaryDirectory(prefix="eval-speed-") as tmp:
        out, weights = Path(tmp), Path(tmp) / fid.FID_WEIGHTS_NAME
        torch.save(fid.random_weights(0), weights)
        warm = argparse.Namespace(num_samples=b, batch_size=b, seed=10**6, max_batches=None)
        draw_samples(pipe, warm, out / "warm-up", 0, 1)
        args = argparse.Namespace(num_samples=n, batch_size=b, seed=0, max_batches=None)
        sync(device)
        t0 = time.perf_counter()
        draw_samples(pipe, args, out, 0, 1)
        sync(device)
        sampling = time.perf_counter() - t0
        net = fid.Inception(weights, device)
        net.activations(sample_files(out, b), b)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        acts = net.activations(sample_files(out, n), b)
        sync(device)
        features = time.perf_counter() - t0
    rng = np.random.default_rng(0)  # the distance's cost depends on the size (2,048), not on the values
    a, c = rng.normal(size=(4096, fid.DIMS)), rng.normal(size=(4096, fid.DIMS))
    t0 = time.perf_counter()
    fid.frechet(fid.statistics(a), fid.statistics(c))
    distance = time.perf_counter() - t0
    per_image = sampling / n + features / len(acts)
    return [emit({"figure": "evaluation_throughput", "config": "quick" if quick else "ffhq-355m",
                  "device": device.type, "num_samples": n, "batch_size": b, "resolution": pipe.resolution,
                  "samples_per_s": rnd(n / sampling), "features_per_s": rnd(len(acts) / features),
                  "frechet_seconds": rnd(distance),
                  "estimated_hours_for_50k": rnd((per_image * FULL_RUN + distance) / 3600, 3),
                  "threads": torch.get_num_threads(),
                  "note": "random weights; samples saved as PNGs by evaluate_fid's own code; the 50k figure is "
                          "this run's per-image time times 50,000"})]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, not speed")
    p.add_argument("--num_samples", type=int, help="samples to time (default 1,000; --quick 8)")
    p.add_argument("--batch_size", type=int, help="images per batch (default 50; --quick 4)")
    args = p.parse_args(argv)
    emit(machine_info(args.quick))
    return evaluation_figures(args.quick, num_samples=args.num_samples, batch_size=args.batch_size)


if __name__ == "__main__":
    main()
