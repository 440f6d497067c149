"""RQ-Transformer: causality, one forward with and without KV caches, cached vs uncached sampling, CFG,
prefixes, overfitting, save/load."""
import copy
import json
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import gen
from rqtransformer import RQTransformer, RQTransformerConfig
from rqtransformer.losses import code_loss
from rqtransformer.model import SHORT_SEQUENCE, KVCache, causal_attention
from rqtransformer.sampling import ONE_THREAD_MAX_ROWS

K, SHAPE, CLASSES = 16, (3, 3, 3), 3


def make_config(**overrides) -> RQTransformerConfig:
    args = dict(codebook_size=K, code_shape=SHAPE, dim=32, heads=2, spatial_layers=2, depth_layers=2,
                num_classes=CLASSES, dropout=0.0)
    args.update(overrides)
    return RQTransformerConfig(**args)


def make_model(seed: int = 0, **overrides) -> RQTransformer:
    """A random model with spread-out logits, so sampling decisions are not near-uniform coin flips."""
    torch.manual_seed(seed)
    model = RQTransformer(make_config(**overrides))
    with torch.no_grad():
        model.head.weight.mul_(40)
        model.class_emb.weight.mul_(40)
        model.code_emb.weight.mul_(20)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model()



def random_codes(batch=2, seed=0):
    return torch.randint(0, K, (batch, *SHAPE), generator=gen(seed))


def labels(*values):
    return torch.tensor(values)


# ---- config and teacher forcing -------------------------------------------------------------------

def test_config_minimal_and_list_code_shape():
    c = RQTransformerConfig(codebook_size=8, code_shape=[2, 2, 2], dim=16, heads=2, spatial_layers=1,
                            depth_layers=1, num_classes=0, dropout=0.0)
    assert c.code_shape == (2, 2, 2) and c.class_names == []
    logits = RQTransformer(c)(torch.zeros(1, 2, 2, 2, dtype=torch.long))
    assert logits.shape == (1, 2, 2, 2, 8)


@pytest.mark.parametrize("overrides, match", [
    (dict(codebook_size=0), "codebook_size"),
    (dict(code_shape=(2, 2)), "code_shape"),
    (dict(code_shape=(2, 0, 2)), "code_shape"),
    (dict(dim=30, heads=4), "divisible"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
    (dict(num_classes=-1), "num_classes"),
    (dict(spatial_layers=0), "spatial_layers"),
    (dict(class_names=["a", "b"]), "class_names"),
])
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(**overrides)


def test_forward_shape_and_loss(model):
    codes = random_codes()
    logits = model(codes, torch.tensor([0, 2]))
    assert logits.shape == (2, *SHAPE, K)
    loss, acc = code_loss(logits, codes)
    assert loss.ndim == 0 and torch.isfinite(loss) and acc.shape == (SHAPE[2],)
    assert model.null_class == CLASSES
    # labels None == null class; a real class changes the logits
    torch.testing.assert_close(model(codes), model(codes, torch.full((2,), CLASSES)))
    assert not torch.allclose(model(codes), model(codes, torch.tensor([0, 0])))


@pytest.mark.parametrize("t", [0, 3, 7])
def test_spatial_causality(model, t):
    h, w, D = SHAPE
    codes = random_codes()
    changed = codes.clone().view(2, h * w, D)
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % K  # every code after position t
    changed = changed.view_as(codes)
    a = model(codes, torch.tensor([1, 2])).view(2, h * w, D, K)
    b = model(changed, torch.tensor([1, 2])).view(2, h * w, D, K)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, t + 1], b[:, t + 1], atol=1e-3)  # the next position does see them


