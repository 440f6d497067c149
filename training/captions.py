"""The text side of stage 2: the prompt tokenizer trained on the training captions, their token ids cached
beside the codes, the pairing of encoded images with their captions, and the prompts shown and saved."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rqcore.pretrained import write_safetensors
from rqtransformer.tokenizer import PromptTokenizer

GRID_PROMPTS, GRID_IMAGES = 8, 64  # the validation batch: distinct captions shown, images at most
SAVED_PROMPTS = 300  # training captions kept in rqtransformer/prompts.json (the app's examples)


def prompt_batch(captions: list[str], labels: list[int] | None, samples_per_prompt: int):
    """The fixed validation batch of a caption model: (prompts [B], labels [B] or None, images per grid
    row). At most GRID_PROMPTS distinct captions spread evenly over all, each with the class of its first
    sample, `samples_per_prompt` each while the batch stays within GRID_IMAGES."""
    first = {}
    for i, caption in enumerate(captions):
        first.setdefault(caption, i)
    shown = spread(list(first), GRID_PROMPTS)
    per_prompt = max(1, min(samples_per_prompt, GRID_IMAGES // len(shown)))
    prompts = [c for c in shown for _ in range(per_prompt)]
    return prompts, None if labels is None else [labels[first[c]] for c in prompts], per_prompt


def spread(items: list, count: int) -> list:
    """At most `count` of `items`, spread evenly from the first to the last."""
    return [items[i] for i in torch.linspace(0, len(items) - 1, min(count, len(items))).round().long().tolist()]


def examples_first(prompts: list[str], count: int = 5) -> list[str]:
    """prompts with `count` of them, spread over all, moved to the front: the app's examples are the first
    prompts of prompts.json (edit its order to choose them)."""
    head = spread(prompts, count)
    chosen = set(head)
    return head + [p for p in prompts if p not in chosen]


def caption_tokenizer(captions: list[str], vocab_size: int, cache_dir: Path,
                      names: bool = False) -> tuple[PromptTokenizer, Path]:
    """(the prompt tokenizer of these captions, with a name token per distinct caption if `names`; its file in
    --output_dir): loaded from the file when an earlier start of this run saved it (so a resumed run tokenizes
    exactly as before), else trained."""
    h = hashlib.sha256(f"vocab_size={vocab_size}\n".encode() + (b"names\n" if names else b""))
    for caption in captions:
        h.update(caption.encode() + b"\0")
    file = cache_dir / f"tokenizer-{h.hexdigest()[:16]}.json"
    if file.is_file():
        try:
            return PromptTokenizer.from_file(file), file
        except ValueError:
            pass  # unreadable: train again
    tokenizer = PromptTokenizer.train(captions, vocab_size)
    if names:
        tokenizer.add_names(captions)
    return tokenizer, file


def tokenize(tokenizer: PromptTokenizer, captions: list[str], max_len: int, cache_dir: Path,
             is_main_process: bool) -> tuple[torch.Tensor, int]:
    """captions -> (token ids [N, max_len] int64, how many captions were truncated), cached in `cache_dir`
    keyed by the tokenizer, the captions and max_len."""
    h = hashlib.sha256(tokenizer.tokenizer.to_str().encode() + f"|max_len={max_len}\n".encode())
    for caption in captions:
        h.update(caption.encode() + b"\0")
    file = cache_dir / f"tokens-{h.hexdigest()[:16]}.safetensors"
    if file.is_file():
        try:
            data = load_file(str(file))
            return data["ids"].long(), int(data["truncated"])
        except (SafetensorError, OSError, KeyError):
            pass  # unreadable cache: tokenize again
    ids, truncated = tokenizer.encode(captions, max_len)
    if is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        write_safetensors({"ids": ids.int(), "truncated": torch.tensor([sum(truncated)])}, file)
    return ids, sum(truncated)


def caption_rows(index: torch.Tensor, image_of: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair every encoded row (an image, or its flip) with every caption of that image.
    index [R]: the image of each row; image_of [S]: the image of each caption -> (rows [M], captions [M])."""
    by_image = [[] for _ in range(int(torch.cat([index, image_of]).max()) + 1)]
    for caption, image in enumerate(image_of.tolist()):
        by_image[image].append(caption)
    pairs = [(row, caption) for row, image in enumerate(index.tolist()) for caption in by_image[image]]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).unbind(1)
