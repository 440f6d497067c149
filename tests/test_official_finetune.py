"""Fine-tuning converted official checkpoints with our trainers (the official repository has no stage-2
training): a few steps on a user's folder lower the loss, train the null class so guidance becomes
available, keep the official layout, tokenizer and sampling settings, and the result reloads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipelines import RQPipeline
from official.convert import main as convert
from training.train_rqtransformer import main as train_stage2
from training.train_rqvae import main as train_stage1

from conftest import make_image_folder

FIXTURES = Path(__file__).parent / "fixtures" / "official"
FAST = ["--train_batch_size", "8", "--lr_warmup_steps", "2", "--report_to", "none", "--mixed_precision", "no",
        "--validation_steps", "1000", "--samples_per_class", "1", "--learning_rate", "1e-3", "--max_train_steps", "40"]


def converted(tmp_path: Path, kind: str) -> Path:
    args = ["--rqvae", str(FIXTURES / "stage1"), "--rqtransformer", str(FIXTURES / kind),
            "--output_dir", str(tmp_path / kind)]
    if kind == "text":
        args += ["--tokenizer", str(FIXTURES / "text" / "tokenizer")]
    convert(args)
    return tmp_path / kind


def nll(pipe: RQPipeline, images: Path, labels=None, prompts=None) -> float:
    """Mean cross-entropy of the pipeline's transformer on the codes of a folder's images."""
    files = sorted(images.glob("*/*.png"))
    x = pipe.preprocess([__import__("PIL.Image").Image.open(f) for f in files])
    codes = pipe.rqvae.encode(x)
    text = pipe.transformer.tokenizer.encode(prompts(files), pipe.transformer.config.max_text_len)[0] \
        if prompts else None
    y = torch.tensor([labels(f) for f in files]) if labels else None
    with torch.inference_mode():
        logits = pipe.transformer(codes, y, text)
    return F.cross_entropy(logits.flatten(0, -2), codes.flatten()).item()


def test_a_converted_class_model_fine_tunes_on_folders_named_after_its_classes(tmp_path):
    source = converted(tmp_path, "class")
    images = make_image_folder(tmp_path / "images", classes=("3", "7"), size=32)
    label = lambda f: int(f.parent.name)  # noqa: E731 - the folder names are the model's classes "3" and "7"
    before = nll(RQPipeline.from_pretrained(source, device="cpu"), images, label)
    out = tmp_path / "tuned"
    train_stage2(["--rqvae", str(source), "--init_from", str(source), "--data_dir", str(images),
                  "--output_dir", str(out), "--cfg_dropout", "0.2", *FAST])
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    assert nll(pipe, images, label) < before - 0.1
    c = pipe.transformer.config
    assert c.num_classes == 10 and c.cumsum_depth_emb and not c.spatial_norm  # the official layout, all classes
    assert pipe.guidance and pipe.default_guidance_scale > 1  # --cfg_dropout trained the null class
    assert pipe.top_k == [16, 8, 4, 2] and pipe.top_p == 0.92  # the official sampling settings carried over
    pipe("7", num_images=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))


def test_without_cfg_dropout_guidance_stays_off(tmp_path):
    source = converted(tmp_path, "class")
    images = make_image_folder(tmp_path / "images", classes=("3", "7"), size=32)
    out = tmp_path / "tuned"
    train_stage2(["--rqvae", str(source), "--init_from", str(source), "--data_dir", str(images),
                  "--output_dir", str(out), "--cfg_dropout", "0", *FAST[:-2], "--max_train_steps", "4"])
    options = json.loads((out / "pipeline.json").read_text())
    assert options["guidance"] is False and options["default_guidance_scale"] == 1.0


def test_class_folders_the_model_lacks_are_one_line(tmp_path, capsys):
    source = converted(tmp_path, "class")
    images = make_image_folder(tmp_path / "images", classes=("3", "cats"), size=32)
    with pytest.raises(SystemExit) as e:
        import training.cli as cli

        cli.run_cli(lambda: train_stage2(["--rqvae", str(source), "--init_from", str(source), "--data_dir",
                                          str(images), "--output_dir", str(tmp_path / "o"), *FAST]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "folders named after some or all of them, plus new ones" in err


def flat_folder(root: Path) -> Path:
    """The fixture images at the folder's root, no class sub-folders: a user's folder of faces."""
    nested = make_image_folder(root.with_name(root.name + "-nested"), size=32)
    root.mkdir()
    for f in sorted(nested.glob("*/*.png")):
        f.rename(root / f"{f.parent.name}-{f.name}")
    return root


def test_a_converted_unconditional_model_fine_tunes_on_a_plain_folder(tmp_path):
    source = converted(tmp_path, "uncond")
    images = flat_folder(tmp_path / "faces")
    files = lambda: sorted(images.glob("*.png"))  # noqa: E731
    x = lambda pipe: pipe.preprocess([__import__("PIL.Image").Image.open(f) for f in files()])  # noqa: E731

    def loss(pipe: RQPipeline) -> float:
        codes = pipe.rqvae.encode(x(pipe))
        with torch.inference_mode():
            return F.cross_entropy(pipe.transformer(codes).flatten(0, -2), codes.flatten()).item()

    before = loss(RQPipeline.from_pretrained(source, device="cpu"))
    out = tmp_path / "tuned"
    train_stage2(["--rqvae", str(source), "--init_from", str(source), "--data_dir", str(images),
                  "--output_dir", str(out), *FAST])
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    assert loss(pipe) < before - 0.1 and pipe.transformer.config.num_classes == 0
    assert len(pipe(num_images=2, generator=torch.Generator().manual_seed(0)).images) == 2


def test_a_class_model_on_a_plain_folder_is_one_line(tmp_path, capsys):
    source = converted(tmp_path, "class")
    images = flat_folder(tmp_path / "plain")
    import training.cli as cli

    with pytest.raises(SystemExit) as e:
        cli.run_cli(lambda: train_stage2(["--rqvae", str(source), "--init_from", str(source), "--data_dir",
                                          str(images), "--output_dir", str(tmp_path / "o"), *FAST]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "has no class sub-folders" in err


def test_a_converted_text_model_fine_tunes_with_the_official_tokenizer(tmp_path):
    source = converted(tmp_path, "text")
    images = make_image_folder(tmp_path / "images", size=32)
    caption = {"circles": "a red circle", "squares": "a painting of a square"}
    rows = [{"file_name": f"{f.parent.name}/{f.name}", "text": caption[f.parent.name]}
            for f in sorted(images.glob("*/*.png"))]
    (images / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = lambda files: [caption[f.parent.name] for f in files]  # noqa: E731
    before = nll(RQPipeline.from_pretrained(source, device="cpu"), images, prompts=prompts)
    out = tmp_path / "tuned"
    train_stage2(["--rqvae", str(source), "--init_from", str(source), "--data_dir", str(images),
                  "--output_dir", str(out), "--caption_dropout", "0.2", "--unconditional", *FAST])
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    assert nll(pipe, images, prompts=prompts) < before - 0.1
    assert not pipe.transformer.config.start_token and pipe.guidance
    original = (source / "rqtransformer" / "tokenizer.json").read_text(encoding="utf-8")
    assert (out / "rqtransformer" / "tokenizer.json").read_text(encoding="utf-8") == original
    pipe(prompt="a red circle", num_images=1, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))


def test_a_converted_rqvae_fine_tunes_in_the_official_layout(tmp_path):
    source = converted(tmp_path, "uncond")
    images = flat_folder(tmp_path / "faces")  # stage 1 needs no classes either
    out = tmp_path / "vae"
    train_stage1(["--init_from", str(source), "--data_dir", str(images), "--output_dir", str(out),
                  "--train_batch_size", "4", "--num_workers", "0", "--lr_warmup_steps", "2", "--report_to", "none",
                  "--num_validation_images", "8", "--max_train_steps", "30", "--learning_rate", "1e-3",
                  "--reconstruction_loss", "l2", "--validation_steps", "1000"])
    from rqvae import RQVAE

    def error(vae) -> float:
        pipe = RQPipeline.from_pretrained(source, device="cpu")
        x = pipe.preprocess([__import__("PIL.Image").Image.open(f) for f in sorted(images.glob("*.png"))])
        with torch.inference_mode():
            return F.mse_loss(vae.decode(vae.encode(x)), x).item()

    tuned = RQVAE.from_pretrained(out)
    assert tuned.config.quant_convs and tuned.config.pad_downsample and tuned.config.attn_resolutions == (8,)
    assert error(tuned) < error(RQVAE.from_pretrained(source / "rqvae"))