@pytest.mark.parametrize("d", [0, 1])
def test_depth_causality(model, d):
    codes = random_codes()
    changed = codes.clone()
    changed[:, 1, 1, d + 1:] = (changed[:, 1, 1, d + 1:] + 5) % K  # position (1, 1), depths after d
    a, b = model(codes, torch.tensor([0, 1])), model(changed, torch.tensor([0, 1]))
    # logits of depth d+1 see codes up to depth d only
    torch.testing.assert_close(a[:, 1, 1, : d + 2], b[:, 1, 1, : d + 2], rtol=0, atol=1e-5)
    torch.testing.assert_close(a[:, :1], b[:, :1], rtol=0, atol=1e-5)  # earlier rows
    torch.testing.assert_close(a[:, 1, :1], b[:, 1, :1], rtol=0, atol=1e-5)  # earlier position in the row
    if d + 2 < SHAPE[2]:
        assert not torch.allclose(a[:, 1, 1, d + 2], b[:, 1, 1, d + 2], atol=1e-3)
    assert not torch.allclose(a[:, 1, 2], b[:, 1, 2], atol=1e-3)  # the next position sees the whole stack


def test_cached_steps_match_teacher_forcing(model):
    """The sampler's calls (one token per call, KV caches) give the teacher-forced forward's values."""
    h, w, D = SHAPE
    codes = random_codes()
    flat = codes.view(2, h * w, D)
    lab = labels(2, 0)
    with torch.no_grad():
        logits = model(codes, lab).view(2, h * w, D, K)
        caches, depth_caches = model.new_caches(2), model.new_caches(2, depth=True)  # depth: rewritten from 0
        x = model.class_emb(lab)[:, None]  # [2, 1, dim]
        for t in range(h * w):
            y = model.spatial_transformer(x, caches, t)  # [2, 1, dim]
            for d in range(D):
                torch.testing.assert_close(model.depth_transformer(y, depth_caches, d)[:, 0], logits[:, t, d],
                                           rtol=0, atol=1e-4)
                y = model.code_emb(flat[:, t, d])[:, None]
            x = model.code_emb(flat[:, t]).sum(1, keepdim=True)


def test_cache_prefill_then_steps(model):
    """Several tokens written from position 0 (causal), then one at a time: the same as without a cache."""
    h, w, D = SHAPE
    x = torch.randn(2, h * w, 32, generator=gen(1))
    with torch.no_grad():
        full = model.spatial_transformer(x)  # [2, h*w, dim]
        caches = model.new_caches(2)
        torch.testing.assert_close(model.spatial_transformer(x[:, :4], caches, 0), full[:, :4], rtol=0, atol=1e-5)
        for t in range(4, h * w):
            torch.testing.assert_close(model.spatial_transformer(x[:, t : t + 1], caches, t), full[:, t : t + 1],
                                       rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="from position 0"):
            model.spatial_transformer(x[:, :2], caches, 3)


def test_kv_cache_is_a_module_outside_the_weights(model):
    caches = model.new_caches(3, depth=True)
    assert len(caches) == 2 and all(isinstance(c, KVCache) for c in caches)
    assert caches[0].kv.shape == (3, 2, 2, SHAPE[2], 16)  # [B, 2 (k, v), heads, D, dim_head]
    assert caches.state_dict() == {}  # a working buffer: never saved with the model
    assert caches.to(torch.float64)[0].kv.dtype == torch.float64
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}  # caches live outside


# ---- sampling -------------------------------------------------------------------------------------

FIRST4 = torch.arange(SHAPE[0] * SHAPE[1]).view(SHAPE[:2]).expand(2, -1, -1) < 4  # the first 4 positions
PREFIX = (torch.randint(0, K, (2, *SHAPE), generator=gen(7)), FIRST4)  # codes [2, h, w, D], keep [2, h, w]
KEEP_CODES = torch.randint(0, K, (2, *SHAPE), generator=gen(8))
KEEP_MASK = torch.rand(2, *SHAPE[:2], generator=gen(9)) < 0.5

