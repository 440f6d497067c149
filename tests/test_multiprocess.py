"""Multi-process training: both stages under torchrun with 2 CPU processes (gloo), as on a
GPU node with NCCL. Real launches of the real scripts, no hooks:

- every process holds identical weights, codebooks (EMA statistics all-reduced) and EMA weights, checked
  by the trainer at each checkpoint and printed, and a divergence stops the run;
- 2 processes equal 1 process with the same global batch, gradient accumulation included;
- only process 0 writes logs, grids, checkpoints and the model; every process its own RNG state;
- a checkpoint written by 2 processes resumes on 2 processes exactly;
- stage 2 encodes half the batches in each process and assembles one cache, equal to a 1-process cache;
- a killed process brings the run down at once with a message naming it (no hang); this one runs under
  `accelerate launch`, the others under `torchrun`;
- a hung process: the others give up after --ddp_timeout seconds with one line saying so.

The equality tolerance: after 4 optimizer steps the two runs differ by less than 5 % of what the last
2 steps moved the weights (measured: 1 % for stage 1, 0.0005 % for stage 2). The difference is float
summation order, which AdamW's first steps amplify for weights whose gradient is near zero.
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
from safetensors.torch import load_file

from conftest import free_port, make_image_folder

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMON = ["--num_workers", "0", "--lr_warmup_steps", "2", "--mixed_precision", "no", "--max_train_steps", "4",
          "--checkpointing_steps", "2"]
# no randomness inside a step, so that 2 processes can equal 1 (k-means, dead-code restarts and quantize
# dropout draw differently per process: they are covered by the replica check of the first test)
DETERMINISTIC_VAE = {"resolution": 16, "codebook_size": 32, "code_depth": 2, "downsample": 8, "channels": 16,
                     "channel_mult": [1, 1, 2, 2], "latent_dim": 32, "kmeans_init": False,
                     "threshold_ema_dead_code": 0.0, "quantize_dropout": False}


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
# accelerate's own launcher on a machine without GPUs: --multi_gpu is what starts N processes
ACCELERATE = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]


def torchrun(module: str, argv: list[str], log: Path, wait: bool = True, launcher: list[str] = TORCHRUN):
    """`torchrun --standalone --nproc_per_node 2 -m module argv` (or another launcher), output to `log`."""
    cmd = [sys.executable, "-m", *launcher, "-m", module, *argv]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)
    if not wait:
        return proc
    code = proc.wait(240)
    text = log.read_text(errors="replace").replace("\r", "\n")
    assert code == 0, text[-3000:]
    return text


def one_process(main, argv: list[str], capsys) -> str:
    main(argv)
    return capsys.readouterr().out


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path)).items()}


def assert_close_runs(one: Path, two: Path, tolerance: float = 0.05) -> float:
    """The models of two runs at step 4 differ by less than `tolerance` of the 1-process run's last 2 steps."""
    a, b, earlier = (weights(d / name / "model.safetensors") for d, name in
                     ((one, "checkpoint-4"), (two, "checkpoint-4"), (one, "checkpoint-2")))
    assert a.keys() == b.keys()
    keys = [k for k in a if "cluster_size" not in k and "initted" not in k]  # counts, not weights
    diff = torch.cat([(a[k] - b[k]).flatten() for k in keys]).norm()
    moved = torch.cat([(a[k] - earlier[k]).flatten() for k in keys]).norm()
    assert moved > 0 and diff < tolerance * moved, (float(diff), float(moved))
    return float(diff / moved)


def test_stage1_replicas_rank0_writes_and_exact_resume(tmp_path):
    """Default tiny RQ-VAE (k-means init, dead-code restarts, quantize dropout: every distributed path of
    the quantizer), 2 processes, tensorboard on."""
    images = make_image_folder(tmp_path / "images")
    out = tmp_path / "out"
    args = ["--data_dir", str(images), "--config", "tiny", "--train_batch_size", "2", "--num_validation_images", "8",
            "--validation_steps", "2", *COMMON]
    text = torchrun("training.train_rqvae", [*args, "--output_dir", str(out), "--report_to", "tensorboard"],
                    tmp_path / "a.log")
    assert "2 processes (MULTI_CPU, backend gloo): global batch 2 x 2 x 1 accumulation" in text
    for step in (2, 4):
        assert f"step {step}: weights, buffers (codebooks included) and EMA weights identical on all 2 processes" in text
    # process 0 alone prints, logs, draws and saves; each process keeps its RNG state in the checkpoint
    assert text.count("16 images in 2 folders") == 1 and text.count('{"step": 4') == 1
    events = list((out / "logs").rglob("events.out.tfevents.*"))  # ...<time>.<host>.<pid>.<n>
    assert events and len({p.name.split(".")[-2] for p in events}) == 1  # written by one process
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["reconstruction-0000002.png",
                                                                   "reconstruction-0000004.png"]
    files = {p.name for p in (out / "checkpoint-4").iterdir()}
    assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", "ema.safetensors"} <= files
    assert not list(out.glob(".tmp-*"))

    # resume checkpoint-2 on 2 processes: the same model, bit for bit
    again = tmp_path / "again"
    again.mkdir()
    shutil.copytree(out / "checkpoint-2", again / "checkpoint-2")
    text = torchrun("training.train_rqvae", [*args, "--output_dir", str(again), "--report_to", "none",
                                             "--resume_from_checkpoint", "latest"], tmp_path / "b.log")
    assert "resumed from" in text and "checkpoint-2 at step 2" in text
    for name in ("model.safetensors", "checkpoint-4/model.safetensors", "checkpoint-4/ema.safetensors"):
        first, second = load_file(str(out / name)), load_file(str(again / name))
        assert all(torch.equal(first[k], second[k]) for k in first), name


