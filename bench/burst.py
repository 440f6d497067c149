"""A burst of visitors: N /generate requests of the served app sent together against the same N one after
another, and one visitor alone (first preview and whole answer), in one run against the same app.

    .venv/bin/python -m bench.burst                          # bundled weights: 8 requests of 4 images
    .venv/bin/python -m bench.burst --base-root /tmp/old     # also serve another checkout's app.py, same run
    .venv/bin/python -m bench.burst --quick                  # 3 requests, a tiny model: checks the script

Method: `python app.py --weights DIR` on a free loopback port (bench.load_test.Server), one warm-up request,
then the N requests (seeds 0..N-1, the Generate button's other defaults) one after another through one
gradio_client Client, then the same N released together from N threads, each with its own Client; wall time
from the first submit to the last answer. As a browser does, each request fetches its final images
concurrently (bench.app_latency.fetch), not through gradio_client's one-by-one download, and waits on the
result rather than iterating the job (gradio_client polls its outputs every millisecond). The images of each
seed must be the same both times. Alone: the median over 3 requests of submit to the first streamed output (a
preview, its images fetched) and to the final result. Peak RSS:
the server's VmHWM after all of it. Figures per served checkout ("this", and "base" with --base-root).
"""
from __future__ import annotations

import hashlib
import statistics
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.app_latency import fetch, file_urls
from bench.common import emit, parse_args, proc_status_mib, rnd, run_main, with_goal
from bench.load_test import ROOT, Server, has_pipeline, tiny_pipeline

OPTIONS = {"weights": "weights/emoji-64", "requests": 8, "num_images": 4, "base_root": None}


def client_for(server: Server):
    from gradio_client import Client

    return Client(server.url, verbose=False, analytics_enabled=False, download_files=False)  # fetched like a browser


def answer(client, seed: int, kwargs: dict, first: bool = False) -> dict:
    """One /generate request: seconds to the final output and a hash of its images, fetched concurrently as a
    browser loads a gallery; first=True: also to the first streamed output (its images fetched). Without it
    the request only waits for the result: gradio_client's job iterator polls every millisecond, which on 2
    cores would take the server's CPU from it."""
    def get(url):
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read()
    t0 = time.perf_counter()
    job = client.submit(seed=seed, api_name="/generate", **kwargs)
    seen = None
    with ThreadPoolExecutor(8) as pool:
        if first:
            for output in job:
                fetch(file_urls(output), pool)
                seen = time.perf_counter() - t0
                break
        images = list(pool.map(get, file_urls(job.result())))  # raises if the app raised
    return {"first": seen, "total": time.perf_counter() - t0,
            "digest": hashlib.sha256(b"".join(images)).hexdigest()}


def together(server: Server, n: int, kwargs: dict) -> tuple[float, list[str]]:
    clients = [client_for(server) for _ in range(n)]
    out: list = [None] * n
    start = threading.Barrier(n + 1)

    def one(i):
        start.wait()
        out[i] = answer(clients[i], i, kwargs)["digest"]
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(600)
    return time.perf_counter() - t0, out


def burst_figure(weights: Path, label: str, root: Path, which: str, o: dict, tmp: Path) -> dict:
    n, kwargs = o["requests"], {"num_images": o["num_images"]}
    server = Server(weights, tmp, root=root)
    try:
        client = client_for(server)
        answer(client, 999, kwargs)  # warm-up
        alone = [answer(client, 100 + i, kwargs, first=True) for i in range(3)]
        first, whole = (statistics.median(a[k] for a in alone) for k in ("first", "total"))
        t0 = time.perf_counter()
        sequential = [answer(client, i, kwargs)["digest"] for i in range(n)]
        seq_s = time.perf_counter() - t0
        tog_s, batched = together(server, n, kwargs)
        record = {"figure": "app_burst", "app": which, "app_root": str(root), "weights": label, "requests": n,
                  "images_per_request": o["num_images"], "one_after_another_s": rnd(seq_s),
                  "together_s": rnd(tog_s), "speedup": rnd(seq_s / tog_s, 3),
                  "same_images_alone_and_together": sequential == batched,
                  "alone_first_preview_s": rnd(first), "alone_whole_answer_s": rnd(whole),
                  "peak_rss_mib": round(proc_status_mib("VmHWM", server.proc.pid), 1)}
        return emit(with_goal(record, "together >= 3x faster than one after another, the same images",
                              record["speedup"] >= 3 and record["same_images_alone_and_together"]))
    finally:
        server.close()


