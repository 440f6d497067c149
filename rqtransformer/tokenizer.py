"""Prompt tokenizer: byte-level BPE (the `tokenizers` package) trained on the training captions.

Byte-level means every Unicode string has an encoding: a word never seen in training falls back to
smaller pieces and, at worst, to its UTF-8 bytes, all 256 of which are always in the vocabulary. So any
prompt tokenizes and no id is ever >= vocab_size. Captions are normalised (NFKC, lower case, runs of
whitespace -> one space, trimmed) before splitting, so "Red  Circle" and "red circle" are one prompt.

Name tokens (`add_names`): one extra id per training name, after the BPE vocabulary. A prompt that is exactly
a known name (after normalisation) gets its name token after its BPE pieces, so a trained name addresses its
own learned embedding while any other prompt goes through the pieces alone. They are special tokens: typing
their text never produces them.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

TEXT_PAD_ID = 0  # right padding of every prompt; an all-pad row is the empty (unconditional) prompt
PAD_TOKEN = "[PAD]"
MIN_VOCAB_SIZE = 257  # 256 byte pieces + [PAD]
NAME_TOKEN = "[name:{}]"  # the text of a name token (never produced by typing it: special tokens are not parsed)


class PromptTokenizer:
    """A thin wrapper over a `tokenizers.Tokenizer`: train / save / from_file / encode / decode."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        # "[PAD]" typed in a prompt is text, not padding: never let the input produce the special id
        self.tokenizer.encode_special_tokens = True
        prefix, suffix = NAME_TOKEN.split("{}")
        added = sorted(tokenizer.get_added_tokens_decoder().items())
        self.name_ids = {t.content[len(prefix):-len(suffix)]: i for i, t in added
                         if t.special and t.content.startswith(prefix) and t.content.endswith(suffix)}

    @classmethod
    def train(cls, captions: list[str], vocab_size: int) -> PromptTokenizer:
        """A BPE vocabulary of at most `vocab_size` ids learnt from `captions` (fewer when the captions
        hold fewer distinct merges)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise ValueError("PromptTokenizer.train needs a list of caption strings")
        if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"text vocab_size must be at least {MIN_VOCAB_SIZE} (256 byte pieces + {PAD_TOKEN}), "
                             f"got {vocab_size}")
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.Sequence([
            normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.Strip()])
        # prefix space: a word at the start of a prompt gets the same pieces as in the middle
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD_TOKEN],  # first -> id 0
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(list(captions), trainer, length=len(captions))
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> PromptTokenizer:
        """Load a tokenizer.json written by save(); a missing or garbled file is one ValueError line."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} does not exist")
        try:
            tok = Tokenizer.from_str(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not a tokenizer.json (not UTF-8 text)") from None
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001 - the Rust side raises Exception or a PanicException
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
            raise ValueError(f"{path} is not a valid tokenizer.json: {first}") from None
        if tok.token_to_id(PAD_TOKEN) != TEXT_PAD_ID:
            raise ValueError(f"{path} is not a prompt tokenizer: it has no {PAD_TOKEN} token with id {TEXT_PAD_ID}")
        return cls(tok)

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically (a temp file beside it, then os.replace)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.tokenizer.to_str())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def normalize(self, prompt: str) -> str:
        """The prompt as the tokenizer sees it (NFKC, lower case, single spaces, trimmed)."""
        return self.tokenizer.normalizer.normalize_str(prompt) if self.tokenizer.normalizer else prompt

    def add_names(self, names: list[str]) -> int:
        """Give each new distinct (normalised, non-empty) name its own token id, after every existing id
        -> how many were added. Existing ids never move, so a model's embedding rows stay valid."""
        new = list(dict.fromkeys(n for n in map(self.normalize, names) if n and n not in self.name_ids))
        if new:
            first = self.vocab_size
            self.tokenizer.add_special_tokens([AddedToken(NAME_TOKEN.format(n), special=True, normalized=False)
                                               for n in new])
            self.name_ids.update({n: first + i for i, n in enumerate(new)})
        return len(new)

    @property
    def first_name_id(self) -> int:
        """Ids >= this are name tokens (vocab_size when there are none)."""
        return min(self.name_ids.values(), default=self.vocab_size)

    @property
    def vocab_size(self) -> int:
        """The real vocabulary size, [PAD] included: every id is < vocab_size."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, prompts: list[str], max_len: int) -> tuple[torch.Tensor, list[bool]]:
        """prompts -> (ids [B, max_len] int64 right-padded with TEXT_PAD_ID, truncated[B]).
        "" (or only whitespace) is all padding: the empty, unconditional prompt. A known name's token follows
        its pieces (in the last slot when they fill the row: the name token alone identifies it)."""
        if isinstance(prompts, str):
            raise ValueError("encode takes a list of prompts, not one string")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"a prompt must be a string, got {type(bad[0]).__name__} {bad[0]!r:.60}")
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len}")
        ids = torch.full((len(prompts), max_len), TEXT_PAD_ID, dtype=torch.long)  # [B, max_len]
        truncated = []
        for i, enc in enumerate(self.tokenizer.encode_batch(list(prompts), add_special_tokens=False)):
            name = self.name_ids.get(self.normalize(prompts[i])) if self.name_ids else None
            row = enc.ids[:max_len] if name is None else enc.ids[:max_len - 1] + [name]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            truncated.append(len(enc.ids) + (name is not None) > max_len)
        return ids, truncated

    def decode(self, ids) -> str:
        """ids (a tensor [L] or a list) -> the normalised text, padding dropped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        return self.tokenizer.decode([int(i) for i in ids if int(i) != TEXT_PAD_ID]).strip()

    def __repr__(self) -> str:
        names = f", names={len(self.name_ids)}" if self.name_ids else ""
        return f"PromptTokenizer(vocab_size={self.vocab_size}{names})"
