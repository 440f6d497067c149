"""Command-line plumbing both training scripts share: the accelerate-style flags, --config / --init_from /
--rqvae resolution (a model folder, or a pipeline folder's rqvae/ or rqtransformer/), and turning user
errors into one line."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from pathlib import Path

import torch

from rqcore.pretrained import CONFIG_NAME, WEIGHTS_NAME, config_from_dict, load_weights, read_json


def positive_int(text: str, least: int = 1) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {value}")
    return value


def non_negative_int(text: str) -> int:
    return positive_int(text, least=0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


# the --dataset_name flags' defaults: any other value beside --data_dir is an error
DATASET_DEFAULTS = dict(dataset_config_name=None, dataset_split="train", image_column="image", label_column=None,
                        max_train_samples=None, validation_split=None, cache_dir=None)


def add_training_args(parser: argparse.ArgumentParser, *, batch_size: int, steps: int, lr: float,
                      output: str = "the final model", sub: str = "rqvae") -> None:
    """The accelerate-style flags both stages take; `output` says what the run leaves in --output_dir,
    `sub` which sub-folder of a pipeline folder --init_from takes."""
    g = parser.add_argument_group("training")
    source = g.add_mutually_exclusive_group(required=True)  # exactly one: argparse says so otherwise
    source.add_argument("--data_dir", "--train_data_dir", dest="data_dir",
                        help="ImageFolder tree <data_dir>/<class>/<image>, or a captioned folder (a metadata.jsonl)")
    source.add_argument("--dataset_name", default=None,
                        help="a Hugging Face dataset instead of --data_dir: a Hub id (<user>/<name>), or a local "
                             ".parquet file, folder of parquet files, imagefolder folder or save_to_disk folder")
    g.add_argument("--output_dir", required=True, help=f"checkpoints, logs, samples and {output}")
    g.add_argument("--train_batch_size", type=positive_int, default=batch_size)
    g.add_argument("--max_train_steps", type=positive_int, default=steps)
    g.add_argument("--learning_rate", type=positive_float, default=lr)
    g.add_argument("--lr_warmup_steps", type=int, default=500)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=positive_float, default=1.0)
    g.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    g.add_argument("--mixed_precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="auto (default): bf16 autocast where the device multiplies bf16 natively (CUDA with bf16, "
                        "CPUs with AVX512-BF16 or AMX), else fp32; the choice is printed at start")
    g.add_argument("--ema_decay", type=float, default=0.999, help="EMA of weights; 0 disables")
    g.add_argument("--checkpointing_steps", type=positive_int, default=500)
    g.add_argument("--checkpoints_total_limit", type=positive_int, default=3,
                   help="keep the N newest checkpoints, and besides them the one saved at the best validation "
                        "(held-out loss or PSNR; checkpoints at validated steps only)")
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    g.add_argument("--init_from", default=None,
                   help=f"start from the weights of a model folder, or of a pipeline folder's {sub}/ (fine-tuning); "
                        f"its config.json is the default --config")
    g.add_argument("--validation_steps", type=positive_int, default=500,
                   help="validation (image grid, held-out metrics) every N steps and after the last")
    g.add_argument("--logging_steps", type=positive_int, default=10)
    g.add_argument("--num_workers", type=int, default=min(2, os.cpu_count() or 1))
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--hflip", action="store_true", help="random horizontal flips (augmentation)")
    g.add_argument("--report_to", choices=["tensorboard", "none"], default="tensorboard")
    g.add_argument("--ddp_timeout", type=positive_int, default=1800,
                   help="seconds a process waits for the others under torchrun / accelerate launch before it "
                        "gives up (one of them died or hangs)")
    h = parser.add_argument_group("Hugging Face datasets (with --dataset_name, as in diffusers' training scripts)")
    h.add_argument("--dataset_config_name", default=None, help="the dataset's config (subset), if it has several")
    h.add_argument("--dataset_split", default=DATASET_DEFAULTS["dataset_split"], help="the split to train on")
    h.add_argument("--image_column", default=DATASET_DEFAULTS["image_column"], help="the column holding the images")
    h.add_argument("--label_column", default=None,
                   help="class labels (a ClassLabel's names, else the sorted distinct values; an imagefolder's "
                        "class sub-folders are 'label'); default: no classes")
    h.add_argument("--max_train_samples", type=positive_int, default=None,
                   help="train on N rows: the split shuffled with --seed, then the first N (as diffusers)")
    h.add_argument("--validation_split", default=None,
                   help="a held-out split of --dataset_name (e.g. test) for validation, instead of --validation_dir")
    h.add_argument("--cache_dir", default=None, help="where datasets keeps downloads and its Arrow cache")


def check_data_args(parser: argparse.ArgumentParser, args) -> None:
    """argparse errors for data flags that do not go together."""
    if not (args.data_dir or args.dataset_name):
        parser.error("--data_dir / --dataset_name is empty")
    if args.data_dir:
        given = [name for name, default in DATASET_DEFAULTS.items() if getattr(args, name) != default]
        if given:
            parser.error(f"--{given[0]} needs --dataset_name (--data_dir is a folder)")
    if args.validation_split and args.validation_dir:
        parser.error("--validation_split and --validation_dir: give one")
    if args.validation_split and args.validation_split == args.dataset_split:
        parser.error(f"--validation_split {args.validation_split} is the training split: give a held-out one")


def model_folder(value: str, flag: str, sub: str) -> Path:
    """The model folder `value` names: itself when it holds a config.json, else a pipeline folder's `sub`/
    (e.g. weights/emoji-64 -> weights/emoji-64/rqtransformer)."""
    path = Path(value)
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise ValueError(f"{flag} {value} {what}")
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / sub).is_dir():
        return path / sub
    raise ValueError(f"{flag} {value} is neither a model folder (no {CONFIG_NAME}) nor a pipeline folder "
                     f"(no {sub}/ inside)")


def config_source(args) -> tuple[str, str]:
    """(value, flag) of the config to build: --config, else --init_from's folder, else the emoji-64
    preset; `flag` names the option the value came from, for messages."""
    if args.config:
        return args.config, "--config"
    return (args.init_from, "--init_from") if args.init_from else ("emoji-64", "--config")


def load_init_from(model: torch.nn.Module, init_from: str | None, class_rows: list | None = None,
                   text_rows: int | None = None) -> None:
    """--init_from: start from a saved model's weights (strict, so a config mismatch names the tensor).
    class_rows: the data adds classes to the saved model's; the new model's class i takes the saved class
    embedding row class_rows[i], a new class (None) the mean of the saved classes' rows, so that it starts
    as an average of them; the null class stays the last row.
    text_rows: the saved text embedding's rows; rows the tokenizer added since (name tokens) start as the pad
    token's row, so that the model starts as the saved one does on the prompts it knew."""
    if init_from:
        if not Path(init_from).is_dir():
            raise ValueError(f"--init_from {init_from} is not a model folder")

        def edit(tensors: dict) -> None:
            if class_rows:
                old = tensors["class_emb.weight"]  # [saved classes + 1, dim]
                mean = old[:-1].float().mean(0).to(old.dtype)
                tensors["class_emb.weight"] = torch.stack([mean if i is None else old[i] for i in class_rows]
                                                          + [old[-1]])
            grow = model.config.text_vocab_size - text_rows if text_rows else 0
            if grow > 0 and len(tensors.get("text_emb.weight", ())) == text_rows:
                old = tensors["text_emb.weight"]  # [saved rows, dim]; row 0: the pad token
                tensors["text_emb.weight"] = torch.cat([old, old[:1].expand(grow, -1)])

        load_weights(model, Path(init_from) / WEIGHTS_NAME, edit=edit)