def exactness_figure(weights: Path, label: str, trials: int, n: int) -> dict:
    """Codes of requests sampled together against the same requests alone: how often batch-size-dependent
    float rounding flips a draw. Random options per request (class, count, guidance, top-k, temperature)."""
    import random

    import torch

    from pipelines import RQPipeline
    from rqtransformer import Conditioning, generate

    pipe = RQPipeline.from_pretrained(weights)
    rng, differ, total = random.Random(0), 0, 0
    for _ in range(trials):
        asks = [dict(class_labels=rng.choice(pipe.class_names) if pipe.class_names else None,
                     prompt=rng.choice(pipe.prompts) if pipe.prompts else None, num_images=rng.randint(1, 4),
                     guidance_scale=rng.choice([1.0, 2.0, 3.0]), top_k=rng.choice([None, 5]),
                     temperature=rng.choice([0.8, 1.0]), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
                for _ in range(n)]
        states = [a["generator"].get_state() for a in asks]
        reqs = [pipe.request(**a) for a in asks]
        together = generate(pipe.transformer, Conditioning.concat([r[0] for r in reqs]), [r[1] for r in reqs],
                            [r[2] for r in reqs])
        start = 0
        for (rows, options, g, _), state in zip(reqs, states):
            g.set_state(state)
            one = generate(pipe.transformer, rows, options, g)
            differ += int((one != together[start:start + len(one)]).sum())
            total += one.numel()
            start += len(one)
    return emit({"figure": "batch_exactness", "weights": label, "trials": trials, "requests_per_batch": n,
                 "codes": total, "codes_that_differ": differ, "goal": "0", "met": differ == 0})


def figures(quick: bool = False, **options) -> list[dict]:
    o = {**OPTIONS, **({"requests": 3} if quick else {}), **{k: v for k, v in options.items() if v is not None}}
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as tmp:
        tmp = Path(tmp)
        weights = Path(o["weights"]) if Path(o["weights"]).is_absolute() else ROOT / o["weights"]
        label = str(o["weights"])
        if quick or not has_pipeline(weights):
            label, weights = "tiny untrained pipeline in a temp dir", tiny_pipeline(tmp / "tiny-pipeline")
        roots = [("this", ROOT)] + ([("base", Path(o["base_root"]).resolve())] if o["base_root"] else [])
        out.append(exactness_figure(weights, label, 2 if quick else 10, o["requests"]))
        for which, root in roots:
            out.append(burst_figure(weights, label, root, which, o, tmp))
    return out


def main(argv=None):
    def extra(p):
        p.add_argument("--weights", default=None, help=f"pipeline folder (default {OPTIONS['weights']})")
        p.add_argument("--requests", type=int, default=None, help=f"requests in the burst ({OPTIONS['requests']})")
        p.add_argument("--num-images", dest="num_images", type=int, default=None,
                       help=f"images per request ({OPTIONS['num_images']})")
        p.add_argument("--base-root", dest="base_root", default=None,
                       help="another checkout whose app.py is measured too, in the same run (e.g. the last release)")
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    opts = {k: getattr(args, k) for k in ("weights", "requests", "num_images", "base_root")}
    return run_main(lambda quick: figures(quick, **opts), args)


if __name__ == "__main__":
    main()
