"""Interrupted training: SIGKILL a real training process between checkpoints and while a
checkpoint is being written, restart with --resume_from_checkpoint latest, and check that it resumes
from the last complete checkpoint, counts on to --max_train_steps, never lists or picks a partial
checkpoint, leaves no temp folder behind, and that the final model loads.

The kill "while writing" polls the output folder for a `.tmp-checkpoint-N` folder and kills at once;
it counts only if that folder is still there after the process is gone (otherwise the save finished
first, and the attempt is repeated). No hooks in the training code, no sleeps as synchronisation.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rqtransformer import RQTransformer
from rqvae import RQVAE
from training.trainer import STATE_FILE, list_checkpoints

from conftest import FAST1, FAST2

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # unbuffered: a killed run keeps its log
STEPS, EVERY = 45, 3  # --max_train_steps, --checkpointing_steps
CHECKPOINT_FILES = {"model.safetensors", "optimizer.bin", "scheduler.bin", STATE_FILE}


class Run:
    """One training process writing its output (stdout and stderr) to a log file."""

    def __init__(self, module: str, argv: list[str], log: Path):
        self.log = log
        with open(log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", module, *argv], cwd=ROOT, env=ENV, stdout=f,
                                         stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> int:
        self.proc.send_signal(signal.SIGKILL)  # only the process this test started
        return self.proc.wait()

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def poll_until(self, predicate, timeout: float = 120):
        """Poll `predicate()` about every millisecond while the process runs; its first truthy value, or
        None if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                return predicate() or None
            time.sleep(0.001)
        self.kill()
        raise TimeoutError(f"nothing happened within {timeout} s; log:\n{self.text()[-2000:]}")


def temp_dirs(out: Path) -> list[Path]:
    try:
        return [out / e.name for e in os.scandir(out) if e.name.startswith(".tmp-checkpoint-")]
    except FileNotFoundError:
        return []


def steps(paths) -> list[int]:
    return [int(p.name.rsplit("-", 1)[1]) for p in paths]


def assert_complete(out: Path) -> list[int]:
    """Every listed checkpoint has all its files and the step of its name; returns the listed steps."""
    found = list_checkpoints(out)
    for path in found:
        assert CHECKPOINT_FILES <= {p.name for p in path.iterdir()}, f"partial checkpoint listed: {path}"
        assert json.loads((path / STATE_FILE).read_text())["step"] == steps([path])[0]
    return steps(found)


def resumed_at(text: str) -> int:
    match = re.search(r"resumed from (\S+) at step (\d+)", text)
    assert match, text[-2000:]
    assert Path(match[1]).name == f"checkpoint-{match[2]}"
    return int(match[2])


def kill_between_checkpoints(run: Run, out: Path, at_least: int) -> dict:
    """Kill as soon as a new complete checkpoint >= at_least appears (the next save is EVERY steps away)."""
    newest = run.poll_until(lambda: (s := assert_complete(out)) and s[-1] >= at_least and s[-1])
    assert newest, run.text()[-2000:]
    code = run.kill()
    return {"killed_after": newest, "code": code, "complete": assert_complete(out), "temp": steps(temp_dirs(out))}


def kill_while_writing(out: Path, new_run, first: Run | None = None, attempts: int = 5) -> dict:
    """Kill runs (`first`, then `new_run(attempt)` resuming) until one dies with a checkpoint half-written."""
    for attempt in range(1, attempts + 1):
        before = assert_complete(out)
        run = first if attempt == 1 and first is not None else new_run(attempt)
        seen = run.poll_until(lambda: temp_dirs(out))
        code = run.kill()
        left = steps(temp_dirs(out))
        assert seen and code == -signal.SIGKILL, run.text()[-2000:]
        if run is not first and before:
            assert resumed_at(run.text()) == before[-1]  # every restart picks the newest complete one
        if left:
            complete = assert_complete(out)
            assert max(left) not in complete and complete[-1] < max(left)  # the partial one is not listed
            return {"attempts": attempt, "killed_while_writing": max(left), "complete": complete}
    pytest.fail(f"never caught a checkpoint being written in {attempts} attempts")


def finish(run: Run, out: Path, expected_resume: int) -> dict:
    code = run.wait()
    text = run.text()
    assert code == 0, text[-3000:]
    assert resumed_at(text) == expected_resume
    assert f"{expected_resume}/{STEPS}" in text  # the progress bar continues from there
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["step"] == STEPS
    assert assert_complete(out) == [STEPS - EVERY, STEPS]
    assert temp_dirs(out) == []  # no stale temp folder left
    return summary


