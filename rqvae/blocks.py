"""The RQ-VAE's convolutional encoder and decoder and the blocks they are built from (see model.py)."""
from __future__ import annotations

import math

import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the code grid: gives every position a global view."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three c) h w -> three b 1 (h w) c", three=3)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, 1, h*w, C]
        return x + self.proj(rearrange(out, "b 1 (h w) c -> b c h w", h=h, w=w))


class PadDownsample(nn.Module):
    """Halve the resolution: zero-pad one column right and one row below, then a 3x3 stride-2 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def level_blocks(c, cin: int, cout: int, blocks: int, resolution: int) -> list[nn.Module]:
    """`blocks` residual blocks cin -> cout, each followed by attention at the attn_resolutions."""
    layers = []
    for _ in range(blocks):
        layers.append(ResBlock(cin, cout))
        cin = cout
        if resolution in c.attn_resolutions:
            layers.append(AttnBlock(cout))
    return layers


class Encoder(nn.Module):
    def __init__(self, c):  # c: RQVAEConfig
        super().__init__()
        widths = [c.channels * m for m in c.channel_mult]
        layers = [nn.Conv2d(c.in_channels, widths[0], 3, padding=1)]
        cin, res = widths[0], c.resolution
        for i, cout in enumerate(widths):
            layers += level_blocks(c, cin, cout, c.num_res_blocks, res)
            cin = cout
            if i < len(widths) - 1:  # a strided conv halves the resolution
                layers.append(PadDownsample(cin) if c.pad_downsample else nn.Conv2d(cin, cin, 4, stride=2, padding=1))
                res //= 2
        layers.append(ResBlock(cin, cin))
        if c.mid_attention:
            layers.append(AttnBlock(cin))
        layers += [ResBlock(cin, cin), norm(cin), nn.SiLU()]
        if c.quant_convs:
            z = c.z_width
            layers += [nn.Conv2d(cin, z, 3, padding=1), nn.Conv2d(z, c.latent_dim, 1)]
        else:
            layers.append(nn.Conv2d(cin, c.latent_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # [B,3,H,W] -> [B,C,h,w]
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, c):  # c: RQVAEConfig
        super().__init__()
        widths = [c.decoder_width * m for m in c.channel_mult][::-1]
        cin = widths[0]
        if c.quant_convs:
            z = c.z_width
            layers = [nn.Conv2d(c.latent_dim, z, 1), nn.Conv2d(z, cin, 3, padding=1)]
        else:
            layers = [nn.Conv2d(c.latent_dim, cin, 3, padding=1)]
        layers.append(ResBlock(cin, cin))
        if c.mid_attention:
            layers.append(AttnBlock(cin))
        layers.append(ResBlock(cin, cin))
        res = c.resolution // c.downsample
        for i, cout in enumerate(widths):
            layers += level_blocks(c, cin, cout, c.num_res_blocks + c.decoder_extra_block, res)
            cin = cout
            if i < len(widths) - 1:  # by default, upsample straight to the next level's (narrower) width: cheaper
                cin = cout if c.upsample_keeps_width else widths[i + 1]
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(cout, cin, 3, padding=1)]
                res *= 2
        layers += [norm(cin), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(cin, c.in_channels, 3, padding=1)  # "last layer" for the adaptive GAN weight

    def forward(self, z):  # [B,C,h,w] -> [B,3,H,W]
        return self.conv_out(self.net(z))
