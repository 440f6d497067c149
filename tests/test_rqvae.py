"""Stage 1: the RQ-VAE model, its save/load and its losses."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from rqcore.images import image_transform, load_image
from rqvae import PRESETS, RQVAE, RQVAEConfig
from rqvae.losses import RQVAELoss, VGGPerceptual, build_perceptual

from conftest import BUNDLED


def tiny(**kw):
    return RQVAEConfig(**{**PRESETS["tiny"], **kw})


def test_minimal_config_builds_a_working_model():
    model = RQVAE(RQVAEConfig(resolution=32, codebook_size=64, code_depth=3, downsample=4))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, terms = model(x)
    assert recon.shape == x.shape and terms["commitment"].ndim == 0
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8, 3) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 64


def test_encode_decode_shapes_and_ranges():
    model = RQVAE(tiny()).eval()
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (3, 2, 2, 2)
    for depth in (None, 1, 2):
        out = model.decode(codes, depth=depth)
        assert out.shape == (3, 3, 16, 16)
        assert out.min() >= -1 and out.max() <= 1
    # a stack of only k codes decodes like the first k of a full stack
    torch.testing.assert_close(model.decode(codes[..., :1]), model.decode(codes, depth=1))


def test_encode_never_touches_the_codebook_even_in_train_mode():
    model = RQVAE(tiny(kmeans_init=False)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.encode(torch.rand(2, 3, 16, 16) * 2 - 1)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def test_full_depth_decode_equals_quantizer_output():
    model = RQVAE(tiny(code_depth=3)).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        quantized, codes, _ = model.quantize(model.encoder(x))
        torch.testing.assert_close(model.embed_codes(codes), quantized, atol=1e-5, rtol=1e-5)


def test_error_falls_with_every_depth_on_the_bundled_model():
    """The shipped RQ-VAE on its held-out example images: each added code per cell lowers every image's
    error. (A tiny model fitted in a test is too chaotic for this: whether its second depth helps depends
    on the CPU's rounding.)"""
    model = RQVAE.from_pretrained(BUNDLED / "rqvae").eval()
    tf = image_transform(model.config.resolution)
    images = torch.stack([tf(load_image(f)) for f in sorted((BUNDLED / "examples").glob("*.png"))])
    with torch.no_grad():
        codes = model.encode(images)  # [6, 8, 8, 4]
        errors = torch.stack([((model.decode(codes, depth=k) - images) ** 2).mean((1, 2, 3)) for k in (1, 2, 3, 4)])
    assert len(images) == 6 and (errors[:-1] > 1.05 * errors[1:]).all(), errors  # [depth, image]


def test_save_load_round_trip_gives_identical_codes(tmp_path):
    model = RQVAE(tiny()).train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    model(x)  # k-means init + EMA updates change the codebook buffers
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = RQVAE.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert torch.equal(loaded.encode(x), model.encode(x))
    torch.testing.assert_close(loaded.decode(model.encode(x)), model.decode(model.encode(x)))
    # the shared codebook stays shared after loading
    q = loaded.quantizer
    assert q.layers[0]._codebook is q.layers[1]._codebook


def test_fp16_save_loads_into_float32(tmp_path):
    model = RQVAE(tiny()).eval()
    model.save_pretrained(tmp_path / "m", dtype=torch.float16)
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in tensors.values() if t.is_floating_point())
    loaded = RQVAE.from_pretrained(tmp_path / "m")
    assert next(loaded.parameters()).dtype == torch.float32


@pytest.mark.parametrize("tamper, message", [
    ("drop", "missing tensor"),
    ("extra", "unexpected tensor"),
    ("shape", "has shape"),
])
def test_strict_loading_rejects_tampered_weights(tmp_path, tamper, message):
    RQVAE(tiny()).save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    key = "decoder.conv_out.weight"
    if tamper == "drop":
        del tensors[key]
    elif tamper == "extra":
        tensors["decoder.surprise"] = torch.zeros(3)
    else:
        tensors[key] = torch.zeros(1, 2, 3)
    save_file(tensors, str(file))
    with pytest.raises(ValueError, match=message):
        RQVAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, message", [
    ({"codebook_size": "512"}, "must be an integer"),
    ({"downsample": 6}, "power of two"),
    ({"resolution": 20}, "not divisible"),
    ({"bogus": 1}, "unknown field"),
    ({"quantize_dropout": 1}, "true or false"),
    ({"decoder_channels": -8}, "decoder_channels must be >= 0"),
])
def test_bad_config_json_is_rejected(tmp_path, edit, message):
    RQVAE(tiny()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(edit)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        RQVAE.from_pretrained(tmp_path)


def test_missing_or_empty_weights_folder(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        RQVAE.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        RQVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        RQVAE.from_pretrained(tmp_path)


def test_corrupt_safetensors_is_a_clear_error(tmp_path):
    RQVAE(tiny()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        RQVAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(2, 3, 8, 8), "must be 16x16"),
    (torch.rand(2, 1, 16, 16), "float tensor"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "float tensor"),
])
def test_bad_images_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        RQVAE(tiny()).encode(bad)


@pytest.mark.parametrize("codes, depth, message", [
    (torch.zeros(1, 3, 3, 2, dtype=torch.long), None, "shape"),
    (torch.full((1, 2, 2, 2), 99), None, "code values"),
    (torch.zeros(1, 2, 2, 2, dtype=torch.long), 3, "depth must be"),
    (torch.zeros(1, 2, 2, 2), None, "integer tensor"),
])
def test_bad_codes_raise(codes, depth, message):
    with pytest.raises(ValueError, match=message):
        RQVAE(tiny()).decode(codes, depth=depth)


def test_perceptual_loss_with_local_weights_is_differentiable(tmp_path):
    vgg = VGGPerceptual(weights=None)
    file = tmp_path / "vgg.safetensors"
    save_file({f"features.{k}": v for k, v in vgg.features.state_dict().items()}, str(file))
    loss_fn = RQVAELoss("l2", perceptual_weight=1.0, perceptual_weights=str(file))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    total, terms = loss_fn.generator_loss(x, y, torch.tensor(0.0), step=0)
    total.backward()
    assert terms["perceptual"] > 0 and y.grad.abs().sum() > 0
    assert loss_fn.perceptual(x, x).item() == pytest.approx(0.0, abs=1e-6)


def test_perceptual_loss_is_disabled_with_a_warning_when_weights_cannot_download(monkeypatch):
    from torchvision.models import VGG16_Weights

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(type(VGG16_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert build_perceptual("imagenet") is None
    assert any("perceptual loss disabled" in str(w.message) for w in caught)
    assert RQVAELoss(perceptual_weight=1.0).perceptual_weight == 0.0


def test_bad_local_perceptual_weights_path():
    with pytest.raises(ValueError, match="safetensors"):
        VGGPerceptual(weights="/nonexistent/vgg.pth")


def test_gan_loss_uses_adaptive_weight():
    torch.manual_seed(0)
    model = RQVAE(tiny())
    loss_fn = RQVAELoss(disc_weight=0.5, disc_start=5, disc_layers=1)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, terms = model(x)
    _, early = loss_fn.generator_loss(x, recon, terms["commitment"], step=4, last_layer=model.decoder.conv_out.weight)
    assert "g" not in early
    total, late = loss_fn.generator_loss(x, recon, terms["commitment"], step=5, last_layer=model.decoder.conv_out.weight)
    assert "g" in late and late["g_weight"] > 0
    total.backward()
    d = loss_fn.discriminator_loss(x, recon)
    assert d.item() > 0
