"""Many users at once: a bounded loopback load test of the served app.

    .venv/bin/python -m bench.load_test            # part of `make bench`: 16 users x 4 requests, then the overflow run
    .venv/bin/python -m bench.load_test --quick    # 4 users x 1 request (overflow: queue of 1): checks the script
    .venv/bin/python -m bench.load_test --weights DIR --users 16 --requests 4 --deadline 900

Two figures, one JSON object each:
- "app_load": `python app.py --weights DIR` (what `make app` runs, with the app's own queue: up to 16
  /generate requests handed to its batcher at once, max_size=32) on 127.0.0.1. N users (threads, each with its own gradio_client.Client) start together
  and submit R /generate requests each, one after another, with the arguments the Generate button sends
  by default. Reported: answered %, latency p50/p95 (submit to final result, so queueing included), the
  longest queue seen (GET /gradio_api/queue/status polled every 50 ms; it counts waiting jobs, not the
  running one), most requests in flight, peak RSS of the server (/proc/PID/status VmHWM) against its RSS
  after a warm-up request, and requests lost without an explicit "queue full" answer.
- "app_load_overflow": the same app served with queue max_size=4 (1 with --quick); every user submits
  one request at the same moment. What does not fit must be turned away explicitly (gradio answers
  HTTP 503 "queue full", gradio_client raises QueueError); nothing may be lost silently, and the server
  must answer a request afterwards.
Weights: DIR if it holds a saved pipeline (default weights/emoji-64), else a tiny untrained pipeline saved
to a temp dir; "weights" in the JSON says which. Bounded: a fixed number of requests, a deadline per figure
(--deadline) that every request waits at most until, daemon threads, and each server is terminated after
its figure, so the script always stops by itself.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.app_latency import free_port, wait_http
from bench.common import emit, parse_args, proc_status_mib, rnd, run_main, with_goal
import torch

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("app_load", "app_load_overflow")
APP_QUEUE = {"default_concurrency_limit": 1, "generate_concurrency_limit": 16, "max_size": 32}  # app.build_demo
OPTIONS = {"weights": "weights/emoji-64", "users": 16, "requests": 4, "overflow_max_size": 4, "deadline": 900.0,
           "num_images": None}
QUICK = {"users": 4, "requests": 1, "overflow_max_size": 1, "deadline": 240.0}
RSS_SLACK_MIB = 100  # "bounded": peak RSS under load <= 1.5 x RSS after warm-up + this
# The app with another queue size (importing app loads nothing; build_demo loads the weights).
LAUNCHER = ("import sys, app\n"
            "demo = app.build_demo(sys.argv[1])\n"
            "demo.queue(default_concurrency_limit=1, max_size=int(sys.argv[2]))\n"
            "demo.launch(**app.LAUNCH_KWARGS)\n")


def has_pipeline(path: Path) -> bool:
    return all((path / sub / "model.safetensors").is_file() for sub in ("rqvae", "rqtransformer"))


def tiny_pipeline(folder: Path) -> Path:
    """An untrained 32 px pipeline (4x4x2 codes): the load test then measures the server, not the model."""
    from pipelines import RQPipeline
    from rqtransformer import RQTransformer, RQTransformerConfig
    from rqvae import PRESETS, RQVAE, RQVAEConfig

    torch.manual_seed(0)
    vae = RQVAE(RQVAEConfig(**{**PRESETS["tiny"], "resolution": 32}))
    vae.train()
    vae(torch.rand(8, 3, 32, 32) * 2 - 1)  # k-means init of the codebook
    tf = RQTransformer(RQTransformerConfig(codebook_size=vae.config.codebook_size, code_shape=vae.config.code_shape,
                                           dim=32, heads=2, spatial_layers=2, depth_layers=1, num_classes=3,
                                           dropout=0.0, class_names=["circles", "squares", "stars"]))
    RQPipeline(vae, tf, max_images=4).save_pretrained(folder)
    return folder


class Server:
    """The app in a subprocess on a free loopback port; `max_size=None`: `python app.py` itself."""

    def __init__(self, weights: Path, tmp: Path, max_size: int | None = None, timeout: float = 300,
                 root: Path = ROOT):
        """root: the checkout whose app.py is served (another one: to compare two versions on one machine)."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
               "GRADIO_ANALYTICS_ENABLED": "False", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
               "OMP_NUM_THREADS": str(torch.get_num_threads()), "GRADIO_EXAMPLES_CACHE": str(tmp / "examples")}
        if max_size is None:
            self.command = ["app.py", "--weights", str(weights)]
        else:
            self.command = ["-c", LAUNCHER, str(weights), str(max_size)]
        self.log_path = tmp / f"server-{port}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, *self.command], cwd=root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        try:
            wait_http(self.url, self.proc, timeout, time.perf_counter())
        except Exception:
            self.close()
            raise

    def queue_size(self) -> int | None:
        import httpx

        try:
            return httpx.get(f"{self.url}gradio_api/queue/status", timeout=2).json()["queue_size"]
        except Exception:  # noqa: BLE001 - a missed sample is not a failure of the server
            return None

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

    def log_tail(self, lines: int = 3) -> list[str]:
        return self.log_path.read_text(errors="replace").strip().splitlines()[-lines:]

    def close(self) -> None:
        self.proc.terminate()  # only the process started above, by its handle
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Monitor(threading.Thread):
    """Samples the server's queue length and RSS every `interval` seconds until stopped."""

    def __init__(self, server: Server, interval: float = 0.05):
        super().__init__(daemon=True)
        self.server, self.interval, self.stop = server, interval, threading.Event()
        self.queue_sizes: list[int] = []
        self.rss: list[float] = []

    def run(self):
        while not self.stop.is_set():
            size = self.server.queue_size()
            if size is not None:
                self.queue_sizes.append(size)
            try:
                self.rss.append(self.server.rss_mib())
            except OSError:
                pass
            self.stop.wait(self.interval)


