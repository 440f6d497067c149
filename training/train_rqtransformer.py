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
from pipelines.inputs import check_options
from rqtransformer.losses import code_loss, per_depth_nll
from rqtransformer.model import PRESETS, TEXT_PAD_ID, RQTransformer
from rqtransformer.tokenizer import MIN_VOCAB_SIZE
from rqvae import RQVAE, RQVAEConfig

from . import cli, trainer
from .captions import (GRID_IMAGES, GRID_PROMPTS, SAVED_PROMPTS, caption_rows, examples_first, prompt_batch, spread,
                       tokenize)
from .data import CaptionedImageFolder
from .encoding import encode_dataset
from .rqtransformer_setup import Plan, by_name, model_config, plan_run


GRID_CLASSES = 16  # the validation batch: however many classes the data has (at most GRID_IMAGES images)


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


def build_model(args, config, plan: Plan, accelerator) -> RQTransformer:
    """The transformer, with the prompt tokenizer and --init_from's weights (new classes from their mean)."""
    if plan.tokenizer_file is not None and accelerator.is_main_process and not plan.tokenizer_file.is_file():
        plan.tokenizer.save(plan.tokenizer_file)  # a resumed run loads this one instead of training another
    model = RQTransformer(config)
    model.tokenizer = plan.tokenizer  # saved with the model (tokenizer.json)
    accelerator.print(f"RQ-Transformer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    cli.load_init_from(model, args.init_from, plan.class_rows,
                       plan.text_rows if plan.saved and plan.saved.max_text_len else None)
    if plan.class_rows:
        accelerator.print(f"new classes {[c for c, i in zip(plan.classes, plan.class_rows) if i is None]} start "
                          f"from the mean of --init_from's class embeddings")
    return model


def encode(vae, vae_dir, dataset, out: Path, hflip: bool, accelerator, latents: bool,
           plan: Plan) -> tuple[list[torch.Tensor], int]:
    """([codes, labels, (text ids [N, L],) (latents,)], one row per image (view) and caption; captions
    truncated to max_text_len)."""
    if not isinstance(dataset, CaptionedImageFolder):
        return list(encode_dataset(vae, vae_dir, dataset, out, hflip, accelerator, latents)), 0
    images, image_of = dataset.images()  # each file encoded once, however many captions it has
    codes, labels, *rest, index = encode_dataset(vae, vae_dir, images, out, hflip, accelerator, latents, index=True)
    if plan.tokenizer is None:  # a captioned validation folder of a model without text
        return [codes, labels, *rest], 0
    ids, truncated = tokenize(plan.tokenizer, dataset.captions, plan.max_text_len, out, accelerator.is_main_process)
    rows, caps = caption_rows(index, image_of)
    return [codes[rows], labels[rows], ids[caps], *(r[rows] for r in rest)], truncated


def encode_sets(args, vae, vae_dir, accelerator, plan: Plan):
    """(train tensors, validation tensors or None, training captions truncated), labels in the model's
    class indices; each process encodes 1/N."""
    out, drawn = Path(args.output_dir), args.stochastic_codes or args.soft_labels  # drawn: latents are kept
    val = encode(vae, vae_dir, plan.val_set, out, False, accelerator, False, plan)[0] \
        if plan.val_set is not None else None
    train, truncated = encode(vae, vae_dir, plan.train_set, out, args.hflip, accelerator, drawn, plan)
    if plan.data_classes:  # the data's class indices -> the model's, by name
        train[1] = by_name(train[1], plan.data_classes, plan.classes)
    if val is not None and plan.classes:  # the test folder's class indices -> the model's, by name
        val[1] = by_name(val[1], plan.val_set.classes, plan.classes)
    return train, val, truncated


