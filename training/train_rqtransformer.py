"""Train the RQ-Transformer (stage 2) on the codes of a trained RQ-VAE; the run ends with a complete
pipeline folder.

    python -m training.train_rqtransformer --rqvae runs/rqvae --data_dir data/emoji/train --output_dir runs/my-model
    python app.py --weights runs/my-model          # or RQPipeline.from_pretrained("runs/my-model")

--output_dir ends up holding rqvae/ (a copy of --rqvae), rqtransformer/ (the EMA transformer) and
pipeline.json, beside training_summary.json, checkpoints, logs and samples/. --rqvae and --init_from
also take a pipeline folder (its rqvae/ or rqtransformer/), e.g. --rqvae weights/emoji-64.

Classes come from the ImageFolder sub-folder names and are saved with the model. The data set is
encoded once with the frozen RQ-VAE and cached in --output_dir, keyed by the RQ-VAE weights and the
image files, so re-runs and resumes skip it; under torchrun / accelerate launch each process encodes 1/N
of it. Validation samples one fixed batch through RQPipeline: at
most 16 classes spread evenly over all of them, one seed.

A Hugging Face dataset (--dataset_name, as in diffusers' scripts) works too: classes from --label_column,
captions from its --caption_column (text by default); its codes are keyed by the dataset's fingerprint.

Text-to-image: a --data_dir with a metadata.jsonl (file_name + a caption column) trains a prompt-conditioned
model; class sub-folders, if any, still give classes. A prompt tokenizer is trained on the training captions
first (--init_from a text model reuses its own); it is saved with the model, and the captions' token ids
are cached beside the codes. --caption_dropout trains the empty prompt for classifier-free guidance. The
validation grid then shows up to 8 training captions spread over all of them, and the model folder keeps
up to 300 of them in rqtransformer/prompts.json (example prompts for the app).
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset
from torchvision.utils import save_image

from pipelines import RQPipeline
from pipelines.inputs import check_display_names, check_options, read_options
from rqtransformer.losses import code_loss, per_depth_nll
from rqtransformer.model import PRESETS, TEXT_PAD_ID, TOKENIZER_NAME, RQTransformer, RQTransformerConfig
from rqtransformer.tokenizer import MIN_VOCAB_SIZE, PromptTokenizer
from rqvae import RQVAE, RQVAEConfig

from . import cli, trainer
from .captions import (GRID_IMAGES, GRID_PROMPTS, SAVED_PROMPTS, caption_rows, caption_tokenizer, examples_first,
                       prompt_batch, spread, tokenize)
from .data import METADATA, CaptionedImageFolder, any_image_folder, has_captions
from .encoding import encode_dataset
from .hf_data import hub_dataset, train_data


GRID_CLASSES = 16  # the validation batch: however many classes the data has (at most GRID_IMAGES images)
TEXT_DEFAULTS = dict(caption_column="text", text_vocab_size=2048, max_text_len=32, caption_dropout=0.1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rqvae", required=True,
                   help="a trained RQ-VAE (training.train_rqvae's --output_dir) or a pipeline folder (its rqvae/); "
                        "copied into --output_dir")
    p.add_argument("--config", default=None,
                   help=f"preset {sorted(PRESETS)}, a config .json, a model folder or a pipeline folder "
                        f"(default: --init_from's, else emoji-64)")
    p.add_argument("--validation_dir", default=None,
                   help="held-out ImageFolder (captioned too when --data_dir is): test loss per depth")
    p.add_argument("--cfg_dropout", type=float, default=0.1, help="label dropout for classifier-free guidance")
    p.add_argument("--dropout", type=float, default=None,
                   help="the transformer's dropout (default: the config's; with --init_from, the saved model's)")
    p.add_argument("--class_title", default="Class",
                   help="what the class sub-folders are, as the app labels its dropdown (e.g. Style)")
    p.add_argument("--unconditional", action="store_true", help="ignore the class folders")
    p.add_argument("--sample_guidance_scale", type=float, default=3.0,
                   help="classifier-free guidance of the validation samples; also the saved pipeline's default")
    g = p.add_argument_group("the paper's stage-2 training (section 3.3); each flag works alone")
    g.add_argument("--stochastic_codes", action="store_true",
                   help="train on codes drawn from Q_tau(k | r) ~ exp(-||r - e(k)||^2 / tau) every step "
                        "instead of the nearest codes (the encoder's latents are cached instead of codes)")
    g.add_argument("--soft_labels", action="store_true",
                   help="cross-entropy against Q_tau of each depth's residual instead of the one-hot code")
    g.add_argument("--code_temperature", type=cli.positive_float, default=0.5,
                   help="tau of --stochastic_codes and --soft_labels (default 0.5, as the official configs). It is "
                        "relative to the latents' scale: for the bundled emoji-64 RQ-VAE 0.5 is near-uniform, use "
                        "about 0.002; the start-up line says how often Q_tau draws the nearest code")
    t = p.add_argument_group("text conditioning: a --data_dir with a metadata.jsonl (captions)")
    t.add_argument("--caption_column", default=None, help="the caption column of metadata.jsonl (default text)")
    t.add_argument("--text_vocab_size", type=cli.positive_int, default=None,
                   help="vocabulary of the prompt tokenizer trained on the training captions (default 2048; "
                        "fewer when the captions hold fewer distinct pieces)")
    t.add_argument("--text_pool", action=argparse.BooleanOptionalAction, default=None,
                   help="add the prompt's pooled token embeddings to the start token, as a class embedding is: "
                        "the prompt reaches every position directly, not only through attention to the prefix "
                        "(default: on for a new text model; with --init_from, the saved model's)")
    t.add_argument("--name_tokens", action="store_true",
                   help="give each distinct training caption its own learned token beside its BPE pieces, for "
                        "short name-like captions (the emoji's names): a trained name then addresses what it was "
                        "trained on, any other prompt goes through the pieces alone")
    t.add_argument("--name_dropout", type=float, default=None,
                   help="share of training rows whose name token is dropped, so that the pieces alone keep "
                        "learning for unseen names (default 0.5; needs name tokens)")
    t.add_argument("--max_text_len", type=cli.positive_int, default=None,
                   help="prompt tokens the model reads; longer captions are truncated (default 32)")
    t.add_argument("--caption_dropout", type=float, default=None,
                   help="share of captions replaced by the empty prompt, for classifier-free guidance "
                        "(default 0.1; independent of --cfg_dropout)")
    p.add_argument("--samples_per_class", type=cli.positive_int, default=4,
                   help=f"validation samples per class, or per prompt for captioned data (up to {GRID_CLASSES} "
                        f"classes or {GRID_PROMPTS} prompts shown; fewer each when the grid would exceed "
                        f"{GRID_IMAGES} images)")
    cli.add_training_args(p, batch_size=32, steps=20_000, lr=3e-4, sub="rqtransformer",
                          output="the final pipeline (rqvae/ + rqtransformer/ + pipeline.json)")
    args = p.parse_args(argv)
    cli.check_data_args(p, args)
    if args.init_from:  # a pipeline folder: its rqtransformer/
        args.init_from = str(cli.model_folder(args.init_from, "--init_from", "rqtransformer"))
    args.config, args.config_flag = cli.config_source(args)
    for flag in ("dropout", "cfg_dropout", "caption_dropout", "name_dropout"):  # rates; None = the default
        value = getattr(args, flag)
        if value is not None and not 0.0 <= value < 1.0:
            p.error(f"--{flag} must be in [0, 1), got {value}")
    if args.text_vocab_size is not None and args.text_vocab_size < MIN_VOCAB_SIZE:
        p.error(f"--text_vocab_size must be at least {MIN_VOCAB_SIZE} (256 byte pieces + padding), "
                f"got {args.text_vocab_size}")
    if args.sample_guidance_scale < 0:
        p.error("--sample_guidance_scale must be >= 0")
    try:
        check_options(1, 1.0, None, args.class_title)  # (the other options are checked above)
    except ValueError as e:
        p.error(str(e).replace("class_title", "--class_title"))
    return args


def validation_batch(num_classes: int, samples_per_class: int) -> tuple[list[int] | None, int, int]:
    """The fixed validation batch: (labels or None, num_images, images per grid row). At most
    GRID_CLASSES classes spread evenly over all, `samples_per_class` each while the batch stays within
    GRID_IMAGES; an unconditional model gets one row without labels."""
    if not num_classes:
        n = min(samples_per_class, GRID_IMAGES)
        return None, n, n
    shown = torch.linspace(0, num_classes - 1, min(num_classes, GRID_CLASSES)).round().long().tolist()
    per_class = max(1, min(samples_per_class, GRID_IMAGES // len(shown)))
    labels = [c for c in shown for _ in range(per_class)]
    return labels, len(labels), per_class


def load_data(args, resolution: int):
    """(train set, validation set or None): ImageFolders, or captioned folders (a metadata.jsonl), every
    image and caption checked before anything is encoded. Fills in the text defaults for captioned data."""
    column = args.caption_column or TEXT_DEFAULTS["caption_column"]
    train_set = train_data(args, resolution, column)
    if not isinstance(train_set, CaptionedImageFolder):
        given = [f"--{name}" for name in TEXT_DEFAULTS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{given[0]} needs captions: " + (f"--data_dir {args.data_dir} has no {METADATA}"
                             if args.data_dir else f"--dataset_name {args.dataset_name} has no column '{column}'"))
    elif args.caption_dropout is None:
        args.caption_dropout = TEXT_DEFAULTS["caption_dropout"]
    val_set = None
    if args.validation_split:  # a held-out split: captions required when training on them
        val_set = hub_dataset(args, resolution, args.validation_split, isinstance(train_set, CaptionedImageFolder))
    if args.validation_dir:
        if isinstance(train_set, CaptionedImageFolder) and Path(args.validation_dir).is_dir() \
                and not has_captions(args.validation_dir):
            raise ValueError(f"--validation_dir {args.validation_dir} has no {METADATA}: the held-out loss of a "
                             f"caption model needs the captions of the validation images")
        val_set = any_image_folder(args.validation_dir, resolution, column)
    return train_set, val_set


def by_name(labels: torch.Tensor, names: list[str], model_names: list[str]) -> torch.Tensor:
    """Class indices into `names` -> indices into `model_names` (the same class names)."""
    return torch.tensor([model_names.index(c) for c in names])[labels]


def main(argv=None):
    args = parse_args(argv)
    vae_dir = cli.model_folder(args.rqvae, "--rqvae", "rqvae")
    cli.config_from_arg(RQVAEConfig, {}, str(vae_dir), "--rqvae")  # another model's folder: say so
    vae = RQVAE.from_pretrained(vae_dir).requires_grad_(False)
    out = Path(args.output_dir)
    # every input is checked before the encoding, which takes minutes on a large folder
    train_set, val_set = load_data(args, vae.config.resolution)
    captioned = isinstance(train_set, CaptionedImageFolder)
    classes = [] if args.unconditional else train_set.classes
    data_flag = f"--data_dir {args.data_dir}" if args.data_dir else f"--dataset_name {args.dataset_name}"
    val_flag = (f"--validation_dir {args.validation_dir}" if args.validation_dir
                else f"--validation_split {args.validation_split}")
    if val_set is not None and classes and not val_set.classes:
        raise ValueError(f"{val_flag} has no classes but {data_flag} has classes {classes}: give it the same "
                         "classes, or pass --unconditional")
    unknown = sorted(set(val_set.classes) - set(classes)) if val_set is not None and classes else []
    if unknown:
        raise ValueError(f"{val_flag} has classes that {data_flag} lacks: {unknown}")
    saved, data_classes, class_rows, options = None, None, None, {}
    if args.init_from:  # say which classes differ, not just which tensor (class_emb) does not fit
        saved = cli.config_from_arg(RQTransformerConfig, PRESETS, args.init_from, "--init_from")
        # a pipeline's sampling defaults and whether its null class was ever trained (not for converted models)
        options = read_options(Path(args.init_from).parent / "pipeline.json")
        names = saved.class_names or [str(i) for i in range(saved.num_classes)]  # as the pipeline shows them
        options["class_display_names"] = check_display_names(options.get("class_display_names"), names)
        if classes and set(classes) <= set(names) and classes != names:
            data_classes, classes = classes, names  # folders named after some of the model's classes
        elif saved.class_names and set(classes) > set(names):  # new classes beside all of the model's
            class_rows = [names.index(c) if c in names else None for c in classes]
        if saved.num_classes != len(classes) and not class_rows:
            data = "--unconditional" if args.unconditional else f"the data has {len(classes)} {classes}"
            raise ValueError(f"--init_from {args.init_from} has {saved.num_classes} classes "
                             f"{names[:8]}{' ...' if saved.num_classes > 8 else ''}, {data}: "
                             "fine-tuning needs its classes (folders named after some or all of them, plus new ones)"
                             + ("; add --unconditional" if not saved.num_classes else ""))
        if captioned and not saved.max_text_len:
            raise ValueError(f"--init_from {args.init_from} has no text conditioning but {data_flag} is captioned: "
                             "a caption model cannot start from it; train one without --init_from")
        if saved.max_text_len and not captioned:
            raise ValueError(f"--init_from {args.init_from} is a text-conditioned model but {data_flag} has no "
                             f"captions ({METADATA} or a caption column): fine-tuning it needs captioned images")
    tokenizer = tokenizer_file = None
    max_text_len = 0
    if captioned and saved is not None:  # fine-tuning: the model's own tokenizer and prompt length
        if args.text_vocab_size is not None:
            raise ValueError(f"--init_from {args.init_from} brings its own tokenizer: drop --text_vocab_size")
        if args.max_text_len not in (None, saved.max_text_len):
            raise ValueError(f"--max_text_len {args.max_text_len} differs from --init_from's {saved.max_text_len}: "
                             "fine-tuning keeps the model's prompt length (drop --max_text_len)")
        tokenizer, max_text_len = PromptTokenizer.from_file(Path(args.init_from) / TOKENIZER_NAME), saved.max_text_len
        if tokenizer.vocab_size != saved.text_vocab_size:
            raise ValueError(f"--init_from {args.init_from}: its {TOKENIZER_NAME} has {tokenizer.vocab_size} tokens, "
                             f"its config's text_vocab_size is {saved.text_vocab_size}")
    elif captioned:  # trained on the training captions (its real size may be below --text_vocab_size)
        tokenizer, tokenizer_file = caption_tokenizer(
            train_set.captions, args.text_vocab_size or TEXT_DEFAULTS["text_vocab_size"], out, args.name_tokens)
        max_text_len = args.max_text_len or TEXT_DEFAULTS["max_text_len"]
    if args.name_tokens and not captioned:
        raise ValueError(f"--name_tokens needs captions: {data_flag} has none")
    text_rows = tokenizer.vocab_size if tokenizer else 0  # the saved model's rows, before any new name token
    if args.name_tokens and saved is not None:  # the same names in the same order: a resumed run gets the same ids
        tokenizer.add_names(train_set.captions)
    if args.name_dropout is not None and not (tokenizer and tokenizer.name_ids):
        raise ValueError("--name_dropout needs name tokens: add --name_tokens (or --init_from a model with them)")
    name_dropout = (0.5 if args.name_dropout is None else args.name_dropout) if tokenizer and tokenizer.name_ids \
        else 0.0
    # a new text model pools its prompt unless told not to; --init_from keeps the saved model's choice
    text_pool = args.text_pool if args.text_pool is not None else saved.text_pool if saved else captioned or None
    config = cli.config_from_arg(RQTransformerConfig, PRESETS, args.config, args.config_flag,
                                 codebook_size=vae.config.codebook_size, code_shape=vae.config.code_shape,
                                 num_classes=len(classes), class_names=classes,
                                 text_vocab_size=tokenizer.vocab_size if tokenizer else 0, max_text_len=max_text_len,
                                 text_pool=text_pool, dropout=args.dropout)
    accelerator = trainer.setup(args, "rqtransformer")
    main_process = accelerator.is_main_process
    if tokenizer_file is not None and main_process and not tokenizer_file.is_file():
        tokenizer.save(tokenizer_file)  # a resumed run loads this one instead of training another
    model = RQTransformer(config)
    model.tokenizer = tokenizer  # saved with the model (tokenizer.json)
    accelerator.print(f"RQ-Transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    cli.load_init_from(model, args.init_from, class_rows, text_rows if saved and saved.max_text_len else None)
    if class_rows:
        accelerator.print(f"new classes {[c for c, i in zip(classes, class_rows) if i is None]} start from the mean "
                          f"of --init_from's class embeddings")
    vae.to(accelerator.device)
    drawn = args.stochastic_codes or args.soft_labels  # codes / targets drawn from cached latents every step
    truncated = [0]

    def encode(dataset, hflip: bool, latents: bool) -> list[torch.Tensor]:
        """[codes, labels, (text ids [N, L],) (latents,)], one row per image (view) and caption."""
        if not isinstance(dataset, CaptionedImageFolder):
            return list(encode_dataset(vae, vae_dir, dataset, out, hflip, accelerator, latents))
        images, image_of = dataset.images()  # each file encoded once, however many captions it has
        codes, labels, *rest, index = encode_dataset(vae, vae_dir, images, out, hflip, accelerator, latents,
                                                     index=True)
        if tokenizer is None:  # a captioned validation folder of a model without text
            return [codes, labels, *rest]
        ids, truncated[0] = tokenize(tokenizer, dataset.captions, max_text_len, out, main_process)
        rows, caps = caption_rows(index, image_of)
        return [codes[rows], labels[rows], ids[caps], *(r[rows] for r in rest)]

    val = encode(val_set, False, False) if val_set is not None else None  # each process encodes 1/N
    train_data = encode(train_set, args.hflip, drawn)
    # guidance needs a trained null class / empty prompt: this run's dropout, or the model's before it
    guidance = options.get("guidance", True) or (args.caption_dropout if tokenizer else args.cfg_dropout) > 0
    guidance_scale = args.sample_guidance_scale if guidance else 1.0
    class_title = options.get("class_title", "Class") if args.class_title == "Class" else args.class_title
    if data_classes:  # the data's class indices -> the model's, by name
        train_data[1] = by_name(train_data[1], data_classes, classes)
    if val is not None and classes:  # the test folder's class indices -> the model's, by name
        val[1] = by_name(val[1], val_set.classes, classes)
    codes = train_data[0]
    text = (f"; {len(train_set.captions)} captions ({len(set(train_set.captions))} distinct), prompt tokenizer "
            f"{tokenizer.vocab_size} tokens, max_text_len {max_text_len} ({truncated[0]} captions truncated), "
            f"caption dropout {args.caption_dropout}"
            + (f", {len(tokenizer.name_ids)} name tokens, name dropout {name_dropout}" if tokenizer.name_ids else "")
            ) if tokenizer else ""
    accelerator.print(f"{len(codes)} code stacks {tuple(codes.shape[1:])}, {len(classes)} classes" + text
                      + (f"; codes drawn at temperature {args.code_temperature}" if args.stochastic_codes else "")
                      + (f"; soft labels at temperature {args.code_temperature}" if args.soft_labels else ""))
    if drawn:  # tau is relative to the latents' scale: say how far Q_tau is from the nearest codes
        first = train_data[-1][:256].to(accelerator.device)  # latents [n,h,w,C]
        kept = (vae.quantize_latents(first, args.code_temperature, torch.Generator(accelerator.device).manual_seed(0))
                == codes[:256].to(accelerator.device)).float().mean((0, 1, 2))  # [D]
        accelerator.print(f"at --code_temperature {args.code_temperature}, Q_tau draws the nearest code "
                          + " / ".join(f"{k:.0%}" for k in kept.tolist()) + " of the time at depths 1..D"
                          + (" (near-uniform: lower --code_temperature)" if kept[0] < 0.5 else ""))
    loader = DataLoader(TensorDataset(*train_data), batch_size=args.train_batch_size, shuffle=True,
                        drop_last=trainer.drop_last(accelerator, len(codes), args.train_batch_size),
                        generator=torch.Generator().manual_seed(args.seed))
    decay, no_decay = [], []
    for p in model.parameters():  # decay every matrix, the 2-D embeddings too; not norms and biases (1-D)
        (decay if p.ndim >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.adam_weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(0.9, 0.95))
    scheduler = trainer.warmup_cosine(optimizer, args.lr_warmup_steps, args.max_train_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    raw = accelerator.unwrap_model(model)
    ema = trainer.EMA(raw, args.ema_decay) if args.ema_decay else None
    start = trainer.resume(accelerator, args, ema)
    null = raw.null_class
    # Codes drawn for step s come from a generator seeded with (seed, s, rank), so a resumed run draws
    # exactly what an uninterrupted one would, with no generator state to checkpoint.
    code_rng = torch.Generator(accelerator.device)
    seeded_for = [-1]

    def draw(latents, codes, step):
        """Codes and soft targets of one batch: (codes [B,h,w,D], targets [B,h,w,D,K] or None)."""
        if seeded_for[0] != step:
            code_rng.manual_seed((args.seed * 1_000_003 + step) * accelerator.num_processes
                                 + accelerator.process_index)
            seeded_for[0] = step
        tau = args.code_temperature
        if args.stochastic_codes and args.soft_labels:  # one walk over the depths gives both
            return vae.quantize_latents(latents, tau, generator=code_rng, return_targets=True)
        if args.stochastic_codes:
            return vae.quantize_latents(latents, tau, generator=code_rng), None
        return codes, vae.soft_targets(latents, codes, tau)

    def train_step(batch, step):
        stacks, y, *rest = batch
        text = rest.pop(0) if tokenizer else None  # [B, max_text_len]
        targets = None
        if rest:
            stacks, targets = draw(rest[0], stacks, step)
        if not classes:
            y = torch.full_like(y, null)
        elif args.cfg_dropout > 0:  # learn the null class too, for classifier-free guidance
            y = torch.where(torch.rand(y.shape, device=y.device) < args.cfg_dropout, null, y)
        if text is not None and args.caption_dropout > 0:  # learn the empty prompt too, drawn apart from classes
            empty = torch.rand(text.shape[0], device=text.device) < args.caption_dropout
            text = text.masked_fill(empty[:, None], TEXT_PAD_ID)
        if text is not None and name_dropout > 0:  # the same caption without its name token: the pieces alone
            drop = torch.rand(text.shape[0], device=text.device) < name_dropout
            text = text.masked_fill(drop[:, None] & (text >= tokenizer.first_name_id), TEXT_PAD_ID)
        loss, acc = code_loss(model(stacks, y, text), stacks, targets)
        trainer.optimizer_step(accelerator, loss, model.parameters(), optimizer, scheduler, args.max_grad_norm)
        logs = {"loss": loss.detach(), "lr": scheduler.get_last_lr()[0]}
        logs.update({f"acc_depth{d + 1}": a for d, a in enumerate(acc)})
        return logs

    def validation_loss():
        """Test cross-entropy per depth (and its perplexity) on the held-out codes."""
        v_codes, v_labels, *v_text = val
        per_depth = per_depth_nll(raw, v_codes, v_labels if classes else torch.full_like(v_labels, null),
                                  text_tokens=v_text[0] if tokenizer else None)
        out = {f"val/loss_depth{d + 1}": float(v) for d, v in enumerate(per_depth)}
        out["val/loss"] = float(per_depth.mean())
        out["val/perplexity"] = float(per_depth.mean().exp())
        return out

    if tokenizer:  # a few training captions, each with the class of its first image
        grid_prompts, grid_labels, grid_row = prompt_batch(train_set.captions, train_set.targets if classes else None,
                                                           args.samples_per_class)
        grid_size = len(grid_prompts)
    else:
        grid_prompts, (grid_labels, grid_size, grid_row) = None, validation_batch(len(classes), args.samples_per_class)

    def evaluate(step, grid: bool = True) -> dict:
        """Held-out loss per depth (logged) and, unless grid=False, one fixed batch of samples: one call,
        one seed, so the grids of a run compare step by step."""
        if not accelerator.is_main_process:
            return {}
        with trainer.evaluation(ema, raw):
            metrics = validation_loss() if val is not None else {}
            if grid:
                pipe = RQPipeline(vae, raw, max_images=grid_size, top_k=options.get("top_k"),
                                  top_p=options.get("top_p"))
                g = torch.Generator(accelerator.device).manual_seed(args.seed)
                with warnings.catch_warnings():  # captions cut to max_text_len: counted once, at the start
                    warnings.simplefilter("ignore", UserWarning)
                    images = pipe(grid_labels, prompt=grid_prompts, num_images=grid_size,
                                  guidance_scale=guidance_scale, generator=g,
                                  output_type="pt").images  # [B,3,H,W] in [0,1]
        if grid:
            (out / "samples").mkdir(exist_ok=True)
            if grid_prompts:  # what each row of the grids shows
                (out / "samples" / "prompts.txt").write_text("\n".join(grid_prompts[::grid_row]) + "\n")
            save_image(images, out / "samples" / f"samples-{step:07d}.png", nrow=grid_row)
        if metrics:
            accelerator.log(metrics, step=step)
            accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics

    started = time.perf_counter()
    best = ("val/loss", "min")  # the checkpoint the rotation keeps besides the newest (with --validation_dir)
    step = trainer.train_loop(accelerator, args, loader, train_step, start_step=start, models=[model],
                               ema=ema, ema_model=model, evaluate=evaluate, best=best)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with trainer.evaluation(ema, raw):  # the EMA weights (the tokenizer is not a weight: it stays)
            prompts = None  # example prompts for the app: a spread of the distinct training captions
            if tokenizer:
                prompts = examples_first(spread(list(dict.fromkeys(train_set.captions)), SAVED_PROMPTS))
            RQPipeline(vae, raw, default_guidance_scale=guidance_scale,
                       caption_dropout=args.caption_dropout if tokenizer else None, prompts=prompts,
                       class_title=class_title, guidance=guidance, top_k=options.get("top_k"),
                       top_p=options.get("top_p"), class_display_names=options.get("class_display_names")
                       ).save_pretrained(out)  # prompts: rqtransformer/prompts.json
        # saved first; the grid of the last step, unless a run that already finished drew it
        seconds = time.perf_counter() - started
        summary = {"step": step, "seconds_per_step": round(seconds / max(1, step - start), 4),
                   **evaluate(step, grid=step > start), **trainer.best_summary(out, best)}
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.print(json.dumps(summary))
    accelerator.end_training()


if __name__ == "__main__":
    cli.run_cli(main)
