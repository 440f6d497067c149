"""Stage-1 losses: reconstruction + commitment, optional VGG16 perceptual loss and a VQGAN-style
patch discriminator (hinge loss, adaptive weight, start step)."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

# ImageNet statistics for VGG inputs
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class VGGPerceptual(nn.Module):
    """Mean L1 distance between unit-normalised VGG16 features at five stages (LPIPS-like, unweighted).

    weights: "imagenet" (torchvision download, needs network), a local .safetensors file with a
    torchvision VGG16 `features` state dict, or None for random weights (only for tests).
    """

    STAGES = (4, 9, 16, 23, 30)  # indices after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def __init__(self, weights: str | None = "imagenet"):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        # only the conv trunk: building the full VGG16 would allocate 120 M unused classifier weights
        features = make_layers(cfgs["D"])[: self.STAGES[-1]]
        if weights == "imagenet":
            from torchvision.models import VGG16_Weights

            state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)  # raises offline
            features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                      if k.startswith("features.") and int(k.split(".")[1]) < self.STAGES[-1]})
        elif weights is not None:
            path = Path(weights)
            if path.suffix != ".safetensors" or not path.is_file():
                raise ValueError(f"--perceptual_weights must be an existing .safetensors file, got {weights}")
            try:  # never unpickles; any other file (or a file of another network) is one clear error
                state = {k.removeprefix("features."): v for k, v in load_file(str(path)).items()}
                features.load_state_dict({k: v for k, v in state.items() if int(k.split(".")[0]) < self.STAGES[-1]})
            except (SafetensorError, OSError, RuntimeError, ValueError) as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ValueError(f"--perceptual_weights {weights} is not the VGG16 features as safetensors: "
                                 f"{reason}") from None
        self.features = features.eval().requires_grad_(False)
        self.register_buffer("mean", _MEAN.clone(), persistent=False)
        self.register_buffer("std", _STD.clone(), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen feature extractor: always eval

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # x, y: [B,3,H,W] in [-1,1]
        h = (torch.cat([x, y]) * 0.5 + 0.5 - self.mean) / self.std
        loss, start = 0.0, 0
        for end in self.STAGES:
            h = self.features[start:end](h)
            fx, fy = F.normalize(h, dim=1).chunk(2)
            loss = loss + (fx - fy).abs().mean()
            start = end
        return loss / len(self.STAGES)


def build_perceptual(weights: str | None) -> VGGPerceptual | None:
    """Perceptual loss with pretrained weights, or None (with a warning) when they can't be had."""
    if weights == "imagenet":
        try:
            return VGGPerceptual("imagenet")
        except Exception as e:  # offline: the download fails; train without it rather than crash
            warnings.warn(f"perceptual loss disabled: pretrained VGG16 weights unavailable ({e.__class__.__name__}). "
                          "Pass --perceptual_weights FILE.safetensors to use a local copy.", stacklevel=2)
            return None
    return VGGPerceptual(weights)


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix / VQGAN): one real/fake logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers + 1):
            out = width * min(2 ** i, 8)
            stride = 2 if i < layers else 1
            seq += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, out), out), nn.LeakyReLU(0.2)]
            ch = out
        seq.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x):  # [B,3,H,W] -> [B,1,h',w']
        return self.net(x)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight=1e4):
    """VQGAN's balance: scale the GAN term so its gradient at the decoder's last layer matches the NLL's."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class RQVAELoss(nn.Module):
    """Generator-side loss for the RQ-VAE plus the discriminator's own loss."""

    def __init__(self, reconstruction: str = "l1", perceptual_weight: float = 0.0,
                 perceptual_weights: str | None = "imagenet", disc_weight: float = 0.0,
                 disc_start: int = 0, disc_layers: int = 3):
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {reconstruction!r}")
        self.reconstruction, self.disc_weight, self.disc_start = reconstruction, disc_weight, disc_start
        self.perceptual = build_perceptual(perceptual_weights) if perceptual_weight > 0 else None
        self.perceptual_weight = perceptual_weight if self.perceptual is not None else 0.0
        self.discriminator = PatchDiscriminator(layers=disc_layers) if disc_weight > 0 else None

    def uses_gan(self, step: int) -> bool:
        return self.discriminator is not None and step >= self.disc_start

    def generator_loss(self, images, recon, commitment, step: int, last_layer=None):
        """Returns (total loss, dict of detached terms for logging)."""
        if self.reconstruction == "l1":
            rec = (recon - images).abs().mean()
        else:
            rec = F.mse_loss(recon, images)
        nll = rec
        terms = {"rec": rec.detach(), "commit": commitment.detach()}
        if self.perceptual is not None:
            p = self.perceptual(recon, images)
            nll = nll + self.perceptual_weight * p
            terms["perceptual"] = p.detach()
        total = nll + commitment
        if self.uses_gan(step):
            g = -self.discriminator(recon).mean()
            w = adaptive_weight(nll, g, last_layer) if last_layer is not None and torch.is_grad_enabled() else 1.0
            total = total + self.disc_weight * w * g
            terms.update(g=g.detach(), g_weight=torch.as_tensor(w).detach())
        return total, terms

    def discriminator_loss(self, images, recon):
        d = hinge_d_loss(self.discriminator(images), self.discriminator(recon.detach()))
        return d
