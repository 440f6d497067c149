"""Shared fixtures and helpers: tiny ImageFolder trees on disk, tiny models and pipelines, the app served
on 127.0.0.1, the fast flags of both training scripts."""
from __future__ import annotations

import os
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import RQPipeline
from rqtransformer import RQTransformer, RQTransformerConfig
from rqvae import PRESETS, RQVAE, RQVAEConfig

# the shipped default: the only model here trained long enough for properties that need a trained model
BUNDLED = Path(__file__).resolve().parents[1] / "weights" / "emoji-64"

if "OMP_NUM_THREADS" not in os.environ:  # let a developer share the cores with a training run
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    """Tests marked cuda need a GPU: skipped where torch sees none (python -m bench.gpu_check runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def make_image_folder(root, classes=("circles", "squares"), per_class=8, size=20, seed=0):
    """RGBA shapes on transparent backgrounds, one colour family per class."""
    rng = np.random.default_rng(seed)
    for ci, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.zeros((size, size, 4), np.uint8)
            a[..., ci % 3] = 200
            a[..., (ci + 1) % 3] = rng.integers(0, 255)
            lo, hi = rng.integers(2, size // 2), rng.integers(size // 2 + 2, size - 1)
            if ci % 2:
                a[lo:hi, lo:hi, 3] = 255
            else:
                yy, xx = np.mgrid[:size, :size]
                a[..., 3] = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (hi - lo) ** 2 / 2) * 255
            Image.fromarray(a, "RGBA").save(root / name / f"{i}.png")
    return root


@pytest.fixture
def image_dir(tmp_path):
    return make_image_folder(tmp_path / "images")


def train_tiny_vae(image_dir, code_depth=2, codebook_size=16, steps=150):
    """A tiny RQ-VAE fitted on the fixture images: enough for the second depth to matter."""
    from training.colour_toy import fit_rqvae
    from training.data import image_folder

    torch.manual_seed(0)
    ds = image_folder(image_dir, 16)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    # no dead-code restarts: with 64 latents per batch they keep replacing the few codes the residuals use,
    # and depth 2 then helps on some CPUs and hurts on others (seen: -0.14 dB on an AVX-512 machine)
    config = RQVAEConfig(**{**PRESETS["tiny"], "code_depth": code_depth, "codebook_size": codebook_size,
                            "latent_dim": 8, "threshold_ema_dead_code": 0.0})
    return fit_rqvae(RQVAE(config), images, steps, lr=3e-3), images


@pytest.fixture(scope="session")
def trained_tiny_vae(tmp_path_factory):
    return train_tiny_vae(make_image_folder(tmp_path_factory.mktemp("vae") / "images"))


# ---- training scripts ----------------------------------------------------------------------------

# stage 1 (training.train_rqvae) and stage 2 (training.train_rqtransformer): tiny configs, few steps
FAST1 = ["--config", "tiny", "--train_batch_size", "4", "--num_workers", "0", "--lr_warmup_steps", "2",
         "--report_to", "none", "--num_validation_images", "8"]
# fp32 on every CPU: tests compare losses with fp32 references, and "auto" is bf16 where the CPU has it natively
FAST2 = ["--config", "tiny", "--train_batch_size", "8", "--lr_warmup_steps", "2", "--report_to", "none",
         "--samples_per_class", "2", "--validation_steps", "100", "--mixed_precision", "no"]


@pytest.fixture
def vae_dir(tmp_path):
    torch.manual_seed(0)
    vae = RQVAE(RQVAEConfig(**PRESETS["tiny"]))
    vae(torch.rand(8, 3, 16, 16) * 2 - 1)  # k-means init
    vae.eval().save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


# ---- a tiny pipeline ------------------------------------------------------------------------------

CLASSES = ["circles", "squares", "stars"]


def tiny_pipeline(seed=0, code_depth=2) -> RQPipeline:
    torch.manual_seed(seed)
    vae = RQVAE(RQVAEConfig(**{**PRESETS["tiny"], "resolution": 32, "code_depth": code_depth}))
    vae.train()
    vae(torch.rand(8, 3, 32, 32) * 2 - 1)  # k-means init of the codebook
    tf = RQTransformer(RQTransformerConfig(codebook_size=32, code_shape=(4, 4, code_depth), dim=32, heads=2,
                                           spatial_layers=2, depth_layers=1, num_classes=3, dropout=0.0,
                                           class_names=CLASSES))
    return RQPipeline(vae, tf, max_images=6)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- the app served over HTTP --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pixels(item) -> np.ndarray:
    return np.asarray(Image.open(item["image"]).convert("RGB"))


def editor(background, *layers):
    from gradio_client import handle_file

    return {"background": handle_file(background), "layers": [handle_file(p) for p in layers], "composite": None}


@contextmanager
def serve_app(weights, root):
    """The app (app.build_demo, which queues as `make app` does) around the pipeline folder `weights`, served on
    127.0.0.1 with its examples cache and downloads under root -> a gradio_client Client; closed after."""
    import app
    from gradio_client import Client

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(app, "CACHE_ROOT", root / "cache")
        # Gradio's uploads and outputs, and gradio_client's folder per download, go under root: in the system
        # temp dir neither library removes them, and thousands piled up there over many runs.
        mp.setenv("GRADIO_TEMP_DIR", str(root / "gradio"))
        (root / "tmp").mkdir(exist_ok=True)
        mp.setattr(tempfile, "tempdir", str(root / "tmp"))
        demo = app.build_demo(weights)
        demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                    **app.LAUNCH_KWARGS)
        try:
            yield Client(demo.local_url, verbose=False, download_files=str(root / "downloads"))
        finally:
            demo.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, weights dir, files dir): the app around a saved tiny pipeline, with an example image."""
    root = tmp_path_factory.mktemp("app")
    weights = root / "weights"
    tiny_pipeline().save_pretrained(weights)
    (weights / "examples").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(weights / "examples" / "a.png")
    with serve_app(weights, root) as client:
        yield client, weights, root


