"""App figures: start-up time, click-to-first-preview and click-to-result latency, peak RSS of the app.

    .venv/bin/python -m bench.app_latency                       # bundled weights (part of `make bench`)
    .venv/bin/python -m bench.app_latency --weights DIR --api-name /generate --app-kwargs '{"num_images": 4}'

Starts `python app.py --weights DIR` (what `make app` runs) on a free port (GRADIO_SERVER_PORT), times
until the server answers HTTP, then submits `/generate` with gradio_client (`submit`, streaming) and
times the first streamed output (the first preview) and the last (the final result). Like a browser,
the bench fetches an output's image files concurrently when the output arrives, and a preview counts
as shown once its images are fetched (gradio_client's own downloading fetches files one by one,
which adds about 0.5 s that a browser does not have). The first
generation is a warm-up (reported as "cold"); the figures are medians of the following runs. Peak RSS
is the app's VmHWM after its first generation. Skips cleanly when app.py or the weights are missing.
--quick only runs fewer generations (the app's size is the app's).
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import REPEATS, emit, parse_args, proc_status_mib, rnd, run_main, with_goal
import torch

ROOT = Path(__file__).resolve().parents[1]
# goals on a 2-core CPU: ready <= 8 s, first preview <= 0.3 s, whole answer (4 images) <= 1.0 s
STARTUP_GOAL_S, PREVIEW_GOAL_S, ANSWER_GOAL_S = 8.0, 0.3, 1.0
NAMES = ("app_startup", "app_first_preview", "app_generation", "peak_rss_app")
OPTIONS = {"weights": "weights/emoji-64", "api_name": "/generate", "app_kwargs": {}, "timeout": 300.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float, t0: float) -> float:
    """Seconds from t0 until `url` answers (any HTTP status); raises if the process dies or time runs out."""
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with code {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return time.perf_counter() - t0
        except urllib.error.HTTPError:
            return time.perf_counter() - t0  # it answered, just not 200
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"app did not answer on {url} within {timeout:.0f} s")


def file_urls(output) -> list[str]:
    """URLs of the files in a streamed output (a gallery's images), at any nesting depth."""
    if isinstance(output, dict):
        return [output["url"]] if isinstance(output.get("url"), str) else \
            [u for v in output.values() for u in file_urls(v)]
    if isinstance(output, (list, tuple)):
        return [u for v in output for u in file_urls(v)]
    return []


def fetch(urls: list[str], pool: ThreadPoolExecutor) -> int:
    """GET the files concurrently, as a browser loads a gallery; returns the bytes fetched."""
    def get(url):
        with urllib.request.urlopen(url, timeout=30) as r:
            return len(r.read())
    return sum(pool.map(get, urls))


def one_generation(client, api_name: str, kwargs: dict) -> dict:
    """Submit; time the first streamed output until its images are fetched, and the final output."""
    t0 = time.perf_counter()
    job = client.submit(api_name=api_name, **kwargs)
    first = message = last = None
    count = 0
    with ThreadPoolExecutor(8) as pool:
        for output in job:
            count, last = count + 1, output
            if first is None:
                message = time.perf_counter() - t0
                fetch(file_urls(output), pool)
                first = time.perf_counter() - t0
        job.result()  # raises if the app raised
        fetch(file_urls(last), pool)
    return {"first": first, "first_message": message, "total": time.perf_counter() - t0, "outputs": count}


def skipped(reason: str) -> list[dict]:
    return [emit({"figure": name, "skipped": reason}) for name in NAMES]


def figures(quick: bool = False, **options) -> list[dict]:
    o = {**OPTIONS, **options}
    app, weights = ROOT / "app.py", ROOT / o["weights"]
    if not app.is_file():
        return skipped("app.py does not exist yet")
    if not weights.is_dir():
        return skipped(f"weights folder {o['weights']} does not exist yet")
    try:
        import gradio_client  # noqa: F401
    except ImportError:
        return skipped("gradio_client is not installed")
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp:  # log, examples cache, downloads
        return serve_and_measure(weights, Path(tmp), quick, o)


def serve_and_measure(weights: Path, tmp: Path, quick: bool, o: dict) -> list[dict]:
    from gradio_client import Client

    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "OMP_NUM_THREADS": str(torch.get_num_threads()),  # same thread count as the other figures
           "GRADIO_EXAMPLES_CACHE": str(tmp / "examples")}  # write nothing into the repo
    log_path, out = tmp / "app.log", []
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "app.py", "--weights", str(weights)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        startup = wait_http(url, proc, o["timeout"], t0)
        out.append(emit(with_goal({"figure": "app_startup", "seconds": rnd(startup),
                                   "command": "python app.py --weights " + o["weights"]},
                                  f"<= {STARTUP_GOAL_S:g} s", startup <= STARTUP_GOAL_S)))
        client = Client(url, verbose=False, analytics_enabled=False, download_files=False)  # fetched like a browser
        cold = one_generation(client, o["api_name"], o["app_kwargs"])
        out.append(emit({"figure": "peak_rss_app", "peak_rss_mib": round(proc_status_mib("VmHWM", proc.pid), 1),
                         "after": "first generation", "goal": None, "met": None}))
        runs = [one_generation(client, o["api_name"], o["app_kwargs"]) for _ in range(1 if quick else REPEATS)]
        first = statistics.median(r["first"] for r in runs)
        common = {"api_name": o["api_name"], "app_kwargs": o["app_kwargs"], "repeats": len(runs),
                  "streamed_outputs": runs[-1]["outputs"]}
        out.append(emit(with_goal({"figure": "app_first_preview", "seconds": rnd(first),
                                   "runs": [rnd(r["first"]) for r in runs], "cold_seconds": rnd(cold["first"]),
                                   "message_seconds": rnd(statistics.median(r["first_message"] for r in runs)),
                                   **common}, f"<= {PREVIEW_GOAL_S:g} s", first <= PREVIEW_GOAL_S)))
        total = statistics.median(r["total"] for r in runs)
        out.append(emit(with_goal({"figure": "app_generation", "seconds": rnd(total),
                                   "runs": [rnd(r["total"]) for r in runs], "cold_seconds": rnd(cold["total"]),
                                   **common}, f"<= {ANSWER_GOAL_S:g} s", total <= ANSWER_GOAL_S)))
    except Exception as e:  # noqa: BLE001 - report, never crash the whole suite
        tail = log_path.read_text().strip().splitlines()[-3:]
        done = {r["figure"] for r in out}
        out += [emit({"figure": n, "skipped": f"{type(e).__name__}: {e}", "app_log_tail": tail})
                for n in NAMES if n not in done]
    finally:
        proc.terminate()  # only the process started above, by its handle
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return out


def main(argv=None):
    def extra(p):
        p.add_argument("--weights", default=OPTIONS["weights"], help="pipeline folder passed to app.py")
        p.add_argument("--api-name", default=OPTIONS["api_name"])
        p.add_argument("--app-kwargs", type=json.loads, default={}, help="JSON keyword arguments for the endpoint")
        p.add_argument("--timeout", type=float, default=OPTIONS["timeout"], help="seconds to wait for start-up")
    args = parse_args(__doc__.splitlines()[0], argv, extra)
    opts = dict(weights=args.weights, api_name=args.api_name, app_kwargs=args.app_kwargs, timeout=args.timeout)
    return run_main(lambda quick: figures(quick, **opts), args)


if __name__ == "__main__":
    main()
