"""The paper's evaluation (evaluation.fid, evaluation.evaluate_fid), offline: our FID is pytorch-fid's own on
the same images and weights (a random-weight Inception file in pytorch-fid's layout), a set against itself
scores about 0, a killed evaluation resumes without sampling a batch twice, rFID runs, and bad input is one
line."""
from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import fid
from pipelines import EXACT_CPU, RQPipeline
from evaluation.evaluate_fid import main as evaluate, rank_batches
from training.cli import run_cli

from conftest import tiny_pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory) -> Path:
    """Random weights in the key layout of pytorch-fid's pt_inception-2015-12-05 file (torchvision's Inception3
    names, 1,008 classes: the FID blocks subclass torchvision's and keep their parameter names)."""
    state = fid.random_weights(0)
    # 6 images span 5 of 2,048 feature dimensions, where the covariances' square root is ill-posed: keep 3
    # features alive (the last block's other channels give 0 after their ReLU)
    for name, value in state.items():
        if name.startswith("Mixed_7c.") and ".bn." in name and name.rsplit(".", 1)[1] in ("weight", "bias"):
            value[3 if name.startswith("Mixed_7c.branch_pool.bn.") else 0:] = 0
    file = tmp_path_factory.mktemp("inception") / fid.FID_WEIGHTS_NAME
    torch.save(state, file)
    return file


@pytest.fixture(scope="module")
def net(inception_file) -> fid.Inception:
    return fid.Inception(inception_file)


def noise_folder(root: Path, seed: int, n: int = 6, size: int = 48) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(n):
        base = rng.integers(0, 255, 3)
        a = np.clip(base + rng.normal(0, 40 + 20 * seed, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(a).save(root / f"{i}.png")
    return root


def test_fid_equals_pytorch_fids_own_and_a_set_against_itself_is_zero(tmp_path, inception_file, net):
    a, b = noise_folder(tmp_path / "a", 0), noise_folder(tmp_path / "b", 1)
    ours = fid.frechet(fid.statistics(net.activations(fid.image_files(a))),
                       fid.statistics(net.activations(fid.image_files(b))))
    home = tmp_path / "torch-home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    os.symlink(inception_file, home / "hub" / "checkpoints" / fid.FID_WEIGHTS_NAME)  # found cached: no network
    proc = subprocess.run([sys.executable, "-m", "pytorch_fid", str(a), str(b), "--device", "cpu",
                           "--batch-size", "50", "--num-workers", "0"], capture_output=True, text=True,
                          env={**os.environ, "TORCH_HOME": str(home)}, timeout=300)
    theirs = float(re.search(r"FID:\s*(\S+)", proc.stdout).group(1))
    assert ours > 0 and abs(ours - theirs) <= 1e-6 * max(1.0, theirs), (ours, theirs)
    acts = net.activations(fid.image_files(a))
    assert abs(fid.frechet(fid.statistics(acts), fid.statistics(acts))) < 1e-6 * max(1.0, ours)


def test_inception_score_follows_its_formula():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5) * 0.3, size=40)
    mean, std = fid.inception_score(p, splits=4)
    parts = [p[i * 10:(i + 1) * 10] for i in range(4)]
    direct = [np.exp(np.mean([np.sum(q * np.log(q / part.mean(0))) for q in part])) for part in parts]
    assert mean == pytest.approx(np.mean(direct)) and std == pytest.approx(np.std(direct, ddof=1))
    assert fid.inception_score(np.full((20, 5), 0.2), splits=2)[0] == pytest.approx(1.0)  # one class: IS 1


def test_every_batch_goes_to_exactly_one_process():
    for world in (1, 2, 3):
        got = sorted(j for r in range(world) for j in rank_batches(7, r, world))
        assert got == list(range(7))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    tiny_pipeline().save_pretrained(folder)
    return folder


def stats_file(tmp_path: Path, net: fid.Inception) -> Path:
    mu, sigma = fid.statistics(net.activations(fid.image_files(noise_folder(tmp_path / "ref", 2))))
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    return tmp_path / "ref.npz"


