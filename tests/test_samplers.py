"""Forward steps against ComfyUI's sampler arithmetic (written out here), and inverse(forward(x)) == x."""

import math

import pytest
import torch
from support import schedule

from renoise_core.samplers import SAMPLERS, ancestral_sigmas, check_sigmas, ddpm_step, euler_ancestral_step, make_steps

# --- ComfyUI's arithmetic, transcribed from comfy/k_diffusion/sampling.py (float32 tensors, as ComfyUI runs) ---

def comfy_get_ancestral_step(sigma_from, sigma_to, eta=1.0):
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def comfy_step(name, x, denoised, sigma, sigma_next, noise, eta=1.0, s_noise=1.0):
    """One step of ComfyUI's sample_<name> given the model output ``denoised`` at ``x``."""
    if name in ("euler", "ddim"):
        d = (x - denoised) / sigma
        return x + d * (sigma_next - sigma)
    if name == "euler_ancestral":
        sigma_down, sigma_up = comfy_get_ancestral_step(sigma, sigma_next, eta=eta)
        if sigma_down == 0:
            return denoised
        d = (x - denoised) / sigma
        return x + d * (sigma_down - sigma) + noise * s_noise * sigma_up
    if name == "lcm":
        x = denoised
        if sigma_next > 0:
            x = x + noise * sigma_next  # EPS.noise_scaling(sigma_next, noise, x)
        return x
    if name == "ddpm":
        eps = (x - denoised) / sigma
        xs = x / torch.sqrt(1.0 + sigma**2.0)
        alpha_cumprod = 1 / ((sigma * sigma) + 1)
        alpha_cumprod_prev = 1 / ((sigma_next * sigma_next) + 1)
        alpha = alpha_cumprod / alpha_cumprod_prev
        mu = (1.0 / alpha).sqrt() * (xs - (1 - alpha) * eps / (1 - alpha_cumprod).sqrt())
        if sigma_next > 0:
            mu += ((1 - alpha) * (1.0 - alpha_cumprod_prev) / (1.0 - alpha_cumprod)).sqrt() * noise
        if sigma_next != 0:
            mu *= torch.sqrt(1.0 + sigma_next**2.0)
        return mu
    raise KeyError(name)


CASES = [("euler", {}), ("ddim", {}), ("euler_ancestral", {}), ("euler_ancestral", {"eta": 0.6, "s_noise": 1.3}),
         ("lcm", {}), ("ddpm", {})]


@pytest.mark.parametrize("name,options", CASES)
def test_forward_step_matches_comfyui(name, options):
    g = torch.Generator().manual_seed(0)
    sigmas = schedule(6)
    steps = make_steps(name, sigmas, **options)
    for i, step in enumerate(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]  # float32 0-d tensors, as ComfyUI indexes them
        x = torch.randn((2, 4, 8, 8), generator=g) * (1 + float(sigma))
        denoised = torch.randn((2, 4, 8, 8), generator=g)
        noise = torch.randn((2, 4, 8, 8), generator=g)
        expected = comfy_step(name, x, denoised, sigma, sigma_next, noise, **options)
        ours = step.forward(x, (x - denoised) / step.sigma, noise)
        scale = expected.abs().max().item()
        assert torch.allclose(ours, expected, rtol=0, atol=2e-6 * max(1.0, scale)), (name, i, (ours - expected).abs().max())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_inverse_undoes_forward(name):
    g = torch.Generator().manual_seed(1)
    for step in make_steps(name, schedule(5).double()):
        x = torch.randn((3, 4, 8, 8), generator=g, dtype=torch.float64)
        eps = torch.randn_like(x)
        noise = torch.randn_like(x)
        x_next = step.forward(x, eps, noise)
        assert torch.allclose(step.inverse(x_next, eps, noise), x, atol=1e-12, rtol=0)
        if step.is_stochastic:
            assert torch.allclose(step.required_noise(x, x_next, eps), noise, atol=1e-10, rtol=0)


def test_ddpm_is_euler_ancestral_with_eta_one_analytically():
    for hi, lo in [(14.6, 4.08), (4.08, 1.61), (1.61, 0.69), (0.69, 0.0)]:
        a, b = ddpm_step(hi, lo), euler_ancestral_step(hi, lo, eta=1.0)
        assert math.isclose(a.phi, b.phi, rel_tol=1e-12)
        assert math.isclose(a.psi, b.psi, rel_tol=1e-12)
        assert math.isclose(a.rho, b.rho, rel_tol=1e-9, abs_tol=1e-12)


def test_last_step_of_stochastic_samplers_adds_no_noise():
    for name in ("euler_ancestral", "lcm", "ddpm"):
        assert not make_steps(name, [1.0, 0.5, 0.0])[-1].is_stochastic
        assert make_steps(name, [1.0, 0.5, 0.0])[0].is_stochastic


def test_ancestral_sigmas_eta_zero_is_deterministic():
    assert ancestral_sigmas(2.0, 1.0, eta=0.0) == (1.0, 0.0)
    assert not make_steps("euler_ancestral", [2.0, 1.0, 0.0], eta=0.0)[0].is_stochastic


@pytest.mark.parametrize(
    "sigmas,message",
    [([], "at least 2"), ([1.0], "at least 2"), ([1.0, 2.0, 0.0], "strictly descending"), ([1.0, 1.0, 0.0], "strictly descending"),
     ([1.0, float("nan"), 0.0], "NaN"), ([1.0, -0.5], ">= 0")],
)
def test_bad_schedules_are_refused(sigmas, message):
    with pytest.raises(ValueError, match=message):
        check_sigmas(sigmas)


def test_unknown_sampler_and_options_are_refused():
    with pytest.raises(ValueError, match="unknown sampler 'heun'.*supported: euler"):
        make_steps("heun", [1.0, 0.0])
    with pytest.raises(ValueError, match="takes no option"):
        make_steps("euler", [1.0, 0.0], eta=1.0)


def test_stochastic_step_without_noise_is_refused():
    step = make_steps("lcm", [2.0, 1.0, 0.0])[0]
    with pytest.raises(ValueError, match="needs a noise"):
        step.forward(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
