"""Stage-1 training CLI: end to end on a generated ImageFolder, checkpoints, resume, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rqvae import PRESETS, RQVAE
from training.cli import run_cli
from training.data import fixed_images
from training.reconstruction import evaluate_depths
from training.train_rqvae import main
from training.trainer import list_checkpoints

from conftest import FAST1

ROOT = Path(__file__).resolve().parents[1]
def cli(*args):
    return subprocess.run([sys.executable, "-m", "training.train_rqvae", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_train_checkpoint_resume_end_to_end(image_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--data_dir", str(image_dir), "--output_dir", str(out), *FAST1, "--checkpointing_steps", "2",
              "--validation_steps", "3", "--checkpoints_total_limit", "2", "--report_to", "tensorboard"]
    first = cli(*common, "--max_train_steps", "4")
    assert first.returncode == 0, first.stderr[-2000:]
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert (out / "samples" / "reconstruction-0000003.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents*")), "tensorboard logs missing"

    second = cli(*common, "--max_train_steps", "7", "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout + second.stderr and "at step 4" in second.stdout + second.stderr
    assert "mixed precision: " in first.stdout  # the one-line notice of --mixed_precision auto
    # the total limit keeps the two newest
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6", "checkpoint-7"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["step"] == 7 and {"psnr_depth1", "psnr_depth2", "codebook_usage"} <= set(summary)
    # the saved model is the one the summary measured (the EMA weights), on real training images
    model = RQVAE.from_pretrained(out)
    images = fixed_images(image_dir, 16, 8)  # the run's validation images (no --validation_dir)
    codes = model.encode(images)
    assert codes.shape == (8, 2, 2, 2) and 0 <= codes.min() and codes.max() < model.config.codebook_size
    measured = evaluate_depths(model, images)
    assert all(torch.isfinite(torch.tensor(v)) for v in measured.values())
    for key in ("psnr_depth1", "psnr_depth2", "codebook_usage"):
        assert measured[key] == pytest.approx(summary[key], rel=1e-4), key


def test_resume_restores_exact_state(image_dir, tmp_path):
    """Training 4 steps straight equals 2 steps + resume + 2 steps (model, optimizer, EMA, data order)."""
    straight, split = tmp_path / "a", tmp_path / "b"
    base = ["--data_dir", str(image_dir), *FAST1, "--checkpointing_steps", "2", "--validation_steps", "100",
            "--hflip"]
    main([*base, "--output_dir", str(straight), "--max_train_steps", "4"])
    main([*base, "--output_dir", str(split), "--max_train_steps", "2"])
    main([*base, "--output_dir", str(split), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    a, b = RQVAE.from_pretrained(straight), RQVAE.from_pretrained(split)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name, atol=1e-6, rtol=1e-5)


def test_output_dir_of_another_run_is_kept_safe(image_dir, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    base = ["--data_dir", str(image_dir), *FAST1, "--validation_steps", "100"]
    main([*base, "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "2",
          "--lr_warmup_steps", "3"])
    assert "never reaches --learning_rate" in caplog.text  # warm-up 3 > 2 steps
    weights = (out / "model.safetensors").read_bytes()
    # safetensors creates 0600 files; ours are readable like config.json (an app run by another user)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777
    code, err = run([*base, "--output_dir", str(out), "--max_train_steps", "1"], capsys)
    assert code == 2 and "already holds checkpoint-2 of an earlier run: pass --resume_from_checkpoint latest" in err
    assert (out / "model.safetensors").read_bytes() == weights
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    # resuming it with another config: one line naming what differs
    cfg = tmp_path / "wider.json"
    cfg.write_text(json.dumps({**PRESETS["tiny"], "channels": 8}))
    code, err = run([*base, "--output_dir", str(out), "--max_train_steps", "3", "--config", str(cfg),
                     "--resume_from_checkpoint", "latest"], capsys)
    assert code == 2 and "cannot resume from" in err and "size mismatch for" in err and "--config" in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, err = run([*base, "--output_dir", str(afile)], capsys)
    assert code == 2 and "--output_dir " + str(afile) + " is a file, not a folder" in err


def test_decoder_only_keeps_the_codes(image_dir, tmp_path, capsys):
    """--decoder_only: encoder and codebook come out bit-identical (a stage-2 model stays valid)."""
    base = ["--data_dir", str(image_dir), *FAST1, "--validation_steps", "100", "--ema_decay", "0"]
    main([*base, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "2"])
    main([*base, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "3", "--init_from", str(tmp_path / "a"),
          "--decoder_only", "--learning_rate", "1e-2", "--reconstruction_loss", "l2"])
    a, b = RQVAE.from_pretrained(tmp_path / "a"), RQVAE.from_pretrained(tmp_path / "b")
    changed = {k for k, v in a.state_dict().items() if not torch.equal(v, b.state_dict()[k])}
    assert changed and all(k.startswith("decoder.") for k in changed), sorted(changed)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(a.encode(images), b.encode(images))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # --mixed_precision bf16 still trains on fp32 codes
        _, terms = b.train()(images, frozen_codes=True)
    assert torch.equal(terms["codes"][:2], b.encode(images)[:2])  # the first half: all D codes
    with pytest.raises(SystemExit):
        main([*base, "--output_dir", str(tmp_path / "c"), "--decoder_only"])
    assert "--decoder_only needs --init_from" in capsys.readouterr().err


def test_wider_decoder_for_the_same_codes(image_dir, tmp_path, capsys):
    """--decoder_channels with --init_from of another width: the encoder and codebook are loaded (same codes),
    the decoder is new and wider; the width is saved in config.json and read back."""
    base = ["--data_dir", str(image_dir), *FAST1, "--validation_steps", "100", "--ema_decay", "0"]
    main([*base, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "2"])
    main([*base, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "2", "--init_from", str(tmp_path / "a"),
          "--decoder_only", "--decoder_channels", "24"])
    assert "encoder and codebook loaded; a fresh decoder of width 24 (its own: 16)" in capsys.readouterr().out
    a, b = RQVAE.from_pretrained(tmp_path / "a"), RQVAE.from_pretrained(tmp_path / "b")
    assert b.config.decoder_channels == 24 and a.config.decoder_channels == 0 and b.config.channels == 16
    assert b.decoder.net[0].weight.shape[0] == 24 * a.config.channel_mult[-1]  # the decoder starts at the top level
    for part in ("encoder", "quantizer"):
        for k, v in getattr(a, part).state_dict().items():
            assert torch.equal(v, getattr(b, part).state_dict()[k]), (part, k)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(a.encode(images), b.encode(images))
    assert b.decode(b.encode(images)).shape == images.shape
    # the same width spelled out: a plain strict load; another change besides the width: the mismatch is named
    main([*base, "--output_dir", str(tmp_path / "c"), "--max_train_steps", "1", "--init_from", str(tmp_path / "a"),
          "--decoder_channels", "16", "--learning_rate", "1e-12"])
    torch.testing.assert_close(RQVAE.from_pretrained(tmp_path / "c").decoder.conv_out.weight, a.decoder.conv_out.weight)
    capsys.readouterr()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**PRESETS["tiny"], "latent_dim": 8}))
    code, err = run([*base, "--config", str(other), "--output_dir", str(tmp_path / "d"), "--init_from",
                     str(tmp_path / "a"), "--decoder_channels", "24"], capsys)
    assert code == 2 and "has shape" in err and err.strip().count("\n") == 0, err


def test_partial_checkpoint_is_never_resumed(image_dir, tmp_path):
    out = tmp_path / "run"
    main(["--data_dir", str(image_dir), "--output_dir", str(out), *FAST1, "--max_train_steps", "2",
          "--checkpointing_steps", "2", "--validation_steps", "100"])
    # a save killed half-way leaves a temp folder, and a checkpoint folder without its state file
    (out / ".tmp-checkpoint-3").mkdir()
    (out / "checkpoint-5").mkdir()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize("setup, message", [
    ("missing", "does not exist"),
    ("empty", "contains no images"),
    ("no_images", "contains no images"),
    ("corrupt", "unreadable image"),
])
def test_bad_data_dirs_give_one_clear_line(tmp_path, capsys, image_dir, setup, message):
    data = tmp_path / "data"
    if setup == "empty":
        data.mkdir()
    elif setup == "no_images":
        (data / "cls").mkdir(parents=True)
        (data / "cls" / "notes.txt").write_text("hello")
    elif setup == "corrupt":
        data = image_dir
        (image_dir / "circles" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, err = run(["--data_dir", str(data), "--output_dir", str(tmp_path / "o"), *FAST1], capsys)
    assert code == 2 and message in err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.parametrize("extra, message", [
    (["--config", "huge"], "--config must be one of"),
    (["--config", "/nonexistent.json"], "does not exist"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "not a complete checkpoint"),
    (["--ema_decay", "1.5"], "--ema_decay"),
])
def test_bad_options(tmp_path, capsys, image_dir, extra, message):
    code, err = run(["--data_dir", str(image_dir), "--output_dir", str(tmp_path / "o"), *FAST1, *extra], capsys)
    assert code == 2 and message in err


@pytest.mark.parametrize("flag, value", [("--max_train_steps", "0"), ("--learning_rate", "-1"),
                                         ("--train_batch_size", "two"), ("--mixed_precision", "fp8")])
def test_bad_numbers_are_rejected_by_argparse(tmp_path, capsys, image_dir, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["--data_dir", str(image_dir), "--output_dir", str(tmp_path), *FAST1, flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_config_json_file(tmp_path, image_dir):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"resolution": 16, "codebook_size": 8, "code_depth": 3, "downsample": 8,
                               "channels": 8, "latent_dim": 8, "mid_attention": False}))
    out = tmp_path / "o"
    main(["--data_dir", str(image_dir), "--output_dir", str(out), *FAST1, "--config", str(cfg),
          "--max_train_steps", "1", "--validation_steps", "100"])
    assert RQVAE.from_pretrained(out).config.code_shape == (2, 2, 3)


def test_ema_warms_up_then_averages():
    from training.trainer import EMA

    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.99)
    torch.nn.init.ones_(model.weight)
    ema.update(model)  # first update: decay 2/11, so the average moves most of the way
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(9 / 11)
    for _ in range(2000):
        ema.update(model)
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(1.0, abs=1e-6)
    with ema.swapped(model):
        model.weight.data.zero_()  # changes inside the context are discarded
    assert model.weight[0, 0].item() == 1.0


def test_init_from_fine_tunes_a_saved_model(tmp_path, image_dir):
    """--init_from starts from a saved model's weights and takes its config when --config is not given."""
    base = ["--data_dir", str(image_dir), *FAST1[2:], "--validation_steps", "100", "--ema_decay", "0"]
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"resolution": 16, "codebook_size": 8, "code_depth": 3, "downsample": 8,
                               "channels": 8, "latent_dim": 8, "mid_attention": False}))
    main([*base, "--config", str(cfg), "--output_dir", str(tmp_path / "a"), "--max_train_steps", "2"])
    start = RQVAE.from_pretrained(tmp_path / "a")
    main([*base, "--init_from", str(tmp_path / "a"), "--output_dir", str(tmp_path / "b"),
          "--max_train_steps", "1", "--learning_rate", "1e-12"])
    tuned = RQVAE.from_pretrained(tmp_path / "b")
    assert tuned.config == start.config  # not the emoji-64 default
    torch.testing.assert_close(tuned.encoder.net[0].weight, start.encoder.net[0].weight)
    fresh = RQVAE(start.config)
    assert not torch.allclose(fresh.encoder.net[0].weight, start.encoder.net[0].weight)

    # a pipeline folder (stage 2's --output_dir, weights/emoji-64) means its rqvae/
    from pipelines import RQPipeline
    from rqtransformer import RQTransformer, RQTransformerConfig
    tf = RQTransformer(RQTransformerConfig(codebook_size=8, code_shape=(2, 2, 3), dim=16, heads=2, spatial_layers=1,
                                           depth_layers=1, num_classes=0, dropout=0.0))
    RQPipeline(start, tf).save_pretrained(tmp_path / "pipe")
    main([*base, "--init_from", str(tmp_path / "pipe"), "--decoder_only", "--output_dir", str(tmp_path / "c"),
          "--max_train_steps", "1", "--learning_rate", "1e-12"])
    tuned = RQVAE.from_pretrained(tmp_path / "c")
    assert tuned.config == start.config
    torch.testing.assert_close(tuned.encoder.net[0].weight, start.encoder.net[0].weight)


