"""Convert the paper's released checkpoints (kakaobrain/rq-vae-transformer) into a pipeline folder.

    python -m official.convert --rqvae stage1/ --rqtransformer stage2/ --output_dir OUT \
        [--tokenizer DIR] [--ema]

Each stage folder is laid out as in the released tarballs: model.pt beside config.yaml. The result loads
with `RQPipeline.from_pretrained(OUT)` and `python app.py --weights OUT`: rqvae/ and rqtransformer/
(config.json + model.safetensors, tokenizer.json for text models), pipeline.json with the official
sampling settings, and a README.md model card. `--rqvae` alone writes an RQ-VAE folder.

model.pt files are pickles: they are read only here, with torch.load(weights_only=True), tensors only.
The weights are CC-BY-NC-SA 4.0: non-commercial use only, whatever this project's own licence.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from pipelines import RQPipeline
from rqcore import cards
from rqcore.pretrained import assign_state
from rqtransformer.model import RQTransformer
from rqvae import RQVAE

from . import layout
from .download import sha256
from training.cli import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rqvae", required=True, help="the released stage-1 folder (model.pt + config.yaml)")
    p.add_argument("--rqtransformer", help="the released stage-2 folder (model.pt + config.yaml); needs --rqvae, "
                                           "whose codebook its embeddings are built from")
    p.add_argument("--output_dir", required=True, help="the pipeline folder (or RQ-VAE folder) to write")
    p.add_argument("--tokenizer", help="text models: the folder of the official BPE files "
                                       "(bpe-16k-vocab.json + bpe-16k-merges.txt)")
    p.add_argument("--ema", action="store_true", help="convert state_dict_ema instead of state_dict (a checkpoint "
                                                      "without one keeps its state_dict: stage 1 has none)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="the transformer's stored weights: float32 (exact) or float16 (half the size; on a CPU the "
                        "app then samples with float16 weights: faster, not bit-exact)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output_dir")
    return p.parse_args(argv)


def check_args(args) -> None:
    for flag in ("rqvae", "rqtransformer", "tokenizer"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_dir():
            raise ValueError(f"--{flag} {value} is not a folder")
    if args.tokenizer and not args.rqtransformer:
        raise ValueError("--tokenizer is for a text stage 2: give --rqtransformer too")
    out = Path(args.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise ValueError(f"--output_dir {out} exists and is not empty: choose another or pass --overwrite")


def build(model_class, config, convert, stage: str):
    """model_class(config) built on the meta device (no random init), given the tensors convert(model) maps
    from the official ones (checked against the config's shapes first)."""
    with torch.device("meta"):
        model = model_class(config)
    state = convert(model)
    layout.check_shapes(model, state, stage)
    assign_state(model, state)
    return model.eval()


def convert_rqvae(folder: Path, ema: bool) -> tuple[RQVAE, bool]:
    """-> (our RQVAE in eval mode, whether EMA weights were used)."""
    config = layout.rqvae_config(layout.read_yaml(folder))
    tensors, use_ema = layout.read_state(folder, ema=ema, fallback=True)
    return build(RQVAE, config, lambda m: layout.rqvae_state(m, config, tensors), "stage 1"), use_ema


def convert_transformer(folder: Path, vae: RQVAE, codebook: torch.Tensor, ema: bool,
                        tokenizer_dir: str | None) -> tuple[RQTransformer, dict]:
    """-> (our RQTransformer, the official sampling settings)."""
    data = layout.read_yaml(folder)
    config = layout.transformer_config(data, vae.config)
    if config.num_classes == 1000:  # ImageNet: the names in index order, from torchvision (nothing downloaded)
        config.class_names = layout.imagenet_class_names()
    if config.max_text_len and not tokenizer_dir:
        raise ValueError("this stage 2 is a text model: give --tokenizer, the folder of the official BPE files")
    if tokenizer_dir and not config.max_text_len:
        raise ValueError("--tokenizer given, but this stage 2 has no text conditioning")
    tensors, _ = layout.read_state(folder, ema=ema)
    model = build(RQTransformer, config, lambda m: layout.transformer_state(config, tensors, codebook), "stage 2")
    if config.max_text_len:
        model.tokenizer = layout.text_tokenizer(Path(tokenizer_dir), data, config.text_vocab_size)
    settings = layout.sampling_settings(data)
    K = config.codebook_size
    top_k = settings["top_k"]  # the official sampler takes min(top_k, K), and None as no filter
    settings["top_k"] = [min(int(k), K) for k in top_k] if isinstance(top_k, list) else \
        (min(int(top_k), K) if top_k is not None else None)
    return model, settings


def model_card(args, vae: RQVAE, transformer: RQTransformer | None, settings: dict, ema: dict) -> str:
    rows = [f"| stage 1 | `{Path(args.rqvae).name}/model.pt` | `{sha256(Path(args.rqvae) / 'model.pt')}` | "
            f"{'state_dict_ema' if ema['rqvae'] else 'state_dict'} |"]
    if transformer is not None:
        rows.append(f"| stage 2 | `{Path(args.rqtransformer).name}/model.pt` | "
                    f"`{sha256(Path(args.rqtransformer) / 'model.pt')}` | "
                    f"{'state_dict_ema' if ema['rqtransformer'] else 'state_dict'} |")
    vc = vae.config
    intro = "\n\n".join([
        f"Converted from the checkpoints released with {cards.PAPER}, repository {layout.SOURCE}, by `python -m "
        "official.convert`. The tensors are the official ones, rearranged; outputs match the official "
        "code in float32 (see the project's README).",
        "\n".join(["| stage | file | sha256 | weights |", "|---|---|---|---|", *rows]),
        f"**Licence: {layout.LICENCE}.** The released weights may be used for non-commercial purposes only, "
        "with attribution, and derivatives shared alike."])
    lines = [
        f"- Stage 1: {vc.resolution} px images, {vc.code_shape[0]}x{vc.code_shape[1]}x{vc.code_shape[2]} codes from "
        f"one shared codebook of {vc.codebook_size}; the codebook's padding row was dropped.",
    ]
    if transformer is not None:
        tc = transformer.config
        kind = ("text-to-image" if tc.max_text_len else f"{tc.num_classes} classes" if tc.num_classes
                else "unconditional")
        n = sum(p.numel() for p in transformer.parameters())
        lines += [
            f"- Stage 2 ({kind}, {n / 1e6:.0f} M parameters here): the code embeddings (an MLP of the stage-1 "
            "codebook rows) were folded into tables; the depth context is the cumulative sum of the earlier "
            "depths' embeddings.",
            "- Guidance is off: the official models never trained an unconditional (null) class or empty prompt. "
            "Fine-tuning with `--cfg_dropout` trains one.",
            f"- Default sampling (the official config's): top-k {settings['top_k']}, top-p {settings['top_p']}.",
        ]
        if tc.max_text_len:
            lines.append(f"- Prompts: the official lower-cased BPE tokenizer (tokenizer.json), {tc.max_text_len} "
                         "tokens, [PAD] = 0. The next-text-token head (`cond_classifier`) was dropped: sampling "
                         "images never uses it.")
    return cards.model_card("A converted RQ-VAE / RQ-Transformer checkpoint", intro,
                            {"What the conversion did": "\n".join(lines)}, tags=["converted"],
                            license="cc-by-nc-sa-4.0")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_args(args)
    out = Path(args.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:  # written beside, then renamed: an interrupted conversion never leaves half a folder behind
        print(f"reading stage 1 from {args.rqvae}", flush=True)
        vae, vae_ema = convert_rqvae(Path(args.rqvae), args.ema)
        transformer, settings = None, {}
        if args.rqtransformer:
            vae.save_pretrained(tmp / "rqvae")
            codebook = vae.quantizer.codebooks[0].detach().clone()  # [K, C]: the rows stage 2's MLPs embed
            vae.to("meta")  # saved: its weights need not share the memory with stage 2's
            print(f"reading stage 2 from {args.rqtransformer}", flush=True)
            transformer, settings = convert_transformer(Path(args.rqtransformer), vae, codebook, args.ema,
                                                        args.tokenizer)
            text = transformer.config.max_text_len > 0
            pipe = RQPipeline(vae, transformer, default_guidance_scale=1.0, guidance=False,
                              caption_dropout=0.0 if text else None,
                              class_title="ImageNet class" if transformer.config.num_classes == 1000 else "Class",
                              **settings)
            transformer.save_pretrained(tmp / "rqtransformer", dtype=getattr(torch, args.dtype))
            pipe.save_options(tmp)
        else:
            vae.save_pretrained(tmp)
        card = model_card(args, vae, transformer, settings, {"rqvae": vae_ema, "rqtransformer": args.ema})
        (tmp / cards.CARD_NAME).write_text(card, encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {out} ({layout.LICENCE})")


if __name__ == "__main__":
    run_cli(main)
