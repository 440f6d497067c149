"""The int8 / int4 weight copies for CPU sampling (rqtransformer.cpu_weights) and the "auto" choice."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rqtransformer import cpu_weights
from rqtransformer.cpu_weights import (INT4_GROUP, LOW_BIT_MAX_ROWS, Int4WeightLinear, Int8WeightLinear,
                                       default_cpu_weights, low_bit_every_row, quantized_copy)
from test_cpu_sampling import gen, make_model

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = {"int8": Int8WeightLinear, "int4": Int4WeightLinear}


def kernels(weights: str) -> bool:
    try:
        quantized_copy(nn.Sequential(nn.Linear(INT4_GROUP, 16)), weights)
        return True
    except ValueError:
        return False


low_bit = pytest.mark.parametrize("weights", [pytest.param(w, marks=pytest.mark.skipif(
    not kernels(w), reason=f"this torch build or CPU has no {w} matmul")) for w in ("int8", "int4")])


@low_bit
def test_low_bit_layer_is_close_to_float32_and_falls_back_beyond_its_rows(weights):
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)
    layer = LAYERS[weights].from_linear(dense)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        want, got = dense(x), layer(x)
        assert got.shape == want.shape and got.dtype == torch.float32
        error = float((got - want).abs().max() / want.abs().max())
        assert 0 < error < {"int8": 0.02, "int4": 0.2}[weights]  # rounded, but close
        many = torch.randn(LOW_BIT_MAX_ROWS + 1, 64)  # more rows: float32, exactly
        assert torch.equal(layer(many), dense(many))
        with low_bit_every_row():  # ...unless lifted; each row then is what it is alone
            rows = layer(many)
        assert torch.equal(rows[:3], layer(many[:3])) and not torch.equal(rows, dense(many))
    y = layer(x)  # autograd: the float32 weight
    assert y.requires_grad and torch.equal(y.detach(), want)


@low_bit
def test_low_bit_copy_keeps_float32_parameters_and_follows_updates(weights, tmp_path):
    model = make_model(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = model.quantized_for_cpu(weights)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # original untouched
    assert all(isinstance(m, LAYERS[weights]) for m in fast.modules() if isinstance(m, nn.Linear))
    state = fast.state_dict()
    assert set(state) == set(before) and all(torch.equal(state[k], before[k]) for k in before)
    x = torch.randn(2, 32, generator=gen(2))
    with torch.no_grad():
        y = fast.head(x)
        fast.head.weight.mul_(-1)  # in place (an optimizer step, load_state_dict): repacked on next use
        fresh = LAYERS[weights].from_linear(copy.deepcopy(fast.head))  # packed from the new weight
        assert torch.equal(fast.head(x), fresh(x)) and not torch.equal(fast.head(x), y)
    fast.save_pretrained(tmp_path)  # saves the float32 parameters
    assert type(type(fast).from_pretrained(tmp_path).head) is nn.Linear


@low_bit
def test_low_bit_sampling_is_deterministic_and_cached_matches_full_forwards(weights):
    fast = make_model(seed=2).quantized_for_cpu(weights)
    kwargs = dict(class_labels=torch.tensor([0, 1, 2]), guidance_scale=2.0, top_k=8)
    a = fast.generate(generator=gen(4), **kwargs)
    assert torch.equal(a, fast.generate(generator=gen(4), **kwargs))
    assert torch.equal(a, copy.deepcopy(fast).generate(generator=gen(4), **kwargs))  # copies repack
    with low_bit_every_row():  # the uncached path's full forwards, through the same kernels
        assert torch.equal(a, fast.generate(generator=gen(4), use_cache=False, **kwargs))
    assert not torch.equal(a, fast.generate(generator=gen(5), **kwargs))


def test_int8_meets_the_fidelity_bound_on_the_official_fixture():
    """The bound a default path must meet (bench.precision): mean KL <= 0.01 nats per code against float32."""
    if not kernels("int8"):
        pytest.skip("no int8 matmul here")
    from bench.precision import KL_BOUND, compare, official_fixture_batches

    for name, tf, batches in official_fixture_batches():
        report = compare(tf, tf.quantized_for_cpu("int8"), batches)
        assert 0 < report["mean_kl_nats"] <= KL_BOUND and report["greedy_agreement"] > 0.95, (name, report)
        assert compare(tf, tf, batches)["mean_kl_nats"] == 0


def test_auto_picks_int8_for_wide_models_where_bf16_is_native(monkeypatch):
    narrow, wide = make_model(), make_model(dim=cpu_weights.INT8_MIN_DIM, heads=8)
    for native, want in ((True, "int8"), (False, "float16")):
        monkeypatch.setattr(cpu_weights, "native_bf16", lambda native=native: native)
        assert default_cpu_weights(wide) == want and default_cpu_weights(narrow) == "float16"


def test_unknown_weights_and_unswappable_layers():
    model = make_model()
    with pytest.raises(ValueError, match="cpu_weights must be one of 'float32', 'float16', 'int8', 'int4', got 'int2'"):
        model.quantized_for_cpu("int2")
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        model.double().quantized_for_cpu("int8")
    if kernels("int4"):  # widths the int4 kernel cannot take stay float32 layers
        odd = quantized_copy(nn.Sequential(nn.Linear(INT4_GROUP + 1, 16), nn.Linear(INT4_GROUP, 16)), "int4")
        assert type(odd[0]) is nn.Linear and isinstance(odd[1], Int4WeightLinear)
        x = torch.randn(2, INT4_GROUP + 1)
        with torch.no_grad():
            assert torch.equal(odd[0](x), F.linear(x, odd[0].weight, odd[0].bias))


def test_pipeline_cpu_decoder_setting(monkeypatch, tmp_path):
    """cpu_decoder: bfloat16 autocast where asked (or "auto" on CPUs with native bf16), float32 images either way,
    close to the float32 decoder's; training (autograd) always decodes in float32."""
    from conftest import tiny_pipeline
    from pipelines import RQPipeline, rq_pipeline

    tiny_pipeline(seed=5).save_pretrained(tmp_path)
    exact = RQPipeline.from_pretrained(tmp_path, device="cpu", cpu_decoder="float32")
    fast = RQPipeline.from_pretrained(tmp_path, device="cpu", cpu_decoder="bfloat16")
    assert exact.rqvae.cpu_decode_dtype == torch.float32 and fast.rqvae.cpu_decode_dtype == torch.bfloat16
    codes = exact(num_images=2, generator=gen(1), output_type="pt").codes
    with torch.inference_mode():
        want, got = exact.rqvae.decode(codes), fast.rqvae.decode(codes)
    assert got.dtype == torch.float32 and not torch.equal(got, want)
    assert float(10 * torch.log10(4 / (got - want).pow(2).mean())) > 30  # PSNR in dB, images in [-1, 1]
    with torch.enable_grad():  # as in training: float32
        assert torch.equal(fast.rqvae.decode(codes).detach(), want)
    for native in (True, False):
        monkeypatch.setattr(rq_pipeline, "native_bf16", lambda native=native: native)
        auto = RQPipeline.from_pretrained(tmp_path, device="cpu")
        assert auto.rqvae.cpu_decode_dtype == (torch.bfloat16 if native else torch.float32)
    with pytest.raises(ValueError, match="cpu_decoder must be one of 'auto', 'float32', 'bfloat16', got 'fp8'"):
        RQPipeline.from_pretrained(tmp_path, device="cpu", cpu_decoder="fp8")


