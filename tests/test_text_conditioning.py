"""Text-conditioned RQ-Transformer: the prompt prefix in forward and in cached sampling, guidance over
text, argument checks, and save/load with the tokenizer (model side; the tokenizer has its own tests)."""
import json

import pytest
import torch

from rqcore.pretrained import PretrainedMixin
from conftest import gen
from rqtransformer import TEXT_PAD_ID, RQTransformer, RQTransformerConfig
from rqtransformer.losses import per_depth_nll

K, SHAPE, CLASSES, VOCAB, L = 16, (3, 3, 3), 3, 20, 4


def make_config(**overrides) -> RQTransformerConfig:
    args = dict(codebook_size=K, code_shape=SHAPE, dim=32, heads=2, spatial_layers=2, depth_layers=2,
                num_classes=CLASSES, dropout=0.0, text_vocab_size=VOCAB, max_text_len=L)
    args.update(overrides)
    return RQTransformerConfig(**args)


def make_model(seed: int = 0, **overrides) -> RQTransformer:
    """A random text model with spread-out logits and strong spatial attention: the prompt reaches the codes
    only through attention, which a fresh model's small residual projections would all but mute."""
    torch.manual_seed(seed)
    model = RQTransformer(make_config(**overrides))
    with torch.no_grad():
        model.head.weight.mul_(40)
        model.class_emb.weight.mul_(40)
        model.code_emb.weight.mul_(20)
        for block in model.spatial_blocks:
            block.attn.proj.weight.mul_(30)
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_model()



def random_codes(batch=2, seed=0):
    return torch.randint(0, K, (batch, *SHAPE), generator=gen(seed))


PROMPTS = torch.tensor([[5, 6, 7, TEXT_PAD_ID], [9, TEXT_PAD_ID, TEXT_PAD_ID, TEXT_PAD_ID]])  # [2, L]
EMPTY = torch.full((2, L), TEXT_PAD_ID)


# ---- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(text_vocab_size=10, max_text_len=0), "must both be 0"),
    (dict(text_vocab_size=0, max_text_len=4), "must both be 0"),
    (dict(text_vocab_size=-1), "text_vocab_size must be an integer >= 0"),
    (dict(max_text_len=2.5), "max_text_len must be an integer >= 0"),
    (dict(max_text_len=True), "max_text_len must be an integer >= 0"),
])
def test_config_rejects_bad_text_fields(overrides, match):
    with pytest.raises(ValueError, match=match) as info:
        make_config(**overrides)
    assert "\n" not in str(info.value)


def test_model_without_text_has_no_text_tensors():
    plain = RQTransformer(make_config(text_vocab_size=0, max_text_len=0))
    assert not plain.has_text and not any(k.startswith("text_") for k in plain.state_dict())
    assert make_model().has_text


def test_old_config_json_without_text_fields_loads(tmp_path):
    plain = make_model(text_vocab_size=0, max_text_len=0)
    plain.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["text_vocab_size"], config["max_text_len"]  # as written before text conditioning
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text("not a tokenizer")  # models without text ignore it
    loaded = RQTransformer.from_pretrained(tmp_path)
    assert loaded.config.max_text_len == 0 and loaded.tokenizer is None
    codes = random_codes()
    assert torch.equal(loaded(codes), plain(codes))


# ---- forward ----------------------------------------------------------------------------------------

def test_forward_with_prompts(model):
    codes = random_codes()
    with torch.no_grad():
        logits = model(codes, torch.tensor([0, 1]), PROMPTS)
        assert logits.shape == (2, *SHAPE, K)
        # no prompt = the empty prompt (all pads)
        torch.testing.assert_close(model(codes, None, None), model(codes, None, EMPTY), rtol=0, atol=0)
        # a different prompt changes the logits, from the first code on
        other = model(codes, torch.tensor([0, 1]), PROMPTS.flip(0))
        assert not torch.allclose(logits[:, 0, 0, 0], other[:, 0, 0, 0], atol=1e-3)
        # text attends causally: a token after the prompt's end (a pad) changes nothing before it is seen,
        # but the codes see every text token, pads included
        changed = PROMPTS.clone()
        changed[1, 3] = 11
        assert torch.equal(model(codes, None, changed)[0], model(codes, None, PROMPTS)[0])
        assert not torch.allclose(model(codes, None, changed)[1], model(codes, None, PROMPTS)[1], atol=1e-3)


