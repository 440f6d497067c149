"""pipelines.batching: concurrent requests sampled as one batch, each with its own options and seed, so that its
images are the ones it gets alone; previews per request; cancelled, failing and refused requests harm nobody."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from pipelines.batching import Batcher, Busy, _Job
from rqtransformer import Conditioning, SamplingOptions, generate

from conftest import gen, tiny_text_pipeline


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


class Held:
    """Keeps the batcher's worker busy until released, so that the requests sent meanwhile wait together."""

    def __init__(self, batcher: Batcher):
        self.batcher, self.release = batcher, threading.Event()
        self.thread = threading.Thread(target=batcher.run_alone, args=(lambda: self.release.wait(30),))
        self.thread.start()
        wait_for(lambda: batcher._worker is not None and not batcher._waiting)  # the worker runs it

    def send(self, requests: list[dict], consume=list, others: int = 0) -> list:
        """Each request's stream(**kwargs), consumed by `consume` (or consume[i]) in its own thread, all in one
        batch (with `others` requests already waiting)."""
        results: list = [None] * len(requests)
        consumers = consume if isinstance(consume, list) else [consume] * len(requests)

        def one(i):
            try:
                results[i] = consumers[i](self.batcher.stream(**requests[i]))
            except Exception as e:  # noqa: BLE001 - checked by the test
                results[i] = e
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        wait_for(lambda: len(self.batcher._waiting) == others + len(requests) or any(r is not None for r in results))
        self.release.set()
        for t in threads + [self.thread]:
            t.join(60)
        return results


def alone(pipe, **kwargs):
    return pipe(**kwargs).codes


REQUESTS = [dict(class_labels="circles", num_images=2, guidance_scale=3.0, seed=1),
            dict(class_labels="squares", num_images=1, guidance_scale=1.0, temperature=0.7, seed=2),
            dict(num_images=3, top_k=5, seed=3),  # unconditional rows
            dict(class_labels=["stars", "circles"], guidance_scale=2.0, top_p=0.8, seed=4),
            dict(class_labels="circles", num_images=2, guidance_scale=3.0, seed=1)]  # the first again


def with_generator(r: dict) -> dict:
    r = dict(r)
    seed = r.pop("seed")
    return {**r, "generator": gen(seed)}


def test_concurrent_requests_are_one_batch_and_each_gets_its_own_images(pipe):
    batcher = Batcher(pipe)
    held = Held(batcher)
    results = held.send([with_generator(r) for r in REQUESTS])
    assert batcher.batches == 1  # all five together
    for request, outs in zip(REQUESTS, results):
        assert not isinstance(outs, Exception), outs
        final = outs[-1]
        assert final.done == 1 and all(o.done < 1 for o in outs[:-1])
        assert torch.equal(final.codes, alone(pipe, **with_generator(request)))
    assert torch.equal(results[0][-1].codes, results[4][-1].codes)  # the same seed: the same images
    assert not torch.equal(results[0][-1].codes, results[3][-1].codes[:2])


def slow_sampler(monkeypatch, seconds_per_step: float = 0.02) -> None:
    """Sampling as slow as a real model's (the tiny one samples a batch in milliseconds)."""
    from pipelines import batching

    generate = batching.generate

    def slow(*args, callback, **kwargs):
        def wrapped(step, codes):
            time.sleep(seconds_per_step)
            callback(step, codes)
        return generate(*args, callback=wrapped, **kwargs)
    monkeypatch.setattr(batching, "generate", slow)


def test_a_request_that_arrives_just_after_another_joins_its_batch(pipe, monkeypatch):
    from pipelines import batching

    slow_sampler(monkeypatch)
    monkeypatch.setattr(batching, "REGROUP_S", 30.0)  # "just after" however busy the machine running the test
    batcher, out = Batcher(pipe), {}
    first = threading.Thread(target=lambda: out.update(a=batcher(class_labels="stars", num_images=2,
                                                                   guidance_scale=2.0, generator=gen(1))))
    first.start()
    wait_for(lambda: batcher._worker is not None and not batcher._waiting)  # the first is sampling, alone
    out["b"] = batcher(class_labels="circles", num_images=1, generator=gen(2))
    first.join(30)
    assert batcher.batches == 1  # the first batch restarted with both
    assert torch.equal(out["a"].codes, alone(pipe, class_labels="stars", num_images=2, guidance_scale=2.0,
                                             generator=gen(1)))  # its generator rewound: the same images
    assert torch.equal(out["b"].codes, alone(pipe, class_labels="circles", num_images=1, generator=gen(2)))


def test_previews_stream_to_each_request(pipe, monkeypatch):
    slow_sampler(monkeypatch)
    batcher = Batcher(pipe)
    held = Held(batcher)
    results = held.send([dict(class_labels="stars", num_images=2, generator=gen(5), every=1),
                         dict(class_labels="squares", num_images=1, generator=gen(6), every=4)],
                        consume=lambda s: [(o.done, o.images) for o in s])
    h, w, _ = pipe.rqvae.code_shape
    for outs, every in zip(results, (1, 4)):  # previews the consumer was too slow for are skipped, never reordered
        done = [d for d, _ in outs]
        assert done[-1] == 1 and done == sorted(set(done)) and len(done) >= 2
        assert all(round(d * h * w) % every == 0 for d in done) and all(len(ims) == len(outs[-1][1]) for _, ims in outs)


