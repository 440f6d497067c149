"""stream()'s machinery: generate() in a worker thread that hands over codes as it goes, and the decoding
of partly sampled code stacks into previews."""
from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from typing import Callable

import torch
import torch.nn.functional as F
from einops import repeat

SAMPLING_THREAD = "RQPipeline.stream"  # the worker thread of stream(), named so that it can be found


class Cancelled(Exception):
    """Raised in a sampling callback when nobody waits for the result any more: stops the sampling."""


class Mailbox:
    """A one-item hand-over from a sampling thread to its consumer. latest_only: a new item replaces one not
    taken yet (the sender never waits), else the sender waits until the item is taken."""

    def __init__(self, latest_only: bool = False):
        self.q: queue.Queue = queue.Queue(maxsize=1)
        self.latest_only = latest_only

    def put(self, item) -> None:
        while self.latest_only:  # one sender: this ends after at most one stale item is dropped
            try:
                return self.q.put_nowait(item)
            except queue.Full:
                with contextlib.suppress(queue.Empty):
                    self.q.get_nowait()
        self.q.put(item)

    def get(self, timeout: float | None = None):
        return self.q.get(timeout=timeout)


def sample_in_thread(generate: Callable[..., torch.Tensor], kwargs: dict, every: int, positions: int,
                     latest_only: bool = False, min_interval: float = 0.0):
    """Run generate(**kwargs, callback=...) in a worker thread; yield (step, codes so far) after every
    `every` of the `positions` code positions, then (None, final codes).

    The queue holds one item, so the worker runs at most a preview ahead of the consumer: when the
    consumer stops (closes the stream, or drops it), sampling stops within a preview. latest_only:
    the worker replaces an untaken item instead of waiting, and stops at its next position.
    min_interval: seconds between the previews handed over (the first is never held back); the ones
    due sooner are skipped, so they cost neither decoding nor sending."""
    box = Mailbox(latest_only)
    stop = threading.Event()
    last = -math.inf  # when the worker last handed over a preview (time.monotonic)

    def callback(step, codes):
        nonlocal last
        if stop.is_set():
            raise Cancelled  # the consumer went away: stop sampling early
        if step % every or step >= positions:
            return
        now = time.monotonic()
        if now - last >= min_interval:
            last = now
            box.put((step, codes))

    def work():
        try:
            box.put((None, generate(**kwargs, callback=callback)))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            box.put((e, None))

    thread = threading.Thread(target=work, name=SAMPLING_THREAD, daemon=True)
    thread.start()
    try:
        while True:
            step, item = box.get()
            if isinstance(step, BaseException):
                raise step
            yield step, item
            if step is None:
                return
    finally:
        stop.set()
        while thread.is_alive():  # take what the worker is waiting to hand over, so that it sees `stop`
            try:
                box.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def decode_preview(rqvae, codes: torch.Tensor) -> torch.Tensor:
    """codes [B,h,w,D], -1 where not sampled yet -> images [B,3,H,W] in [-1,1], unsampled cells grey (0).

    Only the code rows down to the last known position are decoded (the rows below are grey anyway):
    a generation's first preview decodes one row of codes. A completion's kept codes can sit in any row;
    they are decoded too."""
    f = rqvae.config.downsample
    known = (codes >= 0).all(-1)  # [B,h,w]
    rows = int(known.any(0).any(-1).nonzero().max()) + 1 if known.any() else 1
    latent = rqvae.embed_codes(codes.clamp(min=0))[:, :, :rows]  # [B,C,rows,w]
    top = rqvae.decode_latent(latent)  # [B,3,rows*f,W]
    images = F.pad(top, (0, 0, 0, (codes.shape[1] - rows) * f))  # [B,3,H,W], the rows below 0
    return images.masked_fill(~repeat(known, "b h w -> b 1 (h f1) (w f2)", f1=f, f2=f), 0)
