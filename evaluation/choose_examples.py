"""Choose a pipeline's app examples by measurement: the trained (name, style) pairs that the evaluation's
trained-pairs section (trained_pairs.json) scored best, spread over categories and styles.

    python -m evaluation.evaluate --weights weights/emoji-64 --data_dir data/emoji/test \\
        --train_dir data/emoji/train --classifier runs/judge.safetensors --out runs/eval
    python -m evaluation.choose_examples --weights weights/emoji-64 --pairs runs/eval/trained_pairs.json \\
        --train_dir data/emoji/train

Writes pipeline.json's "examples" (the Generate tab's examples; the first --images of them also carry their real
training image, copied to examples/complete/, which the Complete tab regenerates with its own name and style)
and moves the chosen names to the front of rqtransformer/prompts.json. 🎲 Random prompt draws from prompts.json:
the training names.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from pipelines import RQPipeline
from pipelines.inputs import check_examples

from training.cli import non_negative_int, positive_int, run_cli

PAIR_KEYS = ("text", "style", "category", "file_name", "rank", "reconstruction_rank")


def read_pairs(file: Path) -> list[dict]:
    """trained_pairs.json -> its rows, each checked to have PAIR_KEYS."""
    if not file.is_file():
        raise ValueError(f"--pairs {file} does not exist: run evaluation.evaluate with --train_dir and --out first")
    try:
        rows = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--pairs {file} is not valid JSON: {e}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and set(PAIR_KEYS) <= set(r) for r in rows):
        raise ValueError(f"--pairs {file}: expected evaluation.evaluate's trained_pairs.json (a list of objects with "
                         f"{list(PAIR_KEYS)})")
    return rows


def choose(rows: list[dict], count: int) -> list[dict]:
    """Up to `count` pairs of distinct names, best first (rank, then the reconstruction's rank), taken
    round-robin over the categories, each in a style not chosen yet while there is one."""
    best = sorted(rows, key=lambda r: (r["rank"], r["reconstruction_rank"], r["text"]))
    queues: dict[str, list[dict]] = {}
    for r in best:
        queues.setdefault(r["category"], []).append(r)
    all_styles = {r["style"] for r in rows}
    chosen: list[dict] = []
    while len(chosen) < count and any(queues.values()):
        for queue in queues.values():
            round_start = len(chosen) - len(chosen) % len(all_styles)  # rounds of len(all_styles) choices
            used = {r["style"] for r in chosen[round_start:]}
            if len(chosen) < count and queue:
                r = next((r for r in queue if r["style"] not in used), queue[0])
                chosen.append(r)
            names = {r["text"] for r in chosen}
            queue[:] = [r for r in queue if r["text"] not in names]
    return chosen


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "image"


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="the saved pipeline folder the evaluation scored")
    p.add_argument("--pairs", required=True, help="trained_pairs.json of evaluation.evaluate --out")
    p.add_argument("--train_dir", required=True, help="the training split the pairs' file_name is relative to")
    p.add_argument("--count", type=positive_int, default=6, help="Generate examples")
    p.add_argument("--images", type=non_negative_int, default=3, help="of them, Complete examples with their image")
    args = p.parse_args(argv)
    weights, train = Path(args.weights), Path(args.train_dir)
    pipe = RQPipeline.from_pretrained(weights, device="cpu")
    rows = read_pairs(Path(args.pairs))
    unknown = {r["style"] for r in rows} - set(pipe.class_names)
    if unknown:
        raise ValueError(f"--pairs has styles {sorted(unknown)} that {weights} does not know: evaluate this model")
    chosen = choose(rows, args.count)
    examples = [{"prompt": r["text"], "class": r["style"]} for r in chosen]
    folder = weights / "examples" / "complete"
    shutil.rmtree(folder, ignore_errors=True)
    for e, r in zip(examples[:args.images], chosen):
        source = train / r["file_name"]
        if not source.is_file():
            raise ValueError(f"{source} does not exist: pass the --train_dir the evaluation used")
        folder.mkdir(parents=True, exist_ok=True)
        e["image"] = f"examples/complete/{r['style']}-{slug(r['text'])}.png"
        shutil.copyfile(source, weights / e["image"])
    pipe.examples = check_examples(examples, pipe.class_names, pipe.has_text)
    names = [e["prompt"] for e in examples]
    pipe.prompts = names + [t for t in pipe.prompts if t not in names]
    pipe.save_options(weights)
    print(json.dumps(examples, ensure_ascii=False))
    return examples


if __name__ == "__main__":
    run_cli(main)