def test_text_and_text_with_class_requests_batch_together():
    pipe = tiny_text_pipeline(num_classes=3)
    requests = [dict(prompt="red circle", class_labels="stars", guidance_scale=3.0, num_images=2, seed=1),
                dict(prompt="blue square", num_images=1, guidance_scale=1.0, seed=2),
                dict(prompt=None, class_labels="circles", num_images=2, seed=3),  # the empty prompt
                dict(prompt=["green star", "yellow star"], guidance_scale=2.0, seed=4)]
    batcher = Batcher(pipe)
    results = Held(batcher).send([with_generator(r) for r in requests])
    assert batcher.batches == 1
    for request, outs in zip(requests, results):
        assert torch.equal(outs[-1].codes, alone(pipe, **with_generator(request)))
        assert outs[-1].prompts == pipe(**with_generator(request)).prompts


def test_a_closed_stream_stops_only_itself(pipe, monkeypatch):
    slow_sampler(monkeypatch)  # the first preview arrives before the batch ends, however busy the machine
    batcher = Batcher(pipe)
    held = Held(batcher)

    def first_only(stream):
        out = next(stream)
        stream.close()  # as when a visitor leaves: nothing more is sent to it
        return out

    requests = [dict(class_labels="circles", num_images=2, generator=gen(1), every=1),
                dict(class_labels="stars", num_images=2, generator=gen(2)),
                dict(class_labels="squares", num_images=1, generator=gen(3))]
    results = held.send(requests, consume=[first_only, list, list])
    assert results[0].done < 1
    for seed, label, outs in ((2, "stars", results[1]), (3, "squares", results[2])):
        n = len(outs[-1].images)
        assert torch.equal(outs[-1].codes, alone(pipe, class_labels=label, num_images=n, generator=gen(seed)))
    only = Held(batcher).send([requests[0]], consume=[first_only])  # alone: its batch stops early
    assert only[0].done < 1 and batcher(num_images=1, generator=gen(0)).images  # and the worker goes on


def test_a_failing_request_fails_alone_and_the_others_are_answered(pipe):
    batcher = Batcher(pipe)
    held = Held(batcher)
    bad = _Job(Conditioning(torch.tensor([7, 0])), SamplingOptions())  # class 7: out of range (3 classes + null)
    failed: list = []

    def send_bad():
        try:
            list(batcher._submit(bad))
        except ValueError as e:
            failed.append(str(e))
    t = threading.Thread(target=send_bad)
    t.start()
    wait_for(lambda: len(batcher._waiting) == 1)
    good = [dict(class_labels="circles", num_images=2, generator=gen(1)), dict(num_images=1, generator=gen(2))]
    results = held.send(good, others=1)
    t.join(30)
    assert failed and "class_labels must be in [0, 3]" in failed[0]
    for request, outs in zip([dict(class_labels="circles", num_images=2, seed=1), dict(num_images=1, seed=2)],
                             results):
        assert torch.equal(outs[-1].codes, alone(pipe, **with_generator(request)))


def test_a_full_queue_answers_busy_and_input_is_checked_before_waiting(pipe):
    batcher = Batcher(pipe, max_waiting=1)
    held = Held(batcher)
    waiting = threading.Thread(target=lambda: list(batcher.stream(num_images=1, generator=gen(0))))
    waiting.start()
    wait_for(lambda: len(batcher._waiting) == 1)
    with pytest.raises(Busy, match="busy: 1 requests are waiting"):
        next(batcher.stream(num_images=1))
    with pytest.raises(ValueError, match="num_images must be a whole number"):
        next(batcher.stream(num_images=0))
    held.release.set()
    waiting.join(30)
    assert batcher(num_images=2, generator=gen(3)).images  # served again once the queue has room
    assert batcher.run_alone(lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        batcher.run_alone(lambda: 1 / 0)
    for bad in (dict(max_rows=0), dict(max_waiting=1.5)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            Batcher(pipe, **bad)


def test_a_batch_of_requests_samples_the_same_with_and_without_the_cache(pipe):
    reqs = [pipe.request("circles", num_images=2, guidance_scale=3.0, top_k=6, generator=gen(1)),
            pipe.request(num_images=1, temperature=0.7, generator=gen(2)),
            pipe.request(["stars", "squares"], guidance_scale=1.0, top_p=0.8, generator=gen(3))]
    rows = Conditioning.concat([r[0] for r in reqs])
    cached = generate(pipe.transformer, rows, [r[1] for r in reqs], [gen(1), gen(2), gen(3)])
    uncached = generate(pipe.transformer, rows, [r[1] for r in reqs], [gen(1), gen(2), gen(3)], use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[0] == 5
    with pytest.raises(ValueError, match="one per request"):
        generate(pipe.transformer, rows, [r[1] for r in reqs][:2])
    with pytest.raises(ValueError, match="add up to the batch"):
        Conditioning(torch.zeros(3, dtype=torch.long), requests=(1, 1))
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        SamplingOptions(temperature=0)
