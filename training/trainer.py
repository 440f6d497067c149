"""The accelerate trainer both stages share: setup, EMA, atomic checkpoints with exact resume, and the
step loop. Each stage supplies only its own `train_step` and `evaluate`."""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import (DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, gather_object,
                               set_seed)
from safetensors.torch import load_file
from tqdm.auto import tqdm

from rqcore.checks import is_number
from rqcore.machine import native_bf16
from rqcore.pretrained import write_safetensors

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"  # written last: its presence marks a complete checkpoint
EMA_FILE = "ema.safetensors"


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed large blocks for reuse: by default blocks of 32 MB and more are unmapped on
    free, so every step would page-fault its large activations back in. The process keeps its peak memory
    instead. Applies to the main thread's heap, where the step runs; returns whether it applied."""
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def check_output_dir(args) -> None:
    """Create --output_dir; refuse one that holds another run's checkpoints unless resuming it
    (a new run there would overwrite its model and lose its newest checkpoints to the limit)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output_dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output_dir {out}: cannot create it ({e.strerror})") from None
    found = list_checkpoints(out)
    if found and not args.resume_from_checkpoint:
        raise ValueError(f"--output_dir {out} already holds {found[-1].name} of an earlier run: pass "
                         f"--resume_from_checkpoint latest to continue it, or choose another --output_dir")


def resolve_precision(choice: str, device: torch.device) -> tuple[str, str]:
    """--mixed_precision auto -> the faster of bf16 autocast and fp32 on `device`; returns (choice, notice)."""
    if choice != "auto":
        return choice, f"mixed precision: {choice} (as asked)"
    if native_bf16(device):
        return "bf16", (f"mixed precision: bf16 autocast ({device.type} multiplies bf16 natively; "
                        "--mixed_precision no for fp32)")
    return "no", (f"mixed precision: none, fp32 ({device.type} has no native bf16, where bf16 would be emulated "
                  f"and slower; --mixed_precision bf16 to force it)")


def setup(args, project: str) -> Accelerator:
    """Accelerator with seedable sampler (data order resumes exactly), trackers and seed."""
    if args.ema_decay and not 0.0 < args.ema_decay < 1.0:
        raise ValueError(f"--ema_decay must be in (0, 1) or 0 to disable, got {args.ema_decay}")
    if args.lr_warmup_steps < 0:
        raise ValueError("--lr_warmup_steps must be >= 0")
    check_output_dir(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.mixed_precision, precision_notice = resolve_precision(args.mixed_precision, device)
    # accelerate keeps one precision per process and refuses another: a second run in the same process
    # (a notebook, the tests) starts afresh; the distributed process state (PartialState) is kept
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # without cpu=True, accelerate on a machine without GPUs treats each of N launched processes as
        # alone (no gradient sync, every one the main process); with it they form a gloo group
        cpu=device.type == "cpu",
        # a process that waits longer than this for the others (one died, hung or was killed) gives up
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout))],
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # schedules count optimizer steps: accelerate would step them once per process (N times as fast)
        step_scheduler_with_optimizer=False,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=str(Path(args.output_dir) / "logs")),
        # one data order on every process, whatever its own seed: each takes its share of one permutation
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    keep_freed_memory()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # per-file save chatter drowns the progress bar
    if args.lr_warmup_steps > args.max_train_steps:
        logger.warning(f"--lr_warmup_steps {args.lr_warmup_steps} > --max_train_steps {args.max_train_steps}: "
                       f"the learning rate never reaches --learning_rate; lower --lr_warmup_steps")
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        logger.warning("--mixed_precision fp16 has no effect on CPU: training runs in fp32 "
                       "(use bf16 where the CPU supports it)")
    accelerator.print(precision_notice)
    if accelerator.num_processes > 1:
        accelerator.print(f"{accelerator.num_processes} processes ({accelerator.distributed_type.value}, backend "
                          f"{accelerator.state.backend}): global batch {args.train_batch_size} x "
                          f"{accelerator.num_processes} x {args.gradient_accumulation_steps} accumulation")
    # process 0 keeps the single-process seed; the others draw other dropout and augmentation (their
    # initial weights differ too, but prepare() gives every process process 0's)
    set_seed(args.seed, device_specific=True)
    if accelerator.is_main_process and args.report_to != "none":
        accelerator.init_trackers(project, config={k: v for k, v in vars(args).items()
                                                    if is_number(v) or isinstance(v, (str, bool))})
    return accelerator


def warmup_cosine(optimizer, warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine down to 10 %
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of a model's parameters (buffers are taken from the live model)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # warm-up: a fixed 0.999 would keep ~60 % of the random init after 500 steps
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in model.named_parameters():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - decay)

    @contextlib.contextmanager
    @torch.no_grad()
    def swapped(self, model: torch.nn.Module):
        """Temporarily load the EMA weights into `model`."""
        backup = {n: p.detach().clone() for n, p in model.named_parameters()}
        for name, p in model.named_parameters():
            p.copy_(self.shadow[name])
        try:
            yield model
        finally:
            for name, p in model.named_parameters():
                p.copy_(backup[name])

    def load_state_dict(self, state):
        self.decay, self.updates = state["decay"], state["updates"]
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)


@contextlib.contextmanager
def evaluation(ema: EMA | None, model: torch.nn.Module):
    """Eval mode with the EMA weights (if any), no grad; restores the training state afterwards."""
    with (ema.swapped(model) if ema is not None else contextlib.nullcontext()), torch.no_grad():
        model.eval()
        try:
            yield model
        finally:
            model.train()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (with their state file), oldest first."""
    root = Path(output_dir)
    found = [p for p in root.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def remove_checkpoint(path: Path) -> None:
    """Unmark first, then delete: a deletion killed half-way leaves no complete-looking checkpoint."""
    (path / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def best_checkpoint(output_dir, best: tuple[str, str] | None) -> tuple[Path, float] | None:
    """The complete checkpoint whose validation figure `best` = (metric, "min" | "max") is best, with the
    figure; None when no checkpoint was saved at a validated step."""
    if best is None:
        return None
    metric, mode = best
    scored = []
    for order, path in enumerate(list_checkpoints(output_dir)):  # oldest first
        value = json.loads((path / STATE_FILE).read_text()).get("validation", {}).get(metric)
        if is_number(value) and math.isfinite(value):
            scored.append((value if mode == "min" else -value, order, path, value))
    return min(scored)[2:] if scored else None  # ties: the earliest step


def best_summary(output_dir, best: tuple[str, str] | None) -> dict:
    """For training_summary.json: which checkpoint had the best validation figure, e.g. to continue from it."""
    found = best_checkpoint(output_dir, best)
    return {"best_checkpoint": {"path": found[0].name, best[0]: found[1]}} if found else {}


def save_checkpoint(accelerator: Accelerator, output_dir, step: int, total_limit: int | None,
                    ema: EMA | None = None, validation: dict | None = None,
                    best: tuple[str, str] | None = None) -> Path:
    """Write checkpoint-<step>/ atomically: save into a temp folder, then rename.

    The EMA goes into ema.safetensors ourselves (accelerate would pickle it). `validation` (the figures
    measured at this step) goes into its state file; the rotation never removes the checkpoint with the
    best `best` figure, so a run watched for overfitting keeps its best weights."""
    root = Path(output_dir)
    final, tmp = root / f"checkpoint-{step}", root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG state before the folder is renamed
    if accelerator.is_main_process:
        state = {"step": step}
        if validation:
            state["validation"] = {k: float(v) for k, v in validation.items()}
        if ema is not None:
            write_safetensors(ema.shadow, tmp / EMA_FILE)  # shadow tensors are contiguous clones
            state.update(ema_decay=ema.decay, ema_updates=ema.updates)
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
        if final.exists():
            remove_checkpoint(final)
        os.replace(tmp, final)
        if total_limit:
            kept = best_checkpoint(root, best)
            for old in list_checkpoints(root)[:-total_limit]:
                if kept is None or old != kept[0]:
                    remove_checkpoint(old)
    accelerator.wait_for_everyone()
    return final


def resolve_resume(output_dir, resume: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint (None if there is none); a path must be a checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint {resume} is not a complete checkpoint-N folder "
                         f"(use 'latest' to pick the newest in --output_dir)")
    return path


def resume(accelerator: Accelerator, args, ema: EMA | None = None) -> int:
    """Restore model/optimizer/scheduler/EMA/RNG state; returns the step to continue from."""
    path = resolve_resume(args.output_dir, args.resume_from_checkpoint)
    for stale in Path(args.output_dir).glob(".tmp-checkpoint-*"):  # leftovers of a killed save
        if accelerator.is_main_process and (path is None or stale.resolve() != path.resolve()):
            shutil.rmtree(stale, ignore_errors=True)
    if path is None:
        if args.resume_from_checkpoint:
            accelerator.print(f"no checkpoint in {args.output_dir}; starting a new run")
        return 0
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, ValueError) as e:  # load_state_dict / optimizer groups / unreadable files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else lines[0]
        raise ValueError(f"cannot resume from {path}: {detail} (was it saved by a run with other options, "
                         f"e.g. --config, --rqvae, the classes or --decoder_only?)") from None
    state = json.loads((path / STATE_FILE).read_text())
    step = state["step"]
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise ValueError(f"{path} has no {EMA_FILE}: it was saved without EMA (pass --ema_decay 0)")
        ema.load_state_dict({"decay": state["ema_decay"], "updates": state["ema_updates"],
                             "shadow": load_file(str(path / EMA_FILE))})
    accelerator.print(f"resumed from {path} at step {step}")
    return step


def check_replicas(accelerator: Accelerator, models, ema: EMA | None, step: int) -> None:
    """Every process must hold the same weights and buffers, the codebooks included (their EMA statistics
    are all-reduced in the forward pass, not broadcast from process 0), and the same EMA weights.
    Compared by digest; a difference means the processes diverged and the saved model would be process
    0's alone, so it stops the run."""
    if accelerator.num_processes == 1:
        return
    tensors = {f"{i}.{name}": t for i, model in enumerate(models)
               for name, t in accelerator.unwrap_model(model).state_dict().items()}
    tensors.update({f"ema.{name}": t for name, t in (ema.shadow.items() if ema is not None else ())})
    digests = {name: hashlib.blake2b(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy(),
                                     digest_size=16).hexdigest() for name, t in tensors.items()}
    everyone = gather_object([digests])
    for rank, other in enumerate(everyone[1:], 1):
        differ = [name for name in digests if other.get(name) != everyone[0].get(name)]
        if differ:
            raise RuntimeError(f"step {step}: process {rank} holds other values than process 0 in {len(differ)} of "
                               f"{len(digests)} tensors (first: {differ[0]}): the processes diverged")
    accelerator.print(f"step {step}: weights, buffers (codebooks included) and EMA weights identical on all "
                      f"{accelerator.num_processes} processes")


def drop_last(accelerator: Accelerator, rows: int, batch_size: int) -> bool:
    """Drop a partial last batch only when every process still gets a full one: with fewer rows than
    batch_size x processes, dropping would leave each process without any batch."""
    return rows >= batch_size * accelerator.num_processes


def batches(loader, accelerator: Accelerator, start_step: int, accumulation: int):
    """Endless stream of batches that continues the exact data order after a resume."""
    consumed = start_step * accumulation
    epoch, skip = divmod(consumed, len(loader))
    while True:
        loader.set_epoch(epoch)
        it = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        yield from it
        epoch += 1


def optimizer_step(accelerator, loss, params, optimizer, scheduler, max_grad_norm: float) -> None:
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()  # skipped by accelerate while accumulating
    if scheduler is not None and accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def train_loop(accelerator, args, loader, train_step, *, start_step: int, models, ema=None,
               ema_model=None, evaluate=None, best: tuple[str, str] | None = None) -> int:
    """Run `train_step(batch, step) -> dict of floats` until args.max_train_steps.

    Handles accumulation, EMA, logging, periodic `evaluate(step) -> dict of figures` and checkpoints; a
    checkpoint at a validated step keeps its figures, and the one best by `best` (metric, "min" | "max")
    survives the rotation. The last step is not evaluated here: the caller saves the model first, then
    evaluates it (a slow validation must never stand between a finished run and its saved model).
    """
    step = start_step
    progress = tqdm(total=args.max_train_steps, initial=step, desc="steps", dynamic_ncols=True,
                    disable=not accelerator.is_main_process)
    logs: dict[str, float] = {}
    try:
        if step >= args.max_train_steps:
            return step
        for batch in batches(loader, accelerator, step, args.gradient_accumulation_steps):
            with accelerator.accumulate(*models):
                logs = train_step(batch, step)
            if not accelerator.sync_gradients:
                continue
            if ema is not None:
                ema.update(accelerator.unwrap_model(ema_model))
            step += 1
            progress.update(1)
            if step % args.logging_steps == 0 or step == args.max_train_steps:
                logs = {k: float(v) for k, v in logs.items()}
                bad = [f"{k} became {v}" for k, v in logs.items() if not math.isfinite(v)]
                if accelerator.num_processes > 1:  # all stop, not only the one that saw it (the rest would wait)
                    flag = torch.tensor([float(bool(bad))], device=accelerator.device)
                    if accelerator.reduce(flag, "sum").item() and not bad:
                        bad = ["the loss of another process became non-finite"]
                if bad:
                    raise FloatingPointError(f"{bad[0]} at step {step}; lower --learning_rate or resume from "
                                             f"an earlier checkpoint")
                accelerator.log(logs, step=step)
                progress.set_postfix({k: f"{v:.4g}" for k, v in list(logs.items())[:4]})
            measured = None
            if evaluate is not None and step % args.validation_steps == 0 and step < args.max_train_steps:
                with tqdm.external_write_mode():  # its printed line goes above the bar, not into it
                    measured = evaluate(step)
            if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
                with tqdm.external_write_mode():
                    check_replicas(accelerator, models, ema, step)
                save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, ema,
                                validation=measured, best=best)
            if step >= args.max_train_steps:
                break
        return step
    finally:
        progress.close()
