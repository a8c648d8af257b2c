"""The exact analytic models against brute-force dense linear algebra."""

import math

import pytest
import torch

from renoise_core.analytic import SpectralMixture, natural_spectrum


def dense_posterior_mean(model: SpectralMixture, x: torch.Tensor, sigma: float, prior: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for one latent from the dense covariance (Sigma built by applying the spectrum to a basis)."""
    dims = x.numel()
    basis = torch.eye(dims, dtype=torch.float64).view((dims,) + tuple(x.shape))
    sigma_matrix = torch.fft.ifft2(model.spectrum * torch.fft.fft2(basis, norm="ortho"), norm="ortho").real.view(dims, dims)
    a = 1 - sigma if model.parameterization == "flow" else 1.0
    precision = torch.linalg.inv(a * a * sigma_matrix + sigma * sigma * torch.eye(dims, dtype=torch.float64))
    logits, means = [], []
    for k in range(model.num_components):
        offset = x.flatten().double() - a * model.means[k].flatten()
        logits.append(math.log(prior[k]) - 0.5 * float(offset @ precision @ offset))
        means.append(model.means[k].flatten() + a * sigma_matrix @ precision @ offset)
    weights = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
    return sum(w * m for w, m in zip(weights, means)).view(x.shape)


@pytest.mark.parametrize("parameterization", ["eps", "flow"])
def test_spectral_posterior_mean_is_the_dense_wiener_filter(parameterization):
    model = SpectralMixture.random(components=4, shape=(2, 8, 8), within=0.7, seed=0, parameterization=parameterization)
    x = 2 * torch.randn((3, 2, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sigmas = torch.tensor([0.3, 0.95, 0.7], dtype=torch.float64)
    prior = model.prior([0, 1, 2])
    ours = model.posterior_mean(x, sigmas, prior)
    for b in range(3):
        expected = dense_posterior_mean(model, x[b], float(sigmas[b]), prior[b])
        assert torch.allclose(ours[b], expected, atol=1e-10), (parameterization, b)


def test_natural_spectrum_is_even_and_decreasing():
    spectrum = natural_spectrum((1, 16, 16), alpha=2.0)[0]
    assert torch.allclose(spectrum, torch.roll(spectrum.flip(0, 1), (1, 1), (0, 1)))  # S(f) = S(-f): real covariance
    assert spectrum[0, 0] == spectrum.max() and spectrum.mean().item() == pytest.approx(1.0)
    assert spectrum[0, 1] > spectrum[0, 4] > spectrum[0, 8]


def test_spectral_samples_have_the_component_statistics():
    model = SpectralMixture.random(components=2, shape=(1, 16, 16), within=0.5, seed=3)
    samples = torch.cat([model.sample([1] * 64, seed=s) for s in range(8)]).double()
    centred = samples - model.means[1]
    power = (torch.fft.fft2(centred, norm="ortho").abs() ** 2).mean(0)  # per-frequency variance estimate
    assert torch.allclose(power.mean(), model.spectrum.mean(), rtol=0.1)
    low, high = power[0, 0, 1], power[0, 8, 8]
    assert low > 20 * high  # the natural spectrum: fine detail has little variance
