"""text_pool: the prompt's pooled token embeddings join the start token (a class embedding's direct path), in
the teacher-forced forward and in both samplers; the empty prompt adds nothing; old text models load as before."""
from __future__ import annotations

import pytest
import torch

from conftest import gen
from rqtransformer import TEXT_PAD_ID, RQTransformer
from test_text_conditioning import EMPTY, PROMPTS, make_config, make_model, random_codes

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_option_needs_a_text_model_with_a_start_token():
    with pytest.raises(ValueError, match="text_pool needs a text model"):
        make_config(text_pool=True, text_vocab_size=0, max_text_len=0)
    assert make_config().text_pool is False  # earlier text models: unchanged


def test_the_pooled_prompt_reaches_the_first_position_and_the_empty_prompt_adds_nothing():
    plain, pooled = make_model(seed=3), make_model(seed=3, text_pool=True)
    assert plain.state_dict().keys() == pooled.state_dict().keys()  # no new tensors: old files load either way
    codes, labels = random_codes(2), torch.tensor([0, 1])
    with torch.inference_mode():
        assert torch.equal(plain(codes, labels, EMPTY), pooled(codes, labels, EMPTY))
        a, b = plain(codes, labels, PROMPTS), pooled(codes, labels, PROMPTS)
    assert not torch.allclose(a[:, 0, 0], b[:, 0, 0])  # position 0 sees the pooled prompt
    x = pooled.start_inputs(labels, PROMPTS)  # [2, 1, dim]
    pool = pooled.text_emb(PROMPTS[0, :3]).sum(0) / 3 ** 0.5  # the real tokens of prompt 0, pads left out
    assert torch.allclose(x[0, 0], pooled.class_emb.weight[0] + pool, atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_and_uncached_sampling_agree(guidance):
    model = make_model(seed=5, text_pool=True)
    kw = dict(class_labels=torch.tensor([0, 2]), text_tokens=PROMPTS, guidance_scale=guidance)
    cached = model.generate(generator=gen(1), **kw)
    assert torch.equal(cached, model.generate(generator=gen(1), use_cache=False, **kw))


def test_saved_and_loaded_with_the_option(tmp_path):
    from rqtransformer import PromptTokenizer

    model = make_model(seed=2, text_pool=True)
    model.tokenizer = PromptTokenizer.train(["red circle", "blue square"] * 4, 300)
    model.config.text_vocab_size = model.tokenizer.vocab_size  # the file's tokenizer must match the table
    model.text_emb = torch.nn.Embedding(model.tokenizer.vocab_size, 32)
    model.save_pretrained(tmp_path / "m")
    loaded = RQTransformer.from_pretrained(tmp_path / "m")
    assert loaded.config.text_pool
    ids, _ = loaded.tokenizer.encode(["red circle"], loaded.config.max_text_len)
    assert (ids != TEXT_PAD_ID).any()
    codes = random_codes(1)
    with torch.inference_mode():
        assert torch.equal(model.eval()(codes, None, ids), loaded(codes, None, ids))


def test_the_v7_weights_in_training_are_the_preset_with_a_pooled_prompt_on_v6cs_codes():
    """weights/emoji-64-v7 (v7's legs): the emoji-64-v7 sizes, text_pool on, the bundled RQ-VAE's encoder and
    codebook (so the codes are shared, and either decoder draws them), and it draws from a name and a style."""
    from conftest import BUNDLED
    from pipelines import RQPipeline
    from rqtransformer.model import PRESETS

    v7 = BUNDLED.parent / "emoji-64-v7"
    pipe = RQPipeline.from_pretrained(v7, device="cpu")
    config = pipe.transformer.config
    assert {k: getattr(config, k) for k in PRESETS["emoji-64-v7"]} == PRESETS["emoji-64-v7"] and config.text_pool
    bundled = RQPipeline.from_pretrained(BUNDLED, device="cpu").rqvae.state_dict()
    codes_part = {k: v for k, v in pipe.rqvae.state_dict().items() if not k.startswith("decoder.")}
    assert codes_part and all(torch.equal(v, bundled[k]) for k, v in codes_part.items())
    out = pipe("noto", prompt="red heart", num_images=2, generator=gen(0))
    assert [im.size for im in out.images] == [(64, 64)] * 2