SAMPLING_CASES = {
    "plain": {},
    "cfg": dict(guidance_scale=3.0),
    "cfg0": dict(guidance_scale=0.0),
    "cfg_cutoff": dict(guidance_scale=3.0, guidance_cutoff=0.05),
    "top_k": dict(top_k=4),
    "top_p": dict(top_p=0.7),
    "temperature": dict(temperature=0.6),
    "all": dict(guidance_scale=2.0, top_k=6, top_p=0.9, temperature=1.3),
    "prefix": dict(prefix=PREFIX),
    "prefix_cfg": dict(prefix=PREFIX, guidance_scale=2.5, top_p=0.9),
    "keep_mask": dict(prefix=(KEEP_CODES, KEEP_MASK)),
    "keep_mask_cfg": dict(prefix=(KEEP_CODES, KEEP_MASK), guidance_scale=2.0, top_k=5),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_cached_equals_uncached(model, case, seed):
    kwargs = SAMPLING_CASES[case]
    cached = model.generate(class_labels=labels(0, 2), generator=gen(seed), **kwargs)
    uncached = model.generate(class_labels=labels(0, 2), generator=gen(seed), use_cache=False, **kwargs)
    assert cached.shape == (2, *SHAPE) and cached.dtype == torch.long
    assert torch.equal(cached, uncached)


def test_cached_equals_uncached_unconditional():
    model = make_model(seed=3, num_classes=0)
    kwargs = dict(num_samples=3, top_p=0.95, temperature=0.9)
    cached = model.generate(generator=gen(5), **kwargs)
    assert cached.shape == (3, *SHAPE)
    assert torch.equal(cached, model.generate(generator=gen(5), use_cache=False, **kwargs))


def test_guidance_cutoff_keeps_to_codes_the_conditional_model_finds_likely(model):
    classes = labels(0, 1, 2)
    greedy = model.generate(class_labels=classes, top_k=1)  # the conditional model's most likely code each time
    # a cutoff near 1 leaves only that code, however strong the guidance
    assert torch.equal(greedy, model.generate(class_labels=classes, guidance_scale=8.0, guidance_cutoff=0.999,
                                              generator=gen(4)))
    free = model.generate(class_labels=classes, guidance_scale=8.0, guidance_cutoff=0.0, generator=gen(4))
    assert not torch.equal(greedy, free)
    # below scale 1 (towards the unconditional model) the cutoff does nothing
    assert torch.equal(model.generate(class_labels=classes, guidance_scale=0.5, guidance_cutoff=0.999, generator=gen(4)),
                       model.generate(class_labels=classes, guidance_scale=0.5, guidance_cutoff=0.0, generator=gen(4)))


def test_determinism(model):
    a = model.generate(class_labels=labels(1, 1, 2), generator=gen(11))
    b = model.generate(class_labels=labels(1, 1, 2), generator=gen(11))
    c = model.generate(class_labels=labels(1, 1, 2), generator=gen(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert ((0 <= a) & (a < K)).all()


def test_guidance_one_is_plain_conditional(model):
    classes = labels(0, 1, 2)
    plain = model.generate(class_labels=classes, generator=gen(3))
    # a scale that rounds to 1.0 in float32 still takes the 2B-row CFG path: the conditional half
    # must give the same codes as the plain B-row path
    cfg = model.generate(class_labels=classes, guidance_scale=1.00000001, generator=gen(3))
    assert torch.equal(plain, cfg)
    # scale 0 = the null-class half alone = unconditional sampling
    uncond = model.generate(num_samples=3, generator=gen(3))
    assert torch.equal(uncond, model.generate(class_labels=classes, guidance_scale=0.0, generator=gen(3)))
    assert not torch.equal(plain, model.generate(class_labels=classes, guidance_scale=4.0, generator=gen(3)))
    # null-class labels are unconditional rows, also inside a batch
    mixed = model.generate(class_labels=labels(CLASSES, CLASSES, CLASSES), generator=gen(3))
    assert torch.equal(uncond, mixed)


def test_prefix_and_keep_mask_are_respected(model):
    out = model.generate(class_labels=labels(1, 1), prefix=PREFIX, generator=gen(0))
    assert torch.equal(out[FIRST4], PREFIX[0][FIRST4])
    out = model.generate(class_labels=labels(0, 2), prefix=(KEEP_CODES, KEEP_MASK), generator=gen(0))
    assert torch.equal(out[KEEP_MASK], KEEP_CODES[KEEP_MASK])
    assert not torch.equal(out[~KEEP_MASK], KEEP_CODES[~KEEP_MASK])
    # a batch-1 prefix (codes, mask or both) is broadcast to the requested batch
    for codes, mask in ((KEEP_CODES[:1], KEEP_MASK[:1]), (KEEP_CODES[:1], KEEP_MASK[[0, 0, 0]]),
                        (KEEP_CODES[[0, 0, 0]], KEEP_MASK[:1])):
        out = model.generate(num_samples=3, prefix=(codes, mask), generator=gen(0))
        assert out.shape == (3, *SHAPE) and (out[:, KEEP_MASK[0]] == KEEP_CODES[0][KEEP_MASK[0]]).all()


def test_callback_streams_codes(model):
    h, w, D = SHAPE
    seen = []
    out = model.generate(class_labels=labels(0, 1), prefix=(KEEP_CODES, KEEP_MASK), generator=gen(2),
                         callback=lambda step, codes: seen.append((step, codes)))
    assert [s for s, _ in seen] == list(range(1, h * w + 1))
    for step, codes in seen:
        assert codes.shape == (2, h, w, D)
        flat, ref = codes.view(2, h * w, D), out.view(2, h * w, D)
        assert torch.equal(flat[:, :step], ref[:, :step])
        later = flat[:, step:]
        forced_later = KEEP_MASK.view(2, h * w)[:, step:]
        assert (later[~forced_later] == -1).all()  # not generated yet
        assert torch.equal(later[forced_later], ref[:, step:][forced_later])  # forced: known from the start
    assert torch.equal(seen[-1][1], out)


def test_batch_resolution_and_mode_restored():
    model = make_model(seed=1, dropout=0.2)
    model.train()
    assert model.generate(num_samples=4).shape == (4, *SHAPE)
    assert model.generate(class_labels=labels(0, 1)).shape == (2, *SHAPE)
    assert model.generate(class_labels=labels(0, 1), num_samples=2).shape == (2, *SHAPE)
    assert model.generate(class_labels=torch.tensor([2], dtype=torch.int32)).shape == (1, *SHAPE)
    assert model.generate().shape == (1, *SHAPE)
    assert model.generate(prefix=PREFIX).shape == (2, *SHAPE)
    assert model.training  # previous mode restored
    # sampling runs in eval mode: dropout off, so cached == uncached even for a model left in train mode
    a = model.generate(class_labels=labels(2, 0), generator=gen(4))
    assert torch.equal(a, model.generate(class_labels=labels(2, 0), generator=gen(4), use_cache=False))


def test_sampling_threads_are_set_and_restored(model):
    torch.set_num_threads(3)
    try:
        seen = []

        def record(step, codes):
            seen.append(torch.get_num_threads())

        default = model.generate(class_labels=labels(0, 1), generator=gen(5), callback=record)
        assert set(seen) == {1} and torch.get_num_threads() == 3
        seen.clear()
        same = model.generate(class_labels=labels(0, 1), generator=gen(5), callback=record, num_threads=None)
        assert set(seen) == {3} and torch.equal(default, same)  # the thread count does not change the codes
        seen.clear()
        model.generate(callback=record, num_threads=8)  # never more than torch's setting
        assert set(seen) == {3}
        n = ONE_THREAD_MAX_ROWS
        for kwargs in (dict(num_samples=n + 1), dict(class_labels=torch.zeros(n // 2 + 1, dtype=torch.long),
                                                     guidance_scale=2.0),
                       dict(use_cache=False)):  # "auto": large batches and full forwards keep all threads
            seen.clear()
            model.generate(callback=record, **kwargs)
            assert set(seen) == {3}, kwargs
        seen.clear()
        model.generate(num_samples=n, callback=record, num_threads=2)
        assert set(seen) == {2}

        def fail(step, codes):
            raise RuntimeError("stop")
        with pytest.raises(RuntimeError, match="stop"):
            model.generate(callback=fail)
        assert torch.get_num_threads() == 3

        after = []  # concurrent calls (as in the app's worker threads) each end with the setting restored

        def work():
            model.generate(class_labels=labels(0, 1, 2), generator=gen(6))
            after.append(torch.get_num_threads())
        workers = [threading.Thread(target=work) for _ in range(4)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert after == [3] * 4 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(1)


# ---- training, save/load -------------------------------------------------------------------------

def test_overfits_tiny_code_set():
    torch.manual_seed(0)
    model = RQTransformer(make_config(dim=48, heads=4))
    stacks = torch.randint(0, K, (CLASSES, *SHAPE), generator=gen(42))  # one memorised stack per class
    classes = torch.arange(CLASSES)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    first = None
    for _ in range(250):
        loss, acc = code_loss(model(stacks, classes), stacks)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first > 2.0 and loss.item() < 0.05, (first, loss.item())
    assert torch.equal(acc, torch.ones(SHAPE[2]))
    for c in range(CLASSES):
        greedy = model.generate(class_labels=labels(c), top_k=1, generator=gen(c))
        assert torch.equal(greedy[0], stacks[c]), c
    assert model.training


def test_save_load_round_trip(tmp_path):
    model = make_model(seed=2, class_names=["cats", "dogs", "owls"])
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["class_names"] == ["cats", "dogs", "owls"]
    loaded = RQTransformer.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    codes, lab = random_codes(), labels(2, 0)
    assert torch.equal(model(codes, lab), loaded(codes, lab))
    assert torch.equal(model.generate(class_labels=labels(1, 2), generator=gen(0)),
                       loaded.generate(class_labels=labels(1, 2), generator=gen(0)))


@pytest.mark.parametrize("tamper, match", [
    ("missing", "missing tensor"),
    ("extra", "unexpected tensor"),
    ("shape", "shape"),
])
def test_strict_loading_rejects_tampered_file(tmp_path, tamper, match):
    make_model().save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    if tamper == "missing":
        del tensors["head.weight"]
    elif tamper == "extra":
        tensors["head.extra"] = torch.zeros(3)
    else:
        tensors["depth_pos"] = torch.zeros(SHAPE[2] + 1, 32)
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=match):
        RQTransformer.from_pretrained(tmp_path)


# ---- bad arguments --------------------------------------------------------------------------------

BAD_GENERATE = [
    (dict(class_labels=labels(4)), r"class_labels must be in \[0, 3\] \(3 = null class\)"),
    (dict(class_labels=labels(0, -1)), "class_labels must be in"),
    (dict(class_labels=[0, 1]), "class_labels must be None or a non-empty integer tensor"),  # lists: the pipeline's
    (dict(class_labels=1), "class_labels must be None or"),
    (dict(class_labels=torch.tensor(1)), "class_labels must be None or"),
    (dict(class_labels=torch.zeros(2, 1, dtype=torch.long)), "class_labels must be None or"),
    (dict(class_labels=torch.zeros(0, dtype=torch.long)), "non-empty"),
    (dict(class_labels=torch.tensor([0.5])), "integer tensor"),
    (dict(class_labels=torch.tensor([True])), "integer tensor"),
    (dict(num_samples=0), "num_samples"),
    (dict(num_samples=1.5), "num_samples"),
    (dict(class_labels=labels(0, 1), num_samples=3), "does not match"),
    (dict(temperature=0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=K + 1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(guidance_scale=-0.5), "guidance_scale"),
    (dict(guidance_cutoff=1.0), "guidance_cutoff"),
    (dict(guidance_cutoff=-0.1), "guidance_cutoff"),
    (dict(guidance_cutoff=float("nan")), "guidance_cutoff"),
    (dict(guidance_cutoff="0.1"), "guidance_cutoff"),
    (dict(callback=3), "callback"),
    (dict(num_threads=0), "num_threads"),
    (dict(num_threads=1.5), "num_threads"),
    (dict(num_threads="all"), "num_threads"),
    (dict(prefix=torch.zeros(2, 3, SHAPE[2], dtype=torch.long)), "prefix must be a tuple"),  # no [B, k, D] form
    (dict(prefix=[KEEP_CODES, KEEP_MASK]), "prefix must be a tuple"),
    (dict(prefix=(KEEP_CODES, KEEP_MASK, KEEP_MASK)), "prefix must be a tuple"),
    (dict(prefix=(KEEP_CODES[0], KEEP_MASK)), "prefix codes must have shape"),  # unbatched
    (dict(prefix=(KEEP_CODES[..., :2], KEEP_MASK)), "prefix codes must have shape"),
    (dict(prefix=(KEEP_CODES.float(), KEEP_MASK)), "integer tensor"),
    (dict(prefix=(KEEP_CODES, KEEP_MASK[0])), "keep_mask must have shape"),
    (dict(prefix=(KEEP_CODES, KEEP_MASK[:, :2])), "keep_mask must have shape"),
    (dict(prefix=(KEEP_CODES, KEEP_MASK.long())), "keep_mask must be a bool"),
    (dict(prefix=(KEEP_CODES[[0, 1, 1]], KEEP_MASK)), r"prefix codes batch \(3\) and keep_mask batch \(2\) differ"),
    (dict(prefix=PREFIX, num_samples=3), "prefix has batch 2"),
    (dict(prefix=(torch.full_like(KEEP_CODES, K), KEEP_MASK)), r"prefix code values must be in \[0, 16\)"),
    (dict(prefix=(KEEP_CODES - 1, torch.ones_like(KEEP_MASK))), "prefix code values"),
]


@pytest.mark.parametrize("kwargs, match", BAD_GENERATE)
def test_generate_rejects_bad_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(**kwargs)


def test_unconditional_model_takes_only_the_null_class():
    model = make_model(num_classes=0)
    assert model.generate(class_labels=labels(0, 0)).shape == (2, *SHAPE)  # 0 = its null class
    with pytest.raises(ValueError, match=r"class_labels must be in \[0, 0\]"):
        model.generate(class_labels=labels(1))


@pytest.mark.parametrize("codes, labels, match", [
    (torch.zeros(2, 3, 3, dtype=torch.long), None, "shape"),
    (torch.zeros(2, 3, 3, 2, dtype=torch.long), None, "shape"),
    (torch.zeros(2, *SHAPE), None, "integer"),
    (torch.full((2, *SHAPE), K), None, "code values"),
    (torch.full((2, *SHAPE), -1), None, "code values"),
    (torch.zeros(2, *SHAPE, dtype=torch.long), torch.tensor([0, CLASSES + 1]), "class_labels must be in"),
    (torch.zeros(2, *SHAPE, dtype=torch.long), torch.tensor([0]), "class_labels must be"),
])
def test_forward_rejects_bad_inputs(model, codes, labels, match):
    with pytest.raises(ValueError, match=match):
        model(codes, labels)


@pytest.mark.parametrize("top_k, top_p, temperature", [(None, None, 1.0), (3, None, 1.0), (None, 0.6, 1.0),
                                                       (4, 0.8, 0.7), (6, None, 2.0)])
def test_sample_logits_draws_from_the_filtered_softmax(top_k, top_p, temperature):
    """Frequencies of 20k draws match softmax(logits / T) restricted to the top-k, then to the nucleus."""
    from rqtransformer import sample_logits

    logits = torch.tensor([2.0, 0.5, 1.5, -1.0, 1.0, 0.0])
    probs = (logits / temperature).softmax(-1)
    allowed = torch.ones(6, dtype=torch.bool)
    order = probs.argsort(descending=True)
    if top_k is not None:
        allowed[order[top_k:]] = False
    if top_p is not None:  # the nucleus of what top-k left, renormalised
        kept = torch.where(allowed, probs, 0.0)[order] / probs[allowed].sum()
        before = kept.cumsum(0) - kept  # mass of strictly better codes
        allowed[order[before >= top_p]] = False
    expected = torch.where(allowed, probs, 0.0)
    expected /= expected.sum()
    n = 20_000
    draws = sample_logits(logits.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / n
    assert (freq[~allowed] == 0).all()
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_draw_is_torch_multinomial():
    """draw() skips torch.multinomial's checks but must make the same draws (the same codes for a seed)."""
    from rqtransformer.sampling import draw
    probs = torch.rand(64, 10, generator=gen(0)).softmax(-1)
    probs[:, 3] = 0  # filtered codes (top-k / top-p) have probability 0 and are never drawn
    for seed in range(5):
        chosen = draw(probs, gen(seed))
        assert torch.equal(chosen, torch.multinomial(probs, 1, generator=gen(seed)))
        assert chosen.shape == (64, 1) and (chosen != 3).all()


def test_compiled_steps_sample_greedily_like_eager():
    """compile_steps (the GPU option), exercised on CPU with the smallest model: greedy sampling through the
    compiled per-token calls picks, at every position, the best code of eager teacher forcing. (Not equal
    codes: compiled kernels round differently, and on some CPUs that flips near-ties.)"""
    torch.manual_seed(0)
    config = RQTransformerConfig(codebook_size=8, code_shape=(2, 2, 2), dim=16, heads=2, spatial_layers=1,
                                 depth_layers=1, num_classes=2, dropout=0.0)
    model = RQTransformer(config).eval()
    compiled = copy.deepcopy(model).compile_steps()
    lab = labels(0, 1)
    codes = compiled.generate(class_labels=lab, top_k=1, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(codes, lab)  # [2, h, w, D, K], eager
    chosen = logits.gather(-1, codes[..., None])[..., 0]
    assert (logits.amax(-1) - chosen).max() < 1e-4  # the argmax everywhere, up to rounding


@pytest.mark.parametrize("n", [1, 4, SHORT_SEQUENCE, SHORT_SEQUENCE + 1, 100])
def test_causal_attention_matches_float64_reference(n):
    # both paths of causal_attention (CPU matmul + softmax up to SHORT_SEQUENCE tokens, the fused kernel
    # above) against attention written out in float64: values and gradients
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(3, 2, n, 8, generator=g, requires_grad=True) for _ in range(3))
    out = causal_attention(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = q64 @ k64.transpose(-2, -1) / 8 ** 0.5
    future = torch.ones(n, n, dtype=torch.bool).triu(1)
    ref = scores.masked_fill(future, float("-inf")).softmax(-1) @ v64
    ref_grads = torch.autograd.grad(ref.square().sum(), (q64, k64, v64))
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


def test_causal_attention_dropout_drops_weights():
    q, k, v = torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), torch.ones(1, 1, 4, 2)
    torch.manual_seed(0)
    out = causal_attention(q, k, v, dropout_p=0.5)  # uniform weights, some zeroed, the rest doubled
    assert not torch.allclose(out, torch.ones_like(out))
    torch.testing.assert_close(causal_attention(q, k, v), torch.ones(1, 1, 4, 2))


def test_code_loss_with_one_hot_soft_targets_equals_the_hard_loss():
    from rqtransformer.losses import code_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 2, 2, 3, 7, generator=g)
    codes = torch.randint(0, 7, (2, 2, 2, 3), generator=g)
    hard, acc = code_loss(logits, codes)
    soft, acc_soft = code_loss(logits, codes, torch.nn.functional.one_hot(codes, 7).float())
    torch.testing.assert_close(hard, soft)
    assert torch.equal(acc, acc_soft)
    smooth = torch.full((2, 2, 2, 3, 7), 1 / 7)  # uniform targets: the mean of -log_softmax over codes
    expected = -logits.log_softmax(-1).mean(-1).mean()
    torch.testing.assert_close(code_loss(logits, codes, smooth)[0], expected)
