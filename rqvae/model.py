"""RQ-VAE: a convolutional autoencoder whose latents are residual-quantized with one shared codebook.

images [B,3,H,W] in [-1,1] --encoder--> z [B,C,h,w] --ResidualVQ (D steps)--> codes [B,h,w,D]
codes --sum of the first k code embeddings--> [B,C,h,w] --decoder--> images [B,3,H,W]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from vector_quantize_pytorch import ResidualVQ

from rqcore.checks import is_number
from rqcore.pretrained import PretrainedMixin

from .blocks import AttnBlock, Decoder, Encoder, ResBlock  # noqa: F401 (AttnBlock, ResBlock: re-exported)


@dataclass
class RQVAEConfig:
    resolution: int = 64            # input images are resolution x resolution
    codebook_size: int = 512        # K, one codebook shared by every depth
    code_depth: int = 4             # D, residual quantization steps per position
    downsample: int = 8             # f, power of two: code grid is resolution/f squared
    in_channels: int = 3
    channels: int = 64              # width of the first conv level
    channel_mult: tuple[int, ...] = ()  # width multiplier per level; () = (1, 2, 2, 4, 4, ...)
    decoder_channels: int = 0       # the decoder's first-level width; 0 = channels. Wider sharpens decodes
                                    # without changing the codes (train it with --decoder_only)
    num_res_blocks: int = 1         # residual blocks per level
    mid_attention: bool = True      # self-attention at the code grid resolution
    # the official (kakaobrain) layout, for converted checkpoints; the defaults are this project's own
    attn_resolutions: tuple[int, ...] = ()  # self-attention after every residual block at these resolutions
    pad_downsample: bool = False    # downsample: zero-pad right/bottom, 3x3 stride-2 conv (else 4x4, padding 1)
    decoder_extra_block: bool = False  # the decoder has num_res_blocks + 1 blocks per level
    upsample_keeps_width: bool = False  # the upsample conv keeps the width (the next block's shortcut changes it)
    quant_convs: bool = False       # encoder ends 3x3 conv to z_channels then 1x1 to latent_dim; decoder starts
                                    # 1x1 then 3x3 (one 3x3 conv is not the same at the zero-padded borders)
    z_channels: int = 0             # the width between those convs; 0 = latent_dim
    latent_dim: int = 64            # code embedding dimension
    commitment_weight: float = 0.25
    ema_decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10
    threshold_ema_dead_code: float = 2.0  # restart codes whose EMA usage falls below this
    quantize_dropout: bool = True   # train on randomly truncated stacks so coarse decodes look good

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attn_resolutions = tuple(self.attn_resolutions)
        if self.z_channels < 0 or any(r < 1 for r in self.attn_resolutions):
            raise ValueError(f"z_channels must be >= 0 and attn_resolutions positive, got {self.z_channels} "
                             f"and {self.attn_resolutions}")
        for name in ("resolution", "codebook_size", "code_depth", "downsample", "in_channels",
                     "channels", "latent_dim", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_channels < 0:
            raise ValueError(f"decoder_channels must be >= 0 (0 = channels), got {self.decoder_channels}")
        if self.downsample & (self.downsample - 1):
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        if self.resolution % self.downsample:
            raise ValueError(f"resolution {self.resolution} is not divisible by downsample {self.downsample}")
        levels = int(math.log2(self.downsample)) + 1
        if not self.channel_mult:
            self.channel_mult = (1, 2, 2, 4, 4, 4, 4, 4)[:levels] if levels <= 8 else (1,) + (4,) * (levels - 1)
        if len(self.channel_mult) != levels or min(self.channel_mult) < 1:
            raise ValueError(f"channel_mult needs {levels} positive entries for downsample {self.downsample}, "
                             f"got {self.channel_mult}")
        if self.codebook_size < 2:
            raise ValueError("codebook_size must be >= 2")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    @property
    def code_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.downsample
        return (side, side, self.code_depth)

    @property
    def z_width(self) -> int:
        """The width between the quant_convs' 3x3 and 1x1 convs: z_channels, else latent_dim."""
        return self.z_channels or self.latent_dim

    @property
    def decoder_width(self) -> int:
        """The decoder's first-level width: decoder_channels, else channels."""
        return self.decoder_channels or self.channels