def config_from_arg(config_class, presets: dict, value: str, flag: str = "--config", **overrides):
    """`--config` value: a preset name, a JSON file, a model folder or a pipeline folder (its sub-folder of
    this model); `overrides` (not None) replace fields.
    `flag` names the option the value came from in messages (--init_from's folder is the default config)."""
    kind = config_class.__name__.removesuffix("Config")
    if value in presets:
        data = dict(presets[value])
    elif Path(value).is_dir() or value.endswith(".json"):
        folder = model_folder(value, flag, kind.lower()) if Path(value).is_dir() else Path(value)
        path = folder / CONFIG_NAME if folder.is_dir() else folder
        if not path.is_file():
            raise ValueError(f"{flag} {value}: {path} does not exist")
        data = read_json(path, f"{flag} {value}")
        fields = {f.name for f in dataclasses.fields(config_class)}
        shared = {"codebook_size", "resolution"}  # fields both models' configs may have
        if folder.is_dir() and isinstance(data, dict) and set(data) - fields and set(data) & fields <= shared:
            raise ValueError(f"{flag} {value} is not a saved {kind}: its {CONFIG_NAME} is another model's")
    else:
        raise ValueError(f"{flag} must be one of {sorted(presets)}, a .json file or a model folder, got {value!r}")
    if not isinstance(data, dict):
        raise ValueError(f"{flag} {value}: expected a JSON object")
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(config_class, data, source=f"{flag} {value}")


def run_cli(main) -> None:
    """Turn user errors into one clear line and exit code 2 instead of a traceback."""
    try:
        main()
    except (ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted; resume with --resume_from_checkpoint latest", file=sys.stderr)
        raise SystemExit(130) from None
    except RuntimeError as e:
        lost = lost_contact(e)
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr)
        raise SystemExit(1) from None


def lost_contact(e: RuntimeError) -> str | None:
    """One line for a collective that failed because another process died or hung (None for any other
    error): the backend's own message is a C++ source location and a hint at "your code"."""
    import torch.distributed as dist

    text = str(e)
    # gloo's words vary: "Timed out waiting ...", "Application timeout caused pair closure", "Connection ..."
    signs = ("timed out", "timeout", "pair closure", "connection closed by peer", "connection reset")
    if not (dist.is_available() and dist.is_initialized()) or not any(w in text.lower() for w in signs):
        return None
    first = re.sub(r"^\[[^\]]*\]\s*", "", text.strip().splitlines()[0])  # "[.../pair.cc:561] Timed out ..."
    return (f"process {dist.get_rank()} of {dist.get_world_size()} lost contact with the others ({first.rstrip('.')}): "
            f"one of them died, hangs, or kept this one waiting longer than --ddp_timeout; resume with "
            f"--resume_from_checkpoint latest")
