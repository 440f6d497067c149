"""Both training scripts on Hugging Face `datasets` data (--dataset_name), offline: a parquet folder the test
writes (an Image column, captions, string labels; train and test splits) and an imagefolder folder (class
sub-folders: a ClassLabel), run for a few steps; bad inputs give one clear line."""
from __future__ import annotations

import json
import pickle
import sys

import pytest

from pipelines import RQPipeline
from training import train_rqtransformer, train_rqvae
from training.cli import DATASET_DEFAULTS, run_cli
from training.data import CaptionedImageFolder
from training.encoding import cache_key
from training.hf_data import hub_dataset

from conftest import FAST1, FAST2, make_image_folder

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on a shared CPU


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No Hub: the variables, and the flags datasets and huggingface_hub read from them at import."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()  # its bars on stderr would hide the one-line errors checked below
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(parquet folder: train.parquet 12 rows + test.parquet 4 rows, imagefolder folder, datasets cache)."""
    root = tmp_path_factory.mktemp("hf")
    images = make_image_folder(root / "imagefolder", per_class=6)  # RGBA PNGs in circles/ and squares/
    rows = {"image": [], "text": [], "label": []}
    for shape in ("circles", "squares"):
        for i, png in enumerate(sorted((images / shape).iterdir())):
            rows["image"].append({"bytes": png.read_bytes(), "path": None})
            rows["text"].append(f"a {'big' if i % 2 else 'small'} {shape[:-1]} number {i}")
            rows["label"].append(shape)
    features = datasets.Features(image=datasets.Image(), text=datasets.Value("string"), label=datasets.Value("string"))
    table = datasets.Dataset.from_dict(rows, features=features)
    (root / "parquet").mkdir()
    table.select([0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 5]).to_parquet(str(root / "parquet" / "train.parquet"))
    table.select([0, 5, 6, 11]).to_parquet(str(root / "parquet" / "test.parquet"))
    return root / "parquet", images, root / "cache"


def test_parquet_captions_and_labels_both_stages(hub, tmp_path, capsys):
    parquet, _, cache = hub
    data = ["--dataset_name", str(parquet), "--cache_dir", str(cache), "--label_column", "label",
            "--validation_split", "test"]
    vae = tmp_path / "vae"
    train_rqvae.main([*data, "--output_dir", str(vae), *FAST1, "--max_train_steps", "2", "--max_train_samples", "8",
                      "--validation_steps", "100"])
    assert "8 images in 2 folders" in capsys.readouterr().out  # --max_train_samples: 8 of the 12 rows
    assert (vae / "config.json").is_file()

    out = tmp_path / "tf"
    train_rqtransformer.main(["--rqvae", str(vae), *data, "--output_dir", str(out), *FAST2, "--max_train_steps", "2",
                              "--text_vocab_size", "300"])
    printed = capsys.readouterr().out
    assert "12 code stacks" in printed and "12 captions" in printed
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    assert pipe.transformer.config.class_names == ["circles", "squares"]
    prompts = json.loads((out / "rqtransformer" / "prompts.json").read_text())
    assert "a small circle number 0" in prompts
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["step"] == 2 and "val/loss" in summary  # the held-out loss of the test split
    assert len(list(out.glob("codes-*.safetensors"))) == 2  # train and test, keyed by their fingerprints


def test_imagefolder_class_labels(hub, vae_dir, tmp_path, capsys):
    _, images, cache = hub
    data = ["--dataset_name", str(images), "--cache_dir", str(cache), "--label_column", "label"]
    train_rqvae.main([*data, "--output_dir", str(tmp_path / "vae"), *FAST1, "--max_train_steps", "2",
                      "--max_train_samples", "5", "--validation_steps", "100"])
    assert "5 images in 2 folders" in capsys.readouterr().out
    out = tmp_path / "tf"
    train_rqtransformer.main(["--rqvae", str(vae_dir), *data, "--output_dir", str(out), *FAST2,
                              "--max_train_steps", "2", "--max_train_samples", "5"])
    assert "5 code stacks" in capsys.readouterr().out
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    assert pipe.transformer.config.class_names == ["circles", "squares"]  # the ClassLabel's names
    assert not (out / "rqtransformer" / "prompts.json").exists()  # no captions: no text model

    # the stage-1 loader's workers get a pickled copy; without --label_column there are no classes
    args = train_rqvae.parse_args([*data[:4], "--output_dir", str(tmp_path / "o")])
    ds = hub_dataset(args, 16, "train", check=False)
    assert ds.classes == [] and len(ds) == 12 and args.dataset_split == DATASET_DEFAULTS["dataset_split"]
    image, label = pickle.loads(pickle.dumps(ds))[3]
    assert tuple(image.shape) == (3, 16, 16) and label == 0 and image.min() >= -1

    # stage 2's code cache is keyed by the split's fingerprint: the same rows, the same key
    key = lambda **kw: cache_key(vae_dir, hub_dataset(args, 16, "train", check=False, **kw), hflip=False)
    assert key() == key() != key(limit=5)


def test_save_to_disk_folders_and_bad_images(hub, tmp_path, capsys):
    parquet, _, cache = hub
    rows = datasets.load_dataset(str(parquet), cache_dir=str(cache))  # both splits
    rows.save_to_disk(str(tmp_path / "saved"))
    args = train_rqvae.parse_args(["--dataset_name", str(tmp_path / "saved"), "--output_dir", str(tmp_path / "o"),
                                   "--label_column", "label"])
    test = hub_dataset(args, 16, "test")
    assert isinstance(test, CaptionedImageFolder) and len(test) == 4 and test.classes == ["circles", "squares"]
    image, label, caption = test[1]
    assert tuple(image.shape) == (3, 16, 16) and label == 0 and caption.startswith("a ")

    broken = rows["train"].cast_column("image", datasets.Image(decode=False)).map(
        lambda row, i: {"image": {"bytes": b"not a png" if i == 3 else row["image"]["bytes"], "path": None}},
        with_indices=True)
    broken.to_parquet(str(tmp_path / "broken.parquet"))
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: train_rqvae.main(["--dataset_name", str(tmp_path / "broken.parquet"), "--cache_dir", str(cache),
                                          "--output_dir", str(tmp_path / "o"), *FAST1]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unreadable image" in err and "broken.parquet row 3" in err, err
    assert err.strip().count("\n") == 0


@pytest.mark.parametrize("extra, message", [
    (["--image_column", "picture"], "has no column 'picture' (--image_column); its columns: image, text, label"),
    (["--caption_column", "caption"], "has no column 'caption' (--caption_column)"),
    (["--label_column", "kind"], "has no column 'kind' (--label_column)"),
    (["--dataset_split", "validation"], "--dataset_split validation: Unknown split"),
    (["--image_column", "text"], "column 'text' is not an image column"),
])
def test_bad_columns_and_splits(hub, tmp_path, capsys, extra, message):
    parquet, _, cache = hub
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: train_rqvae.main(["--dataset_name", str(parquet), "--cache_dir", str(cache), *extra,
                                          "--output_dir", str(tmp_path / "o"), *FAST1]))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err, err
    assert err.strip().count("\n") == 0 and "Traceback" not in err


@pytest.mark.parametrize("source, message", [
    (["--data_dir", "x", "--dataset_name", "y"], "not allowed with argument"),
    ([], "one of the arguments --data_dir/--train_data_dir --dataset_name is required"),
    (["--dataset_name", "./no/such/folder"], "./no/such/folder: no such file or folder"),
    (["--dataset_name", "user/my-emoji"], "the Hugging Face Hub is unreachable (offline mode"),
    (["--train_data_dir", "x", "--label_column", "label"], "--label_column needs --dataset_name"),
    (["--dataset_name", "y", "--validation_split", "train"], "is the training split"),
])
def test_bad_sources_give_one_line(vae_dir, tmp_path, capsys, source, message):
    for main, extra in ((train_rqvae.main, []), (train_rqtransformer.main, ["--rqvae", str(vae_dir)])):
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: main([*source, *extra, "--output_dir", str(tmp_path / "o")]))
        last = capsys.readouterr().err.strip().splitlines()[-1]  # argparse prints its usage above
        assert e.value.code == 2 and "error: " in last and message in last, last


def test_empty_split_and_no_datasets_package(hub, tmp_path, capsys, monkeypatch):
    parquet, _, cache = hub
    empty = datasets.load_dataset(str(parquet), split="test", cache_dir=str(cache)).select([])
    empty.to_parquet(str(tmp_path / "empty.parquet"))

    def error(name):
        with pytest.raises(SystemExit) as e:
            run_cli(lambda: train_rqvae.main(["--dataset_name", name, "--cache_dir", str(cache),
                                              "--output_dir", str(tmp_path / "o"), *FAST1]))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.strip().count("\n") == 0, err
        return err

    assert "split train is empty" in error(str(tmp_path / "empty.parquet"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed: import fails
    assert "needs the datasets package: pip install 'datasets>=4'" in error(str(parquet))


def test_odd_columns_and_a_saved_empty_split(hub, tmp_path, capsys):
    """A 'text' column that is not captions is ignored unless asked for; labels must be strings or whole
    numbers; a save_to_disk folder whose other split is empty still loads the asked one."""
    parquet, _, cache = hub
    rows = datasets.load_dataset(str(parquet), split="train", cache_dir=str(cache))
    ints = rows.remove_columns("text").add_column("text", list(range(len(rows))))  # not captions
    ints.to_parquet(str(tmp_path / "ints.parquet"))
    args = train_rqvae.parse_args(["--dataset_name", str(tmp_path / "ints.parquet"), "--output_dir", str(tmp_path)])
    assert not isinstance(hub_dataset(args, 16, "train", check=False), CaptionedImageFolder)
    listed = rows.remove_columns("label").add_column("label", [[i] for i in range(len(rows))])
    listed.to_parquet(str(tmp_path / "listed.parquet"))
    args = train_rqvae.parse_args(["--dataset_name", str(tmp_path / "listed.parquet"), "--output_dir",
                                   str(tmp_path), "--label_column", "label"])
    with pytest.raises(ValueError, match="--label_column 'label' must hold strings or whole numbers"):
        hub_dataset(args, 16, "train", check=False)
    datasets.DatasetDict(train=rows, test=rows.select([])).save_to_disk(str(tmp_path / "saved"))
    args = train_rqvae.parse_args(["--dataset_name", str(tmp_path / "saved"), "--output_dir", str(tmp_path)])
    assert len(hub_dataset(args, 16, "train", check=False)) == len(rows)
    with pytest.raises(ValueError, match="split test is empty"):
        hub_dataset(args, 16, "test", check=False)