class RQVAE(PretrainedMixin, nn.Module):
    config_class = RQVAEConfig
    meta_init = True  # from_pretrained builds on the meta device; materialize_meta() fills the rest

    def __init__(self, config: RQVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantizer = self._quantizer(config)
        # decode()'s arithmetic on a CPU without autograd: bfloat16 autocast is about 4x faster where the CPU
        # multiplies bf16 natively (RQPipeline's cpu_decoder="auto" sets it there); training is always float32
        self.cpu_decode_dtype = torch.float32

    @staticmethod
    def _quantizer(config: RQVAEConfig) -> ResidualVQ:
        return ResidualVQ(
            dim=config.latent_dim,
            num_quantizers=config.code_depth,
            codebook_size=config.codebook_size,
            shared_codebook=True,
            decay=config.ema_decay,
            kmeans_init=config.kmeans_init,
            kmeans_iters=config.kmeans_iters,
            threshold_ema_dead_code=config.threshold_ema_dead_code,
            commitment_weight=config.commitment_weight,
            quantize_dropout=config.quantize_dropout and config.code_depth > 1,
        )

    def materialize_meta(self) -> None:
        """After loading onto the meta device: a real quantizer (its non-persistent buffers are no state_dict
        entries, so loading cannot fill them) holding the loaded codebook (small: K x C)."""
        loaded = self.quantizer.state_dict()
        with torch.device("cpu"):
            self.quantizer = self._quantizer(self.config)
        self.quantizer.load_state_dict(loaded)

    @property
    def code_shape(self) -> tuple[int, int, int]:
        return self.config.code_shape

    def _check_images(self, images: torch.Tensor) -> None:
        c = self.config
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != c.in_channels:
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor [B,{c.in_channels},H,W], got {got}")
        if images.shape[-2:] != (c.resolution, c.resolution):
            raise ValueError(f"images must be {c.resolution}x{c.resolution}, got "
                             f"{images.shape[-2]}x{images.shape[-1]} (resize them first)")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")

    def quantize(self, z: torch.Tensor):
        """z [B,C,h,w] -> (quantized [B,C,h,w], codes [B,h,w,D], commitment loss [])."""
        h, w = z.shape[-2:]
        x = rearrange(z, "b c h w -> b (h w) c")
        quantized, codes, commit = self.quantizer(x.float())  # codes [B, h*w, D]; -1 where dropped
        quantized = rearrange(quantized, "b (h w) c -> b c h w", h=h, w=w).to(z.dtype)
        return quantized, rearrange(codes, "b (h w) d -> b h w d", h=h, w=w), commit.sum()

    @torch.no_grad()
    def encode(self, images: torch.Tensor, temperature: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> codes LongTensor [B,h,w,D]. Never updates the codebook.

        temperature 0: the nearest code at every depth (deterministic). > 0: stochastic codes drawn from
        Q_tau, see `quantize_latents`."""
        if temperature:
            return self.quantize_latents(self.encode_latents(images), temperature, generator)
        self._check_images(images)
        was_training = self.quantizer.training
        self.quantizer.eval()  # eval: no EMA update, no quantize dropout
        try:
            _, codes, _ = self.quantize(self.encoder(images))
        finally:
            self.quantizer.train(was_training)
        return codes

    # ---- stochastic codes and soft labels (paper section 3.3) -----------------------------------------
    # Q_tau(k | r) = softmax_k(-||r - e(k)||^2 / tau) over the shared codebook, for the residual r left at a
    # depth. Stage 2 caches the continuous latents and draws codes / soft targets from them every step.

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> continuous latents [B,h,w,C] (fp32), before quantization."""
        self._check_images(images)
        return rearrange(self.encoder(images).float(), "b c h w -> b h w c")

    @torch.no_grad()
    def quantize_latents(self, latents: torch.Tensor, temperature: float = 0.0,
                         generator: torch.Generator | None = None, return_targets: bool = False):
        """latents [B,h,w,C] -> codes [B,h,w,D]. temperature 0: nearest codes (exactly `encode`'s);
        > 0: code d is drawn from Q_tau(. | r_d) and the next residual subtracts the drawn code.
        return_targets (temperature > 0): also the soft targets of the drawn codes, (codes, targets
        [B,h,w,D,K]), as `soft_targets` would give them, without computing the distances twice."""
        check_temperature(temperature, allow_zero=not return_targets)
        if not temperature:
            was_training = self.quantizer.training
            self.quantizer.eval()
            try:
                _, codes, _ = self.quantize(rearrange(self._check_latents(latents), "b h w c -> b c h w"))
            finally:
                self.quantizer.train(was_training)
            return codes
        codes, targets = self._residual_walk(latents, temperature, generator=generator, with_targets=return_targets)
        return (codes, targets) if return_targets else codes

    @torch.no_grad()
    def soft_targets(self, latents: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
        """Soft labels Q_tau(. | r_d) [B,h,w,D,K] (each row sums to 1) for latents [B,h,w,C], where r_d is
        the residual left after the given codes [B,h,w,D] of depths < d (deterministic or sampled)."""
        check_temperature(temperature)
        _, probs = self._residual_walk(latents, temperature, codes=codes, with_targets=True)
        return probs

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        h, w, _ = self.code_shape
        C = self.config.latent_dim
        if not torch.is_tensor(latents) or not latents.is_floating_point() or latents.ndim != 4 \
                or tuple(latents.shape[1:]) != (h, w, C):
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"latents must be a float tensor [B,{h},{w},{C}], got {got}")
        return latents.float()

    def _residual_walk(self, latents, temperature: float, generator=None, codes=None, with_targets=False):
        """Walk the D depths: logits -||r_d - e||^2 / tau [N,K]; take the given code at d, or draw one.
        Returns (codes [B,h,w,D], probs [B,h,w,D,K] if with_targets else None)."""
        with torch.autocast(latents.device.type, enabled=False):  # distances in fp32, also under bf16 training
            return self._residual_walk_fp32(latents, temperature, generator, codes, with_targets)

    def _residual_walk_fp32(self, latents, temperature: float, generator, codes, with_targets):
        B, h, w, _ = latents.shape
        r = self.quantizer.project_in(rearrange(self._check_latents(latents), "b h w c -> (b h w) c"))  # [N,C]
        embed = self.quantizer.codebooks[0].float()  # [K,C], shared by every depth
        e2 = (embed ** 2).sum(-1)  # [K]
        given = None if codes is None else rearrange(codes.long(), "b h w d -> (b h w) d")  # [N,D]
        out, probs = [], []
        for d in range(self.config.code_depth):
            # the library's distance, expanded: ||r||^2 + ||e||^2 - 2 r.e
            logits = -((r ** 2).sum(-1, keepdim=True) + e2 - 2 * r @ embed.T) / temperature  # [N,K]
            if with_targets:
                probs.append(logits.softmax(-1))
            if given is None:
                u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0)
                code = (logits - (-u.log()).log()).argmax(-1)  # Gumbel-max: a draw from softmax(logits)
            else:
                code = given[:, d]
            out.append(code)
            r = r - embed[code]
        codes = rearrange(torch.stack(out, -1), "(b h w) d -> b h w d", b=B, h=h, w=w)
        if not with_targets:
            return codes, None
        return codes, rearrange(torch.stack(probs, 1), "(b h w) d k -> b h w d k", b=B, h=h, w=w)

    def embed_codes(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """codes [B,h,w,k] -> latent [B,C,h,w] summing the first `depth` code embeddings."""
        D = self.config.code_depth
        if not torch.is_tensor(codes) or codes.ndim != 4 or codes.dtype not in (torch.int32, torch.int64):
            raise ValueError("codes must be an integer tensor [B,h,w,D]")
        h, w, _ = self.code_shape
        if codes.shape[1:3] != (h, w) or not 1 <= codes.shape[-1] <= D:
            raise ValueError(f"codes must have shape [B,{h},{w},k] with 1<=k<={D}, got {tuple(codes.shape)}")
        depth = codes.shape[-1] if depth is None else depth
        if not isinstance(depth, int) or not 1 <= depth <= codes.shape[-1]:
            raise ValueError(f"depth must be an integer in 1..{codes.shape[-1]}, got {depth!r}")
        if codes.min() < 0 or codes.max() >= self.config.codebook_size:
            raise ValueError(f"code values must be in [0, {self.config.codebook_size})")
        full = F.pad(codes[..., :depth].long(), (0, D - depth))  # the library wants all D columns
        per_depth = self.quantizer.get_codes_from_indices(full)  # [D, B, h, w, C]
        latent = self.quantizer.project_out(per_depth[:depth].sum(0))  # [B, h, w, C]
        return rearrange(latent, "b h w c -> b c h w")

    def decode(self, codes: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """codes [B,h,w,D] -> images [B,3,H,W] float32 in [-1,1]; `depth=k` uses only the first k codes."""
        return self.decode_latent(self.embed_codes(codes, depth))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """latents [B,C,h,w] float32 -> images [B,3,H,W] float32 in [-1,1], in cpu_decode_dtype on a CPU."""
        if self.cpu_decode_dtype != torch.float32 and z.device.type == "cpu" and not torch.is_grad_enabled():
            with torch.autocast("cpu", dtype=self.cpu_decode_dtype):
                return self.decoder(z).float().clamp(-1, 1)
        return self.decoder(z).clamp(-1, 1)

    def forward(self, images: torch.Tensor, frozen_codes: bool = False):
        """Training forward: returns (reconstruction [B,3,H,W], terms).

        terms: "commitment" (weighted, differentiable), "codes" [B,h,w,D] (-1 where quantize dropout
        truncated the stack) for usage statistics.
        frozen_codes: train the decoder alone on the codes `encode` gives (no codebook update), so the
        codes a stage-2 model learned stay valid. Half the batch is decoded from all D codes (the final
        images), the other half from a random depth 1..D (the coarse previews).
        """
        self._check_images(images)
        if not frozen_codes:
            quantized, codes, commit = self.quantize(self.encoder(images))
            return self.decoder(quantized), {"commitment": commit, "codes": codes}
        with torch.autocast(images.device.type, enabled=False):  # fp32, as stage 2 and inference encode
            codes = self.encode(images.float())  # [B,h,w,D], no grad
        B, D = codes.shape[0], self.config.code_depth
        depth = torch.randint(1, D + 1, (B,), device=codes.device)
        depth[: B // 2] = D
        with torch.no_grad():
            prefixes = torch.stack([self.embed_codes(codes, k) for k in range(1, D + 1)])  # [D,B,C,h,w]
        latent = prefixes[depth - 1, torch.arange(B, device=codes.device)]  # [B,C,h,w]
        codes = torch.where(torch.arange(D, device=codes.device) < depth[:, None, None, None], codes, -1)
        return self.decoder(latent), {"commitment": images.new_zeros(()), "codes": codes}


def check_temperature(temperature, allow_zero: bool = False) -> float:
    """The code temperature tau: a finite number > 0 (or exactly 0 where deterministic codes are meant)."""
    ok = is_number(temperature) and math.isfinite(temperature) \
        and (temperature > 0 or (allow_zero and temperature == 0))
    if not ok:
        wanted = "a finite number >= 0 (0 = nearest codes)" if allow_zero else "a finite number > 0"
        raise ValueError(f"code temperature must be {wanted}, got {temperature!r}")
    return float(temperature)


PRESETS = {
    # seconds per step on a laptop CPU: for tests and smoke runs (16 px -> 2x2x2 codes)
    "tiny": dict(resolution=16, codebook_size=32, code_depth=2, downsample=8, channels=16,
                 channel_mult=(1, 1, 2, 2), latent_dim=32, kmeans_iters=2),
    # the bundled default: 64 px -> 8x8x4 codes, codebook 512
    "emoji-64": dict(resolution=64, codebook_size=512, code_depth=4, downsample=8, channels=32,
                     channel_mult=(1, 2, 4, 4), latent_dim=64),
    # the paper's 256 px models (its official 8x8x4 configs): 256 px -> 8x8x4 codes (f = 32), latent 256,
    # 2 residual blocks per level; attention only in the middle blocks at 8x8 (theirs adds some per level)
    "ffhq-256": dict(resolution=256, codebook_size=2048, code_depth=4, downsample=32, channels=128,
                     channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, latent_dim=256),
    "imagenet-256": dict(resolution=256, codebook_size=16384, code_depth=4, downsample=32, channels=128,
                         channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2, latent_dim=256),
}