def test_stage1_killed_between_and_during_checkpoints_resumes(image_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["--data_dir", str(image_dir), "--output_dir", str(out), *FAST1, "--max_train_steps", str(STEPS),
            "--checkpointing_steps", str(EVERY), "--checkpoints_total_limit", "2", "--validation_steps", "1000"]
    first = kill_between_checkpoints(Run("training.train_rqvae", argv, tmp_path / "run1.log"), out, at_least=2 * EVERY)
    assert first["code"] == -signal.SIGKILL and first["complete"][-1] == first["killed_after"]

    resume = [*argv, "--resume_from_checkpoint", "latest"]
    during = kill_while_writing(out, lambda i: Run("training.train_rqvae", resume, tmp_path / f"run2-{i}.log"))
    summary = finish(Run("training.train_rqvae", resume, tmp_path / "run3.log"), out, during["complete"][-1])

    model = RQVAE.from_pretrained(out)
    assert model.encode(torch.zeros(1, 3, 16, 16)).shape == (1, 2, 2, 2)
    print(json.dumps({"stage": 1, "between": first, "during": during, "final_step": summary["step"]}))


def test_stage2_killed_while_writing_a_checkpoint_resumes(vae_dir, image_dir, tmp_path):
    out = tmp_path / "tf"
    argv = ["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--output_dir", str(out), *FAST2,
            "--max_train_steps", str(STEPS), "--checkpointing_steps", str(EVERY), "--checkpoints_total_limit", "2",
            "--resume_from_checkpoint", "latest"]
    first = Run("training.train_rqtransformer", argv, tmp_path / "run1.log")  # a new run (nothing to resume yet)
    assert first.poll_until(lambda: assert_complete(out)), first.text()[-2000:]  # one complete checkpoint
    during = kill_while_writing(out, lambda i: Run("training.train_rqtransformer", argv, tmp_path / f"run1-{i}.log"), first)
    summary = finish(Run("training.train_rqtransformer", argv, tmp_path / "run2.log"), out, during["complete"][-1])
    model = RQTransformer.from_pretrained(out / "rqtransformer")
    assert model.config.class_names == ["circles", "squares"]
    print(json.dumps({"stage": 2, "during": during, "final_step": summary["step"]}))


# ---- deterministic parts: a deletion killed half-way, stale temp folders ----------------------------

def test_checkpoint_deletion_killed_half_way_is_never_listed(image_dir, tmp_path, monkeypatch):
    """Pruning old checkpoints (--checkpoints_total_limit) killed in the middle of the deletion."""
    from training.train_rqvae import main

    out = tmp_path / "run"
    argv = ["--data_dir", str(image_dir), "--output_dir", str(out), *FAST1, "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "1", "--validation_steps", "1000", "--max_train_steps", "3"]
    real_rmtree = shutil.rmtree

    def killed_half_way(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("checkpoint-"):
            (path / "model.safetensors").unlink()  # the first file went, then the process died
            raise KeyboardInterrupt
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        main(argv)  # dies while pruning checkpoint-1 after saving checkpoint-2
    monkeypatch.undo()
    assert assert_complete(out) == [2]  # the half-deleted checkpoint-1 is not listed
    main([*argv, "--resume_from_checkpoint", "latest"])
    assert assert_complete(out) == [3]
    RQVAE.from_pretrained(out)


def test_stale_temp_folders_are_removed_on_resume(image_dir, tmp_path, capsys):
    from training.train_rqvae import main

    out = tmp_path / "run"
    argv = ["--data_dir", str(image_dir), "--output_dir", str(out), *FAST1, "--checkpointing_steps", "2",
            "--validation_steps", "1000", "--max_train_steps", "2"]
    main(argv)
    for name in (".tmp-checkpoint-3", ".tmp-checkpoint-40"):  # killed saves, one at a step never reached again
        (out / name).mkdir()
        (out / name / "model.safetensors").write_bytes(b"partial")
    main([*argv[:-1], "3", "--resume_from_checkpoint", "latest"])
    assert resumed_at(capsys.readouterr().out) == 2
    assert temp_dirs(out) == [] and assert_complete(out) == [2, 3]


# ---- the rotation keeps the best validated checkpoint ---------------------------------------------------

def test_rotation_keeps_the_checkpoint_with_the_best_validation(tmp_path):
    """--checkpoints_total_limit keeps the newest N and, besides them, the one with the best figure."""
    from accelerate import Accelerator

    from training.trainer import best_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))  # a model only, no optimizer: the rotation is what is tested
    out = tmp_path / "run"
    for step, loss in enumerate([3.0, 2.0, 2.5, None, 2.7], 1):  # step 4 was not validated
        save_checkpoint(accelerator, out, step, 1, validation=None if loss is None else {"val/loss": loss},
                        best=("val/loss", "min"))
    assert steps(list_checkpoints(out)) == [2, 5]
    assert json.loads((out / "checkpoint-2" / STATE_FILE).read_text())["validation"] == {"val/loss": 2.0}
    save_checkpoint(accelerator, out, 6, 1, validation={"val/loss": 1.5}, best=("val/loss", "min"))
    assert steps(list_checkpoints(out)) == [6]  # a better one replaces it
    assert best_checkpoint(out, ("val/loss", "max")) == (out / "checkpoint-6", 1.5)  # the only one left
    save_checkpoint(accelerator, out, 7, 1, validation={"val/loss": 1.0})  # no `best`: plain rotation
    assert steps(list_checkpoints(out)) == [7] and best_checkpoint(out, None) is None


def test_stage1_keeps_its_best_psnr_checkpoint_and_names_it(image_dir, tmp_path, capsys):
    from training.train_rqvae import main

    out = tmp_path / "run"
    main(["--data_dir", str(image_dir), "--output_dir", str(out), *FAST1, "--checkpointing_steps", "1",
          "--validation_steps", "1", "--checkpoints_total_limit", "1", "--max_train_steps", "4"])
    printed = capsys.readouterr().out  # "step N: psnr_depth1 .., psnr_depth2 X, ..." at each validated step
    psnr = {int(m[1]): float(m[2]) for m in re.finditer(r"step (\d+): .*psnr_depth2 ([\d.]+)", printed)}
    validated = {step: value for step, value in psnr.items() if step < 4}  # the last step is saved, then measured
    assert sorted(validated) == [1, 2, 3]
    best = max(validated, key=validated.get)
    assert assert_complete(out) == sorted({best, 4})
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["best_checkpoint"]["path"] == f"checkpoint-{best}"
    assert summary["best_checkpoint"]["psnr_depth2"] == pytest.approx(validated[best], abs=1e-3)
