"""The evaluation command on a tiny saved pipeline."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from pipelines import EXACT_CPU, RQPipeline
from rqtransformer import RQTransformer, RQTransformerConfig
from rqtransformer.losses import per_depth_nll
from training.cli import run_cli
from training.data import captioned_image_folder
from evaluation.evaluate import main
from training.reconstruction import evaluate_depths


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
    assert all(5 < report[f"psnr_depth{k}"] < 60 for k in (1, 2))  # dB; whether depth 2 helps a tiny model varies
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

    from evaluation.figures import main as figures

    figures(["--weights", str(weights), "--data_dir", str(image_dir), "--out", str(tmp_path / "docs"),
             "--per_class", "3"])
    for name in ("samples.png", "depths.png", "completion.png"):
        with Image.open(tmp_path / "docs" / name) as im:
            assert im.width > 16 and im.height > 16


# ---- captioned style folders (emoji in styles: the styles are classes, the names prompts) ----------------

STYLES = ("circles", "squares")  # tiny_text_pipeline(num_classes=2)'s class names
# (name, category): names from the tiny tokenizer's captions; the category decides the shape drawn
EMOJI = [("red circle", "round"), ("blue square", "boxy"), ("green star", "round"), ("yellow star", "boxy"),
         ("big blue circle", "round")]
HELD_EMOJI, HELD_PAIRS = {"yellow star"}, {("blue square", "squares"), ("green star", "circles")}


def make_style_folder(root, size=20):
    """<root>/{train,test}/<style>/<n>.png + metadata.jsonl per split: the category gives the shape, the name
    the colour, the style the background; 'yellow star' held out in every style, two (emoji, style) pairs."""
    from PIL import Image, ImageDraw

    rows = {"train": [], "test": []}
    for si, style in enumerate(STYLES):
        for n, (name, category) in enumerate(EMOJI):
            heldout = "emoji" if name in HELD_EMOJI else "pair" if (name, style) in HELD_PAIRS else None
            split = "test" if heldout else "train"
            im = Image.new("RGB", (size, size), (255, 255, 255) if si == 0 else (200, 200, 160))
            fill = (60 * n % 256, 255 - 50 * n, 120)
            box = (3 + n % 3, 3, size - 3, size - 3 - n % 2)
            (ImageDraw.Draw(im).ellipse if category == "round" else ImageDraw.Draw(im).rectangle)(box, fill=fill)
            (root / split / style).mkdir(parents=True, exist_ok=True)
            im.save(root / split / style / f"{n}.png")
            row = {"file_name": f"{style}/{n}.png", "text": name, "unified": f"1F{600 + n}", "category": category}
            rows[split].append(row | ({"heldout": heldout} if heldout else {}))
    for split, items in rows.items():
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return root


@pytest.fixture(scope="module")
def text_weights(tmp_path_factory):
    from conftest import tiny_text_pipeline

    path = tmp_path_factory.mktemp("text_eval") / "w"
    tiny_text_pipeline(num_classes=2).save_pretrained(path)
    return path


@pytest.fixture
def styles(tmp_path):
    return make_style_folder(tmp_path / "emoji")


def test_captioned_styles_report_pairs_consistency_and_speed(text_weights, styles, tmp_path, capsys, one_thread):
    out = tmp_path / "eval"
    report = main(["--weights", str(text_weights), "--data_dir", str(styles / "test"), "--train_dir",
                   str(styles / "train"), "--out", str(out), "--classifier_steps", "3",
                   "--classifier", str(tmp_path / "judge.safetensors")])
    assert report["test_images"] == 4 and report["train_images"] == 6 and report["judge_categories"] == 2
    assert report["psnr_depth1"] > 0 and 0 < report["codebook_usage"] <= 1
    assert set(report["per_style"]) == set(STYLES)
    for style, row in report["per_style"].items():
        assert row["test_images"] == 2 and row["psnr_depth1"] > 0 and row["pairs"] == 1 and row["heldout_emoji"] == 1
        # a style has 5 real images, fewer than the 10 nearest: every held-out pair is found
        assert row["pair_retrieval_top10"] == 1.0
    assert {"nll_depth1", "nll_depth2", "perplexity_depth2", "nll_mean_heldout_pair",
            "nll_mean_heldout_emoji"} <= set(report)
    assert all(math.isfinite(report[f"prompt_information_heldout_{k}"]) for k in ("pair", "emoji"))
    # the test NLL is that of each image's own prompt and style (not the empty prompt's)
    pipe = RQPipeline.from_pretrained(text_weights, device="cpu", **EXACT_CPU)
    test = captioned_image_folder(styles / "test", 32).images()[0]
    codes = pipe.rqvae.encode(torch.stack([test[i][0] for i in range(len(test))]))
    text = pipe.transformer.tokenizer.encode(test.captions, 6)[0]
    labels = torch.tensor(test.targets)
    nll = per_depth_nll(pipe.transformer, codes, labels, text_tokens=text)
    assert report["nll_depth1"] == pytest.approx(float(nll[0]), rel=1e-3)
    assert report["nll_mean"] == pytest.approx(float(nll.mean()), rel=1e-3)
    assert float(per_depth_nll(pipe.transformer, codes, labels).mean()) != pytest.approx(report["nll_mean"], rel=1e-3)
    # per held-out kind (one pass per image in the report): the NLL and the prompt's information, by subset
    kinds = {json.loads(line)["file_name"]: json.loads(line).get("heldout")
             for line in (styles / "test" / "metadata.jsonl").read_text().splitlines()}
    kind_of = [kinds[os.path.relpath(path, test.root)] for path, _ in test.samples]
    for kind in ("pair", "emoji"):
        m = [i for i, k in enumerate(kind_of) if k == kind]
        named = per_depth_nll(pipe.transformer, codes[m], labels[m], text_tokens=text[m]).mean()
        empty = per_depth_nll(pipe.transformer, codes[m], labels[m]).mean()
        assert report[f"nll_mean_heldout_{kind}"] == pytest.approx(float(named), rel=1e-3)
        assert report[f"prompt_information_heldout_{kind}"] == pytest.approx(float(empty - named), abs=1e-3)
    images = torch.stack([test[i][0] for i in range(len(test))])
    for s, style in enumerate(test.classes):  # per style: the same figures as measured on its images alone
        alone = evaluate_depths(pipe.rqvae, images[torch.tensor(test.targets) == s])
        assert report["per_style"][style]["psnr_depth2"] == pytest.approx(alone["psnr_depth2"], abs=1e-3)
        assert report["per_style"][style]["codebook_usage"] == pytest.approx(alone["codebook_usage"], abs=1e-4)
    assert report["pairs"] == 2 and report["heldout_emoji"] == 2 and report["pair_retrieval_top10"] == 1.0
    # the reference queries (reconstructions; the emoji in its other style): fewer than 10 per style, all found
    assert report["pair_retrieval_top10_reconstruction"] == 1.0 and report["pair_retrieval_top10_other_styles"] == 1.0
    assert 1 <= report["pair_median_rank"] <= 5
    for key in ("judge_test_accuracy", "judge_accuracy_heldout_pair", "judge_accuracy_heldout_emoji",
                "pair_category_consistency", "heldout_emoji_category_consistency"):
        assert 0 <= report[key] <= 1, key
    for key in ("pair_category_consistency", "heldout_emoji_category_consistency"):
        ratio = report[key + "_ratio"]
        assert ratio is None if report["judge_test_accuracy"] == 0 else ratio >= 0
    assert report["sampling_seconds_per_image"] > 0 and report["sampling_batch"] == 4
    assert report["cpu"] and report["guidance_scale"] == 3.0 and report["samples_per_prompt"] == 4
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert json.loads((out / "report.json").read_text()) == report
    md = (out / "report.md").read_text()
    assert "| pair_retrieval_top10 | 1.0 |" in md and "| per_style | test_images |" in md and "| squares |" in md
    for name in ("pairs.png", "heldout_emoji.png", "trained_pairs.png"):
        assert (out / name).is_file()
    check_trained_pairs(report, pipe, styles, out)
    check_choose_examples(text_weights, styles, out, tmp_path, capsys)

    # a quick run: one pair and one held-out emoji image, the saved judge reused
    quick = main(["--weights", str(text_weights), "--data_dir", str(styles / "test"), "--train_dir",
                  str(styles / "train"), "--classifier", str(tmp_path / "judge.safetensors"),
                  "--max_pairs", "1", "--max_heldout_emoji", "1", "--trained_pairs", "0"])
    assert quick["pairs"] == 1 and quick["heldout_emoji"] == 1 and "trained_pairs" not in quick
    assert quick["judge_test_accuracy"] == report["judge_test_accuracy"]


def check_trained_pairs(report, pipe, styles, out):
    """The trained-pairs section: all 6 training pairs (fewer than --trained_pairs 320), ranked among a style's
    5 real images, the references beside them, and the NLL of the pairs with their name and without."""
    assert report["trained_pairs"] == 6
    for prefix in ("trained_pairs_", "trained_pairs_reconstruction_", "trained_pairs_other_styles_"):
        assert 0 <= report[prefix + "top1"] <= report[prefix + "top10"] == 1.0  # 5 images a style: all in the 10
        assert 1 <= report[prefix + "median_rank"] <= 5
    assert report["trained_pairs_top10_share_of_reconstruction"] == 1.0
    per = report["trained_pairs_per_category"]
    assert set(per) == {"round", "boxy"} and sum(row["pairs"] for row in per.values()) == 6
    train = captioned_image_folder(styles / "train", 32).images()[0]
    codes = pipe.rqvae.encode(torch.stack([train[i][0] for i in range(len(train))]))
    text = pipe.transformer.tokenizer.encode(train.captions, 6)[0]
    labels = torch.tensor(train.targets)
    named = per_depth_nll(pipe.transformer, codes, labels, text_tokens=text).mean()
    empty = per_depth_nll(pipe.transformer, codes, labels).mean()
    assert report["trained_pairs_nll_mean"] == pytest.approx(float(named), rel=1e-3)
    depths = per_depth_nll(pipe.transformer, codes, labels, text_tokens=text)
    assert [report[f"trained_pairs_nll_depth{d}"] for d in (1, 2)] == pytest.approx(depths.tolist(), rel=1e-3)
    # from the first code alone (depth D is trained_pairs_reconstruction_top10); 5 images a style: all found
    assert report["trained_pairs_reconstruction_depth1_top10"] == 1.0
    assert "trained_pairs_reconstruction_depth2_top10" not in report
    assert report["trained_pairs_prompt_information"] == pytest.approx(float(empty - named), abs=1e-3)
    listed = json.loads((out / "trained_pairs.json").read_text())
    assert len(listed) == 6 and {row["style"] for row in listed} == set(STYLES)
    assert {(row["text"], row["file_name"]) for row in listed} == {
        (c, os.path.relpath(path, train.root)) for c, (path, _) in zip(train.captions, train.samples)}
    assert all(1 <= row["rank"] <= 5 and 1 <= row["reconstruction_rank"] <= 5 for row in listed)
    assert "| trained_pairs_per_category | pairs |" in (out / "report.md").read_text()


def check_choose_examples(text_weights, styles, out, tmp_path, capsys):
    """evaluation.choose_examples on that evaluation's trained_pairs.json: the best pairs, distinct names, the first
    ones with their real image, the chosen names first in prompts.json; bad input is one line."""
    import shutil

    from evaluation import choose_examples

    weights = tmp_path / "w"
    shutil.copytree(text_weights, weights)
    args = ["--weights", str(weights), "--pairs", str(out / "trained_pairs.json"), "--train_dir", str(styles / "train")]
    chosen = choose_examples.main([*args, "--count", "3", "--images", "2"])
    listed = json.loads((out / "trained_pairs.json").read_text())
    assert len(chosen) == 3 == len({e["prompt"] for e in chosen}) and ["image" in e for e in chosen] == [True, True, False]
    best = min(r["rank"] for r in listed)
    first = next(r for r in listed if (r["text"], r["style"]) == (chosen[0]["prompt"], chosen[0]["class"]))
    assert first["rank"] == best
    for e in chosen[:2]:
        row = next(r for r in listed if (r["text"], r["style"]) == (e["prompt"], e["class"]))
        assert (weights / e["image"]).read_bytes() == (styles / "train" / row["file_name"]).read_bytes()
    pipe = RQPipeline.from_pretrained(weights, device="cpu")
    assert pipe.examples == chosen and pipe.prompts[:3] == [e["prompt"] for e in chosen]
    assert sorted(pipe.prompts) == sorted(RQPipeline.from_pretrained(text_weights, device="cpu").prompts)
    capsys.readouterr()
    (tmp_path / "bad.json").write_text("[{\"text\": 1}]")
    for pairs, message in ((tmp_path / "none.json", "does not exist: run evaluation.evaluate"),
                           (tmp_path / "bad.json", "expected evaluation.evaluate's trained_pairs.json")):
        with pytest.raises(SystemExit):
            run_cli(lambda: choose_examples.main([*args[:2], "--pairs", str(pairs), *args[4:]]))
        assert message in capsys.readouterr().err
    (tmp_path / "moons.json").write_text(json.dumps([{**listed[0], "style": "moons"}]))
    with pytest.raises(SystemExit):
        run_cli(lambda: choose_examples.main([*args[:2], "--pairs", str(tmp_path / "moons.json"), *args[4:]]))
    assert "has styles ['moons'] that" in capsys.readouterr().err


def test_choosing_examples_goes_round_the_categories_and_styles():
    from evaluation.choose_examples import choose

    rows = [{"text": f"n{i}", "style": f"s{i % 3}", "category": f"c{i % 2}", "rank": 1 + i % 4,
             "reconstruction_rank": 1, "file_name": f"{i}.png"} for i in range(20)]
    chosen = choose(rows, 6)
    assert [r["category"] for r in chosen] == ["c0", "c1"] * 3 and len({r["text"] for r in chosen}) == 6
    assert {r["style"] for r in chosen[:3]} == {"s0", "s1", "s2"} and chosen[0]["rank"] == 1
    assert len(choose(rows, 100)) == 20


def test_trained_pairs_take_the_same_share_of_each_category():
    from evaluation.trained import trained_pairs

    categories = ["a"] * 10 + ["b"] * 2 + ["c"] * 5
    assert trained_pairs(categories, 6) == [0, 9, 10, 11, 12, 16]  # 2 each: a category's first and last rows
    assert trained_pairs(categories, 100) == list(range(17))  # fewer rows than asked: all of them
    assert trained_pairs(categories, 1) == [0, 10, 12]  # at least one per category


def test_retrieval_ranks_count_only_nearer_images_of_the_query_style():
    from evaluation.text import retrieval_ranks

    gallery = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0], [1.0, 0.1]]), dim=1)
    gallery_styles = torch.tensor([0, 0, 0, 0, 1])  # the last image is nearest to query 0 but of another style
    query = F.normalize(torch.tensor([[1.0, 0.05], [0.0, 1.0]]), dim=1)
    ranks = retrieval_ranks(query, gallery, gallery_styles, torch.tensor([0, 0]), torch.tensor([2, 3]))
    assert ranks.tolist() == [3, 1]  # query 0: rows 0 and 1 are nearer than its target, row 4 is not its style


def test_captioned_styles_without_train_dir(text_weights, styles, one_thread):
    report = main(["--weights", str(text_weights), "--data_dir", str(styles / "test")])
    assert "psnr_depth2" in report and "nll_mean_heldout_emoji" in report and "pairs" not in report


def rewrite(meta, change):
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    meta.write_text("".join(json.dumps(change(r)) + "\n" for r in rows))


@pytest.mark.parametrize("spoil, message", [
    (lambda root: rewrite(root / "test" / "metadata.jsonl", lambda r: {k: v for k, v in r.items() if k != "category"}),
     "line 1: column 'category' is missing"),
    (lambda root: rewrite(root / "test" / "metadata.jsonl", lambda r: r | {"heldout": "maybe"}),
     'heldout must be "emoji", "pair" or absent'),
    (lambda root: rewrite(root / "train" / "metadata.jsonl", lambda r: r | {"heldout": "pair"}),
     "has held-out rows"),
    (lambda root: (root / "train" / "metadata.jsonl").unlink(), "has no metadata.jsonl"),
    (lambda root: ((root / "test" / "squares").rename(root / "test" / "triangles"), rewrite(
        root / "test" / "metadata.jsonl", lambda r: r | {"file_name": r["file_name"].replace("squares", "triangles")})),
     "has styles ['triangles'] the model does not know"),
])
def test_captioned_styles_refuse_bad_input(text_weights, styles, spoil, message, capsys):
    spoil(styles)
    with pytest.raises(SystemExit):
        run_cli(lambda: main(["--weights", str(text_weights), "--data_dir", str(styles / "test"),
                              "--train_dir", str(styles / "train")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_captioned_styles_need_a_text_and_class_model(styles, tmp_path, capsys):
    from conftest import tiny_pipeline

    tiny_pipeline().save_pretrained(tmp_path / "classes_only")
    with pytest.raises(SystemExit):
        run_cli(lambda: main(["--weights", str(tmp_path / "classes_only"), "--data_dir", str(styles / "test")]))
    assert "needs a model with prompts and style classes" in capsys.readouterr().err


def test_figures_of_a_text_model_show_a_row_per_prompt_and_a_column_per_style(text_weights, styles, tmp_path,
                                                                             one_thread):
    from PIL import Image

    from evaluation.figures import main as figures

    figures(["--weights", str(text_weights), "--data_dir", str(styles / "test"), "--out", str(tmp_path / "docs"),
             "--prompts", "red circle, blue square, green star", "--scale", "1"])
    with Image.open(tmp_path / "docs" / "samples.png") as im:  # 3 rows x 2 styles of 32 px, 4 px padding
        assert im.size == (4 + 2 * 36, 4 + 3 * 36)
    for name in ("depths.png", "completion.png"):
        assert (tmp_path / "docs" / name).is_file()


def test_trained_pairs_must_be_a_count(text_weights, styles, capsys):
    with pytest.raises(SystemExit):
        main(["--weights", str(text_weights), "--data_dir", str(styles / "test"), "--trained_pairs", "-1"])
    assert "--trained_pairs: expected a whole number >= 0, got -1" in capsys.readouterr().err
