"""Flow-matching (CONST) models: ComfyUI's RF sampler arithmetic, inverse steps, reconstruction on an exact
analytic flow model (x = (1 - sigma) x0 + sigma eps)."""

import dataclasses

import pytest
import torch

from renoise_core import NoiseCorrectionConfig, ReNoiseConfig, edit_friendly_invert, invert, make_steps, sample, with_final_sigma
from renoise_core.analytic import GaussianMixture, psnr

#: Flux schnell, 4 steps (shift 1): ComfyUI's simple schedule on a flow model
SCHNELL = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
CLASSES = [0, 3, 6]


def comfy_rf_step(name, x, denoised, sigma, sigma_next, noise, eta=1.0, s_noise=1.0):
    """ComfyUI's arithmetic on CONST models, transcribed (sample_euler_ancestral_RF, sample_euler, sample_lcm)."""
    if name == "euler":
        return x + (x - denoised) / sigma * (sigma_next - sigma)
    if name == "lcm":
        x = denoised
        return sigma_next * noise + (1.0 - sigma_next) * x if sigma_next > 0 else x
    if sigma_next == 0:
        return denoised
    downstep_ratio = 1 + (sigma_next / sigma - 1) * eta
    sigma_down = sigma_next * downstep_ratio
    alpha_ip1 = 1 - sigma_next
    alpha_down = 1 - sigma_down
    renoise_coeff = (sigma_next**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
    sigma_down_i_ratio = sigma_down / sigma
    x = sigma_down_i_ratio * x + (1 - sigma_down_i_ratio) * denoised
    if eta > 0:
        x = (alpha_ip1 / alpha_down) * x + noise * s_noise * renoise_coeff
    return x


@pytest.mark.parametrize("name,options", [("euler", {}), ("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.5, "s_noise": 1.2}),
                                          ("euler_ancestral", {"eta": 0.0}), ("lcm", {})])
def test_flow_forward_steps_match_comfyui(name, options):
    g = torch.Generator().manual_seed(0)
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0])
    for i, step in enumerate(make_steps(name, sigmas, "flow", **options)):
        x, denoised, noise = (torch.randn((2, 16, 8, 8), generator=g) for _ in range(3))
        expected = comfy_rf_step(name, x, denoised, sigmas[i], sigmas[i + 1], noise, **options)
        ours = step.forward(x, (x - denoised) / step.sigma, noise)
        assert torch.allclose(ours, expected, atol=3e-6), (name, i, (ours - expected).abs().max())


@pytest.mark.parametrize("name", ["euler", "ddim", "euler_ancestral", "lcm"])
def test_flow_inverse_undoes_forward(name):
    g = torch.Generator().manual_seed(1)
    for step in make_steps(name, [1.0, 0.7, 0.4, 0.1, 0.0], "flow"):
        x, eps, noise = (torch.randn((2, 16, 4, 4), generator=g, dtype=torch.float64) for _ in range(3))
        assert torch.allclose(step.inverse(step.forward(x, eps, noise), eps, noise), x, atol=1e-12)


def test_flow_refusals():
    with pytest.raises(ValueError, match="unknown sampler 'ddpm' for flow models"):
        make_steps("ddpm", SCHNELL, "flow")
    with pytest.raises(ValueError, match=r"flow-model sigmas lie in \[0, 1\]"):
        make_steps("euler", [14.6, 0.0], "flow")
    with pytest.raises(ValueError, match="parameterization"):
        make_steps("euler", SCHNELL, "vpred")


@pytest.fixture(scope="module")
def flow_mixture():
    return GaussianMixture.random(components=16, shape=(16, 8, 8), std=1.0, seed=0, parameterization="flow")


def test_analytic_flow_denoiser_is_the_posterior_mean(flow_mixture):
    """At sigma -> 0 it returns x; at sigma = 1 (pure noise) the prior mean."""
    x0 = flow_mixture.sample([2], seed=0)
    d = flow_mixture.denoiser([2])
    assert torch.allclose(d(x0, torch.tensor([1e-6])), x0, atol=1e-4)
    prior_mean = (flow_mixture.prior([2])[0].view(-1, 1, 1, 1) * flow_mixture.means).sum(0).float()
    assert torch.allclose(d(torch.randn_like(x0), torch.tensor([1.0]))[0], prior_mean, atol=1e-4)


def flow_reconstruction_db(mixture, sampler, config, sigmas=SCHNELL):
    x0 = mixture.sample(CLASSES, seed=1)
    d = mixture.denoiser(CLASSES)
    inv = invert(d, x0, sigmas, sampler, config=config, seed=3, parameterization="flow")
    out = sample(d, inv.latent, inv.sigmas, sampler, noises=inv.noises, parameterization="flow")
    return psnr(out, x0).mean().item()


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral"])
def test_renoise_improves_flow_reconstruction(flow_mixture, sampler):
    plain = flow_reconstruction_db(flow_mixture, sampler, ReNoiseConfig(renoise_steps=0))
    renoise = flow_reconstruction_db(flow_mixture, sampler, ReNoiseConfig(early_below_sigma=0.25))
    assert renoise > plain + 3.0, (plain, renoise)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "lcm"])
def test_exact_noise_correction_on_flow(flow_mixture, sampler):
    base = ReNoiseConfig(early_below_sigma=0.25)
    none = flow_reconstruction_db(flow_mixture, sampler, base)
    exact = flow_reconstruction_db(flow_mixture, sampler, dataclasses.replace(base, noise_correction=NoiseCorrectionConfig("exact")))
    assert exact > none + 10.0 and exact > 40.0, (none, exact)


def test_edit_friendly_on_flow_is_exact(flow_mixture):
    x0 = flow_mixture.sample(CLASSES, seed=1)
    d = flow_mixture.denoiser(CLASSES)
    sigmas = with_final_sigma(SCHNELL, 0.001)
    inv = edit_friendly_invert(d, x0, sigmas, "euler_ancestral", seed=2, parameterization="flow")
    out = sample(d, inv.latent, inv.sigmas, "euler_ancestral", noises=inv.noises, parameterization="flow")
    assert torch.allclose(out, x0, atol=1e-4)
