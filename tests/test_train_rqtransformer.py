"""Stage-2 training CLI: the pipeline folder it ends with, code caching, class names, the validation batch,
checkpoints/resume, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from PIL import Image

from pipelines import RQPipeline
from rqtransformer import RQTransformer
from rqvae import RQVAE
from training.cli import run_cli
from training.train_rqtransformer import main, validation_batch
from training.trainer import list_checkpoints

from conftest import FAST2, make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def test_train_resume_and_code_cache(vae_dir, image_dir, tmp_path):
    out = tmp_path / "tf"
    common = ["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--validation_dir", str(image_dir),
              "--output_dir", str(out), *FAST2, "--checkpointing_steps", "2", "--hflip"]
    run = lambda *extra: subprocess.run([sys.executable, "-m", "training.train_rqtransformer", *common, *extra], cwd=ROOT,
                                        capture_output=True, text=True, timeout=300)
    first = run("--max_train_steps", "2", "--validation_steps", "2")
    assert first.returncode == 0, first.stderr[-2000:]
    caches = sorted(out.glob("codes-*.safetensors"))
    assert len(caches) == 2  # train (with flips) and validation
    assert "32 code stacks" in first.stdout  # 16 images + their flips
    assert (out / "samples" / "samples-0000002.png").is_file()
    stamp = [c.stat().st_mtime_ns for c in caches]

    second = run("--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "at step 2" in second.stdout and "encoding" not in second.stderr  # cache reused
    assert [c.stat().st_mtime_ns for c in sorted(out.glob("codes-*.safetensors"))] == stamp
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    model = RQTransformer.from_pretrained(out / "rqtransformer")
    assert model.config.class_names == ["circles", "squares"] and model.config.code_shape == (2, 2, 2)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["step"] == 4 and {"val/loss_depth1", "val/loss_depth2", "val/perplexity"} <= set(summary)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["samples-0000002.png", "samples-0000004.png"]


def test_output_is_a_pipeline_folder_the_app_serves(vae_dir, image_dir, tmp_path, monkeypatch):
    """No assembly step: the output folder loads as an RQPipeline and builds the app; --rqvae takes it too."""
    out = tmp_path / "tf"
    main(["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--output_dir", str(out), *FAST2,
          "--max_train_steps", "2", "--sample_guidance_scale", "2"])
    assert json.loads((out / "pipeline.json").read_text())["default_guidance_scale"] == 2.0
    given = RQVAE.from_pretrained(vae_dir).state_dict()
    for key, value in RQVAE.from_pretrained(out / "rqvae").state_dict().items():
        assert torch.equal(value, given[key]), key
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    images = pipe("squares", num_images=3, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 3 and images[0].size == (16, 16)

    import app
    monkeypatch.setattr(app, "CACHE_ROOT", tmp_path / "cache")
    assert app.build_demo(out) is not None  # built, not served

    # a pipeline folder as --rqvae (its rqvae/) and as --init_from (its rqtransformer/)
    again = tmp_path / "again"
    main(["--rqvae", str(out), "--init_from", str(out), "--data_dir", str(image_dir), "--output_dir", str(again),
          *FAST2[2:], "--max_train_steps", "1", "--learning_rate", "1e-12", "--ema_decay", "0"])
    for key, value in RQVAE.from_pretrained(again / "rqvae").state_dict().items():
        assert torch.equal(value, given[key]), key
    tuned = RQTransformer.from_pretrained(again / "rqtransformer")
    for key, value in RQTransformer.from_pretrained(out / "rqtransformer").state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[key], value, msg=key)


def test_validation_samples_one_batch_of_at_most_16_classes(vae_dir, tmp_path):
    """20 classes: the grid shows 16 of them, spread from the first class to the last, in one batch."""
    data = make_image_folder(tmp_path / "many", classes=[f"c{i:02d}" for i in range(20)], per_class=1)
    out = tmp_path / "o"
    main(["--rqvae", str(vae_dir), "--data_dir", str(data), "--output_dir", str(out), *FAST2,
          "--max_train_steps", "1"])
    with Image.open(out / "samples" / "samples-0000001.png") as grid:  # 16 rows of --samples_per_class 2
        assert grid.size == (2 + 2 * (16 + 2), 2 + 16 * (16 + 2))

    labels, n, per_row = validation_batch(20, 2)
    assert per_row == 2 and n == len(labels) == 32 and labels[::2] == sorted(set(labels))
    assert len(set(labels)) == 16 and labels[0] == 0 and labels[-1] == 19
    labels, n, per_row = validation_batch(1724, 4)  # the folder that made the old grid run half an hour
    assert n == 64 and len(set(labels)) == 16 and labels[-1] == 1723
    labels, n, per_row = validation_batch(3, 100)  # many per class: the batch stays within 64
    assert per_row == 21 and n == 63 and sorted(set(labels)) == [0, 1, 2]
    assert validation_batch(0, 4) == (None, 4, 4)  # unconditional: one row, no labels


def test_resume_is_exact(vae_dir, image_dir, tmp_path):
    base = ["--rqvae", str(vae_dir), "--data_dir", str(image_dir), *FAST2, "--checkpointing_steps", "2"]
    main([*base, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "4"])
    main([*base, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "2"])
    main([*base, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    a, b = (RQTransformer.from_pretrained(tmp_path / n / "rqtransformer").state_dict() for n in "ab")
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


PAPER = ["--stochastic_codes", "--soft_labels", "--code_temperature", "0.5"]


def test_paper_training_resumes_exactly_and_changes_training(vae_dir, image_dir, tmp_path):
    """Stochastic codes + soft labels: 4 steps straight == 2 + resume + 2 (codes drawn per step from
    (seed, step), so no generator state is lost); and the flags change what is learned."""
    base = ["--rqvae", str(vae_dir), "--data_dir", str(image_dir), *FAST2, "--checkpointing_steps", "2", "--hflip"]
    main([*base, *PAPER, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "4"])
    main([*base, *PAPER, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "2"])
    main([*base, *PAPER, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "4",
          "--resume_from_checkpoint", "latest"])
    main([*base, "--output_dir", str(tmp_path / "plain"), "--max_train_steps", "4"])
    a, b, plain = (RQTransformer.from_pretrained(tmp_path / n / "rqtransformer").state_dict()
                   for n in ("a", "b", "plain"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    cache = load_file(str(next((tmp_path / "a").glob("codes-*.safetensors"))))
    assert cache["latents"].shape == (32, 2, 2, 32) and cache["codes"].shape == (32, 2, 2, 2)  # 16 images + flips
    summary = json.loads((tmp_path / "a" / "training_summary.json").read_text())
    assert summary["step"] == 4 and summary["seconds_per_step"] > 0


@pytest.mark.parametrize("flag", ["--stochastic_codes", "--soft_labels"])
def test_each_paper_flag_trains_alone_with_guidance_and_validation(vae_dir, image_dir, tmp_path, flag):
    out = tmp_path / "run"
    main(["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--validation_dir", str(image_dir),
          "--output_dir", str(out), *FAST2, "--max_train_steps", "2", flag, "--code_temperature", "0.3"])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["step"] == 2 and 0 < summary["val/loss"] < 10  # held-out NLL on the deterministic codes
    assert (out / "samples" / "samples-0000002.png").is_file()


def test_bf16_mixed_precision_trains_and_saves_float32(vae_dir, image_dir, tmp_path):
    # bf16 autocast on CPU (2.8x faster steps where the CPU has bf16 matmul), then an fp32 run in the same
    # process: accelerate keeps one precision per process unless each run starts afresh
    out = tmp_path / "bf16"
    common = ["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--validation_dir", str(image_dir), *FAST2]
    main([*common, "--output_dir", str(out), "--max_train_steps", "3", "--mixed_precision", "bf16"])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["step"] == 3 and 0 < summary["val/loss"] < 10
    main([*common, "--output_dir", str(tmp_path / "fp32"), "--max_train_steps", "1", "--mixed_precision", "no"])
    model = RQTransformer.from_pretrained(out / "rqtransformer")
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_unconditional(vae_dir, image_dir, tmp_path):
    main(["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--output_dir", str(tmp_path / "u"), *FAST2,
          "--max_train_steps", "1", "--unconditional"])
    assert RQTransformer.from_pretrained(tmp_path / "u" / "rqtransformer").config.num_classes == 0
    with Image.open(tmp_path / "u" / "samples" / "samples-0000001.png") as grid:  # one row of 2, no labels
        assert grid.size == (2 + 2 * (16 + 2), 2 + 16 + 2)


@pytest.mark.parametrize("extra, message", [
    (["--rqvae", "/nonexistent"], "does not exist"),
    (["--data_dir", "/nonexistent"], "does not exist"),
    (["--config", "big"], "--config must be one of"),
])
def test_bad_paths_and_options(vae_dir, image_dir, tmp_path, capsys, extra, message):
    argv = ["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--output_dir", str(tmp_path / "o"), *FAST2, *extra]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--cfg_dropout", "1.5"), ("--dropout", "1"), ("--max_train_steps", "-3"),
                                         ("--sample_guidance_scale", "-1"), ("--code_temperature", "0"),
                                         ("--code_temperature", "-0.5"), ("--code_temperature", "nan"),
                                         ("--code_temperature", "warm")])
def test_bad_numbers(vae_dir, image_dir, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        main(["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--output_dir", str(tmp_path), flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_init_from_fine_tunes_a_saved_transformer(vae_dir, image_dir, tmp_path):
    base = ["--rqvae", str(vae_dir), "--data_dir", str(image_dir), *FAST2[2:], "--ema_decay", "0"]
    main([*base, "--config", "tiny", "--output_dir", str(tmp_path / "a"), "--max_train_steps", "2"])
    main([*base, "--init_from", str(tmp_path / "a" / "rqtransformer"), "--output_dir", str(tmp_path / "b"),
          "--max_train_steps", "1", "--learning_rate", "1e-12"])  # a transformer folder (a pipeline folder: above)
    a, b = (RQTransformer.from_pretrained(tmp_path / n / "rqtransformer") for n in "ab")
    assert b.config == a.config
    for key, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], value, msg=key)


def test_init_from_with_other_classes_names_the_tensor(vae_dir, image_dir, tmp_path, capsys):
    base = ["--rqvae", str(vae_dir), *FAST2, "--max_train_steps", "1"]
    main([*base, "--data_dir", str(image_dir), "--output_dir", str(tmp_path / "a")])
    three = make_image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=3)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([*base, "--data_dir", str(three), "--output_dir", str(tmp_path / "b"),
                              "--init_from", str(tmp_path / "a")]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has 2 classes ['circles', 'squares'], the data has 3 ['a', 'b', 'c']" in err


def test_init_from_adds_new_classes_by_name(vae_dir, image_dir, tmp_path, capsys):
    """Data with all of the model's classes plus new ones: the saved rows move to their new indices by name
    ("blobs" sorts first), the new class starts at the mean of the saved ones, the null class stays last."""
    base = ["--rqvae", str(vae_dir), *FAST2[2:], "--ema_decay", "0"]
    main([*base, "--data_dir", str(image_dir), "--config", "tiny", "--output_dir", str(tmp_path / "a"),
          "--max_train_steps", "2"])
    more = make_image_folder(tmp_path / "more", classes=("blobs", "circles", "squares"), per_class=2)
    options = json.loads((tmp_path / "a" / "pipeline.json").read_text())  # display names carry over
    (tmp_path / "a" / "pipeline.json").write_text(json.dumps({**options, "class_display_names": {"circles": "Rings"}}))
    main([*base, "--data_dir", str(more), "--init_from", str(tmp_path / "a"), "--output_dir", str(tmp_path / "b"),
          "--max_train_steps", "1", "--learning_rate", "1e-12", "--dropout", "0.25"])  # a new dropout, same weights
    assert json.loads((tmp_path / "b" / "pipeline.json").read_text())["class_display_names"] == {"circles": "Rings"}
    assert "new classes ['blobs'] start from the mean of --init_from's class embeddings" in capsys.readouterr().out
    a, b = (RQTransformer.from_pretrained(tmp_path / n / "rqtransformer") for n in "ab")
    assert b.config.class_names == ["blobs", "circles", "squares"] and a.config.class_names == ["circles", "squares"]
    assert b.config.dropout == 0.25 != a.config.dropout
    old, new = a.class_emb.weight, b.class_emb.weight  # [classes + 1, dim], the null class last
    torch.testing.assert_close(new[1:], old)  # circles, squares, null: the saved rows, one index later
    torch.testing.assert_close(new[0], old[:2].mean(0))
    for key, value in a.state_dict().items():
        if key != "class_emb.weight":
            torch.testing.assert_close(b.state_dict()[key], value, msg=key)
    # a display-name map in --init_from's pipeline.json that does not fit its model is refused before training
    (tmp_path / "a" / "pipeline.json").write_text(json.dumps({**options, "class_display_names": {"blobs": "B"}}))
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([*base, "--data_dir", str(more), "--init_from", str(tmp_path / "a"),
                              "--output_dir", str(tmp_path / "c"), "--max_train_steps", "1"]))
    assert e.value.code == 2 and "'blobs' is not a class of this model" in capsys.readouterr().err


def test_validation_classes_are_matched_by_name(vae_dir, image_dir, tmp_path, capsys):
    """A test folder with only some of the classes: its labels are the model's, by folder name."""
    from training.data import image_folder
    squares = make_image_folder(tmp_path / "sq", classes=("circles", "squares"), per_class=2)
    for png in (squares / "circles").iterdir():
        png.unlink()
    (squares / "circles").rmdir()  # only "squares", which is index 1 in training, 0 in its own folder
    out = tmp_path / "o"
    main(["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--validation_dir", str(squares),
          "--output_dir", str(out), *FAST2, "--max_train_steps", "1"])
    model = RQTransformer.from_pretrained(out / "rqtransformer")
    from rqtransformer.losses import per_depth_nll
    from training.encoding import encode_dataset
    codes, _ = encode_dataset(RQVAE.from_pretrained(vae_dir), vae_dir, image_folder(squares, 16), tmp_path / "c",
                              False)
    expected = per_depth_nll(model, codes, torch.ones(len(codes), dtype=torch.long)).mean()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["val/loss"] == pytest.approx(float(expected), rel=1e-5)

    extra = make_image_folder(tmp_path / "extra", classes=("squares", "zebras"), per_class=1)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--validation_dir", str(extra),
                              "--output_dir", str(tmp_path / "o2"), *FAST2]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "has classes that --data_dir" in err and "lacks: ['zebras']" in err
    assert not list((tmp_path / "o2").glob("codes-*"))  # refused before any encoding


@pytest.mark.parametrize("flag, which, message", [
    ("--init_from", "neither",
     "is neither a model folder (no config.json) nor a pipeline folder (no rqtransformer/ inside)"),
    ("--init_from", "rqvae", "is not a saved RQTransformer: its config.json is another model's"),
    ("--rqvae", "neither", "is neither a model folder (no config.json) nor a pipeline folder (no rqvae/ inside)"),
    ("--rqvae", "transformer", "is not a saved RQVAE: its config.json is another model's"),
])
def test_the_wrong_kind_of_folder(vae_dir, image_dir, tmp_path, capsys, flag, which, message):
    folder = {"neither": image_dir, "rqvae": vae_dir, "transformer": tmp_path / "tf"}[which]
    if which == "transformer":
        from conftest import tiny_pipeline
        tiny_pipeline().transformer.save_pretrained(folder)  # a transformer where the RQ-VAE belongs
    argv = ["--rqvae", str(vae_dir), "--data_dir", str(image_dir), "--output_dir", str(tmp_path / "o"), *FAST2[2:]]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([*argv, flag, str(folder)]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"error: {flag} {folder} {message}\n"
