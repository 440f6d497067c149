"""Bad input everywhere: the cases that the per-module tests do not cover yet.

Each bad case must give ONE line that names the problem and what is allowed; the app must serve the
next request. Odd-but-valid inputs (1x1, 16-bit, CMYK, palette with transparency, a mask of another
size) must simply work. Already covered elsewhere and not repeated here:
  test_app.py                 unknown class, num_images 0/7, temperature 0, top_p 2, top_k 33, seed -1 and
                              2**63, truncated/garbage uploads, empty mask, bad box, garbage editor image,
                              missing weights at start-up
  test_pipeline.py            unknown/out-of-range/float labels, num_images 0/7/2.0, temperature 0, top_k 0/33,
                              top_p 0/1.5, guidance -1, every PIL mode in memory, empty/malformed mask,
                              mismatched models, missing/empty pipeline folder, unknown pipeline.json keys,
                              prompts: non-string/empty list/too many, any Unicode, too long, on a model
                              without text, none on a model trained without caption dropout
  test_app.py (text)          a lone surrogate in a raw request's prompt, a truncated prompt's warning
  test_rqvae.py               tampered safetensors (missing/extra/shape), bad config.json types, corrupt file
  test_rqtransformer.py       config values, tampered safetensors, generate() arguments
  test_train_rqvae.py         missing/empty/no-image/corrupt data dir, bad --config, partial checkpoints, argparse
  test_train_rqtransformer.py missing --rqvae/--data_dir, bad --config, argparse numbers
"""
from __future__ import annotations

import json
import pickle
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from pipelines import RQPipeline
from rqtransformer import RQTransformer, RQTransformerConfig
from training.cli import run_cli

gr = pytest.importorskip("gradio")
from gradio_client import handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from conftest import FAST1, FAST2, editor, gen, pixels, tiny_text_pipeline  # noqa: E402

LIMIT = "the limit is 40,000,000 pixels"