def test_cached_steps_match_teacher_forcing_with_a_prompt(model):
    """Prefill the prompt, then one token per call: the teacher-forced forward's logits."""
    h, w, D = SHAPE
    codes, lab = random_codes(), torch.tensor([2, 0])
    flat = codes.view(2, h * w, D)
    with torch.no_grad():
        logits = model(codes, lab, PROMPTS).view(2, h * w, D, K)
        caches, depth_caches = model.new_caches(2), model.new_caches(2, depth=True)
        assert caches[0].kv.shape[3] == L + h * w
        model.spatial_transformer(model.text_emb(PROMPTS), caches, 0)
        x = model.class_emb(lab)[:, None]
        for t in range(h * w):
            y = model.spatial_transformer(x, caches, L + t)
            for d in range(D):
                torch.testing.assert_close(model.depth_transformer(y, depth_caches, d)[:, 0], logits[:, t, d],
                                           rtol=0, atol=1e-4)
                y = model.code_emb(flat[:, t, d])[:, None]
            x = model.code_emb(flat[:, t]).sum(1, keepdim=True)


def test_per_depth_nll_takes_prompts(model):
    codes, lab = random_codes(3), torch.tensor([0, 1, 2])
    prompts = PROMPTS[[0, 1, 0]]
    nll = per_depth_nll(model, codes, lab, batch_size=2, text_tokens=prompts)
    with torch.no_grad():
        logits = model(codes, lab, prompts)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, K), codes.reshape(-1), reduction="none")
    torch.testing.assert_close(nll, ce.view(-1, SHAPE[2]).mean(0))
    assert not torch.allclose(nll, per_depth_nll(model, codes, lab))  # None = the empty prompt: different


# ---- sampling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(text_tokens=PROMPTS),
    dict(text_tokens=PROMPTS, guidance_scale=3.0),
    dict(text_tokens=PROMPTS, class_labels=torch.tensor([1, 2]), guidance_scale=2.5, top_k=5),
    dict(text_tokens=PROMPTS[:1], num_samples=3, guidance_scale=3.0),  # one prompt broadcast
    dict(class_labels=torch.tensor([0, 1]), guidance_scale=3.0),  # class guidance on a text model
    dict(text_tokens=PROMPTS, prefix=(random_codes(), torch.tensor([[1, 0, 1], [0, 0, 0], [0, 1, 0]]).bool()[None]),
         guidance_scale=2.0),
])
def test_cached_sampling_matches_uncached_with_a_prompt(model, kwargs):
    cached = model.generate(generator=gen(5), **kwargs)
    assert torch.equal(cached, model.generate(generator=gen(5), use_cache=False, **kwargs))


def test_sampling_is_deterministic_and_follows_the_prompt(model):
    a = model.generate(text_tokens=PROMPTS, guidance_scale=3.0, generator=gen(1))
    assert torch.equal(a, model.generate(text_tokens=PROMPTS, guidance_scale=3.0, generator=gen(1)))
    assert not torch.equal(a, model.generate(text_tokens=PROMPTS, guidance_scale=3.0, generator=gen(2)))
    # greedy: the codes depend on the prompt alone
    first = model.generate(text_tokens=PROMPTS[:1], num_samples=2, top_k=1)
    second = model.generate(text_tokens=PROMPTS[1:], num_samples=2, top_k=1)
    assert torch.equal(first[0], first[1]) and (first != second).float().mean() > 0.2


def test_empty_prompt_is_no_prompt(model):
    assert torch.equal(model.generate(num_samples=2, generator=gen(3)),
                       model.generate(text_tokens=EMPTY, generator=gen(3)))


def test_guidance_uses_the_empty_prompt_as_unconditional(model):
    """Guidance with scale 0 samples from the unconditional rows alone: null class and the empty prompt."""
    kwargs = dict(top_k=1, generator=gen(0))
    uncond = model.generate(num_samples=2, **kwargs)
    assert torch.equal(model.generate(text_tokens=PROMPTS, guidance_scale=0.0, **kwargs), uncond)
    assert torch.equal(model.generate(text_tokens=PROMPTS, class_labels=torch.tensor([0, 1]), guidance_scale=0.0,
                                      **kwargs), uncond)
    assert not torch.equal(model.generate(text_tokens=PROMPTS, **kwargs), uncond)


BAD_TEXT = [
    (PROMPTS.float(), "text_tokens must be an integer tensor"),
    (PROMPTS.bool(), "text_tokens must be an integer tensor"),
    ([[5, 6, 7, 0]], "text_tokens must be an integer tensor"),
    (PROMPTS[:, :3], r"text_tokens must have shape \[.*, 4\] \(max_text_len 4"),
    (PROMPTS[0], "text_tokens must have shape"),
    (PROMPTS[:0], "text_tokens must have shape"),
    (PROMPTS - 1, r"text token ids must be in \[0, 20\)"),
    (PROMPTS + VOCAB, r"text token ids must be in \[0, 20\)"),
]