def report_data(args, vae, accelerator, plan: Plan, train: list[torch.Tensor], truncated: int) -> None:
    """One start-up line on the codes, classes and captions; with drawn codes, how close Q_tau is to the
    nearest codes (tau is relative to the latents' scale)."""
    codes, tokenizer = train[0], plan.tokenizer
    text = (f"; {len(plan.train_set.captions)} captions ({len(set(plan.train_set.captions))} distinct), prompt "
            f"tokenizer {tokenizer.vocab_size} tokens, max_text_len {plan.max_text_len} ({truncated} captions "
            f"truncated), caption dropout {args.caption_dropout}"
            + (f", {len(tokenizer.name_ids)} name tokens, name dropout {plan.name_dropout}"
               if tokenizer.name_ids else "")) if tokenizer else ""
    accelerator.print(f"{len(codes)} code stacks {tuple(codes.shape[1:])}, {len(plan.classes)} classes" + text
                      + (f"; codes drawn at temperature {args.code_temperature}" if args.stochastic_codes else "")
                      + (f"; soft labels at temperature {args.code_temperature}" if args.soft_labels else ""))
    if args.stochastic_codes or args.soft_labels:
        first = train[-1][:256].to(accelerator.device)  # latents [n,h,w,C]
        kept = (vae.quantize_latents(first, args.code_temperature, torch.Generator(accelerator.device).manual_seed(0))
                == codes[:256].to(accelerator.device)).float().mean((0, 1, 2))  # [D]
        accelerator.print(f"at --code_temperature {args.code_temperature}, Q_tau draws the nearest code "
                          + " / ".join(f"{k:.0%}" for k in kept.tolist()) + " of the time at depths 1..D"
                          + (" (near-uniform: lower --code_temperature)" if kept[0] < 0.5 else ""))


def make_optimizer(model, args):
    """AdamW (weight decay on every matrix, the 2-D embeddings too; not on norms and biases) and its schedule."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.adam_weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.learning_rate, betas=(0.9, 0.95))
    return optimizer, trainer.warmup_cosine(optimizer, args.lr_warmup_steps, args.max_train_steps)


def sampling_options(args, plan: Plan) -> dict:
    """The saved pipeline's sampling options; the validation grids sample with them too."""
    options = plan.options
    # guidance needs a trained null class / empty prompt: this run's dropout, or the model's before it
    guidance = options.get("guidance", True) or (args.caption_dropout if plan.tokenizer else args.cfg_dropout) > 0
    return dict(default_guidance_scale=args.sample_guidance_scale if guidance else 1.0, guidance=guidance,
                class_title=options.get("class_title", "Class") if args.class_title == "Class" else args.class_title,
                top_k=options.get("top_k"), top_p=options.get("top_p"),
                class_display_names=options.get("class_display_names"))