def classify(error: BaseException) -> str:
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    text = f"{type(error).__name__}: {error}"
    if isinstance(error, QueueError) or "queue is full" in text.lower():
        return "queue_full"
    if isinstance(error, TimeoutError):
        return "timeout"
    return "app_error" if isinstance(error, AppError) else "error"


def one_request(client, seed: int, kwargs: dict, deadline: float, expected_images: int) -> dict:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return {"outcome": "not_sent"}
    t0 = time.perf_counter()
    job = None
    try:
        job = client.submit(api_name="/generate", seed=seed, **kwargs)
        gallery = job.result(timeout=remaining)
        if len(gallery) != expected_images:
            return {"outcome": "error", "message": f"{len(gallery)} images instead of {expected_images}"}
        return {"outcome": "answered", "seconds": time.perf_counter() - t0}
    except BaseException as e:  # noqa: BLE001 - every failure is classified and reported
        if job is not None and isinstance(e, TimeoutError):
            job.cancel()
        return {"outcome": classify(e), "message": f"{type(e).__name__}: {e}"[:200],
                "seconds": time.perf_counter() - t0}


class InFlight:
    """Requests sent and not yet answered, and the most at any one time (the caller holds the lock)."""

    def __init__(self):
        self.now = self.most = 0

    def add(self, n: int) -> None:
        self.now += n
        self.most = max(self.most, self.now)