@pytest.mark.parametrize("text, match", BAD_TEXT)
def test_forward_and_generate_reject_bad_text_tokens(model, text, match):
    for call in (lambda: model(random_codes(), None, text), lambda: model.generate(text_tokens=text)):
        with pytest.raises(ValueError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_text_batch_must_match():
    model = make_model()
    with pytest.raises(ValueError, match=r"text_tokens must have shape \[3, 4\]"):
        model(random_codes(3), None, PROMPTS)
    with pytest.raises(ValueError, match="text_tokens has batch 2 but 3 samples are requested"):
        model.generate(text_tokens=PROMPTS, class_labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="text_tokens has batch 2 but 3 samples"):
        model.generate(text_tokens=PROMPTS, num_samples=3)
    assert model.generate(text_tokens=PROMPTS).shape == (2, *SHAPE)  # the batch of the prompts


def test_model_without_text_refuses_text_tokens():
    plain = make_model(text_vocab_size=0, max_text_len=0)
    for call in (lambda: plain(random_codes(), None, PROMPTS), lambda: plain.generate(text_tokens=PROMPTS)):
        with pytest.raises(ValueError, match=r"this model has no text conditioning \(text_vocab_size = 0\)"):
            call()


# ---- save / load with the tokenizer ------------------------------------------------------------------

CAPTIONS = ["red circle", "blue square", "green triangle", "a red square", "small blue circle"] * 4


@pytest.fixture(scope="module")
def tokenizer():
    from rqtransformer.tokenizer import PromptTokenizer  # needs the tokenizers package
    return PromptTokenizer.train(CAPTIONS, 300)


def test_pad_id_agrees_with_the_tokenizer(tokenizer):
    from rqtransformer.tokenizer import TEXT_PAD_ID as tokenizer_pad
    assert tokenizer_pad == TEXT_PAD_ID
    ids, _ = tokenizer.encode(["", "red circle"], L)
    assert (ids[0] == TEXT_PAD_ID).all() and ids[1, 0] != TEXT_PAD_ID


def test_save_load_round_trip_with_tokenizer(tmp_path, tokenizer):
    model = make_model(text_vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = RQTransformer.from_pretrained(tmp_path)
    assert loaded.tokenizer.vocab_size == tokenizer.vocab_size
    prompts = ["red circle", "blue square"]
    ids = loaded.tokenizer.encode(prompts, L)[0]
    assert torch.equal(ids, tokenizer.encode(prompts, L)[0])
    codes = random_codes()
    with torch.no_grad():
        assert torch.equal(loaded(codes, None, ids), model(codes, None, ids))
    kwargs = dict(text_tokens=ids, guidance_scale=3.0)
    assert torch.equal(loaded.generate(generator=gen(0), **kwargs), model.generate(generator=gen(0), **kwargs))


def test_save_refuses_a_text_model_without_its_tokenizer(tmp_path, tokenizer):
    model = make_model()
    with pytest.raises(ValueError, match="this text model has no tokenizer: set model.tokenizer"):
        model.save_pretrained(tmp_path)
    model.tokenizer = tokenizer  # 300-ish tokens, the model has 20
    with pytest.raises(ValueError, match=f"model.tokenizer has {tokenizer.vocab_size} tokens but the model's "
                                         f"text_vocab_size is {VOCAB}"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_strict_load_refuses_missing_or_mismatched_tokenizer(tmp_path, tokenizer):
    model = make_model(text_vocab_size=tokenizer.vocab_size)
    model.tokenizer = tokenizer
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="holds a text-conditioned model but no tokenizer.json") as info:
        RQTransformer.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)
    from rqtransformer.tokenizer import PromptTokenizer
    PromptTokenizer.train(CAPTIONS + ["yellow star"], 400).save(tmp_path / "tokenizer.json")  # another vocabulary
    with pytest.raises(ValueError, match="tokens but config.json's text_vocab_size is") as info:
        RQTransformer.from_pretrained(tmp_path)
    assert "\n" not in str(info.value)


def test_weights_written_without_tokenizer_do_not_load(tmp_path):
    """A text model's folder written by the plain mixin (no tokenizer) is refused on load."""
    PretrainedMixin.save_pretrained(make_model(), tmp_path)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        RQTransformer.from_pretrained(tmp_path)