class TrainStep:
    """One step of stage 2: label, caption and name dropout, the code loss and the update. Codes drawn for
    step s come from a generator seeded with (seed, s, rank), so a resumed run draws exactly what an
    uninterrupted one would, with no generator state to checkpoint."""

    def __init__(self, accelerator, args, vae, model, optimizer, scheduler, plan: Plan):
        self.accelerator, self.args, self.vae, self.model, self.plan = accelerator, args, vae, model, plan
        self.optimizer, self.scheduler = optimizer, scheduler
        self.null = accelerator.unwrap_model(model).null_class
        self.code_rng = torch.Generator(accelerator.device)
        self.seeded_for = -1  # the step code_rng was last seeded for

    def draw(self, latents, codes, step):
        """Codes and soft targets of one batch: (codes [B,h,w,D], targets [B,h,w,D,K] or None)."""
        args, accelerator = self.args, self.accelerator
        if self.seeded_for != step:
            self.code_rng.manual_seed((args.seed * 1_000_003 + step) * accelerator.num_processes
                                      + accelerator.process_index)
            self.seeded_for = step
        tau = args.code_temperature
        if args.stochastic_codes and args.soft_labels:  # one walk over the depths gives both
            return self.vae.quantize_latents(latents, tau, generator=self.code_rng, return_targets=True)
        if args.stochastic_codes:
            return self.vae.quantize_latents(latents, tau, generator=self.code_rng), None
        return codes, self.vae.soft_targets(latents, codes, tau)

    def __call__(self, batch, step) -> dict:
        args, tokenizer, null = self.args, self.plan.tokenizer, self.null
        stacks, y, *rest = batch
        text = rest.pop(0) if tokenizer else None  # [B, max_text_len]
        targets = None
        if rest:
            stacks, targets = self.draw(rest[0], stacks, step)
        if not self.plan.classes:
            y = torch.full_like(y, null)
        elif args.cfg_dropout > 0:  # learn the null class too, for classifier-free guidance
            y = torch.where(torch.rand(y.shape, device=y.device) < args.cfg_dropout, null, y)
        if text is not None and args.caption_dropout > 0:  # learn the empty prompt too, drawn apart from classes
            empty = torch.rand(text.shape[0], device=text.device) < args.caption_dropout
            text = text.masked_fill(empty[:, None], TEXT_PAD_ID)
        if text is not None and self.plan.name_dropout > 0:  # the same caption without its name token
            drop = torch.rand(text.shape[0], device=text.device) < self.plan.name_dropout
            text = text.masked_fill(drop[:, None] & (text >= tokenizer.first_name_id), TEXT_PAD_ID)
        loss, acc = code_loss(self.model(stacks, y, text), stacks, targets)
        trainer.optimizer_step(self.accelerator, loss, self.model.parameters(), self.optimizer, self.scheduler,
                               args.max_grad_norm)
        logs = {"loss": loss.detach(), "lr": self.scheduler.get_last_lr()[0]}
        logs.update({f"acc_depth{d + 1}": a for d, a in enumerate(acc)})
        return logs


class Validation:
    """Held-out loss per depth (logged) and one fixed batch of samples: one call, one seed, so the grids of
    a run compare step by step."""

    def __init__(self, accelerator, args, vae, raw, ema, val, plan: Plan, sampling: dict):
        self.accelerator, self.args, self.vae, self.raw, self.ema = accelerator, args, vae, raw, ema
        self.val, self.plan, self.sampling = val, plan, sampling
        if plan.tokenizer:  # a few training captions, each with the class of its first image
            self.prompts, self.labels, self.row = prompt_batch(
                plan.train_set.captions, plan.train_set.targets if plan.classes else None, args.samples_per_class)
            self.size = len(self.prompts)
        else:
            self.prompts, (self.labels, self.size, self.row) = None, validation_batch(len(plan.classes),
                                                                                      args.samples_per_class)

    def loss(self) -> dict:
        """Test cross-entropy per depth (and its perplexity) on the held-out codes."""
        v_codes, v_labels, *v_text = self.val
        per_depth = per_depth_nll(self.raw, v_codes,
                                  v_labels if self.plan.classes else torch.full_like(v_labels, self.raw.null_class),
                                  text_tokens=v_text[0] if self.plan.tokenizer else None)
        out = {f"val/loss_depth{d + 1}": float(v) for d, v in enumerate(per_depth)}
        out["val/loss"] = float(per_depth.mean())
        out["val/perplexity"] = float(per_depth.mean().exp())
        return out

    def samples(self) -> torch.Tensor:
        """The fixed batch [B,3,H,W] in [0,1]."""
        pipe = RQPipeline(self.vae, self.raw, max_images=self.size, top_k=self.sampling["top_k"],
                          top_p=self.sampling["top_p"])
        g = torch.Generator(self.accelerator.device).manual_seed(self.args.seed)
        with warnings.catch_warnings():  # captions cut to max_text_len: counted once, at the start
            warnings.simplefilter("ignore", UserWarning)
            return pipe(self.labels, prompt=self.prompts, num_images=self.size,
                        guidance_scale=self.sampling["default_guidance_scale"], generator=g, output_type="pt").images

    def __call__(self, step: int, grid: bool = True) -> dict:
        """The figures of `step`; the grid too unless grid=False."""
        if not self.accelerator.is_main_process:
            return {}
        with trainer.evaluation(self.ema, self.raw):
            metrics = self.loss() if self.val is not None else {}
            images = self.samples() if grid else None
        if grid:
            folder = Path(self.args.output_dir) / "samples"
            folder.mkdir(exist_ok=True)
            if self.prompts:  # what each row of the grids shows
                (folder / "prompts.txt").write_text("\n".join(self.prompts[::self.row]) + "\n")
            save_image(images, folder / f"samples-{step:07d}.png", nrow=self.row)
        if metrics:
            self.accelerator.log(metrics, step=step)
            self.accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics


