"""Text-to-image training end to end: a captioned folder -> stage 2 with a prompt tokenizer -> samples that
follow the prompt (the test that proves the conditioning works); captions with classes, bad captions, exact
resume, --init_from between text and class models, and stage 1 on a captioned folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import RQPipeline
from rqtransformer import RQTransformer
from rqtransformer.losses import per_depth_nll
from rqvae import RQVAE
from training import train_rqvae
from training.cli import run_cli
from training.data import captioned_image_folder
from training.captions import caption_rows, prompt_batch, spread
from training.colour_toy import COLOURS, SHAPES, colour_image, colour_rqvae, dominant_colour
from training.train_rqtransformer import main

from conftest import FAST1, FAST2, make_image_folder

@pytest.fixture(autouse=True, scope="module")
def one_thread():  # tiny models on shared cores: one intra-op thread is faster, and calmer under load
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_colour_folder(root, per_caption=2, seed=0):
    """16 px images, all at the root: a circle or a square in a darker shade of the background's colour,
    captioned "<colour> <shape>" in metadata.jsonl."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    rows = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for i in range(per_caption):
                name = f"{colour}-{shape}-{i}.png"
                Image.fromarray(colour_image(rgb, shape, rng)).save(root / name)
                rows.append({"file_name": name, "text": f"{colour} {shape}"})
    write_metadata(root, rows)
    return root


def write_metadata(root, rows) -> None:
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_folder(tmp_path_factory.mktemp("colours") / "data")


@pytest.fixture(scope="module")
def colour_vae(colours, tmp_path_factory):
    """A tiny RQ-VAE fitted to the colour images (a minute's stage 1 in a few seconds): it must decode the
    colours right, or the test below would measure the RQ-VAE instead of the prompts."""
    ds = captioned_image_folder(colours, 16)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    vae = colour_rqvae(images, steps=200)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images)) * 0.5 + 0.5
    assert torch.equal(dominant_colour(decoded), dominant_colour(images * 0.5 + 0.5))
    folder = tmp_path_factory.mktemp("colour_vae") / "vae"
    vae.save_pretrained(folder)
    return folder


