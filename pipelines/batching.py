"""Many users at once: requests that arrive while a batch samples are sampled together in the next batch.

    batcher = Batcher(pipe, max_rows=64)
    for out in batcher.stream("noto", prompt="red heart", num_images=4, generator=torch.Generator().manual_seed(0)):
        ...  # previews (out.done < 1), then the final output, as RQPipeline.stream(latest_only=True)

One worker thread owns the model. It takes every waiting request, oldest first, up to `max_rows` transformer
rows (a guided request of n images counts 2n), and samples them as one batch; each request keeps its own
options and random generator, so its images are the ones it gets alone. Previews are decoded beside the
sampling by one long-lived thread and shared out (n requests: each gets one at most every n x its
min_interval); the final images are decoded in each caller's thread, one request at a time. A request whose
caller goes away stops receiving; a batch whose callers all went away stops. If a batch fails, each of its requests is retried alone, so that one bad request fails only itself.
`run_alone(fn)` runs other model work (reconstruction, completion) between batches. At most `max_waiting`
requests wait; one more is refused with `Busy`.
"""
from __future__ import annotations

import atexit
import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from rqtransformer import Conditioning, generate
from rqtransformer.sampling import intra_op_threads

from .streaming import Cancelled, Mailbox, decode_preview

MAX_ROWS = 64  # the default rows per batch: 8 guided requests of 4 images
REGROUP_S = 0.15  # a batch may restart to take in requests that arrive this soon after its oldest (see _Regroup)


class Busy(RuntimeError):
    """Too many requests are waiting."""


class _Regroup(Exception):
    """Visitors who click together arrive some milliseconds apart: the first finds the worker idle and starts
    alone. A batch whose oldest request arrived under REGROUP_S ago, and which has sent no preview yet, stops
    when others are waiting and starts again with them, each request's generator rewound to its state at the
    start: the same images, one batch."""


@dataclass(eq=False)
class _Job:
    """A request to sample (rows, options, generator) or other work to run alone (fn); its results go to box."""
    rows: Conditioning | None = None
    options: object = None
    generator: torch.Generator | None = None
    every: int = 0  # previews every this many positions (0: none)
    min_interval: float = 0.0
    fn: Callable | None = None
    box: Mailbox = field(default_factory=lambda: Mailbox(latest_only=True))
    gone: threading.Event = field(default_factory=threading.Event)
    last: float = -math.inf  # when a preview was last due
    arrived: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False  # the final output or an error was sent: no preview may replace it

    @property
    def cost(self) -> int:
        return self.rows.batch_size * (2 if self.options.guided else 1) if self.rows is not None else 0

    def send(self, kind: str, step: int, value) -> None:
        with self.lock:
            if not self.finished:
                self.finished = kind != "preview"
                self.box.put((kind, step, value))


class _Previews(threading.Thread):
    """Decodes a batch's due previews beside the sampling thread: one decoder at a time, whatever the number of
    requests, and the newest codes only (latest-only)."""

    def __init__(self, rqvae):
        super().__init__(name="RQ batcher previews", daemon=True)
        self.rqvae, self.box = rqvae, Mailbox(latest_only=True)
        # one thread for the batcher's life (its OpenMP team is made once); at exit it is stopped and joined
        # before Python kills daemon threads: killed inside a torch call, the process would abort
        atexit.register(self.close)

    def run(self) -> None:
        while (item := self.box.get()) is not None:
            step, codes, due = item  # codes [B, h, w, D] of the whole batch; due: [(job, first row)]
            due = [(j, s) for j, s in due if not j.gone.is_set()]
            if not due:
                continue
            # for several requests one thread: the sampler has the other core (previews are latest-only: a slower
            # one is skipped); one request's previews are small and come first, as without the batcher
            with torch.inference_mode(), intra_op_threads(1 if len(due) > 1 else None, codes.device):
                for j, s in due:  # request by request: the decoder's activations stay those of one request
                    part = codes[s:s + j.rows.batch_size]
                    j.send("preview", step, (part, decode_preview(self.rqvae, part)))

    def close(self) -> None:
        self.box.put(None)
        if self.is_alive() and self is not threading.current_thread():
            self.join()