def test_fewer_images_than_the_global_batch_still_train(tmp_path):
    """3 images, batch 2 per process, 2 processes: no process may be left without a batch (it was, when
    drop_last looked at one process's batch: a ZeroDivisionError)."""
    images = make_image_folder(tmp_path / "images", per_class=1, classes=("circles", "squares", "stars"))
    text = torchrun("training.train_rqvae", ["--data_dir", str(images), "--config", "tiny", "--train_batch_size", "2",
                                             "--num_validation_images", "2", *COMMON, "--report_to", "none",
                                             "--output_dir", str(tmp_path / "out")], tmp_path / "a.log")
    assert "3 images" in text and '{"step": 4' in text and (tmp_path / "out" / "model.safetensors").is_file()


def test_stage1_two_processes_equal_one_with_accumulation(tmp_path, capsys):
    from training.train_rqvae import main

    images = make_image_folder(tmp_path / "images")
    config = tmp_path / "vae.json"
    config.write_text(json.dumps(DETERMINISTIC_VAE))
    args = ["--data_dir", str(images), "--config", str(config), "--num_validation_images", "8", "--report_to", "none",
            "--ema_decay", "0", "--gradient_accumulation_steps", "2", *COMMON]
    text = torchrun("training.train_rqvae", [*args, "--output_dir", str(tmp_path / "two"), "--train_batch_size", "2"],
                    tmp_path / "two.log")
    assert "global batch 2 x 2 x 2 accumulation" in text
    torch.set_num_threads(1)
    one_process(main, [*args, "--output_dir", str(tmp_path / "one"), "--train_batch_size", "4"], capsys)
    assert_close_runs(tmp_path / "one", tmp_path / "two")
    # the codebooks (EMA buffers of the quantizer) agree as the weights do
    a, b = (weights(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    codebook = [k for k in a if k.endswith("_codebook.embed")]
    assert codebook and all(torch.allclose(a[k], b[k], atol=1e-3) for k in codebook)


def test_stage2_sharded_encoding_and_two_processes_equal_one(vae_dir, tmp_path, capsys):
    from training.train_rqtransformer import main

    images = make_image_folder(tmp_path / "images", per_class=36)  # 72 images: 2 encoding batches, 1 per process
    config = tmp_path / "transformer.json"
    config.write_text(json.dumps({"dim": 32, "heads": 2, "spatial_layers": 1, "depth_layers": 1, "dropout": 0.0}))
    args = ["--rqvae", str(vae_dir), "--data_dir", str(images), "--config", str(config), "--report_to", "none",
            "--samples_per_class", "2", "--validation_steps", "100", "--cfg_dropout", "0", "--ema_decay", "0", *COMMON]
    text = torchrun("training.train_rqtransformer", [*args, "--output_dir", str(tmp_path / "two"),
                                                     "--train_batch_size", "2", "--gradient_accumulation_steps", "2"],
                    tmp_path / "two.log")
    assert "encoded 72 images in" in text and "2 processes)" in text
    assert text.count("72 code stacks (2, 2, 2), 2 classes") == 1
    torch.set_num_threads(1)
    out = one_process(main, [*args, "--output_dir", str(tmp_path / "one"), "--train_batch_size", "8"], capsys)
    assert "1 process)" in out
    (two,), (one,) = (list((tmp_path / d).glob("codes-*.safetensors")) for d in ("two", "one"))
    assert two.name == one.name  # one cache key, one file, assembled in one order
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_close_runs(tmp_path / "one", tmp_path / "two")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def start_then(signum: int, tmp_path: Path, launcher: list[str], timeout: int):
    """Start a long 2-process stage-1 run, send `signum` to process 1 once both train; (the run, its log)."""
    images = make_image_folder(tmp_path / "images")
    log = tmp_path / "run.log"
    proc = torchrun("training.train_rqvae", ["--data_dir", str(images), "--output_dir", str(tmp_path / "out"),
                                             "--config", "tiny", "--train_batch_size", "2", "--num_workers", "0",
                                             "--report_to", "none", "--max_train_steps", "100000",
                                             "--validation_steps", "100000", "--ddp_timeout", str(timeout)],
                    log, wait=False, launcher=launcher)
    try:
        deadline = time.monotonic() + 120
        while "steps:" not in log.read_text(errors="replace"):  # both are training
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        (victim,) = [pid for pid in children(proc.pid) if rank_of(pid) == 1]
        os.kill(victim, signum)
    except BaseException:
        stop(proc)
        raise
    return proc, log


def stop(proc) -> None:
    """The launcher and every worker it started."""
    for pid in children(proc.pid) if proc.poll() is None else []:
        os.kill(pid, signal.SIGKILL)
    proc.kill()
    proc.wait()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes in /proc")
def test_a_killed_process_stops_the_run_with_a_clear_message(tmp_path):
    proc, log = start_then(signal.SIGKILL, tmp_path, ACCELERATE, timeout=600)
    try:
        killed = time.monotonic()
        code = proc.wait(60)  # far below --ddp_timeout: the launcher notices at once
        took = time.monotonic() - killed
    finally:
        stop(proc)
    text = log.read_text(errors="replace")
    assert code != 0 and took < 30
    assert "training.train_rqvae FAILED" in text and "SIGKILL" in text and "rank      : 1" in text


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the worker processes in /proc")
def test_a_hung_process_times_out_after_ddp_timeout(tmp_path):
    proc, log = start_then(signal.SIGSTOP, tmp_path, TORCHRUN, timeout=3)  # stopped: alive but silent
    try:
        stopped, deadline = time.monotonic(), time.monotonic() + 60
        while "lost contact" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.05)
        took = time.monotonic() - stopped
    finally:
        stop(proc)  # the launcher would SIGKILL the stopped process after its own grace period
    line = [x for x in log.read_text(errors="replace").splitlines() if "lost contact" in x]
    # no lower bound: gloo counts the 3 s from when the collective began, which can precede the SIGSTOP
    # (2.97 s seen in a fresh clone); the bound that matters is that the run stops instead of hanging
    assert line and took < 30, log.read_text(errors="replace")[-2000:]
    # gloo words the 3 s timeout one of two ways (both seen in fresh-clone runs on the same kind of machine)
    assert re.match(r"error: process 0 of 2 lost contact with the others \((Timed out waiting 3000ms"
                    r"|Application timeout caused pair closure)", line[0]), line[0]
    assert line[0].endswith("longer than --ddp_timeout; resume with --resume_from_checkpoint latest")


REPLICA_SCRIPT = """
import torch
from accelerate import Accelerator
from training.trainer import check_replicas
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(2, 2)
torch.nn.init.constant_(model.weight, 1.0)
torch.nn.init.zeros_(model.bias)
model.register_buffer("codebook", torch.zeros(3))
check_replicas(accelerator, [model], None, step=7)
with torch.no_grad():
    model.weight[0, 0] += accelerator.process_index * 1e-7  # one float apart
try:
    check_replicas(accelerator, [model], None, step=8)
except RuntimeError as e:
    print(f"caught: {e}")  # one write: both processes share the pipe, unbuffered
"""


def test_replica_check_catches_diverged_processes(tmp_path):
    script = tmp_path / "replicas.py"
    script.write_text(REPLICA_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    out = subprocess.run(cmd, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120).stdout
    assert "step 7: weights, buffers (codebooks included) and EMA weights identical on all 2 processes" in out
    assert out.count("caught: step 8: process 1 holds other values than process 0 in 1 of 3 tensors "
                     "(first: 0.weight): the processes diverged") == 2  # every process stops


@pytest.mark.parametrize("message, lost", [
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Timed out waiting 3000ms for recv operation", True),
    ("Application timeout caused pair closure", True),
    ("[pair.cc:598] Connection closed by peer [127.0.0.1]:29500", True),
    ("Expected all tensors to be on the same device", False),
])
def test_the_backends_words_for_a_lost_peer_become_one_line(message, lost):
    """gloo says "lost peer" in several ways (one of them seen only on some machines); other errors stay."""
    import torch.distributed as dist

    from training.cli import lost_contact

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        line = lost_contact(RuntimeError(message))
    finally:
        dist.destroy_process_group()
    assert (line is not None) == lost
    if lost:
        assert line.startswith("process 0 of 1 lost contact with the others (") and "pair.cc" not in line
        assert line.endswith("resume with --resume_from_checkpoint latest")