def test_samples_follow_the_prompt(colours, colour_vae, tmp_path):
    """After a short training through the real entry point, guided samples of every prompt have the prompt's
    colour (>= 90 %); samples of the empty prompt are near chance (25 %) against the same targets."""
    out = tmp_path / "run"
    main(["--rqvae", str(colour_vae), "--data_dir", str(colours), "--output_dir", str(out), "--config", "tiny",
          "--train_batch_size", "16", "--max_train_steps", "800", "--learning_rate", "3e-3", "--lr_warmup_steps",
          "10", "--ema_decay", "0", "--max_text_len", "8", "--report_to", "none", "--validation_steps", "1000",
          "--checkpointing_steps", "1000"])
    prompts = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    saved = json.loads((out / "rqtransformer" / "prompts.json").read_text())
    assert sorted(saved) == sorted(prompts) and saved[:5] == spread(sorted(prompts), 5)  # the app's examples first
    assert (out / "samples" / "prompts.txt").read_text().split("\n")[:-1] == sorted(prompts)  # grid rows
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    pipe.max_images = 64
    per_prompt = 8
    target = torch.tensor([list(COLOURS).index(p.split()[0]) for p in prompts]).repeat_interleave(per_prompt)
    # guidance 2: at 3, a model this small now and then takes a code its conditional logits give ~1e-5, because
    # the unconditional ones give it far less (CFG amplifies that ratio); 98-100 % over seeds at 2, 72-97 % at 3
    guided = pipe(prompt=[p for p in prompts for _ in range(per_prompt)], guidance_scale=2.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").images
    hits = (dominant_colour(guided) == target).float().mean()
    empty = pipe(num_images=len(target), guidance_scale=2.0, generator=torch.Generator().manual_seed(0),
                 output_type="pt").images
    by_chance = (dominant_colour(empty) == target).float().mean()
    assert hits >= 0.9, f"{hits:.0%} of guided samples have the prompt's colour"
    assert by_chance <= 0.5, f"{by_chance:.0%} of empty-prompt samples have the colour of the paired prompt"
    assert len(dominant_colour(empty).unique()) >= 3  # the empty prompt: the data's mix, not one colour


# ---- captions with classes, validation, the grid and prompts.json ------------------------------------

def captioned_classes(root, per_class=4, second_caption=True):
    """make_image_folder's two class folders, each image captioned "<colour word> <shape> <i>"; with
    `second_caption` the first image of each class has a second row (COCO-style multi-captions)."""
    make_image_folder(root, per_class=per_class)
    rows = []
    for cls, words in (("circles", "pale round"), ("squares", "bright boxy")):
        for i in range(per_class):
            rows.append({"file_name": f"{cls}/{i}.png", "text": f"{words} shape {i}"})
        if second_caption:
            rows.append({"file_name": f"{cls}/0.png", "text": f"another {cls[:-1]}"})
    write_metadata(root, rows)
    return root


def test_captions_and_classes_combine(vae_dir, tmp_path, capsys):
    """Class folders give classes, metadata.jsonl gives prompts; the held-out NLL is the model's on each
    (image, class, caption) of --validation_dir, and the files the app reads are there."""
    data = captioned_classes(tmp_path / "data")
    out = tmp_path / "out"
    main(["--rqvae", str(vae_dir), "--data_dir", str(data), "--validation_dir", str(data), "--output_dir", str(out),
          *FAST2, "--max_train_steps", "2", "--max_text_len", "6", "--text_vocab_size", "300"])
    stdout = capsys.readouterr().out
    assert "10 code stacks" in stdout and "2 classes; 10 captions (10 distinct)" in stdout  # 8 images, 10 rows
    model = RQTransformer.from_pretrained(out / "rqtransformer")
    assert model.config.class_names == ["circles", "squares"] and model.config.max_text_len == 6
    assert model.config.text_vocab_size == model.tokenizer.vocab_size <= 300
    assert (out / "rqtransformer" / "tokenizer.json").is_file()

    ds = captioned_image_folder(data, 16)
    vae = RQVAE.from_pretrained(vae_dir)
    codes = vae.encode(torch.stack([ds[i][0] for i in range(len(ds))]))
    ids, _ = model.tokenizer.encode(ds.captions, 6)
    expected = per_depth_nll(model, codes, torch.tensor(ds.targets), text_tokens=ids).mean()
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["val/loss"] == pytest.approx(float(expected), rel=1e-5)

    captions = json.loads((out / "rqtransformer" / "prompts.json").read_text())
    assert sorted(captions) == sorted(set(ds.captions))
    with Image.open(out / "samples" / "samples-0000002.png") as grid:  # 8 of the 10 prompts, 2 samples each
        assert grid.size == (2 + 2 * (16 + 2), 2 + 8 * (16 + 2))
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    images = pipe("squares", prompt="another square", num_images=2, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2


def test_unconditional_ignores_classes_not_captions(vae_dir, tmp_path):
    data = captioned_classes(tmp_path / "data", per_class=2)
    main(["--rqvae", str(vae_dir), "--data_dir", str(data), "--output_dir", str(tmp_path / "u"), *FAST2,
          "--max_train_steps", "1", "--unconditional"])
    config = RQTransformer.from_pretrained(tmp_path / "u" / "rqtransformer").config
    assert config.num_classes == 0 and config.max_text_len == 32 and config.text_vocab_size > 256


def test_caption_rows_pair_every_view_with_every_caption():
    # images 0, 1, 2 encoded with flips (rows 3..5); image 1 has two captions, image 2 none
    index = torch.tensor([0, 1, 2, 0, 1, 2])
    image_of = torch.tensor([0, 1, 1])  # caption -> image
    rows, captions = caption_rows(index, image_of)
    assert list(zip(rows.tolist(), captions.tolist())) == [(0, 0), (1, 1), (1, 2), (3, 0), (4, 1), (4, 2)]


def test_prompt_spreads():
    captions = [f"caption {i:04d}" for i in range(1000) for _ in range(2)]  # two rows each
    saved = spread(list(dict.fromkeys(captions)), 300)
    assert len(saved) == len(set(saved)) == 300 and saved[0] == "caption 0000" and saved[-1] == "caption 0999"
    prompts, labels, per_prompt = prompt_batch(captions, [i // 200 for i in range(2000)], 4)
    assert per_prompt == 4 and len(prompts) == 32 and len(set(prompts)) == 8
    assert prompts[0] == "caption 0000" and prompts[-1] == "caption 0999" and labels[0] == 0 and labels[-1] == 9
    assert prompt_batch(["a", "b"], None, 100) == (["a"] * 32 + ["b"] * 32, None, 32)  # within 64 images


# ---- bad input: one line, exit 2, nothing encoded ------------------------------------------------------

def run(argv, capsys, one_line: bool = True) -> str:
    """The error output of a refused run (exit 2): one line, or argparse's usage + error for bad flag values."""
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and (not one_line or (err.startswith("error: ") and err.count("\n") == 1)), err
    return err


@pytest.mark.parametrize("row, extra, message", [
    ({"file_name": "circles/0.png"}, [], "metadata.jsonl line 1: caption column 'text' is missing"),
    ({"file_name": "circles/0.png", "caption": "a"}, ["--caption_column", "label"],
     "metadata.jsonl line 1: caption column 'label' is missing"),
    ({"file_name": "circles/9.png", "text": "a"}, [], "metadata.jsonl line 1: file_name 'circles/9.png' does not exist"),
    ({"file_name": "circles/0.png", "text": "  "}, [], "metadata.jsonl line 1: caption 'text' of circles/0.png is empty"),
    ({"file_name": "circles/0.png", "text": 7}, [], "metadata.jsonl line 1: caption 'text' must be a string"),
])
def test_bad_captions_are_one_line(vae_dir, tmp_path, capsys, row, extra, message):
    data = captioned_classes(tmp_path / "data", per_class=2)
    write_metadata(data, [row])
    out = tmp_path / "out"
    err = run(["--rqvae", str(vae_dir), "--data_dir", str(data), "--output_dir", str(out), *FAST2, *extra], capsys)
    assert message in err
    assert not list(out.glob("codes-*")) and not list(out.glob("tokens-*"))  # refused before any encoding


def test_captions_needed_where_the_options_ask_for_them(vae_dir, image_dir, tmp_path, capsys):
    base = ["--rqvae", str(vae_dir), "--output_dir", str(tmp_path / "out"), *FAST2]
    err = run([*base, "--data_dir", str(image_dir), "--caption_dropout", "0.2"], capsys)
    assert f"--caption_dropout needs captions: --data_dir {image_dir} has no metadata.jsonl" in err
    data = captioned_classes(tmp_path / "data", per_class=2)
    err = run([*base, "--data_dir", str(data), "--validation_dir", str(image_dir)], capsys)
    assert f"--validation_dir {image_dir} has no metadata.jsonl: the held-out loss of a caption model" in err
    root_only = make_colour_folder(tmp_path / "flat", per_caption=1)  # captioned, no class folders
    err = run([*base, "--data_dir", str(data), "--validation_dir", str(root_only)], capsys)
    assert "has no classes but --data_dir" in err and "has classes ['circles', 'squares']" in err
    err = run([*base, "--data_dir", str(data), "--text_vocab_size", "100"], capsys, one_line=False)
    assert "--text_vocab_size must be at least 257" in err
    err = run([*base, "--data_dir", str(data), "--caption_dropout", "1"], capsys, one_line=False)
    assert "--caption_dropout must be in [0, 1)" in err


# ---- resume and fine-tuning -------------------------------------------------------------------------------

@pytest.mark.parametrize("paper", [False, True], ids=["plain", "stochastic-soft"])
def test_resume_is_exact_with_captions(vae_dir, tmp_path, capsys, paper):
    """4 steps straight == 2 + resume + 2, with caption and class dropout drawing every step; the resumed
    run reuses the tokenizer and the token and code caches."""
    data = captioned_classes(tmp_path / "data", per_class=3)
    base = ["--rqvae", str(vae_dir), "--data_dir", str(data), *FAST2, "--checkpointing_steps", "2", "--hflip",
            "--caption_dropout", "0.5", "--max_text_len", "4"]
    if paper:
        base += ["--stochastic_codes", "--soft_labels"]
    main([*base, "--output_dir", str(tmp_path / "a"), "--max_train_steps", "4"])
    main([*base, "--output_dir", str(tmp_path / "b"), "--max_train_steps", "2"])
    b = tmp_path / "b"
    cached = sorted([*b.glob("codes-*"), *b.glob("tokens-*"), *b.glob("tokenizer-*")])
    assert len(cached) == 3
    stamps = [p.stat().st_mtime_ns for p in cached]
    capsys.readouterr()
    main([*base, "--output_dir", str(b), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    assert "at step 2" in capsys.readouterr().out
    assert sorted([*b.glob("codes-*"), *b.glob("tokens-*"), *b.glob("tokenizer-*")]) == cached
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    first, second = (RQTransformer.from_pretrained(tmp_path / n / "rqtransformer") for n in "ab")
    for key, value in first.state_dict().items():
        torch.testing.assert_close(second.state_dict()[key], value, msg=key)
    assert first.tokenizer.tokenizer.to_str() == second.tokenizer.tokenizer.to_str()


def test_init_from_a_text_model_reuses_its_tokenizer(vae_dir, tmp_path):
    first = captioned_classes(tmp_path / "first", per_class=2)
    base = ["--rqvae", str(vae_dir), *FAST2, "--ema_decay", "0", "--max_train_steps", "1"]
    main([*base, "--data_dir", str(first), "--output_dir", str(tmp_path / "a"), "--max_text_len", "5"])
    other = captioned_classes(tmp_path / "other", per_class=2, second_caption=False)
    write_metadata(other, [{"file_name": f"{c}/{i}.png", "text": f"quite different words {c} {i}"}
                           for c in ("circles", "squares") for i in range(2)])
    main([*base, "--data_dir", str(other), "--output_dir", str(tmp_path / "b"), "--init_from", str(tmp_path / "a"),
          "--learning_rate", "1e-12"])  # a pipeline folder: its rqtransformer/
    assert not list((tmp_path / "b").glob("tokenizer-*"))  # not trained again
    a, b = (tmp_path / n / "rqtransformer" for n in "ab")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tuned, given = RQTransformer.from_pretrained(b), RQTransformer.from_pretrained(a)
    assert tuned.config == given.config
    for key, value in given.state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[key], value, msg=key)
    assert "quite different words circles 0" in json.loads((b / "prompts.json").read_text())


def test_init_from_refuses_text_and_class_models_for_each_other(vae_dir, image_dir, tmp_path, capsys):
    data = captioned_classes(tmp_path / "data", per_class=2)
    base = ["--rqvae", str(vae_dir), *FAST2, "--max_train_steps", "1"]
    main([*base, "--data_dir", str(data), "--output_dir", str(tmp_path / "text")])
    main([*base, "--data_dir", str(image_dir), "--output_dir", str(tmp_path / "classes")])
    text, classes = tmp_path / "text" / "rqtransformer", tmp_path / "classes" / "rqtransformer"
    capsys.readouterr()
    err = run([*base, "--data_dir", str(image_dir), "--output_dir", str(tmp_path / "o1"), "--init_from", str(text)],
              capsys)
    assert f"--init_from {text} is a text-conditioned model but --data_dir {image_dir} has no captions" in err
    err = run([*base, "--data_dir", str(data), "--output_dir", str(tmp_path / "o2"), "--init_from", str(classes)],
              capsys)
    assert f"--init_from {classes} has no text conditioning but --data_dir" in err and "is captioned" in err
    err = run([*base, "--data_dir", str(data), "--output_dir", str(tmp_path / "o3"), "--init_from", str(text),
               "--text_vocab_size", "500"], capsys)
    assert "brings its own tokenizer: drop --text_vocab_size" in err
    err = run([*base, "--data_dir", str(data), "--output_dir", str(tmp_path / "o4"), "--init_from", str(text),
               "--max_text_len", "7"], capsys)
    assert "--max_text_len 7 differs from --init_from's 32" in err


# ---- stage 1 ----------------------------------------------------------------------------------------------

def test_stage1_trains_on_a_captioned_folder(tmp_path, capsys):
    """Images at the root, no class folders, one image with two captions: each file is trained on once."""
    data = make_colour_folder(tmp_path / "flat", per_caption=1)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    write_metadata(data, [*rows, {"file_name": "red-circle-0.png", "text": "a second caption"}])
    out = tmp_path / "vae"
    train_rqvae.main(["--data_dir", str(data), "--output_dir", str(out), *FAST1, "--max_train_steps", "2"])
    assert "8 images (no class folders)" in capsys.readouterr().out
    assert RQVAE.from_pretrained(out).config.resolution == 16
    assert json.loads((out / "training_summary.json").read_text())["step"] == 2

