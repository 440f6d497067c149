"""Train the RQ-VAE (stage 1) on an ImageFolder tree, or a captioned folder (a metadata.jsonl; its images
may sit at the root), or a Hugging Face dataset (--dataset_name): captions are not used here, stage 2 learns them.

    python -m training.train_rqvae --data_dir data/emoji/train --output_dir runs/rqvae --config emoji-64
    python -m training.train_rqvae --dataset_name user/my-emoji --output_dir runs/rqvae --config emoji-64
    accelerate launch -m training.train_rqvae ...   # multi-GPU

The final EMA model lands in --output_dir (RQVAE.from_pretrained(output_dir)): stage 2's --rqvae.
--init_from takes a model folder or a pipeline folder (its rqvae/), e.g. to fine-tune the decoder of
weights/emoji-64 with --decoder_only, or to train a wider one for its codes (--decoder_only --decoder_channels 64).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.utils import save_image

from rqcore.metrics import psnr
from rqvae.losses import RQVAELoss
from rqvae.model import PRESETS, RQVAE, RQVAEConfig

from . import cli, trainer
from .data import CaptionedImageFolder
from .reconstruction import evaluate_depths
from .hf_data import train_data, validation_images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help=f"preset {sorted(PRESETS)}, a config .json, a model folder or a pipeline folder "
                        f"(default: --init_from's, else emoji-64)")
    p.add_argument("--resolution", type=cli.positive_int, default=None, help="override the config's")
    p.add_argument("--decoder_channels", type=cli.positive_int, default=None,
                   help="override the config's decoder width; with --init_from of another width, the encoder and "
                        "codebook are loaded and the decoder starts fresh (with --decoder_only: the codes stay)")
    p.add_argument("--validation_dir", default=None, help="held-out ImageFolder for PSNR (default: train)")
    p.add_argument("--num_validation_images", type=cli.positive_int, default=64)
    p.add_argument("--caption_column", default=None,
                   help="the caption column of a captioned folder's metadata.jsonl or of --dataset_name (default "
                        "text; checked, not used here)")
    p.add_argument("--reconstruction_loss", choices=["l1", "l2"], default="l1")
    p.add_argument("--decoder_only", action="store_true",
                   help="with --init_from: train only the decoder; encoder and codebook stay frozen, so the "
                        "codes (and a stage-2 model trained on them) stay valid")
    p.add_argument("--perceptual_weight", type=float, default=0.0, help="VGG16 perceptual loss; 0 = off")
    p.add_argument("--perceptual_weights", default="imagenet",
                   help="'imagenet' (downloads torchvision weights) or a local VGG16 .safetensors")
    p.add_argument("--disc_weight", type=float, default=0.0, help="patch-GAN loss weight; 0 = off")
    p.add_argument("--disc_start", type=int, default=10_000, help="step at which the GAN loss starts")
    p.add_argument("--disc_layers", type=cli.positive_int, default=3, help="patch discriminator depth")
    p.add_argument("--disc_learning_rate", type=cli.positive_float, default=None)
    cli.add_training_args(p, batch_size=16, steps=20_000, lr=2e-4)
    args = p.parse_args(argv)
    cli.check_data_args(p, args)
    if args.decoder_only and not args.init_from:
        p.error("--decoder_only needs --init_from: a trained encoder and codebook to keep")
    if args.init_from:  # a pipeline folder: its rqvae/
        args.init_from = str(cli.model_folder(args.init_from, "--init_from", "rqvae"))
    args.config, args.config_flag = cli.config_source(args)
    for name in ("perceptual_weight", "disc_weight", "disc_start"):
        if getattr(args, name) < 0:
            p.error(f"--{name} must be >= 0")
    return args


def load_init_from(model: RQVAE, init_from: str | None, accelerator) -> None:
    """--init_from's weights; when only the decoder's width differs (--decoder_channels), its encoder and
    codebook, and a fresh decoder."""
    if not init_from:
        return
    ours = model.config
    theirs = cli.config_from_arg(RQVAEConfig, PRESETS, init_from, "--init_from")
    if theirs.decoder_width == ours.decoder_width \
            or dataclasses.replace(theirs, decoder_channels=ours.decoder_channels) != ours:
        cli.load_init_from(model, init_from)  # the same model, or another config (the strict load names the mismatch)
        return
    source = RQVAE.from_pretrained(init_from)  # strict
    model.encoder.load_state_dict(source.encoder.state_dict())
    model.quantizer.load_state_dict(source.quantizer.state_dict())
    accelerator.print(f"--init_from {init_from}: encoder and codebook loaded; a fresh decoder of width "
                      f"{ours.decoder_width} (its own: {theirs.decoder_width})")


def load_data(args, config):
    """(training images, a fixed batch of validation images [N,3,H,W]); captions are checked, not used."""
    dataset = train_data(args, config.resolution, args.caption_column or "text")
    if isinstance(dataset, CaptionedImageFolder):
        dataset = dataset.images()[0]  # each file once per epoch, however many captions it has
    val_images = validation_images(args, dataset, config.resolution, args.num_validation_images,
                                   args.caption_column or "text")
    return dataset, val_images


def build_model(args, config, accelerator) -> tuple[RQVAE, RQVAELoss]:
    """The RQ-VAE (with --init_from's weights) and its loss, whose discriminator, if any, is trained too."""
    model = RQVAE(config)
    load_init_from(model, args.init_from, accelerator)
    criterion = RQVAELoss(args.reconstruction_loss, args.perceptual_weight, args.perceptual_weights,
                          args.disc_weight, args.disc_start,
                          # each layer halves the patch grid; keep at least 4x4 patches for the 4x4 kernels
                          disc_layers=max(1, min(args.disc_layers, config.resolution.bit_length() - 5)),
                          ).to(accelerator.device)
    if args.decoder_only:
        model.encoder.requires_grad_(False)
        model.quantizer.requires_grad_(False)
    return model, criterion


class TrainStep:
    """One step of stage 1: the generator (RQ-VAE) update, then the discriminator's once the GAN loss is on."""

    def __init__(self, accelerator, args, model, criterion, trained, optimizer, scheduler, d_opt):
        self.accelerator, self.args, self.model, self.criterion = accelerator, args, model, criterion
        self.trained, self.optimizer, self.scheduler, self.d_opt = trained, optimizer, scheduler, d_opt
        self.raw = accelerator.unwrap_model(model)

    def __call__(self, batch, step) -> dict:
        args, criterion, images = self.args, self.criterion, batch[0]
        if args.hflip:  # flipped here, not in the loader: the loader prefetches, which would break exact resume
            flip = torch.rand(images.shape[0], device=images.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        recon, terms = self.model(images, frozen_codes=args.decoder_only)
        if criterion.discriminator is not None:
            criterion.discriminator.requires_grad_(False)  # the G step must not move D
        loss, logs = criterion.generator_loss(images, recon, terms["commitment"], step,
                                              last_layer=self.raw.decoder.conv_out.weight)
        trainer.optimizer_step(self.accelerator, loss, self.trained, self.optimizer, self.scheduler,
                               args.max_grad_norm)
        if criterion.uses_gan(step):
            criterion.discriminator.requires_grad_(True)
            d_loss = criterion.discriminator_loss(images, recon)
            trainer.optimizer_step(self.accelerator, d_loss, criterion.discriminator.parameters(), self.d_opt, None,
                                   args.max_grad_norm)
            logs["d_loss"] = d_loss.detach()
        codes = terms["codes"]
        logs.update(loss=loss.detach(), psnr=psnr(recon.detach().clamp(-1, 1), images).mean(),
                    batch_usage=codes[codes >= 0].unique().numel() / self.raw.config.codebook_size,
                    lr=self.scheduler.get_last_lr()[0])
        return logs


class Validation:
    """PSNR per depth on the validation images (logged), and a reconstruction grid (rows: input, then depth
    1..D)."""

    def __init__(self, accelerator, args, raw, ema, val_images):
        self.accelerator, self.args, self.raw, self.ema, self.val_images = accelerator, args, raw, ema, val_images

    def __call__(self, step: int, grid: bool = True) -> dict:
        """The figures of `step`; the grid too unless grid=False."""
        if not self.accelerator.is_main_process:
            return {}
        raw = self.raw
        with trainer.evaluation(self.ema, raw):
            images = self.val_images.to(self.accelerator.device)
            metrics = evaluate_depths(raw, images)
            if grid:
                shown = images[:8]
                codes = raw.encode(shown)
                rows = [shown] + [raw.decode(codes, depth=k) for k in range(1, raw.config.code_depth + 1)]
        if grid:
            grid_dir = Path(self.args.output_dir) / "samples"
            grid_dir.mkdir(exist_ok=True)
            save_image(torch.cat(rows) * 0.5 + 0.5, grid_dir / f"reconstruction-{step:07d}.png", nrow=len(shown))
        self.accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
        self.accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        return metrics


def main(argv=None):
    args = parse_args(argv)
    config = cli.config_from_arg(RQVAEConfig, PRESETS, args.config, args.config_flag, resolution=args.resolution,
                                 decoder_channels=args.decoder_channels)
    dataset, val_images = load_data(args, config)
    accelerator = trainer.setup(args, "rqvae")
    loader = DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                        drop_last=trainer.drop_last(accelerator, len(dataset), args.train_batch_size),
                        num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=args.num_workers > 0,
                        # own generator: creating an iterator must not draw from the global RNG (exact resume)
                        generator=torch.Generator().manual_seed(args.seed))
    where = f"in {len(dataset.classes)} folders" if dataset.classes else "(no class folders)"
    accelerator.print(f"{len(dataset)} images {where}; codes {config.code_shape}")
    model, criterion = build_model(args, config, accelerator)  # after setup: its initial weights follow --seed
    trained = [p for p in model.parameters() if p.requires_grad]
    accelerator.print(f"RQ-VAE: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters "
                      f"({sum(p.numel() for p in trained) / 1e6:.2f} M trained), codebook {config.codebook_size}")
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, betas=(0.9, 0.99),
                                  weight_decay=args.adam_weight_decay)
    scheduler = trainer.warmup_cosine(optimizer, args.lr_warmup_steps, args.max_train_steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    models, d_opt = [model], None
    if criterion.discriminator is not None:
        d_opt = torch.optim.AdamW(criterion.discriminator.parameters(),
                                  lr=args.disc_learning_rate or args.learning_rate, betas=(0.5, 0.9))
        criterion.discriminator, d_opt = accelerator.prepare(criterion.discriminator, d_opt)
        models.append(criterion.discriminator)
    raw = accelerator.unwrap_model(model)
    ema = trainer.EMA(raw, args.ema_decay) if args.ema_decay else None
    start = trainer.resume(accelerator, args, ema)
    train_step = TrainStep(accelerator, args, model, criterion, trained, optimizer, scheduler, d_opt)
    evaluate = Validation(accelerator, args, raw, ema, val_images)

    best = (f"psnr_depth{config.code_depth}", "max")  # the checkpoint the rotation keeps besides the newest
    step = trainer.train_loop(accelerator, args, loader, train_step, start_step=start, models=models,
                              ema=ema, ema_model=model, evaluate=evaluate, best=best)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with trainer.evaluation(ema, raw):
            raw.save_pretrained(args.output_dir)
        # saved first; the grid of the last step, unless a run that already finished drew it
        metrics = evaluate(step, grid=step > start)
        summary = {"step": step, **metrics, **trainer.best_summary(args.output_dir, best)}
        (Path(args.output_dir) / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.print(json.dumps(summary))
    accelerator.end_training()


if __name__ == "__main__":
    cli.run_cli(main)