class Batcher:
    def __init__(self, pipe, max_rows: int = MAX_ROWS, max_waiting: int = 32,
                 run: Callable[[Callable], object] | None = None):
        """max_rows: transformer rows per batch (bounded by memory: the KV caches grow with it). max_waiting:
        requests that may wait. run: calls the batch function, e.g. ZeroGPU's spaces.GPU(lambda fn: fn())
        so that one GPU call serves one batch."""
        for name, value in (("max_rows", max_rows), ("max_waiting", max_waiting)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.pipe, self.max_rows, self.max_waiting = pipe, max_rows, max_waiting
        self.run = run or (lambda fn: fn())
        self._waiting: collections.deque[_Job] = collections.deque()
        self._ready = threading.Condition()
        self._worker: threading.Thread | None = None
        self._previews: _Previews | None = None
        self._decoding = threading.Lock()
        self.batches = 0  # batches sampled so far (for tests and benchmarks)

    # ---- callers ------------------------------------------------------------------------------

    def stream(self, class_labels=None, prompt=None, num_images=None, temperature=1.0, top_k=None, top_p=None,
               guidance_scale=None, generator=None, output_type="pil", every: int | None = None,
               min_interval: float = 0.0):
        """RQPipeline.stream's arguments (previews latest-only): previews, then the final output. Input is
        checked here, before the request waits."""
        pipe = self.pipe
        rows, options, generator, meta = pipe.request(class_labels, prompt, num_images, temperature, top_k, top_p,
                                                      guidance_scale, generator, output_type)
        every = every if every is not None else pipe.rqvae.code_shape[1]
        job = _Job(rows, options, generator, every=int(every), min_interval=float(min_interval))
        for kind, step, value in self._submit(job):
            if kind == "final":
                with self._decoding:  # one decode at a time: as fast on 2 cores, and a bounded peak memory
                    out = pipe.decode_output(value, meta, output_type)
                yield out
                return
            codes, images = value
            yield pipe._preview(codes, step, meta, output_type, images)

    def __call__(self, *args, **kwargs):
        """RQPipeline.__call__ through the batcher: the final output."""
        *_, last = self.stream(*args, every=10**9, **kwargs)
        return last

    def run_alone(self, fn: Callable[[], object]):
        """fn() in the worker, between batches (model work that does not batch); its result or its error."""
        for _, _, value in self._submit(_Job(fn=fn)):
            return value

    def _submit(self, job: _Job):
        with self._ready:
            if len(self._waiting) >= self.max_waiting:
                raise Busy(f"busy: {len(self._waiting)} requests are waiting; try again in a moment")
            self._waiting.append(job)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="RQ batcher", daemon=True)
                self._worker.start()
            self._ready.notify()
        try:
            while True:
                kind, step, value = job.box.get()
                if kind == "error":
                    raise value
                yield kind, step, value
                if kind == "final":
                    return
        finally:
            job.gone.set()  # done, closed or dropped: the worker stops sending

    # ---- the worker ---------------------------------------------------------------------------

    def _next(self) -> list[_Job]:
        """The oldest waiting job, and with a request every later one that fits into max_rows, in order."""
        with self._ready:
            while not self._waiting:
                self._ready.wait()
            first = self._waiting.popleft()
            if first.fn is not None:
                return [first]
            batch, rows = [first], first.cost
            for job in list(self._waiting):
                if self._joins(job, rows):
                    self._waiting.remove(job)
                    batch.append(job)
                    rows += job.cost
            return batch

    def _work(self) -> None:
        while True:
            batch = [j for j in self._next() if not j.gone.is_set()]
            try:
                self._serve(batch)
            except BaseException as e:  # noqa: BLE001 - the worker never dies with requests waiting on it
                for j in batch:
                    j.send("error", 0, e)

    def _serve(self, batch: list[_Job]) -> None:
        if not batch:
            return
        if batch[0].fn is not None:
            return self._finish(batch[0], lambda: self.run(batch[0].fn))
        states = [j.generator.get_state() if j.generator is not None else None for j in batch]
        try:
            codes = self.run(lambda: self._sample(batch))
        except Cancelled:
            return
        except _Regroup:
            for j, state in zip(batch, states):
                j.generator.set_state(state)
            with self._ready:
                self._waiting.extendleft(reversed(batch))  # first again, in their order
            return
        except Exception as e:  # noqa: BLE001 - retried alone, so only the request at fault fails
            if len(batch) == 1:
                return batch[0].send("error", 0, e)
            for job in batch:
                self._finish(job, lambda job=job: self.run(lambda: self._sample([job])))
            return
        for job, part in zip(batch, codes.split([j.rows.batch_size for j in batch])):
            job.send("final", 0, part)

    @staticmethod
    def _finish(job: _Job, fn: Callable) -> None:
        try:
            job.send("final", 0, fn())
        except Cancelled:
            pass
        except Exception as e:  # noqa: BLE001 - handed to the caller's thread
            job.send("error", 0, e)

    def _joins(self, job: _Job, rows: int) -> bool:
        """Whether waiting `job` joins a batch of `rows` rows: a request that fits into max_rows."""
        return job.fn is None and rows + job.cost <= self.max_rows

    def _fits_more(self, batch: list[_Job]) -> bool:
        """Whether a waiting request would join `batch` (see _next)."""
        rows = sum(j.cost for j in batch)
        with self._ready:
            return any(self._joins(j, rows) for j in self._waiting)

    def _sample(self, batch: list[_Job]) -> torch.Tensor:
        rows = Conditioning.concat([j.rows for j in batch])
        starts = [part.start for part in rows.slices()]  # each job is one request: its first row
        positions = math.prod(self.pipe.rqvae.code_shape[:2])

        if any(j.every for j in batch) and self._previews is None:
            self._previews = _Previews(self.pipe.rqvae)
            self._previews.start()
        previews = self._previews
        oldest = min(j.arrived for j in batch)
        regroup = all(j.generator is not None for j in batch)  # the global generator cannot be rewound

        def callback(step: int, codes: torch.Tensor) -> None:
            if all(j.gone.is_set() for j in batch):
                raise Cancelled  # nobody waits for this batch any more
            now = time.monotonic()
            if regroup and now - oldest < REGROUP_S and not any(j.last > -math.inf for j in batch) \
                    and self._fits_more(batch):
                raise _Regroup
            live = [(j, s) for j, s in zip(batch, starts) if j.every and not j.gone.is_set()]
            # previews are shared out: with n requests each gets one at most every n x its min_interval, so a
            # batch decodes and sends about as many as one request does (sampling is what they wait for)
            due = [(j, s) for j, s in live if step % j.every == 0 and step < positions
                   and now - j.last >= j.min_interval * len(live)]
            for j, _ in due:
                j.last = now
            if due:
                previews.box.put((step, codes, due))

        codes = generate(self.pipe.transformer, rows, [j.options for j in batch], [j.generator for j in batch],
                         callback=callback)
        self.batches += 1
        return codes  # a preview still decoding is dropped once its request has its final output (_Job.send)
