"""Name tokens: one learned token per training caption beside its BPE pieces (PromptTokenizer.add_names and
train_rqtransformer --name_tokens / --name_dropout), and the pooled prompt as the default of new text models."""
from __future__ import annotations

import json

import pytest
import torch

from pipelines import RQPipeline
from rqtransformer import RQTransformer
from rqtransformer.tokenizer import TEXT_PAD_ID, PromptTokenizer
from training.train_rqtransformer import main

from conftest import FAST2
from test_text_to_image import captioned_classes, run

NAMES = ["red circle", "green square", "blue triangle", "red square"]


@pytest.fixture
def tok():
    return PromptTokenizer.train(NAMES * 3, 300)


def test_a_known_name_gets_its_own_token_after_its_pieces(tok):
    plain = tok.encode(["red circle", "purple hexagon"], 24)[0]
    bpe = tok.vocab_size
    assert tok.add_names(NAMES + ["Red  Circle", " "]) == 4  # normalised and distinct; empty names skipped
    assert tok.vocab_size == bpe + 4 and tok.first_name_id == bpe
    assert tok.name_ids == {n: bpe + i for i, n in enumerate(NAMES)} and tok.add_names(NAMES) == 0
    ids, truncated = tok.encode(["red circle", "RED   circle", "purple hexagon", "red", ""], 24)
    pieces = int((plain[0] != TEXT_PAD_ID).sum())
    assert torch.equal(ids[0, :pieces], plain[0, :pieces]) and ids[0, pieces] == bpe  # pieces, then the name
    assert torch.equal(ids[1], ids[0]) and torch.equal(ids[2], plain[1])  # an unknown prompt: pieces alone
    assert (ids[3] < bpe).all() and (ids[4] == TEXT_PAD_ID).all() and truncated == [False] * 5
    assert tok.decode(ids[0]) == "red circle"  # the name token is not text
    assert "names=4" in repr(tok)


def test_the_name_token_takes_the_last_slot_of_a_full_row(tok):
    tok.add_names(["blue triangle"])
    ids, truncated = tok.encode(["blue triangle"], 1)
    assert ids.tolist() == [[tok.name_ids["blue triangle"]]] and truncated == [True]


def test_typing_a_name_tokens_text_never_gives_its_id(tok):
    tok.add_names(NAMES)
    ids = tok.encode(["[name:red circle]", "x [name:red circle] y"], 16)[0]
    assert (ids < tok.first_name_id).all()


def test_names_survive_a_save_and_load(tok, tmp_path):
    tok.add_names(NAMES)
    tok.save(tmp_path / "tokenizer.json")
    loaded = PromptTokenizer.from_file(tmp_path / "tokenizer.json")
    assert loaded.name_ids == tok.name_ids and loaded.vocab_size == tok.vocab_size
    prompts = NAMES + ["purple hexagon", ""]
    assert torch.equal(loaded.encode(prompts, 8)[0], tok.encode(prompts, 8)[0])
    assert PromptTokenizer.train(NAMES * 3, 300).name_ids == {}  # a tokenizer without names has none


# ---- training ------------------------------------------------------------------------------------------

def test_training_with_name_tokens_saves_a_model_that_samples_by_name(vae_dir, tmp_path, capsys):
    data = captioned_classes(tmp_path / "data", per_class=2)
    out = tmp_path / "out"
    main(["--rqvae", str(vae_dir), "--data_dir", str(data), "--output_dir", str(out), *FAST2,
          "--max_train_steps", "2", "--max_text_len", "6", "--name_tokens"])
    assert "6 name tokens, name dropout 0.5" in capsys.readouterr().out  # 6 distinct captions
    model = RQTransformer.from_pretrained(out / "rqtransformer")
    captions = json.loads((out / "rqtransformer" / "prompts.json").read_text())
    assert sorted(model.tokenizer.name_ids) == sorted(captions) and len(captions) == 6
    assert model.config.text_vocab_size == model.tokenizer.vocab_size and model.config.text_pool  # the default
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    assert len(pipe("squares", prompt="another square", num_images=2).images) == 2
    assert len(pipe("squares", prompt="boxy", num_images=1).images) == 1


def test_resume_with_name_tokens_is_exact(vae_dir, tmp_path):
    """4 steps straight == 2 + resume + 2, with name dropout drawing every step."""
    data = captioned_classes(tmp_path / "data", per_class=2)
    base = ["--rqvae", str(vae_dir), "--data_dir", str(data), *FAST2, "--checkpointing_steps", "2",
            "--max_text_len", "6", "--name_tokens", "--name_dropout", "0.5"]
    main([*base, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "4"])
    main([*base, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "2"])
    main([*base, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    first, second = (RQTransformer.from_pretrained(tmp_path / n / "rqtransformer") for n in "ab")
    for key, value in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[key], value, msg=key)


def test_init_from_adds_name_tokens_starting_as_the_pad_row(vae_dir, tmp_path, capsys):
    data = captioned_classes(tmp_path / "data", per_class=2)
    base = ["--rqvae", str(vae_dir), "--data_dir", str(data), *FAST2, "--ema_decay", "0", "--max_train_steps", "1"]
    main([*base, "--output_dir", str(tmp_path / "a"), "--max_text_len", "6", "--no-text_pool"])
    main([*base, "--output_dir", str(tmp_path / "b"), "--init_from", str(tmp_path / "a"), "--name_tokens",
          "--learning_rate", "1e-12"])
    given, tuned = (RQTransformer.from_pretrained(tmp_path / n / "rqtransformer") for n in "ab")
    assert not given.config.text_pool and not tuned.config.text_pool  # --init_from keeps the saved model's
    old, new = given.config.text_vocab_size, tuned.config.text_vocab_size
    assert new == old + 6 and tuned.tokenizer.first_name_id == old
    emb = tuned.state_dict()["text_emb.weight"]
    torch.testing.assert_close(emb[:old], given.state_dict()["text_emb.weight"])
    torch.testing.assert_close(emb[old:], emb[:1].expand(6, -1))  # the pad row: the model starts as the saved one
    for key, value in given.state_dict().items():
        if key != "text_emb.weight":
            torch.testing.assert_close(tuned.state_dict()[key], value, msg=key)


def test_name_options_refuse_what_they_cannot_do(vae_dir, image_dir, tmp_path, capsys):
    data = captioned_classes(tmp_path / "data", per_class=2)
    base = ["--rqvae", str(vae_dir), "--output_dir", str(tmp_path / "out"), *FAST2]
    err = run([*base, "--data_dir", str(image_dir), "--name_tokens"], capsys)
    assert f"--name_tokens needs captions: --data_dir {image_dir} has none" in err
    err = run([*base, "--data_dir", str(data), "--name_dropout", "0.2"], capsys)
    assert "--name_dropout needs name tokens: add --name_tokens" in err
    err = run([*base, "--data_dir", str(data), "--name_tokens", "--name_dropout", "1"], capsys, one_line=False)
    assert "--name_dropout must be in [0, 1)" in err