@pytest.fixture(scope="module")
def files(served):
    """A good PNG (RGBA, transparent corner), a wide PNG, a white-on-black mask, a truncated PNG and a non-image."""
    _, weights, root = served
    good, mask = root / "good.png", root / "mask.png"
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0], rgba[4:36, 4:36, 3] = 200, 255
    Image.fromarray(rgba, "RGBA").save(good)
    wide = root / "wide.png"
    Image.new("RGB", (80, 40), (30, 60, 200)).save(wide)  # the model sees its centre 40x40 square
    m = np.zeros((40, 40), np.uint8)
    m[20:, :] = 255  # bottom half = regenerate
    Image.fromarray(m, "L").save(mask)
    truncated, garbage = root / "truncated.png", root / "garbage.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    garbage.write_bytes(b"this is not an image" * 10)
    return dict(good=good, wide=wide, mask=mask, truncated=truncated, garbage=garbage)


# ---- a tiny text-conditioned pipeline -------------------------------------------------------------

CAPTIONS = ["red circle", "blue square", "green star", "a small red square", "big blue circle", "yellow star"]


def tiny_text_pipeline(seed=0, num_classes=3, max_text_len=6, caption_dropout=0.1) -> RQPipeline:
    """tiny_pipeline's models with a prompt tokenizer trained on CAPTIONS (also its example prompts), made
    so that different prompts sample different codes."""
    from rqtransformer import PromptTokenizer

    torch.manual_seed(seed)
    vae = RQVAE(RQVAEConfig(**{**PRESETS["tiny"], "resolution": 32, "code_depth": 2}))
    vae.train()
    vae(torch.rand(8, 3, 32, 32) * 2 - 1)  # k-means init of the codebook
    tokenizer = PromptTokenizer.train(CAPTIONS * 4, 300)
    tf = RQTransformer(RQTransformerConfig(codebook_size=32, code_shape=(4, 4, 2), dim=32, heads=2,
                                           spatial_layers=2, depth_layers=1, num_classes=num_classes, dropout=0.0,
                                           class_names=CLASSES[:num_classes], text_vocab_size=tokenizer.vocab_size,
                                           max_text_len=max_text_len))
    tf.tokenizer = tokenizer
    with torch.no_grad():  # an untrained model's small residual projections all but mute the prompt: amplify
        tf.head.weight.mul_(40)
        tf.text_emb.weight.mul_(20)
        tf.code_emb.weight.mul_(20)
        for block in tf.spatial_blocks:
            block.attn.proj.weight.mul_(30)
    return RQPipeline(vae, tf, max_images=6, caption_dropout=caption_dropout, prompts=CAPTIONS)


@pytest.fixture(scope="module")
def served_text(tmp_path_factory):
    """(client, weights dir): the app around a saved tiny text pipeline (no classes), over HTTP."""
    root = tmp_path_factory.mktemp("text_app")
    tiny_text_pipeline(num_classes=0).save_pretrained(root / "weights")
    with serve_app(root / "weights", root) as client:
        yield client, root / "weights"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread avoids OpenMP overhead and contention on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
