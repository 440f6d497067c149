"""The per-token path (Block.step, native_gelu), MKL-packed float32 weights while sampling (packed_weights)
and the float16-weight CPU copy (quantized_for_cpu)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rqtransformer import RQTransformer, RQTransformerConfig
from rqtransformer import cpu
from rqtransformer.cpu import PACK_MIN_ROWS, linear, native_gelu, packed_weights
from rqtransformer.cpu_weights import HalfWeightLinear

K, SHAPE = 16, (3, 3, 3)
needs_mkl_packing = pytest.mark.skipif(not cpu.mkl_packing_available(), reason="this torch has no MKL packed GEMM")
needs_fbgemm = pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines,
                                  reason="float16 CPU weights need fbgemm (x86)")


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed=0, half_exact=False, **overrides) -> RQTransformer:
    args = dict(codebook_size=K, code_shape=SHAPE, dim=32, heads=2, spatial_layers=2, depth_layers=2,
                num_classes=3, dropout=0.0)
    torch.manual_seed(seed)
    model = RQTransformer(RQTransformerConfig(**{**args, **overrides}))
    with torch.no_grad():  # spread-out logits, so sampling decisions are not coin flips
        model.head.weight.mul_(40)
        model.class_emb.weight.mul_(40)
        model.code_emb.weight.mul_(20)
        if half_exact:  # as if loaded from a float16 file (the bundled weights are stored so)
            for p in model.parameters():
                p.copy_(p.half().float())
    return model.eval()


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(1, 8), (3, 1024), (2, 7), (1, 2)])
def test_native_gelu_is_gelu(shape):
    x = torch.randn(shape, generator=gen(0)) * 3
    out = native_gelu(x)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, F.gelu(x), rtol=1e-6, atol=1e-6)  # a few ulp (AVX-512 oneDNN differs most)
    wide = torch.randn(shape[1], shape[0], generator=gen(1)).t()  # non-contiguous input
    torch.testing.assert_close(native_gelu(wide), F.gelu(wide), rtol=1e-6, atol=1e-6)


def test_block_step_is_forward_for_one_token():
    model = make_model()
    block = model.spatial_blocks[0]
    x = torch.randn(2, 5, 32, generator=gen(2))
    with torch.no_grad():
        full = block(x)  # causal, no cache
        caches = model.new_caches(2)
        for t in range(5):
            torch.testing.assert_close(block.step(x[:, t], caches[0].kv, t), full[:, t], rtol=0, atol=1e-5)


@needs_mkl_packing
def test_packed_weights_multiply_like_the_linear_layers():
    model = make_model()
    layers = [m for m in model.modules() if type(m) is nn.Linear]
    rows = PACK_MIN_ROWS + 2
    with torch.inference_mode():
        with packed_weights(model, rows):
            rows_, packs = cpu._PACKED.get()
            assert rows_ == rows and set(packs) == {id(m) for m in layers}  # every float32 Linear packed
            for m in layers:
                x = torch.randn(rows, m.in_features, generator=gen(3))
                torch.testing.assert_close(linear(m, x), m(x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(linear(m, x[:, None]), m(x[:, None]), rtol=1e-5, atol=1e-5)  # [rows, 1, in]
                other = torch.randn(rows + 1, m.in_features, generator=gen(4))  # another row count: plain F.linear
                assert torch.equal(linear(m, other), m(other))
        assert cpu._PACKED.get() is None  # restored on exit
        with packed_weights(model, PACK_MIN_ROWS - 1):  # too few rows to pay: nothing packed
            assert cpu._PACKED.get() is None
        with packed_weights(model.to(torch.float64), rows):  # not float32: nothing packed
            assert cpu._PACKED.get() is None


@needs_mkl_packing
def test_sampling_outside_float32_keeps_working():
    """bf16 weights are not packed, and under bf16 autocast the packed path leaves the bf16 activations to
    plain Linear layers: both sample valid codes at a row count that packs float32."""
    model = make_model()
    labels = torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = model.generate(class_labels=labels, generator=gen(6))
    assert codes.shape == (4, *SHAPE) and 0 <= int(codes.min()) and int(codes.max()) < K
    codes = model.to(torch.bfloat16).generate(class_labels=labels, generator=gen(6))
    assert codes.shape == (4, *SHAPE) and 0 <= int(codes.min()) and int(codes.max()) < K


@needs_mkl_packing
def test_sampling_with_packed_weights_matches_the_teacher_forced_model():
    """Batch 4 with guidance (8 rows) samples through the packed weights; the uncached path (full forwards,
    plain F.linear) draws the same codes for the same seed, and a packed call leaves no state behind."""
    model = make_model()
    labels = torch.tensor([0, 1, 2, 0])
    kw = dict(class_labels=labels, guidance_scale=2.0, top_k=8)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        cached = model.generate(generator=gen(5), **kw)
    ops = {e.key: e.count for e in prof.key_averages()}
    per_token = SHAPE[0] * SHAPE[1] * (2 + 2 * SHAPE[2]) * 4 + SHAPE[0] * SHAPE[1] * SHAPE[2]  # 4 per block, head
    assert ops.get("mkl::_mkl_linear") == per_token and "aten::addmm" not in ops
    assert torch.equal(cached, model.generate(generator=gen(5), use_cache=False, **kw))
    assert torch.equal(cached, model.generate(generator=gen(5), **kw)) and cpu._PACKED.get() is None


@needs_fbgemm
def test_quantized_for_cpu_is_a_float16_weight_copy():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = model.quantized_for_cpu()
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # original untouched
    linears = [m for m in fast.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, HalfWeightLinear) for m in linears)
    state = fast.state_dict()  # the same float32 parameters: saving the copy saves the model
    assert set(state) == set(before) and all(torch.equal(state[k], before[k]) for k in before)
    assert fast.head.weight.data_ptr() != model.head.weight.data_ptr()

    codes, labels = torch.randint(0, K, (2, *SHAPE), generator=gen(3)), torch.tensor([0, 2])
    half = copy.deepcopy(model)
    with torch.no_grad():
        for m in half.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(m.weight.half().float())
        want, got, exact = half(codes, labels), fast(codes, labels), model(codes, labels)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-4)  # = float32 math on float16-rounded weights
    assert not torch.equal(got, exact)
    torch.testing.assert_close(fast(codes, labels), exact, rtol=0, atol=0)  # with autograd: the float32 weights


@needs_fbgemm
def test_quantized_for_cpu_sampling_parity_and_determinism():
    fast = make_model(seed=1).quantized_for_cpu()
    kwargs = dict(class_labels=torch.tensor([0, 1, 2]), guidance_scale=2.0, top_k=8)
    a = fast.generate(generator=gen(4), **kwargs)
    assert torch.equal(a, fast.generate(generator=gen(4), **kwargs))
    assert torch.equal(a, fast.generate(generator=gen(4), use_cache=False, **kwargs))
    assert torch.equal(a, copy.deepcopy(fast).generate(generator=gen(4), **kwargs))  # copies repack
    assert not torch.equal(a, fast.generate(generator=gen(5), **kwargs))


@needs_fbgemm
def test_float16_weights_sample_what_the_float32_model_samples():
    """Weights that are exactly float16 (as loaded from a float16 file) lose nothing in the copy."""
    model = make_model(seed=2, half_exact=True)
    kwargs = dict(class_labels=torch.tensor([0, 1, 2, 0]), top_p=0.9)
    assert torch.equal(model.quantized_for_cpu().generate(generator=gen(6), **kwargs),
                       model.generate(generator=gen(6), **kwargs))


@needs_fbgemm
def test_quantized_copy_follows_weight_updates_and_saves_float32(tmp_path):
    model = make_model(seed=3)
    fast = model.quantized_for_cpu()
    x = torch.randn(4, 32, generator=gen(7))
    with torch.no_grad():
        y = fast.head(x)
        fast.head.weight.mul_(2)  # in place (an optimizer step, load_state_dict): repacked on next use
        torch.testing.assert_close(fast.head(x), 2 * y - fast.head.bias, rtol=0, atol=1e-4)
    fast.save_pretrained(tmp_path)
    loaded = RQTransformer.from_pretrained(tmp_path)
    assert type(loaded.head) is nn.Linear and torch.equal(loaded.head.weight, fast.head.weight)


def test_quantized_for_cpu_needs_a_float32_cpu_model():
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        make_model().double().quantized_for_cpu()


@needs_fbgemm
def test_pipeline_cpu_weights_setting(tmp_path):
    """from_pretrained on the CPU: "auto" gives a narrow model float16 weights (lossless for float16 files, the
    same codes for a seed), "float32" keeps the model as it is, and saving saves plain float32 weights."""
    from conftest import tiny_pipeline
    from pipelines import RQPipeline

    def is_fast(p):
        return isinstance(p.transformer.head, HalfWeightLinear)

    pipe = tiny_pipeline(seed=4)
    pipe.save_pretrained(tmp_path / "fp32")
    pipe.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    assert is_fast(RQPipeline.from_pretrained(tmp_path / "fp32", device="cpu"))
    assert not is_fast(RQPipeline.from_pretrained(tmp_path / "fp32", device="cpu", cpu_weights="float32"))
    fast = RQPipeline.from_pretrained(tmp_path / "fp16", device="cpu")
    slow = RQPipeline.from_pretrained(tmp_path / "fp16", device="cpu", cpu_weights="float32")
    assert is_fast(fast) and not is_fast(slow)
    a = fast([0, 1, 2], generator=gen(8), output_type="pt")
    b = slow([0, 1, 2], generator=gen(8), output_type="pt")
    assert torch.equal(a.codes, b.codes)  # lossless: the same samples for the same seed
    fast.save_pretrained(tmp_path / "again")  # saving the pipeline saves plain float32 weights
    again = RQTransformer.from_pretrained(tmp_path / "again" / "rqtransformer")
    assert all(torch.equal(v, slow.transformer.state_dict()[k]) for k, v in again.state_dict().items())
    for bad in ("int3", None, True):
        with pytest.raises(ValueError, match="cpu_weights must be one of 'auto', 'float32', 'float16'"):
            RQPipeline.from_pretrained(tmp_path / "fp16", device="cpu", cpu_weights=bad)