def save_pipeline(args, vae, raw, ema, plan: Plan, sampling: dict) -> None:
    """The final pipeline folder: the EMA weights (the tokenizer is not a weight: it stays) and, for a text
    model, example prompts for the app (rqtransformer/prompts.json)."""
    with trainer.evaluation(ema, raw):
        prompts = None  # a spread of the distinct training captions
        if plan.tokenizer:
            prompts = examples_first(spread(list(dict.fromkeys(plan.train_set.captions)), SAVED_PROMPTS))
        RQPipeline(vae, raw, caption_dropout=args.caption_dropout if plan.tokenizer else None, prompts=prompts,
                   **sampling).save_pretrained(args.output_dir)


def main(argv=None):
    args = parse_args(argv)
    vae_dir = cli.model_folder(args.rqvae, "--rqvae", "rqvae")
    cli.config_from_arg(RQVAEConfig, {}, str(vae_dir), "--rqvae")  # another model's folder: say so
    vae = RQVAE.from_pretrained(vae_dir).requires_grad_(False)
    out = Path(args.output_dir)
    plan = plan_run(args, vae.config.resolution, out)  # every input checked before the (slow) encoding
    config = model_config(args, vae.config, plan)
    accelerator = trainer.setup(args, "rqtransformer")
    model = build_model(args, config, plan, accelerator)  # after setup: its initial weights follow --seed
    vae.to(accelerator.device)
    train, val, truncated = encode_sets(args, vae, vae_dir, accelerator, plan)
    report_data(args, vae, accelerator, plan, train, truncated)
    loader = DataLoader(TensorDataset(*train), batch_size=args.train_batch_size, shuffle=True,
                        drop_last=trainer.drop_last(accelerator, len(train[0]), args.train_batch_size),
                        generator=torch.Generator().manual_seed(args.seed))
    optimizer, scheduler = make_optimizer(model, args)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    raw = accelerator.unwrap_model(model)
    ema = trainer.EMA(raw, args.ema_decay) if args.ema_decay else None
    start = trainer.resume(accelerator, args, ema)
    sampling = sampling_options(args, plan)
    train_step = TrainStep(accelerator, args, vae, model, optimizer, scheduler, plan)
    evaluate = Validation(accelerator, args, vae, raw, ema, val, plan, sampling)

    started = time.perf_counter()
    best = ("val/loss", "min")  # the checkpoint the rotation keeps besides the newest (with --validation_dir)
    step = trainer.train_loop(accelerator, args, loader, train_step, start_step=start, models=[model],
                              ema=ema, ema_model=model, evaluate=evaluate, best=best)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_pipeline(args, vae, raw, ema, plan, sampling)
        # saved first; the grid of the last step, unless a run that already finished drew it
        seconds = time.perf_counter() - started
        summary = {"step": step, "seconds_per_step": round(seconds / max(1, step - start), 4),
                   **evaluate(step, grid=step > start), **trainer.best_summary(out, best)}
        (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.print(json.dumps(summary))
    accelerator.end_training()


if __name__ == "__main__":
    cli.run_cli(main)