def run_users(server: Server, users: int, requests: int, kwargs: dict, expected_images: int,
              deadline: float) -> dict:
    """`users` threads, each its own Client, released together; each sends `requests` requests in turn."""
    from gradio_client import Client

    results: list[dict] = []
    lock = threading.Lock()
    in_flight = InFlight()
    start = threading.Barrier(users + 1)

    def user(index: int):
        try:
            client = Client(server.url, verbose=False, analytics_enabled=False, download_files=False)
        except Exception as e:  # noqa: BLE001
            client, error = None, {"outcome": "error", "message": f"client: {type(e).__name__}: {e}"[:200]}
        try:
            start.wait(timeout=max(1.0, deadline - time.monotonic()))
        except threading.BrokenBarrierError:
            pass
        for r in range(requests):
            if client is None:
                out = dict(error)
            else:
                with lock:
                    in_flight.add(1)
                out = one_request(client, 1000 * index + r, kwargs, deadline, expected_images)
                with lock:
                    in_flight.add(-1)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    monitor = Monitor(server)
    monitor.start()
    t0 = time.perf_counter()
    try:
        start.wait(timeout=max(1.0, deadline - time.monotonic()))
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()) + 5)
    wall = time.perf_counter() - t0
    monitor.stop.set()
    monitor.join(timeout=5)
    with lock:
        done = list(results)
    missing = users * requests - len(done)  # threads still stuck past the deadline
    done += [{"outcome": "timeout", "message": "no answer before the deadline"}] * missing
    return {"results": done, "wall": wall, "queue_sizes": monitor.queue_sizes, "rss": monitor.rss,
            "most_in_flight": in_flight.most}


def summarize(run: dict, total: int) -> dict:
    results = run["results"]
    count = {k: sum(r["outcome"] == k for r in results)
             for k in ("answered", "queue_full", "app_error", "error", "timeout", "not_sent")}
    latencies = sorted(r["seconds"] for r in results if r["outcome"] == "answered")
    messages = sorted({r["message"] for r in results if r["outcome"] not in ("answered",) and r.get("message")})
    return {
        "requests": total,
        "answered": count["answered"],
        "answered_pct": round(100 * count["answered"] / total, 1),
        "rejected_queue_full": count["queue_full"],
        "dropped_without_queue_full_message": total - count["answered"] - count["queue_full"],
        "outcomes": count,
        "latency_p50_s": rnd(statistics.median(latencies)) if latencies else None,
        "latency_p95_s": rnd(latencies[math.ceil(0.95 * len(latencies)) - 1]) if latencies else None,  # nearest rank
        "latency_max_s": rnd(latencies[-1]) if latencies else None,
        "max_queue_length": max(run["queue_sizes"], default=None),
        "queue_samples": len(run["queue_sizes"]),
        "most_requests_in_flight": run["most_in_flight"],
        "wall_seconds": rnd(run["wall"]),
        "messages": messages[:5],
    }


def warm_up(server: Server, kwargs: dict, deadline: float) -> float:
    from gradio_client import Client

    client = Client(server.url, verbose=False, analytics_enabled=False, download_files=False)
    t0 = time.perf_counter()
    client.submit(api_name="/generate", **kwargs).result(timeout=max(1.0, deadline - time.monotonic()))
    return time.perf_counter() - t0


def load_figure(weights: Path, label: str, tmp: Path, o: dict, kwargs: dict, images: int, deadline: float) -> dict:
    server = Server(weights, tmp)
    try:
        cold = warm_up(server, kwargs, deadline)
        rss_warm = server.rss_mib()
        run = run_users(server, o["users"], o["requests"], kwargs, images, deadline)
        peak = proc_status_mib("VmHWM", server.proc.pid)
        record = {"figure": "app_load", "weights": label, "server": "python " + " ".join(server.command),
                  "queue": APP_QUEUE, "users": o["users"], "requests_per_user": o["requests"],
                  "app_kwargs": kwargs, "images_per_request": images,
                  **summarize(run, o["users"] * o["requests"]), "cold_request_s": rnd(cold),
                  "rss_after_warmup_mib": round(rss_warm, 1), "rss_max_sampled_mib": round(max(run["rss"],
                                                                                               default=0), 1),
                  "peak_rss_mib": round(peak, 1), "rss_bounded": peak <= 1.5 * rss_warm + RSS_SLACK_MIB}
        ok = record["answered"] == record["requests"] and record["rss_bounded"]
        return emit(with_goal(record, "100 % answered, none dropped, peak RSS <= 1.5 x warm RSS + "
                                      f"{RSS_SLACK_MIB} MiB", ok))
    finally:
        server.close()


