"""PromptTokenizer: trained byte-level BPE, save/load round trip, any Unicode, padding and truncation."""
from __future__ import annotations

import pytest
import torch

from rqtransformer.tokenizer import MIN_VOCAB_SIZE, TEXT_PAD_ID, PromptTokenizer

CAPTIONS = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle")] * 4
ODD = ["😀🐱 猫の顔 café naïve Ωmega", "ＦＵＬＬＷＩＤＴＨ ﬁ", "tab\there\nnew\x00line\x07\x1b[0m",
       "\u200b\u200d\ufeff", "a [PAD] b", "🏳️‍🌈" * 2, "ǅ ß İ", "\U0010FFFF \ud7ff"]


@pytest.fixture(scope="module")
def tok():
    return PromptTokenizer.train(CAPTIONS, 400)


def test_train_learns_words_and_pad_is_zero(tok):
    assert tok.tokenizer.token_to_id("[PAD]") == TEXT_PAD_ID == 0
    assert MIN_VOCAB_SIZE <= tok.vocab_size <= 400  # few captions: fewer merges than asked
    ids, truncated = tok.encode(["red circle", "Blue   SQUARE "], 4)
    assert ids.dtype == torch.long and ids.shape == (2, 4) and truncated == [False, False]
    assert (ids[:, :2] != TEXT_PAD_ID).all() and (ids[:, 2:] == TEXT_PAD_ID).all()  # one piece per word
    assert tok.decode(ids[0]) == "red circle" and tok.decode(ids[1]) == "blue square"  # normalised
    assert torch.equal(tok.encode(["RED\tCircle"], 4)[0], ids[:1])


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    loaded = PromptTokenizer.from_file(path)
    assert loaded.vocab_size == tok.vocab_size
    prompts = CAPTIONS[:12] + ODD + ["", "purple hexagon"]
    assert torch.equal(loaded.encode(prompts, 16)[0], tok.encode(prompts, 16)[0])
    # training is deterministic: the same captions give the same ids (a resumed stage 2 agrees)
    again = PromptTokenizer.train(CAPTIONS, 400)
    assert torch.equal(again.encode(prompts, 16)[0], tok.encode(prompts, 16)[0])


def test_any_unicode_encodes(tok):
    ids, truncated = tok.encode(ODD, 64)
    assert ids.shape == (len(ODD), 64) and not any(truncated)
    assert ids.min() >= 0 and ids.max() < tok.vocab_size
    assert (ids[:, 0] != TEXT_PAD_ID).all()  # every odd prompt gives tokens (zero-width chars included)
    # "[PAD]" typed in a prompt is text, never the padding id in the middle of a prompt
    row = ids[ODD.index("a [PAD] b")]
    assert (row[: (row != TEXT_PAD_ID).sum()] != TEXT_PAD_ID).all()
    assert "猫" in tok.decode(ids[0]) and "😀" in tok.decode(ids[0])
    # an unseen word falls back to smaller pieces, still decodable
    assert tok.decode(tok.encode(["zebra"], 16)[0][0]) == "zebra"


def test_truncation_flag_and_empty_prompt(tok):
    ids, truncated = tok.encode(["red circle " * 10, "red circle", "", "  \t\n "], 4)
    assert truncated == [True, False, False, False]
    assert (ids[0] != TEXT_PAD_ID).all()
    assert (ids[2] == TEXT_PAD_ID).all() and (ids[3] == TEXT_PAD_ID).all()  # whitespace-only == empty
    ids, truncated = tok.encode(["red circle"], 2)  # exactly max_len tokens is not truncated
    assert truncated == [False] and (ids != TEXT_PAD_ID).all()


def test_bad_prompts(tok):
    for prompts in (["ok", None], ["ok", 3], [b"bytes"]):
        with pytest.raises(ValueError, match="a prompt must be a string"):
            tok.encode(prompts, 8)
    with pytest.raises(ValueError, match="list of prompts"):
        tok.encode("red circle", 8)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(["red"], 0)
    with pytest.raises(ValueError, match="at least 257"):
        PromptTokenizer.train(CAPTIONS, 100)


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"model": 3}', b"\xff\xfe garbage \x00",
                                     b'{"version": "1.0", "truncation": null}'])
def test_garbled_file_is_one_line(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as e:
        PromptTokenizer.from_file(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_foreign_tokenizer(tok, tmp_path):
    with pytest.raises(ValueError, match="does not exist") as e:
        PromptTokenizer.from_file(tmp_path / "nope.json")
    assert "nope.json" in str(e.value)
    from tokenizers import Tokenizer, models

    other = tmp_path / "other.json"
    other.write_text(Tokenizer(models.BPE()).to_str())  # valid, but no [PAD] at id 0
    with pytest.raises(ValueError, match=r"no \[PAD\] token"):
        PromptTokenizer.from_file(other)
