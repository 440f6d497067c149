"""The evaluation command on a tiny saved pipeline."""
from __future__ import annotations

import json

import pytest

from pipelines import RQPipeline
from training.evaluate import main
from rqtransformer import RQTransformer, RQTransformerConfig
from training.cli import run_cli


@pytest.fixture
def weights(tmp_path, trained_tiny_vae):
    vae, _ = trained_tiny_vae
    tf = RQTransformer(RQTransformerConfig(codebook_size=16, code_shape=(2, 2, 2), dim=16, heads=2, spatial_layers=1,
                                           depth_layers=1, num_classes=2, dropout=0.0,
                                           class_names=["circles", "squares"]))
    RQPipeline(vae, tf).save_pretrained(tmp_path / "w")
    return tmp_path / "w"


def test_evaluate_reports_every_metric(weights, image_dir, tmp_path, capsys):
    report = main(["--weights", str(weights), "--data_dir", str(image_dir), "--train_dir", str(image_dir),
                   "--out", str(tmp_path / "eval"), "--classifier_steps", "3", "--samples_per_class", "3"])
    assert set(report) >= {"psnr_depth1", "psnr_depth2", "codebook_usage", "nll_depth1", "nll_depth2",
                           "perplexity_depth1", "classifier_test_accuracy", "sample_class_consistency"}
    assert report["psnr_depth2"] > report["psnr_depth1"]
    assert 0 <= report["sample_class_consistency"] <= 1 and 0 < report["codebook_usage"] <= 1
    for key in ("classifier_test_accuracy_per_class", "sample_class_consistency_per_class"):
        assert set(report[key]) == {"circles", "squares"} and all(0 <= v <= 1 for v in report[key].values())
    # an untrained prior is about as uncertain as a uniform one over 16 codes
    assert 8 < report["perplexity_depth1"] < 32
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert json.loads((tmp_path / "eval" / "report.json").read_text()) == report
    assert (tmp_path / "eval" / "samples.png").is_file()


def test_judge_classifier_is_saved_and_reused(weights, image_dir, tmp_path):
    args = ["--weights", str(weights), "--data_dir", str(image_dir), "--train_dir", str(image_dir),
            "--classifier", str(tmp_path / "judge.safetensors"), "--classifier_steps", "2", "--samples_per_class", "1"]
    first = main(args)
    assert (tmp_path / "judge.safetensors").is_file()
    second = main(args)  # loaded, not retrained: same accuracy on the same images
    assert second["classifier_test_accuracy"] == first["classifier_test_accuracy"]


def test_evaluate_refuses_other_classes(weights, tmp_path, capsys):
    from conftest import make_image_folder

    other = make_image_folder(tmp_path / "other", classes=("cats", "dogs"), per_class=2)
    with pytest.raises(SystemExit):
        run_cli(lambda: main(["--weights", str(weights), "--data_dir", str(other)]))
    assert "has classes" in capsys.readouterr().err


def test_figures_script_writes_the_readme_pictures(weights, image_dir, tmp_path):
    from PIL import Image

    from training.figures import main as figures

    figures(["--weights", str(weights), "--data_dir", str(image_dir), "--out", str(tmp_path / "docs"),
             "--per_class", "3"])
    for name in ("samples.png", "depths.png", "completion.png"):
        with Image.open(tmp_path / "docs" / name) as im:
            assert im.width > 16 and im.height > 16