@pytest.mark.parametrize("target, message", [
    ("missing", "does not exist"),
    ("neither", "is neither a model folder (no config.json) nor a pipeline folder (no rqvae/ inside)"),
    ("other_config", "has shape"),
])
def test_init_from_bad_folder(tmp_path, capsys, image_dir, target, message):
    folder = tmp_path / "nothing"
    if target == "neither":  # e.g. a folder of images
        folder = image_dir
    elif target == "other_config":  # a tiny model with a different codebook, loaded into the tiny preset
        from rqvae import PRESETS, RQVAEConfig
        RQVAE(RQVAEConfig(**{**PRESETS["tiny"], "codebook_size": 8})).save_pretrained(folder)
    code, err = run(["--data_dir", str(image_dir), "--output_dir", str(tmp_path / "o"), *FAST1,
                     "--init_from", str(folder)], capsys)
    assert code == 2 and message in err and "Traceback" not in err


# A fresh process so the heap's state does not depend on the tests before; mallinfo2 says where a
# block lives. (Page-fault counts vary with the machine and the allocating thread: not asserted.)
MALLOC_CHILD = """
import ctypes, sys, torch
from training.trainer import keep_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
before = libc.mallinfo2().hblkhd
block = torch.ones(16 * 1024 * 1024)  # 64 MB, like one large activation of a training step
mapped = libc.mallinfo2().hblkhd - before
del block
print(applied, mapped, libc.mallinfo2().fordblks)
"""


