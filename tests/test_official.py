"""The official checkpoints' converter: exact parity with the official code on committed fixtures (made by
running the official source at tiny sizes with random weights: tests/fixtures/official/), and its refusals."""
from __future__ import annotations

import json
import pickle
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines import EXACT_CPU, RQPipeline
from rqtransformer.sampling import sample_logits
from official import layout as official
from official.convert import main as convert

FIXTURES = Path(__file__).parent / "fixtures" / "official"
ROOT = Path(__file__).resolve().parents[1]
KINDS = ("uncond", "class", "text")
TOL = 1e-4  # max abs, float32 on CPU (the bound)


def expected(kind: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / kind / "expected.safetensors"))


def run_convert(out: Path, kind: str | None = None, *extra: str) -> Path:
    args = ["--rqvae", str(FIXTURES / "stage1"), "--output_dir", str(out), *extra]
    if kind:
        args += ["--rqtransformer", str(FIXTURES / kind)]
    if kind == "text":
        args += ["--tokenizer", str(FIXTURES / "text" / "tokenizer")]
    convert(args)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, RQPipeline]:
    root = tmp_path_factory.mktemp("converted")
    # float32 weights: parity with the official code is exact only without the CPU default's rounding
    return {kind: RQPipeline.from_pretrained(run_convert(root / kind, kind), device="cpu", **EXACT_CPU)
            for kind in KINDS}


def cond_args(kind: str, cond: torch.Tensor) -> dict:
    return {"uncond": {}, "class": {"class_labels": cond.long()}, "text": {"text_tokens": cond.long()}}[kind]


# ---- stage 1 ----------------------------------------------------------------------------------------------

def test_stage1_codes_and_decodes_match_the_official_code(converted):
    vae, ref = converted["uncond"].rqvae, expected("stage1")
    with torch.inference_mode():
        latents = vae.encode_latents(ref["images"])  # [B, h, w, C]
        codes = vae.encode(ref["images"])
        decoded = vae.decoder(vae.embed_codes(codes))  # before decode()'s clamp: the official one has none
        first = vae.decoder(vae.embed_codes(codes, depth=1))
    assert (latents - ref["latents"]).abs().max() < TOL
    assert torch.equal(codes, ref["codes"].long())
    assert len(codes[..., -1].unique()) > 3  # the fixture exercises every depth, not one repeated code
    assert (decoded - ref["decoded"]).abs().max() < TOL
    assert (first - ref["decoded_first"]).abs().max() < TOL


def test_rqvae_alone_writes_an_rqvae_folder(tmp_path):
    from rqvae import RQVAE

    out = run_convert(tmp_path / "vae")
    assert (out / "README.md").is_file() and not (out / "rqtransformer").exists()
    vae = RQVAE.from_pretrained(out)
    assert torch.equal(vae.encode(expected("stage1")["images"]), expected("stage1")["codes"].long())


# ---- stage 2 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_teacher_forced_logits_match(converted, kind):
    ref, tf = expected(kind), converted[kind].transformer
    with torch.inference_mode():
        logits = tf(ref["codes"].long(), **cond_args(kind, ref["cond"]))
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max() < TOL


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_sampling_gives_the_official_codes(converted, kind, use_cache):
    ref, tf = expected(kind), converted[kind].transformer
    B = len(ref["greedy"])
    cond = cond_args(kind, ref["cond"])
    codes = tf.generate(**cond, num_samples=None if cond else B, top_k=1, use_cache=use_cache)
    assert torch.equal(codes, ref["greedy"].long())
    if "greedy_uncached" in ref:
        assert torch.equal(ref["greedy_uncached"], ref["greedy"])