def write_png(path: Path, width: int, height: int, bit_depth: int = 8, decodable: bool = True) -> Path:
    """A greyscale PNG written by hand, without allocating the image. decodable=False: only the header is
    right (an image whose size is refused must never be decoded, so this is never noticed)."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([bit_depth, 0, 0, 0, 0])
    row = b"\x00" + bytes((width * bit_depth + 7) // 8)  # filter byte + a black row
    data = zlib.compress(row * height, 1) if decodable else zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def make_odd_files(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    out = {"bomb": write_png(root / "bomb.png", 20000, 20000, decodable=False),  # 400 M pixels
           "big": write_png(root / "big.png", 7000, 7000, bit_depth=1)}  # 49 M: PIL only warns, we refuse
    Image.new("RGB", (1, 1), (255, 0, 0)).save(out.setdefault("one", root / "one.png"))
    ramp = np.linspace(0, 65535, 40 * 40).reshape(40, 40).astype(np.uint16)  # full 16-bit range
    Image.fromarray(ramp).save(out.setdefault("grey16", root / "grey16.png"))
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(out.setdefault("cmyk", root / "cmyk.jpg"))  # red
    pal = Image.new("P", (40, 40), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(0, (0, 0, 20, 40))  # left half: index 0 = transparent
    pal.save(out.setdefault("palette", root / "palette.png"), transparency=0)
    la = np.zeros((40, 40, 2), np.uint8)
    la[..., 0], la[:, 20:, 1] = 60, 255  # dark grey, right half opaque
    Image.fromarray(la, "LA").save(out.setdefault("la", root / "la.png"))
    (root / "empty.png").write_bytes(b"")
    out["empty"] = root / "empty.png"
    (root / "drawing.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    out["svg"] = root / "drawing.svg"
    black, small = np.zeros((40, 40), np.uint8), np.zeros((10, 10), np.uint8)
    small[5:] = 255  # bottom half, at a quarter of the image's size
    Image.fromarray(black, "L").save(out.setdefault("black_mask", root / "black_mask.png"))
    Image.fromarray(black + 255, "L").save(out.setdefault("white_mask", root / "white_mask.png"))
    Image.fromarray(small, "L").save(out.setdefault("small_mask", root / "small_mask.png"))
    return out


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return make_odd_files(tmp_path_factory.mktemp("odd"))


def one_line(message: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message, message


# ---- app ------------------------------------------------------------------------------------------

APP_BAD = {  # id: (endpoint, arguments; "@name" = a file from `odd`, "E@name" = an editor without layers)
    "bomb_20000x20000_reconstruct": ("/reconstruct", dict(image="@bomb"), ["Image: the image is too large", LIMIT]),
    "big_7000x7000_reconstruct": ("/reconstruct", dict(image="@big"), ["image is too large (7000x7000)", LIMIT]),
    "bomb_20000x20000_complete": ("/complete", dict(image="E@bomb"), ["Image: the image is too large", LIMIT]),
    "empty_file_upload": ("/reconstruct", dict(image="@empty"), ["Image: could not read the uploaded image",
                                                                 "upload a PNG, JPEG or WebP"]),
    "svg_upload": ("/reconstruct", dict(image="@svg"), ["Image: SVG files are not supported"]),
    "reconstruct_no_image": ("/reconstruct", dict(image=None), ["upload an image"]),
    "complete_no_image": ("/complete", dict(image=None), ["upload an image to complete"]),
    "all_black_mask_layer": ("/complete", dict(image="E@black_mask"), ["the mask is empty: paint over"]),
    "num_images_non_integer": ("/generate", dict(num_images=2.5),
                               ["Number of images: must be a whole number from 1 to 6, got 2.5"]),
    "num_images_text": ("/generate", dict(num_images="four"),
                        ["Number of images: expected a number from 1 to 6, got 'four'"]),
    "num_images_null": ("/generate", dict(num_images=None), ["Number of images: expected a number from 1 to 6"]),
    "seed_text": ("/generate", dict(seed="x"), ["Seed: expected a number from 0 to 9223372036854775807"]),
    "top_k_huge": ("/generate", dict(top_k=10**9), ["Top-k (0 = off): Value 1000000000 is greater than maximum "
                                                    "value 32"]),
    "top_k_negative": ("/generate", dict(top_k=-1), ["Top-k (0 = off): Value -1 is less than minimum value 0"]),
    "top_k_non_integer": ("/generate", dict(top_k=2.5), ["Top-k (0 = off): must be a whole number from 0 to 32"]),
    "top_p_zero": ("/generate", dict(top_p=0), ["Top-p (1 = off): Value 0 is less than minimum value 0.01"]),
    "guidance_negative": ("/generate", dict(guidance_scale=-1),
                          ["Guidance scale (1 = off): Value -1 is less than minimum value 0"]),
    "temperature_negative": ("/generate", dict(temperature=-1), ["Temperature: Value -1 is less than minimum"]),
    "class_index_instead_of_name": ("/generate", dict(class_name=7), ["Class: Value: 7 is not in the list"]),
    "complete_num_images_0": ("/complete", dict(image="E@one", num_images=0),
                              ["Number of images: Value 0 is less than minimum value 1"]),
    "complete_num_images_non_integer": ("/complete", dict(image="E@one", num_images=1.5),
                                        ["Number of images: must be a whole number from 1 to 6"]),
    "complete_seed_negative": ("/complete", dict(image="E@one", seed=-1), ["Seed: Value -1 is less than minimum"]),
    "complete_unknown_class": ("/complete", dict(image="E@one", class_name="unicorns"),
                               ["Class: Value: unicorns is not in the list of choices"]),
    "complete_box_outside_image": ("/complete", dict(image="E@one", use_box=True, x1=1.5),
                                   ["x1 (right): Value 1.5 is greater than maximum value 1"]),
    "prompt_on_model_without_text": ("/generate", dict(prompt="red circle"),
                                     ["this model has no text conditioning: leave prompt empty"]),
    "complete_prompt_on_model_without_text": ("/complete", dict(image="E@white_mask", prompt="red circle"),
                                              ["this model has no text conditioning"]),
}


def resolve(call: dict, odd: dict) -> dict:
    call = dict(call)
    image = call.get("image")
    if isinstance(image, str) and image.startswith("E@"):
        name = image[2:]
        call["image"] = (editor(odd["one"], odd[name]) if name.endswith("_mask") else editor(odd[name]))
    elif isinstance(image, str) and image.startswith("@"):
        call["image"] = handle_file(odd[image[1:]])
    return call


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the 7000x7000 upload: expected
@pytest.mark.parametrize("case", list(APP_BAD))
def test_app_bad_input_one_line_and_next_request_served(served, odd, case):
    client, *_ = served
    api_name, call, expected = APP_BAD[case]
    with pytest.raises(AppError) as info:
        client.predict(**resolve(call, odd), api_name=api_name)
    message = str(info.value)
    for part in expected:
        assert part in message, message
    one_line(message)
    assert len(client.predict(num_images=1, api_name="/generate")) == 1  # the server is up and serves


def input_strip(client, path) -> np.ndarray:
    strip, code_grid = client.predict(handle_file(path), api_name="/reconstruct")
    assert len(strip) == 3 and Path(code_grid).is_file()  # input + depth 1..2
    return pixels(strip[0])  # the input as the model saw it (32 px, shown at 256 px)


def test_app_odd_but_valid_images_work(served, odd):
    client, *_ = served
    red = input_strip(client, odd["one"])  # 1x1: upscaled to the model's size
    assert (red[..., 0] > 200).all() and (red[..., 1:] < 60).all()
    ramp = input_strip(client, odd["grey16"])  # 16-bit: scaled to 8 bits, not clipped to white
    assert ramp.min() < 40 and ramp.max() > 215 and 90 < ramp.mean() < 165
    cmyk = input_strip(client, odd["cmyk"])  # CMYK JPEG -> RGB
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60
    pal = input_strip(client, odd["palette"])  # palette + transparency: transparent -> white
    assert (pal[:, :100] > 240).all() and (pal[:, 160:, 0] > 200).all() and (pal[:, 160:, 1] < 60).all()
    la = input_strip(client, odd["la"])  # grey + alpha
    assert (la[:, :100] > 240).all() and (la[:, 160:] < 80).all()


def test_app_mask_of_another_size_and_all_white_mask(served, files, odd):
    client, *_ = served
    full = client.predict(editor(files["good"], files["mask"]), num_images=1, seed=2, api_name="/complete")
    small = client.predict(editor(files["good"], odd["small_mask"]), num_images=1, seed=2, api_name="/complete")
    assert np.array_equal(pixels(small[0]), pixels(full[0]))  # the 10x10 mask is resized to the 40x40 image
    everything = client.predict(editor(files["good"], odd["white_mask"]), num_images=1, api_name="/complete")
    shown = pixels(everything[0])
    assert shown[..., 2].min() >= 100  # every cell shaded magenta: all regenerated
    assert len(everything) == 2


# ---- pipeline -------------------------------------------------------------------------------------

def lazy(path: Path) -> Image.Image:
    return Image.open(path)  # not decoded yet: the size check must come before any decoding


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature must be a number > 0"),
    (dict(temperature=float("nan")), "temperature must be a number > 0"),
    (dict(top_k=2.5), r"top_k must be None or an integer"),
    (dict(top_k=True), r"top_k must be None or an integer"),
    (dict(class_labels=0, guidance_scale=float("inf")), "guidance_scale must be a number >= 0"),
    (dict(num_images=True), "num_images must be a whole number from 1 to 6"),
    (dict(class_labels=[]), "give 1 to 6 class labels"),
    (dict(class_labels=True), "class labels must be class names or indices"),
    (dict(class_labels=-1), r"class index -1 is out of range 0\.\.2"),
], ids=["temperature_negative", "temperature_nan", "top_k_non_integer", "top_k_bool", "guidance_inf",
        "num_images_bool", "class_labels_empty", "class_label_bool", "class_index_negative"])
def test_pipeline_bad_sampling_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        pipe(**kwargs)
    one_line(str(info.value))


def test_pipeline_refuses_huge_images_before_decoding(pipe, odd, monkeypatch):
    with pytest.warns(Image.DecompressionBombWarning):
        big = lazy(odd["big"])  # 49 M pixels: PIL warns only
    with pytest.raises(ValueError, match=r"image is too large \(7000x7000\); the limit is 40,000,000 pixels"):
        pipe.reconstruct(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # a caller who switched PIL's guard off
    with pytest.raises(ValueError, match=r"image is too large \(20000x20000\); the limit is 40,000,000"):
        pipe.reconstruct(lazy(odd["bomb"]))  # its pixel data is garbage: decoding would fail
    with pytest.raises(ValueError, match=r"mask is too large \(20000x20000\); the limit is 40,000,000"):
        pipe.complete(Image.new("RGB", (32, 32)), lazy(odd["bomb"]))
    with pytest.raises(ValueError, match=r"image is too large \(7000x7000\)"):
        pipe.complete(big, lazy(odd["bomb"]))  # both too large: the image is checked first


def test_pipeline_odd_but_valid_images(pipe, odd):
    assert pipe.reconstruct(lazy(odd["one"])).input_image.size == (32, 32)
    ramp = np.asarray(pipe.reconstruct(lazy(odd["grey16"])).input_image)
    assert ramp.min() < 40 and ramp.max() > 215  # 16-bit scaled, not clipped
    assert np.asarray(pipe.reconstruct(lazy(odd["cmyk"])).input_image)[..., 0].mean() > 200
    pal = np.asarray(pipe.reconstruct(lazy(odd["palette"])).input_image)
    assert (pal[:, :12] > 240).all() and (pal[:, 20:, 0] > 200).all()


def test_pipeline_all_one_and_odd_sized_masks(pipe):
    image = Image.new("RGB", (32, 32), (10, 200, 10))
    out = pipe.complete(image, torch.ones(32, 32), generator=gen(0))  # float mask in [0,1], all one
    assert out.codes.shape == (1, 4, 4, 2) and not pipe.mask_to_keep(torch.ones(32, 32)).any()
    keep = pipe.mask_to_keep(torch.ones(7, 5, dtype=torch.bool))  # another size and aspect: resized
    assert keep.shape == (4, 4) and not keep.any()


@pytest.fixture
def saved(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    return tmp_path / "p"


def edit_json(file: Path, **changes) -> None:
    data = json.loads(file.read_text())
    data.update(changes)
    file.write_text(json.dumps(data))


SAVED_CASES = [
    ("other_codebook_transformer", "the transformer expects codes .* from a codebook of 64"),
    ("vae_negative_codebook", "codebook_size must be >= 1, got -5"),
    ("transformer_code_shape_2d", r"code_shape must be 3 positive integers \(h, w, D\)"),
    ("transformer_names_count", "class_names has 2 entries but num_classes is 3"),
    ("pipeline_json_max_images_0", "max_images must be a positive integer <= 64, got 0"),
    ("pipeline_json_max_images_huge", "max_images must be a positive integer <= 64, got 1000000000"),
    ("pipeline_json_guidance_negative", "default_guidance_scale must be a number >= 0"),
    ("pipeline_json_guidance_text", "default_guidance_scale must be a number >= 0"),
    ("pipeline_json_list", "expected a JSON object"),
    ("vae_weights_missing", "no model.safetensors found"),
    ("vae_weights_wrong_dtype", "has dtype torch.int64, the model needs a floating-point tensor"),
    ("transformer_weights_wrong_dtype", "has dtype torch.bool, the model needs a floating-point tensor"),
]


@pytest.mark.parametrize("case, message", SAVED_CASES, ids=[c for c, _ in SAVED_CASES])
def test_saved_pipeline_with_bad_files(saved, case, message):
    vae, tf = saved / "rqvae", saved / "rqtransformer"
    if case == "other_codebook_transformer":
        RQTransformer(RQTransformerConfig(codebook_size=64, code_shape=(4, 4, 2), dim=32, heads=2, spatial_layers=1,
                                          depth_layers=1, num_classes=0, dropout=0.0)).save_pretrained(tf)
    elif case == "vae_negative_codebook":
        edit_json(vae / "config.json", codebook_size=-5)
    elif case == "transformer_code_shape_2d":
        edit_json(tf / "config.json", code_shape=[4, 4])
    elif case == "transformer_names_count":
        edit_json(tf / "config.json", class_names=["a", "b"])
    elif case.startswith("pipeline_json"):
        value = {"max_images_0": {"max_images": 0}, "max_images_huge": {"max_images": 10**9},
                 "guidance_negative": {"default_guidance_scale": -1},
                 "guidance_text": {"default_guidance_scale": "high"}, "list": [1, 2]}[case[len("pipeline_json_"):]]
        (saved / "pipeline.json").write_text(json.dumps(value))
    elif case == "vae_weights_missing":
        (vae / "model.safetensors").unlink()
    else:
        file = (vae if case.startswith("vae") else tf) / "model.safetensors"
        tensors = load_file(str(file))
        key = "decoder.conv_out.weight" if case.startswith("vae") else "head.weight"
        tensors[key] = torch.ones_like(tensors[key], dtype=torch.int64 if case.startswith("vae") else torch.bool)
        save_file(tensors, str(file))
    with pytest.raises(ValueError, match=message) as info:
        RQPipeline.from_pretrained(saved, device="cpu")
    one_line(str(info.value))


@pytest.fixture(scope="module")
def saved_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_pipeline")
    tiny_text_pipeline().save_pretrained(root / "p")
    return root / "p"


TEXT_CASES = {  # a text pipeline's prompts.json and pipeline.json caption_dropout
    "prompts_json_garbled": ("prompts.json", b'["red circle", "blue', r"prompts.json is not valid JSON"),
    "prompts_json_pickle": ("prompts.json", pickle.dumps(["red circle"]),
                            r"prompts.json is not valid JSON"),  # JSON only: never unpickled
    "prompts_json_object": ("prompts.json", b'{"prompts": ["red"]}', "must be a list of prompt strings, got dict"),
    "prompts_json_number": ("prompts.json", b'["red", 3]', "must be a list of prompt strings; item 1 is int 3"),
    "caption_dropout_one": ("pipeline.json", b'{"caption_dropout": 1.0}',
                            r"caption_dropout must be None \(unknown\) or the training's rate in \[0, 1\), got 1.0"),
    "caption_dropout_text": ("pipeline.json", b'{"caption_dropout": "yes"}', "caption_dropout must be None"),
}


@pytest.mark.parametrize("case", list(TEXT_CASES))
def test_saved_text_pipeline_with_bad_files(saved_text, tmp_path, case):
    name, content, message = TEXT_CASES[case]
    folder = tmp_path / "p"
    shutil.copytree(saved_text, folder)
    (folder / "rqtransformer" / name if name == "prompts.json" else folder / name).write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        RQPipeline.from_pretrained(folder, device="cpu")
    one_line(str(info.value))


# ---- training CLIs (in-process: the same run_cli wrapper as `python -m ...`) ----------------------

def cli_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2, err
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # before it: progress bars (stage 2 encodes the data) or argparse's usage
    assert last.startswith("error: ") or (err.startswith("usage:") and ": error: " in last), err
    return last


def bad_data_dir(root: Path, kind: str, odd: dict) -> Path:
    from conftest import make_image_folder

    if kind == "no_images":
        (root / "cls").mkdir(parents=True)
        (root / "cls" / "readme.txt").write_text("no images here")
        return root
    make_image_folder(root, per_class=2)
    target = root / "circles" / f"{kind}.png"
    if kind == "bomb":
        target.write_bytes(odd["bomb"].read_bytes())
    elif kind == "big":
        target.write_bytes(odd["big"].read_bytes())
    elif kind == "empty_file":
        target.write_bytes(b"")
    else:
        target.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


STAGE1_CASES = [
    ("bomb", ["bomb.png", "too large", "40,000,000 pixels"]),
    ("big", ["big.png", "too large (7000x7000)", "40,000,000 pixels"]),
    ("empty_file", ["empty_file.png", "unreadable image"]),
    ("resolution_20", ["resolution 20 is not divisible by downsample 8"]),
    ("config_negative_codebook", ["codebook_size must be >= 1"]),
    ("config_not_object", ["expected a JSON object"]),
    ("resume_partial", ["not a complete checkpoint-N folder"]),
    ("warmup_negative", ["--lr_warmup_steps must be >= 0"]),
    ("perceptual_negative", ["--perceptual_weight must be >= 0"]),
    ("checkpointing_steps_0", ["--checkpointing_steps", "expected a whole number >= 1, got 0"]),
]


@pytest.mark.parametrize("case, message", STAGE1_CASES, ids=[c for c, _ in STAGE1_CASES])
def test_stage1_cli_bad_input(tmp_path, capsys, image_dir, odd, case, message):
    from training.train_rqvae import main

    data, extra = image_dir, []
    if case in ("bomb", "big", "empty_file"):
        data = bad_data_dir(tmp_path / "data", case, odd)
    elif case == "resolution_20":
        extra = ["--resolution", "20"]
    elif case.startswith("config_"):
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps([1, 2] if case == "config_not_object" else {"codebook_size": -1}))
        extra = ["--config", str(cfg)]
    elif case == "resume_partial":
        extra = resume_from_partial(tmp_path / "o", 4)
    elif case == "warmup_negative":
        extra = ["--lr_warmup_steps", "-1"]
    elif case == "perceptual_negative":
        extra = ["--perceptual_weight", "-1"]
    elif case == "checkpointing_steps_0":
        extra = ["--checkpointing_steps", "0"]
    argv = ["--data_dir", str(data), "--output_dir", str(tmp_path / "o"), *FAST1, "--max_train_steps", "1", *extra]
    err = cli_error(main, argv, capsys)
    for part in message:
        assert part in err, err


def resume_from_partial(output_dir, step: int) -> list[str]:
    """CLI args pointing --resume_from_checkpoint at a checkpoint whose save never finished."""
    partial = output_dir / f".tmp-checkpoint-{step}"
    partial.mkdir(parents=True)
    return ["--resume_from_checkpoint", str(partial)]


STAGE2_CASES = [
    ("no_images", ["contains no images"]),
    ("corrupt", ["unreadable image", "corrupt.png"]),
    ("bomb", ["bomb.png", "too large", "40,000,000 pixels"]),
    ("rqvae_empty", ["--rqvae", "is neither a model folder (no config.json) nor a pipeline folder"]),
    ("rqvae_garbage_weights", ["not a readable safetensors file"]),
    ("validation_missing", ["data folder", "does not exist"]),
    ("config_wrong_type", ["field 'dim' must be an integer"]),
    ("config_heads", ["dim (30) must be divisible by heads (4)"]),
    ("resume_partial", ["not a complete checkpoint-N folder"]),
    ("batch_size_0", ["--train_batch_size", "expected a whole number >= 1, got 0"]),
]


@pytest.mark.parametrize("case, message", STAGE2_CASES, ids=[c for c, _ in STAGE2_CASES])
def test_stage2_cli_bad_input(tmp_path, capsys, image_dir, vae_dir, odd, case, message):
    from training.train_rqtransformer import main

    data, rqvae, extra = image_dir, vae_dir, []
    if case in ("no_images", "corrupt", "bomb"):
        data = bad_data_dir(tmp_path / "data", case, odd)
    elif case == "rqvae_empty":
        rqvae = tmp_path / "empty_vae"
        rqvae.mkdir()
    elif case == "rqvae_garbage_weights":
        (vae_dir / "model.safetensors").write_bytes(b"\x00" * 64)
    elif case == "validation_missing":
        extra = ["--validation_dir", str(tmp_path / "nowhere")]
    elif case.startswith("config_"):
        cfg = tmp_path / "cfg.json"
        base = dict(dim=32, heads=2, spatial_layers=1, depth_layers=1, dropout=0.0)
        cfg.write_text(json.dumps({**base, "dim": "big"} if case == "config_wrong_type" else {**base, "dim": 30,
                                                                                              "heads": 4}))
        extra = ["--config", str(cfg)]
    elif case == "resume_partial":
        extra = resume_from_partial(tmp_path / "o", 2)
    elif case == "batch_size_0":
        extra = ["--train_batch_size", "0"]
    argv = ["--rqvae", str(rqvae), "--data_dir", str(data), "--output_dir", str(tmp_path / "o"), *FAST2,
            "--max_train_steps", "1", *extra]
    err = cli_error(main, argv, capsys)
    for part in message:
        assert part in err, err