@pytest.mark.skipif(sys.platform != "linux" or __import__("platform").libc_ver()[0] != "glibc",
                    reason="glibc's malloc settings")
@pytest.mark.parametrize("mode", ["default", "keep"])
def test_freed_large_blocks_stay_in_the_heap(mode):
    import ctypes
    if not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"):
        pytest.skip("glibc < 2.33 has no mallinfo2")
    run = subprocess.run([sys.executable, "-c", MALLOC_CHILD, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    applied, mapped, free_in_heap = run.stdout.split()
    if mode == "default":  # glibc maps blocks this large on their own and unmaps them on free
        assert applied == "False" and int(mapped) >= 64 << 20
    else:  # served from the heap and kept there once freed, so the next step reuses its pages
        assert applied == "True" and int(mapped) == 0 and int(free_in_heap) >= 64 << 20


def test_mixed_precision_auto_picks_bf16_only_where_the_device_multiplies_it_natively():
    from rqcore.machine import native_bf16
    from training.trainer import resolve_precision

    cpu = torch.device("cpu")
    choice, notice = resolve_precision("auto", cpu)
    assert choice == ("bf16" if native_bf16(cpu) else "no") and notice.startswith("mixed precision: ")
    assert "\n" not in notice
    assert resolve_precision("no", cpu)[0] == "no" and resolve_precision("bf16", cpu)[0] == "bf16"
