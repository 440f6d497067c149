"""Model cards (README.md): the one shape every card written here takes, the paper they cite, and reading a
card back (its text without front matter, its summary)."""
from __future__ import annotations

import re

CARD_NAME = "README.md"  # a model card's file name in a saved folder, as on the Hub
PAPER = 'Lee et al., "Autoregressive Image Generation using Residual Quantization", CVPR 2022, arXiv 2203.01941'
TAGS = ("image-generation", "rq-vae", "rq-transformer")
SUMMARY_CHARS = 2000


def model_card(title: str, intro: str, sections: dict[str, str] | None = None, *, tags=(),
               license: str | None = None) -> str:
    """Front matter (licence, tags), "# title", the intro, then a "## heading" and its text per section."""
    front = ([f"license: {license}"] if license else []) + [f"tags: [{', '.join(dict.fromkeys([*TAGS, *tags]))}]"]
    parts = ["---\n" + "\n".join(front) + "\n---", f"# {title}", intro.strip()]
    parts += [f"## {heading}\n\n{text.strip()}" for heading, text in (sections or {}).items()]
    return "\n\n".join(parts) + "\n"


def card_text(card: str) -> str:
    """The card without its YAML front matter."""
    return re.sub(r"\A---\n.*?\n---\n", "", card, flags=re.S).strip()


def blocks(text: str) -> list[str]:
    """Paragraphs (split on blank lines), a fenced code block kept whole even with blank lines inside."""
    out, fenced = [], False
    for para in re.split(r"\n\s*\n", text):
        if fenced:
            out[-1] += "\n\n" + para
        else:
            out.append(para)
        fenced ^= para.count("```") % 2 == 1
    return out


def card_summary(card: str, limit: int = SUMMARY_CHARS) -> str:
    """The card's opening: its text up to the first "## " section after the intro, cut on a paragraph
    boundary to at most `limit` characters."""
    paras, kept = blocks(card_text(card)), []
    for i, para in enumerate(paras):
        if i and para.startswith("## ") or len("\n\n".join(kept + [para])) > limit:
            break
        kept.append(para)
    if kept:
        return "\n\n".join(kept)
    head = paras[0][:limit - 1]  # a first paragraph over the limit: cut on a line or a word
    return head[:max(head.rfind("\n"), head.rfind(" "), 1)].rstrip() + "…"