@low_bit
def test_pipeline_and_app_load_low_bit_weights_when_asked(weights, tmp_path):
    """cpu_weights="int8" / "int4" from from_pretrained and from the app's --cpu_weights: the layers swapped,
    sampling works, and saving writes the float32 parameters as loaded."""
    import app
    from conftest import tiny_pipeline
    from pipelines import RQPipeline

    tiny_pipeline(seed=6).save_pretrained(tmp_path / "p")
    pipe = RQPipeline.from_pretrained(tmp_path / "p", device="cpu", cpu_weights=weights)
    assert isinstance(pipe.transformer.head, LAYERS[weights])
    out = pipe([0, 1], generator=gen(2), output_type="pt")
    assert out.images.shape == (2, 3, 32, 32) and torch.equal(out.codes, pipe([0, 1], generator=gen(2)).codes)
    pipe.save_pretrained(tmp_path / "again")
    exact = RQPipeline.from_pretrained(tmp_path / "p", device="cpu", cpu_weights="float32")
    again = RQPipeline.from_pretrained(tmp_path / "again", device="cpu", cpu_weights="float32")
    assert all(torch.equal(v, exact.transformer.state_dict()[k]) for k, v in again.transformer.state_dict().items())
    demo = app.build_demo(str(tmp_path / "p"), cpu_weights=weights)
    assert demo is not None  # the app's pipeline is loaded with the same setting:
    loaded = [fn for fn in demo.fns.values() if getattr(fn.fn, "__self__", None) is not None]
    assert loaded and all(isinstance(f.fn.__self__.pipe.transformer.head, LAYERS[weights]) for f in loaded)
