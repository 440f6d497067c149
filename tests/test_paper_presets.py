"""The paper's 256 px presets: built on the meta device (no memory), shapes and parameter counts checked
against formulas written from the architecture (not from the modules), and one 256 px training step with
the ffhq-256 layout at tiny widths on CPU."""
from __future__ import annotations

import pytest
import torch

from rqtransformer.model import PRESETS as TF_PRESETS
from rqtransformer.model import RQTransformer, RQTransformerConfig
from rqvae.model import PRESETS, RQVAE, RQVAEConfig


def conv(cin, cout, k):
    return cin * cout * k * k + cout


def group_norm(c):
    return 2 * c


def res_block(cin, cout):
    return (group_norm(cin) + conv(cin, cout, 3) + group_norm(cout) + conv(cout, cout, 3)
            + (conv(cin, cout, 1) if cin != cout else 0))


def attn_block(c):
    return group_norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)


def rqvae_params(c: RQVAEConfig) -> int:
    """Encoder: stem conv, num_res_blocks residual blocks per level with a strided 4x4 conv between levels,
    then res + attention + res at the code grid, norm and a 1x1 conv to the latent. Decoder: the mirror, with
    an upsample + 3x3 conv to the next (narrower) width between levels. The EMA codebook is a buffer."""
    widths = [c.channels * m for m in c.channel_mult]
    n, cin = conv(c.in_channels, widths[0], 3), widths[0]
    for i, cout in enumerate(widths):
        n += res_block(cin, cout) + res_block(cout, cout) * (c.num_res_blocks - 1)
        cin = cout
        n += conv(cin, cin, 4) if i < len(widths) - 1 else 0
    n += 2 * res_block(cin, cin) + attn_block(cin) + group_norm(cin) + conv(cin, c.latent_dim, 1)
    widths = widths[::-1]
    cin = widths[0]
    n += conv(c.latent_dim, cin, 3) + 2 * res_block(cin, cin) + attn_block(cin)
    for i, cout in enumerate(widths):
        n += res_block(cin, cout) + res_block(cout, cout) * (c.num_res_blocks - 1)
        if i < len(widths) - 1:
            n += conv(cout, widths[i + 1], 3)
        cin = widths[i + 1] if i < len(widths) - 1 else cout
    return n + group_norm(cin) + conv(cin, c.in_channels, 3)


def transformer_params(K: int, classes: int, code_shape, dim: int, layers: int) -> int:
    """Code and class embeddings (+ null class), spatial and depth positions, `layers` pre-norm blocks
    (qkv 3d^2+3d, proj d^2+d, MLP 8d^2+5d, two LayerNorms 4d), two final LayerNorms and the head."""
    h, w, D = code_shape
    return K * dim + (classes + 1) * dim + (h * w + D) * dim + layers * (12 * dim ** 2 + 13 * dim) + 4 * dim \
        + dim * K + K


@pytest.mark.parametrize("name, codebook", [("ffhq-256", 2048), ("imagenet-256", 16384)])
def test_rqvae_paper_presets(name, codebook):
    config = RQVAEConfig(**PRESETS[name])
    with torch.device("meta"):
        model = RQVAE(config)
        z = model.encoder(torch.empty(1, 3, 256, 256))
        x = model.decoder(z)
    assert config.code_shape == (8, 8, 4) and config.channel_mult == (1, 1, 2, 2, 4, 4)
    assert tuple(z.shape) == (1, 256, 8, 8) and tuple(x.shape) == (1, 3, 256, 256)
    assert tuple(model.quantizer.codebooks.shape) == (4, codebook, 256)  # the 4 depths share one codebook
    n = sum(p.numel() for p in model.parameters())
    assert n == rqvae_params(config) == 81_976_707  # the same for both: the codebook is an EMA buffer


# (codebook, classes): FFHQ is unconditional with 2048 codes, ImageNet has 1000 classes and 16384 codes.
# Pinned counts: transformer_params, checked by hand for paper-350m (28 blocks x 12,596,224 + embeddings
# 2,169,856 + head 2,099,200 + norms 4,096); the paper reports 355M, 480M, 821M, 1.4B and 3.8B.
@pytest.mark.parametrize("name, codebook, classes, count", [
    ("paper-350m", 2048, 0, 356_965_376),
    ("paper-480m", 16384, 1000, 505_300_480),
    ("paper-821m", 16384, 1000, 845_278_720),
    ("paper-1.4b", 16384, 1000, 1_411_909_120),
    ("paper-3.8b", 16384, 1000, 3_863_120_384),
])
def test_transformer_paper_presets(name, codebook, classes, count):
    preset = TF_PRESETS[name]
    config = RQTransformerConfig(codebook_size=codebook, code_shape=(8, 8, 4), num_classes=classes, **preset)
    with torch.device("meta"):
        model = RQTransformer(config)
    dim = preset["dim"]
    assert tuple(model.spatial_pos.shape) == (64, dim) and tuple(model.depth_pos.shape) == (4, dim)
    assert tuple(model.head.weight.shape) == (codebook, dim) and dim // preset["heads"] == 64
    n = sum(p.numel() for p in model.parameters())
    assert n == transformer_params(codebook, classes, (8, 8, 4), dim,
                                   preset["spatial_layers"] + preset["depth_layers"]) == count


def test_presets_grow():
    sizes = [transformer_params(16384, 1000, (8, 8, 4), p["dim"], p["spatial_layers"] + p["depth_layers"])
             for name, p in TF_PRESETS.items() if name.startswith("paper-") and name != "paper-350m"]
    assert sizes == sorted(sizes) and len(sizes) == 4


def test_256px_training_step_with_tiny_widths():
    torch.manual_seed(0)
    config = RQVAEConfig(**{**PRESETS["ffhq-256"], "channels": 8, "codebook_size": 16, "latent_dim": 16,
                            "kmeans_iters": 2})
    model = RQVAE(config)
    assert rqvae_params(config) == sum(p.numel() for p in model.parameters())
    images = torch.rand(2, 3, 256, 256) * 2 - 1
    recon, terms = model(images)
    loss = (recon - images).abs().mean() + terms["commitment"]
    loss.backward()
    assert recon.shape == images.shape and tuple(terms["codes"].shape) == (2, 8, 8, 4)
    assert torch.isfinite(loss) and model.encoder.net[0].weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert tuple(model.encode(images).shape) == (2, 8, 8, 4)