def test_a_killed_evaluation_resumes_without_sampling_twice(tmp_path, model_dir, inception_file, net, capsys):
    out, ref = tmp_path / "legs", stats_file(tmp_path, net)
    run = ["--weights", str(model_dir), "--ref", str(ref), "--num_samples", "5", "--batch_size", "2",
           "--inception_weights", str(inception_file), "--inception_score", "--out", str(out)]
    evaluate([*run, "--max_batches", "2"])  # as if killed after two batches
    assert not (out / "metrics.json").exists() and len(list((out / "samples").glob("*.png"))) == 4
    stamps = {f.name: f.stat().st_mtime_ns for f in (out / "samples").glob("*.png")}
    capsys.readouterr()
    evaluate(run)
    assert "resuming: 4 of 5 samples exist" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["batches_drawn_now"] == 1 and metrics["num_images"] == 5
    assert np.isfinite(metrics["fid"]) and metrics["is_mean"] >= 1
    assert all(f.stat().st_mtime_ns == stamps[f.name] for f in (out / "samples").glob("*.png") if f.name in stamps)
    pipe = RQPipeline.from_pretrained(model_dir, device="cpu", **EXACT_CPU)  # the same images as one uninterrupted run
    for j, rows in enumerate([(0, 1), (2, 3), (4,)]):
        images = pipe(class_labels=[i % 3 for i in rows], generator=torch.Generator().manual_seed(j)).images
        for i, image in zip(rows, images):
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(out / "samples" / f"{i:06d}.png")))


def test_a_run_killed_mid_way_resumes_from_its_saved_samples(tmp_path, model_dir, inception_file, net, capsys):
    """A real SIGKILL while sampling: the saved PNGs are kept as they are and the next run draws only the rest."""
    out, ref = tmp_path / "killed", stats_file(tmp_path, net)
    run = ["--weights", str(model_dir), "--ref", str(ref), "--num_samples", "600", "--batch_size", "1",
           "--inception_weights", str(inception_file), "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "evaluation.evaluate_fid", *run], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list(out.glob("samples/*.png"))) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    saved = sorted(out.glob("samples/[0-9][0-9][0-9][0-9][0-9][0-9].png"))
    assert 3 <= len(saved) < 600, len(saved)
    (out / "samples" / f"{len(saved):06d}.tmp.png").write_bytes(b"half a png")  # as a kill mid-save leaves
    stamps = {f.name: f.stat().st_mtime_ns for f in saved}
    capsys.readouterr()
    evaluate([*run, "--max_batches", "2"])
    assert f"resuming: {len(saved)} of 600 samples exist" in capsys.readouterr().out
    now = sorted(out.glob("samples/[0-9][0-9][0-9][0-9][0-9][0-9].png"))
    assert len(now) == len(saved) + 2 and all(f.stat().st_mtime_ns == stamps[f.name] for f in saved)


def test_rfid_of_a_stage_1_on_an_image_folder(tmp_path, model_dir, inception_file, capsys):
    images = noise_folder(tmp_path / "images", 3, n=5, size=40)
    evaluate(["--rqvae", str(model_dir), "--ref_dir", str(images), "--out", str(tmp_path / "r"),
              "--batch_size", "4", "--inception_weights", str(inception_file)])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert np.isfinite(line["rfid"]) and line["rfid"] > 0 and line["num_images"] == 5
    assert len(list((tmp_path / "r" / "originals").glob("*.png"))) == 5
    assert Image.open(tmp_path / "r" / "originals" / "000000.png").size == (32, 32)  # the model's resolution


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/nonexistent")


def one_line(argv, capsys) -> str:
    capsys.readouterr()  # earlier progress bars
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: evaluate(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line(tmp_path, model_dir, inception_file, net, capsys):
    global MARKER
    base = ["--weights", str(model_dir), "--out", str(tmp_path / "o"), "--num_samples", "4", "--batch_size", "4"]
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    assert "has no 'mu' and 'sigma'" in one_line([*base, "--ref", str(tmp_path / "bad.npz"),
                                                  "--inception_weights", str(inception_file)], capsys)
    MARKER = tmp_path / "pwned"
    (tmp_path / "planted.pth").write_bytes(pickle.dumps(Planted()))
    ref = stats_file(tmp_path, net)
    err = one_line([*base, "--out", str(tmp_path / "o2"), "--ref", str(ref), "--inception_weights",
                    str(tmp_path / "planted.pth")], capsys)
    assert "weights-only load" in err and not MARKER.exists()
    evaluate([*base, "--ref", str(ref), "--inception_weights", str(inception_file), "--max_batches", "0"])
    assert "other settings" in one_line([*base, "--ref", str(ref), "--batch_size", "2",
                                         "--inception_weights", str(inception_file)], capsys)
    assert "is not a folder" in one_line(["--weights", str(tmp_path / "nope"), "--ref", str(ref), "--out",
                                          str(tmp_path / "o3")], capsys)
    assert "reconstructs the images of --ref_dir" in one_line(["--rqvae", str(model_dir), "--ref", str(ref),
                                                               "--out", str(tmp_path / "o4")], capsys)
