"""Stochastic codes and soft labels of the RQ-VAE (paper section 3.3): Q_tau(k | r) ~ exp(-||r - e(k)||^2 / tau)."""
from __future__ import annotations

import math

import pytest
import torch

from rqvae import PRESETS, RQVAE, RQVAEConfig


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = RQVAE(RQVAEConfig(**PRESETS["tiny"]))
    model(torch.rand(16, 3, 16, 16) * 2 - 1)  # k-means init of the codebook
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_soft_targets_are_distributions_whose_argmax_is_the_nearest_code(vae, images):
    latents = vae.encode_latents(images)  # [B,h,w,C]
    codes = vae.encode(images)  # [B,h,w,D]
    probs = vae.soft_targets(latents, codes, temperature=0.5)
    assert probs.shape == (*codes.shape, vae.config.codebook_size)
    assert torch.allclose(probs.sum(-1), torch.ones(codes.shape), atol=1e-5)
    assert torch.equal(probs.argmax(-1), codes)


def test_near_zero_temperature_gives_exactly_the_deterministic_codes(vae, images):
    latents = vae.encode_latents(images)
    codes = vae.encode(images)
    assert torch.equal(vae.quantize_latents(latents, 0.0), codes)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(vae.quantize_latents(latents, 1e-9, generator=g), codes)
    assert torch.equal(vae.encode(images, temperature=1e-9, generator=g), codes)


def test_sampling_is_reproducible_with_a_generator_and_varies_with_the_seed(vae, images):
    latents = vae.encode_latents(images)
    draw = lambda seed: vae.quantize_latents(latents, 0.5, generator=torch.Generator().manual_seed(seed))
    a, b, c = draw(3), draw(3), draw(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < vae.config.codebook_size


def test_sampled_codes_follow_q_tau(vae):
    """Chi-square goodness of fit of 20,000 first-depth draws for one latent vector against Q_tau."""
    tau, n = 2.0, 20_000
    latent = vae.encode_latents(torch.zeros(1, 3, 16, 16))[:, :1, :1]  # [1,1,1,C]
    many = latent.expand(n, 2, 2, -1).contiguous()  # h, w of the tiny preset are 2x2
    codes = vae.quantize_latents(many, tau, generator=torch.Generator().manual_seed(0))[:, 0, 0, 0]  # [n]
    # depth 1 has no earlier codes, so its target does not depend on the codes passed
    q = vae.soft_targets(latent.expand(1, 2, 2, -1), torch.zeros(1, 2, 2, 2, dtype=torch.long), tau)[0, 0, 0, 0]
    observed = torch.bincount(codes, minlength=q.numel()).double()
    expected = q.double() * n
    keep = expected >= 5  # pool rare codes into one cell, as the test requires
    obs = torch.cat([observed[keep], observed[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2, dof = float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1
    assert dof >= 3, "the distribution should spread over several codes at this temperature"
    # generous: the 0.999 quantile of chi-square is below dof + 4.5 * sqrt(2 dof) + 10 for these sizes
    assert chi2 < dof + 4.5 * math.sqrt(2 * dof) + 10, (chi2, dof)
    # and far from a mismatched distribution (a uniform draw over the same cells)
    uniform = torch.full_like(exp, n / len(exp))
    assert float(((obs - uniform) ** 2 / uniform).sum()) > 10 * chi2


def test_drawing_with_targets_matches_soft_targets_of_the_drawn_codes(vae, images):
    latents = vae.encode_latents(images)
    codes, targets = vae.quantize_latents(latents, 0.5, generator=torch.Generator().manual_seed(2), return_targets=True)
    assert torch.equal(codes, vae.quantize_latents(latents, 0.5, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(targets, vae.soft_targets(latents, codes, 0.5))


def test_soft_targets_follow_the_given_codes(vae, images):
    """The residual at depth 2 depends on the code taken at depth 1: other codes, other targets."""
    latents = vae.encode_latents(images)
    codes = vae.encode(images)
    other = codes.clone()
    other[..., 0] = (codes[..., 0] + 1) % vae.config.codebook_size
    a, b = vae.soft_targets(latents, codes, 0.5), vae.soft_targets(latents, other, 0.5)
    assert torch.equal(a[..., 0, :], b[..., 0, :]) and not torch.allclose(a[..., 1, :], b[..., 1, :])


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "0.5", None, True])
def test_bad_temperatures_are_one_line(vae, images, bad):
    latents = vae.encode_latents(images)
    with pytest.raises(ValueError, match=r"^code temperature must be a finite number > 0, got") as e:
        vae.soft_targets(latents, vae.encode(images), bad)
    assert "\n" not in str(e.value)
    if bad != 0.0:
        with pytest.raises(ValueError, match=r"code temperature must be a finite number >= 0"):
            vae.quantize_latents(latents, bad)


def test_bad_latents_are_refused(vae):
    with pytest.raises(ValueError, match=r"latents must be a float tensor \[B,2,2,32\]"):
        vae.quantize_latents(torch.zeros(1, 3, 3, 32), 0.5)
