"""On a CUDA GPU: device placement, bfloat16, compiled sampling steps, the app serving from the GPU.

Marked `cuda`: skipped where torch sees no GPU (tests/conftest.py); `python -m bench.gpu_check` runs them.
The last test, unmarked, checks that they are.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CLASSES, tiny_pipeline
from PIL import Image

from pipelines import RQPipeline

cuda = pytest.mark.cuda


def cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator("cuda").manual_seed(seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cuda") / "pipe"
    tiny_pipeline().save_pretrained(folder)
    return folder


@cuda
def test_pipeline_loads_onto_the_gpu_and_samples_there(saved):
    pipe = RQPipeline.from_pretrained(saved)  # the default device is the GPU when there is one
    assert pipe.device.type == "cuda"
    assert {p.device.type for m in (pipe.rqvae, pipe.transformer) for p in m.parameters()} == {"cuda"}
    a = pipe("circles", num_images=2, generator=cuda_gen(0), output_type="pt")
    b = pipe("circles", num_images=2, generator=cuda_gen(0), output_type="pt")
    assert torch.equal(a.codes, b.codes) and tuple(a.images.shape) == (2, 3, 32, 32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    rec = pipe.reconstruct(image)
    assert len(rec.psnr) == 2 and all(np.isfinite(rec.psnr))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 16, 32, 32))
    out = pipe.complete(image, mask, "stars", num_images=2, generator=cuda_gen(1))
    assert len(out.images) == 2 and out.keep_mask[:2].all() and not out.keep_mask[2:].any()


@cuda
def test_bfloat16_transformer_samples_valid_codes(saved):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    pipe = RQPipeline.from_pretrained(saved, device="cuda", dtype=torch.bfloat16)
    assert pipe.transformer.head.weight.dtype == torch.bfloat16
    assert next(pipe.rqvae.parameters()).dtype == torch.float32  # the RQ-VAE stays float32 (nearest codes)
    out = pipe(["circles", "squares", "stars"], generator=cuda_gen(0), output_type="pt")
    assert out.codes.min() >= 0 and out.codes.max() < 32 and torch.isfinite(out.images).all()


@cuda
def test_compiled_sampling_steps_give_the_same_logits_and_codes():
    tf = tiny_pipeline().transformer.to("cuda")
    codes = torch.randint(0, 32, (4, 4, 4, 2), device="cuda", generator=cuda_gen(0))
    labels = torch.tensor([0, 1, 2, 0], device="cuda")
    with torch.inference_mode():
        eager_logits = tf(codes, labels)
        eager = tf.generate(class_labels=labels, guidance_scale=2.0, generator=cuda_gen(5))
    tf.compile_steps()
    with torch.inference_mode():
        torch.testing.assert_close(tf(codes, labels), eager_logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(tf.generate(class_labels=labels, guidance_scale=2.0, generator=cuda_gen(5)), eager)


@cuda
def test_app_serves_from_the_gpu(served):
    client, *_ = served
    gallery = client.predict(num_images=2, seed=3, api_name="/generate")
    assert len(gallery) == 2 and {item["caption"] for item in gallery} <= {c.capitalize() for c in CLASSES}
    assert torch.cuda.memory_allocated() > 0  # the served pipeline's weights live on the GPU


def test_cuda_tests_skip_without_a_gpu(request):
    here = [i for i in request.session.items if i.path == request.node.path and i is not request.node]
    marked = [i for i in here if i.get_closest_marker("cuda")]
    assert len(marked) == len(here) and marked  # every other test here needs the GPU
    skipped = [i for i in marked if i.get_closest_marker("skip")]
    assert len(skipped) == (0 if torch.cuda.is_available() else len(marked))