@pytest.mark.parametrize("k,p", [(16, 1.0), (8, 0.92), (64, 0.7), (4, None)])
def test_sampling_filters_draw_from_the_official_distribution(k, p):
    """top-k keeps ties at the k-th value and top-p runs on the kept codes, as the official sampler."""
    ref = load_file(str(FIXTURES / "class" / "expected.safetensors"))
    logits, probs = ref["filter_logits"], ref[f"probs_k{k}_p{p}"]  # [N, K] each
    n = 20_000
    rows = logits.repeat_interleave(n, 0)  # [N*n, K]
    draws = sample_logits(rows, top_k=k, top_p=p, generator=torch.Generator().manual_seed(0))
    counts = torch.zeros_like(probs)
    counts.scatter_add_(1, draws.view(len(probs), n), torch.ones(len(probs), n))
    freq = counts / n
    assert torch.equal(freq > 0, probs > 0) or not ((freq > 0) & (probs == 0)).any()  # never outside the support
    # within 5 standard deviations of a multinomial count, everywhere
    assert ((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-9).all()


def test_per_depth_sampling_settings_come_from_the_config(converted):
    pipe = converted["class"]
    assert pipe.top_k == [16, 8, 4, 2] and pipe.top_p == 0.92
    assert converted["uncond"].top_k == 16
    out = pipe("3", num_images=2, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (2, 3, 32, 32)


# ---- guidance, classes, text ------------------------------------------------------------------------------

def test_guidance_is_off_with_one_clear_line(converted):
    pipe = converted["class"]
    assert pipe.default_guidance_scale == 1.0 and not pipe.guidance
    with pytest.raises(ValueError, match="null.*never trained") as e:
        pipe("3", guidance_scale=3.0)
    assert "\n" not in str(e.value)
    pipe("3", guidance_scale=1.0, generator=torch.Generator().manual_seed(0))  # 1 is fine


@pytest.mark.parametrize("kind", KINDS)
def test_converted_models_batch_concurrent_requests(converted, kind):
    """The official layouts (no start token for text, per-depth filters) through the batcher: each request's
    images are the ones it gets alone."""
    from pipelines.batching import Batcher

    from test_batching import Held

    pipe = converted[kind]
    ask = {"uncond": [dict(num_images=2), dict(num_images=1, temperature=0.8)],
           "class": [dict(class_labels="3", num_images=2), dict(class_labels=["0", "5"], top_k=4)],
           "text": [dict(prompt="a cat", num_images=2), dict(prompt=["a dog", "the sea"], top_p=0.9)]}[kind]
    seeded = [{**a, "generator": torch.Generator().manual_seed(i)} for i, a in enumerate(ask)]
    batcher = Batcher(pipe)
    results = Held(batcher).send(seeded)
    assert batcher.batches == 1
    for i, (a, outs) in enumerate(zip(ask, results)):
        assert torch.equal(outs[-1].codes, pipe(**a, generator=torch.Generator().manual_seed(i)).codes)


def test_text_tokenizer_gives_the_official_ids(converted):
    tf = converted["text"].transformer
    meta = json.loads((FIXTURES / "text" / "prompts.json").read_text(encoding="utf-8"))
    ids, _ = tf.tokenizer.encode(meta["prompts"], tf.config.max_text_len)
    assert ids.tolist() == meta["ids"]


@pytest.mark.skipif(not (FIXTURES / "tokenizer16k_expected.json").is_file(), reason="no 16k reference ids")
def test_the_real_16k_tokenizer_when_an_official_tree_is_given(tmp_path):
    """Runs only with RQ_OFFICIAL_TREE naming an extracted official repository (its BPE files are not ours)."""
    import os

    tree = os.environ.get("RQ_OFFICIAL_TREE")
    if not tree:
        pytest.skip("set RQ_OFFICIAL_TREE to an extracted official repository to check the 16k tokenizer")
    ref = json.loads((FIXTURES / "tokenizer16k_expected.json").read_text(encoding="utf-8"))
    folder = Path(tree) / "rqvae" / "txtimg_datasets" / "tokenizers" / "pretrained"
    tok = official.text_tokenizer(folder, {"dataset": {"txt_tok_name": "bpe16k_huggingface"}}, 16384 + 0)
    ids, _ = tok.encode(ref["prompts"], 32)
    assert ids.tolist() == ref["ids"]


# ---- the files the converter writes, and what it refuses --------------------------------------------------

def test_pipeline_folder_card_and_options(converted, tmp_path):
    out = converted["text"].folder
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "non-commercial" in card and official.SOURCE in card and "cond_classifier" in card
    options = json.loads((out / "pipeline.json").read_text())
    assert options["guidance"] is False and options["top_k"] == 64 and options["top_p"] == 0.7
    assert (out / "rqtransformer" / "tokenizer.json").is_file()
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in out.rglob("*"))


def test_float16_files_sample_with_float16_weights_on_the_cpu(tmp_path):
    from rqtransformer.cpu_weights import HalfWeightLinear

    out = run_convert(tmp_path / "half", "uncond", "--dtype", "float16")
    assert load_file(str(out / "rqtransformer" / "model.safetensors"))["head.weight"].dtype == torch.float16
    assert load_file(str(out / "rqvae" / "model.safetensors"))["decoder.conv_out.weight"].dtype == torch.float32
    pipe = RQPipeline.from_pretrained(out, device="cpu")
    if platform.machine() in ("x86_64", "AMD64"):  # fbgemm's float16 kernels: x86 only
        assert isinstance(pipe.transformer.head, HalfWeightLinear)
    assert pipe(num_images=1, output_type="pt").images.shape == (1, 3, 32, 32)


def test_ema_picks_state_dict_ema(tmp_path):
    pipe = RQPipeline.from_pretrained(run_convert(tmp_path / "ema", "class", "--ema"), device="cpu")
    ema = torch.load(FIXTURES / "class" / "model.pt", weights_only=True)["state_dict_ema"]
    assert torch.equal(pipe.transformer.depth_norm.weight, ema["classifier.layer_norm.weight"])


class Planted:
    """Unpickling this runs code (writes a file): a weights-only load must refuse it before that."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def copy_stage(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def test_a_planted_pickle_is_refused_in_one_line_and_runs_nothing(tmp_path):
    stage1 = copy_stage(tmp_path, "stage1")
    marker = tmp_path / "pwned"
    with open(stage1 / "model.pt", "wb") as f:
        pickle.dump({"state_dict": {}, "x": Planted(marker)}, f)
    proc = subprocess.run([sys.executable, "-m", "official.convert", "--rqvae", str(stage1),
                           "--output_dir", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and not marker.exists() and not (tmp_path / "out").exists()
    assert proc.stderr.count("\n") == 1 and "weights-only load refuses" in proc.stderr, proc.stderr


def convert_error(*args: str) -> str:
    with pytest.raises(ValueError) as e:
        convert(list(args))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_unsafe_yaml_is_refused(tmp_path):
    stage1 = copy_stage(tmp_path, "stage1")
    (stage1 / "config.yaml").write_text("arch: !!python/object/apply:os.system ['touch pwned']\n")
    assert "not plain YAML" in convert_error("--rqvae", str(stage1), "--output_dir", str(tmp_path / "o"))


def test_keys_and_shapes_that_do_not_match_the_config(tmp_path):
    stage1 = copy_stage(tmp_path, "stage1")
    data = torch.load(stage1 / "model.pt", weights_only=True)
    del data["state_dict"]["encoder.conv_in.weight"]
    torch.save(data, stage1 / "model.pt")
    assert "no tensor 'encoder.conv_in.weight'" in convert_error("--rqvae", str(stage1), "--output_dir",
                                                                  str(tmp_path / "o"))
    shutil.copy(FIXTURES / "stage1" / "model.pt", stage1 / "model.pt")
    text = (stage1 / "config.yaml").read_text().replace("ch: 32", "ch: 64")
    (stage1 / "config.yaml").write_text(text)
    assert "shape" in convert_error("--rqvae", str(stage1), "--output_dir", str(tmp_path / "o"))


def test_a_stage2_paired_with_the_wrong_stage1(tmp_path):
    stage1 = copy_stage(tmp_path, "stage1")
    text = (stage1 / "config.yaml").read_text().replace("n_embed: 64", "n_embed: 32")
    (stage1 / "config.yaml").write_text(text)
    msg = convert_error("--rqvae", str(stage1), "--rqtransformer", str(FIXTURES / "uncond"),
                        "--output_dir", str(tmp_path / "o"))
    assert "another stage 1" in msg or "codebook" in msg


def test_a_text_model_needs_its_tokenizer(tmp_path):
    msg = convert_error("--rqvae", str(FIXTURES / "stage1"), "--rqtransformer", str(FIXTURES / "text"),
                        "--output_dir", str(tmp_path / "o"))
    assert "--tokenizer" in msg and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["class", "text"])
def test_the_app_serves_a_converted_folder(converted, tmp_path, kind):
    """Over HTTP: the class model by class, the text model (no start token, the official tokenizer) by prompt;
    the text model never saw an empty prompt, so none is a clear error, not a sample."""
    from gradio_client.exceptions import AppError

    from conftest import serve_app

    with serve_app(converted[kind].folder, tmp_path) as client:
        if kind == "class":
            result = client.predict(class_name="3", num_images=2, seed=0, api_name="/generate")
        else:
            result = client.predict(num_images=2, seed=0, prompt="A painting of a CAT, in the frame.",
                                    api_name="/generate")
            with pytest.raises(AppError, match="give a prompt"):
                client.predict(num_images=1, seed=0, prompt="", api_name="/generate")
        assert len(result) == 2