def overflow_figure(weights: Path, label: str, tmp: Path, o: dict, kwargs: dict, images: int,
                    deadline: float) -> dict:
    from gradio_client import Client

    size = o["overflow_max_size"]
    server = Server(weights, tmp, max_size=size)
    try:
        warm_up(server, kwargs, deadline)
        run = run_users(server, o["users"], 1, kwargs, images, deadline)
        client = Client(server.url, verbose=False, analytics_enabled=False, download_files=False)
        after = one_request(client, 7, kwargs, deadline, images)  # the server still serves
        record = {"figure": "app_load_overflow", "weights": label, "server": "python -c <app.build_demo + "
                  f"demo.queue(default_concurrency_limit=1, max_size={size})>",
                  "queue": {"default_concurrency_limit": 1, "max_size": size}, "users": o["users"],
                  "requests_per_user": 1, **summarize(run, o["users"]),
                  "served_after_overflow": after["outcome"] == "answered",
                  "peak_rss_mib": round(proc_status_mib("VmHWM", server.proc.pid), 1)}
        ok = (record["dropped_without_queue_full_message"] == 0 and record["rejected_queue_full"] > 0
              and record["served_after_overflow"])
        return emit(with_goal(record, "only explicit queue-full rejections (>= 1), none lost, served afterwards",
                              ok))
    finally:
        server.close()


def figures(quick: bool = False, **options) -> list[dict]:
    o = {**OPTIONS, **(QUICK if quick else {}), **{k: v for k, v in options.items() if v is not None}}
    try:
        import gradio_client  # noqa: F401
    except ImportError:
        return [emit({"figure": n, "skipped": "gradio_client is not installed"}) for n in NAMES]
    kwargs = {} if o["num_images"] is None else {"num_images": int(o["num_images"])}
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        tmp = Path(tmp)
        weights = Path(o["weights"])
        weights = weights if weights.is_absolute() else ROOT / weights
        if has_pipeline(weights):
            label = str(o["weights"])
        else:
            label = f"tiny untrained pipeline in a temp dir ({o['weights']} holds no saved pipeline)"
            weights = tiny_pipeline(tmp / "tiny-pipeline")
        max_images = json.loads((weights / "pipeline.json").read_text()).get("max_images", 16) \
            if (weights / "pipeline.json").is_file() else 16
        images = int(o["num_images"]) if o["num_images"] is not None else min(4, max_images)  # the app's default
        for name, fn in (("app_load", load_figure), ("app_load_overflow", overflow_figure)):
            try:
                deadline = time.monotonic() + float(o["deadline"])  # per figure: start-up, warm-up and all requests
                out.append(fn(weights, label, tmp, o, kwargs, images, deadline))
            except Exception as e:  # noqa: BLE001 - report, never crash the whole suite
                out.append(emit({"figure": name, "skipped": f"{type(e).__name__}: {e}"[:300]}))
    return out


def main(argv=None):
    def extra(p):
        p.add_argument("--weights", default=None, help=f"pipeline folder (default {OPTIONS['weights']}; a tiny "
                                                       "untrained one if it holds no saved pipeline)")
        p.add_argument("--users", type=int, default=None, help=f"concurrent users (default {OPTIONS['users']})")
        p.add_argument("--requests", type=int, default=None, help=f"requests per user ({OPTIONS['requests']})")
        p.add_argument("--overflow-max-size", dest="overflow_max_size", type=int, default=None,
                       help=f"queue size of the overflow run ({OPTIONS['overflow_max_size']})")
        p.add_argument("--num-images", dest="num_images", type=int, default=None,
                       help="images per request (default: the app's default)")
        p.add_argument("--deadline", type=float, default=None, help=f"seconds per figure ({OPTIONS['deadline']})")
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    opts = {k: getattr(args, k) for k in ("weights", "users", "requests", "overflow_max_size", "num_images",
                                          "deadline")}
    return run_main(lambda quick: figures(quick, **opts), args)


if __name__ == "__main__":
    main()
