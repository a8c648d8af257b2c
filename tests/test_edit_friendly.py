"""Edit-friendly DDPM inversion on the exact analytic model."""

import pytest
import torch
from support import TRAINING_SIGMAS, schedule

from renoise_core import edit_friendly_invert, sample, with_final_sigma

SIGMA_MIN = float(TRAINING_SIGMAS[0])


def ef_schedule(steps):
    return with_final_sigma(schedule(steps), SIGMA_MIN)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_ancestral", "lcm"])
@pytest.mark.parametrize("steps", [1, 4, 25, 100])
def test_reconstruction_is_exact(mixture, sampler, steps):
    x0 = mixture.sample([2, 7], seed=3)
    d = mixture.denoiser([2, 7])
    inv = edit_friendly_invert(d, x0, ef_schedule(steps), sampler, seed=5)
    assert inv.denoiser_calls == steps
    reconstruction = sample(d, inv.latent, inv.sigmas, sampler, noises=inv.noises)
    assert torch.allclose(reconstruction, x0, atol=2e-5, rtol=0), (reconstruction - x0).abs().max()


def test_noise_statistics_match_the_paper(mixture):
    """The extracted noises are not N(0, I): larger variance, negatively correlated between consecutive steps."""
    x0 = mixture.sample([1, 4, 9], seed=2)
    inv = edit_friendly_invert(mixture.denoiser([1, 4, 9]), x0, ef_schedule(100), "ddpm", seed=1)
    z = inv.noises[:-1].double()  # the last step's noise fits a tiny sigma: leave it out of the statistics
    variance = z.flatten(1).var(dim=1)
    consecutive = torch.nn.functional.cosine_similarity(z[:-1].flatten(1), z[1:].flatten(1), dim=1)
    assert variance.mean() > 1.2, variance.mean()
    assert (consecutive < 0).float().mean() > 0.9 and consecutive.mean() < -0.2, consecutive.mean()


def test_skip_starts_later_and_still_reconstructs(mixture):
    x0 = mixture.sample([3], seed=4)
    d = mixture.denoiser([3])
    sigmas = ef_schedule(20)
    full = edit_friendly_invert(d, x0, sigmas, "ddpm", seed=2)
    skipped = edit_friendly_invert(d, x0, sigmas, "ddpm", seed=2, skip=7)
    assert skipped.sigmas.tolist() == pytest.approx(sigmas[7:].tolist()) and skipped.noises.shape[0] == 13
    assert torch.allclose(skipped.noises, full.noises[7:], atol=1e-3, rtol=1e-4)  # full: x_7 recomputed, equal up to rounding
    assert skipped.denoiser_calls == 13
    assert torch.allclose(sample(d, skipped.latent, skipped.sigmas, "ddpm", noises=skipped.noises), x0, atol=2e-5)


def test_schedule_ending_at_zero_reconstructs_up_to_the_last_step(mixture):
    x0 = mixture.sample([3], seed=4)
    d = mixture.denoiser([3])
    inv = edit_friendly_invert(d, x0, schedule(10), "ddpm", seed=2)
    assert inv.denoiser_calls == 9  # the last step adds no noise: nothing to fit, no call
    out = sample(d, inv.latent, inv.sigmas, "ddpm", noises=inv.noises)
    assert (out - x0).abs().max() > 1e-3  # that last step is the sampler's own, hence with_final_sigma


def test_refusals(mixture):
    x0 = mixture.sample([3], seed=4)
    d = mixture.denoiser([3])
    with pytest.raises(ValueError, match="needs a stochastic sampler"):
        edit_friendly_invert(d, x0, ef_schedule(4), "euler")
    with pytest.raises(ValueError, match="skip must be between 0 and 3"):
        edit_friendly_invert(d, x0, ef_schedule(4), "ddpm", skip=4)
    with pytest.raises(ValueError, match="final_sigma"):
        with_final_sigma(schedule(4), 5.0)


def test_inputs_untouched_and_deterministic(mixture):
    x0 = mixture.sample([3, 4], seed=4)
    copy = x0.clone()
    d = mixture.denoiser([3, 4])
    a = edit_friendly_invert(d, x0, ef_schedule(6), "euler_ancestral", seed=9)
    b = edit_friendly_invert(d, x0, ef_schedule(6), "euler_ancestral", seed=9)
    assert torch.equal(x0, copy) and torch.equal(a.noises, b.noises) and torch.equal(a.latent, b.latent)
