"""ReNoise inversion on the exact analytic model: reconstruction quality is measured against a known truth."""

import dataclasses

import pytest
import torch
from support import EARLY_BELOW_SIGMA, schedule

from renoise_core import (
    EditLossConfig,
    NoiseCorrectionConfig,
    ReNoiseConfig,
    correct_noise,
    invert,
    planned_denoiser_calls,
    sample,
)
from renoise_core.analytic import psnr
from renoise_core.samplers import make_steps

CLASSES = [0, 3, 6]
TURBO = ReNoiseConfig(
    early_below_sigma=EARLY_BELOW_SIGMA, edit_loss=EditLossConfig(), noise_correction=NoiseCorrectionConfig("optimize")
)


def denoiser_for(mixture, sampler, classes=CLASSES):
    return mixture.consistency_denoiser(classes, substeps=24) if sampler == "lcm" else mixture.denoiser(classes)


def reconstruction_db(mixture, x0, sampler, sigmas, config, classes=CLASSES):
    d = denoiser_for(mixture, sampler, classes)
    inv = invert(d, x0, sigmas, sampler, config=config, seed=11)
    return psnr(sample(d, inv.latent, inv.sigmas, sampler, noises=inv.noises), x0).mean().item(), inv


def test_k0_is_exactly_ddim_inversion(mixture, turbo_sigmas):
    x0 = mixture.sample(CLASSES, seed=1)
    d = mixture.denoiser(CLASSES)
    x = x0.clone()
    sig = turbo_sigmas.tolist()
    for i in reversed(range(len(sig) - 1)):  # DDIM inversion: eps evaluated at the lower point
        eps = (x - d(x, torch.full((3,), sig[i]))) / sig[i]
        x = x - (sig[i + 1] - sig[i]) * eps
    inv = invert(d, x0, turbo_sigmas, "ddim", config=ReNoiseConfig(renoise_steps=0))
    assert torch.equal(inv.latent, x)
    assert inv.denoiser_calls == 4


def test_renoise_beats_sampler_reversal_at_equal_calls(mixture, turbo_sigmas):
    """4-step Euler: ReNoise (K=9, 35 calls) against reversal with 40 inversion steps (40 calls)."""
    x0 = mixture.sample(CLASSES, seed=1)
    d = mixture.denoiser(CLASSES)
    reversal = invert(d, x0, schedule(40), "euler", config=ReNoiseConfig(renoise_steps=0))
    reversal_db = psnr(sample(d, reversal.latent, turbo_sigmas, "euler"), x0).mean().item()
    renoise_db, inv = reconstruction_db(mixture, x0, "euler", turbo_sigmas, ReNoiseConfig(early_below_sigma=EARLY_BELOW_SIGMA))
    assert inv.denoiser_calls <= reversal.denoiser_calls
    assert renoise_db > reversal_db + 8.0, (renoise_db, reversal_db)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "lcm", "ddpm"])
def test_renoise_improves_on_plain_reversal(mixture, turbo_sigmas, sampler):
    x0 = mixture.sample(CLASSES, seed=1)
    plain_db, _ = reconstruction_db(mixture, x0, sampler, turbo_sigmas, ReNoiseConfig(renoise_steps=0))
    renoise_db, _ = reconstruction_db(mixture, x0, sampler, turbo_sigmas, ReNoiseConfig(early_below_sigma=EARLY_BELOW_SIGMA))
    assert renoise_db > plain_db + 2.0, (plain_db, renoise_db)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "lcm", "ddpm"])
def test_exact_noise_correction_reconstructs_stochastic_inversion(mixture, turbo_sigmas, sampler):
    x0 = mixture.sample(CLASSES, seed=1)
    base = ReNoiseConfig(early_below_sigma=EARLY_BELOW_SIGMA)
    none_db, _ = reconstruction_db(mixture, x0, sampler, turbo_sigmas, base)
    exact = dataclasses.replace(base, noise_correction=NoiseCorrectionConfig("exact"))
    optimize = dataclasses.replace(base, noise_correction=NoiseCorrectionConfig("optimize"))
    exact_db, inv = reconstruction_db(mixture, x0, sampler, turbo_sigmas, exact)
    optimize_db, _ = reconstruction_db(mixture, x0, sampler, turbo_sigmas, optimize)
    assert exact_db > none_db + 15.0, (none_db, exact_db)
    assert exact_db > 40.0
    assert none_db < optimize_db < exact_db
    # one extra call per stochastic step; none where rho = 0 (the last sampling step)
    assert [s.denoiser_calls for s in inv.steps] == [11, 11, 11, 5]


def test_turbo_defaults_make_38_calls(mixture, turbo_sigmas):
    x0 = mixture.sample([0], seed=1)
    inv = invert(mixture.denoiser([0]), x0, turbo_sigmas, "euler_ancestral", config=TURBO, seed=7865)
    assert inv.denoiser_calls == 38 == planned_denoiser_calls(turbo_sigmas, "euler_ancestral", TURBO)
    assert [s.evaluations for s in inv.steps] == [10, 10, 10, 5]
    assert [tuple(s.change_norms.shape) for s in inv.steps] == [(9, 1)] * 3 + [(4, 1)]


def test_same_seed_same_result_and_seed_matters(mixture, turbo_sigmas):
    x0 = mixture.sample([2], seed=3)
    d = mixture.denoiser([2])
    a = invert(d, x0, turbo_sigmas, "euler_ancestral", config=TURBO, seed=5)
    b = invert(d, x0, turbo_sigmas, "euler_ancestral", config=TURBO, seed=5)
    c = invert(d, x0, turbo_sigmas, "euler_ancestral", config=TURBO, seed=6)
    assert torch.equal(a.latent, b.latent) and torch.equal(a.noises, b.noises)
    assert not torch.allclose(a.latent, c.latent)


def test_batch_equals_single_runs(mixture, turbo_sigmas):
    """Item b of a batch with seed s is the single run with seed s + b (noises, rolls, losses all per item)."""
    x0 = mixture.sample(CLASSES, seed=4)
    batch = invert(mixture.denoiser(CLASSES), x0, turbo_sigmas, "euler_ancestral", config=TURBO, seed=100)
    for b, cls in enumerate(CLASSES):
        single = invert(mixture.denoiser([cls]), x0[b : b + 1], turbo_sigmas, "euler_ancestral", config=TURBO, seed=100 + b)
        assert torch.allclose(batch.latent[b : b + 1], single.latent, atol=1e-5, rtol=1e-5)
        assert torch.allclose(batch.noises[:, b : b + 1], single.noises, atol=1e-5, rtol=1e-5)


def test_inputs_are_not_modified(mixture, turbo_sigmas):
    x0 = mixture.sample(CLASSES, seed=1)
    noises = torch.randn((4,) + tuple(x0.shape))
    sigmas = turbo_sigmas.clone()
    x0_copy, noises_copy, sigmas_copy = x0.clone(), noises.clone(), sigmas.clone()
    d = mixture.denoiser(CLASSES)
    inv = invert(d, x0, sigmas, "euler_ancestral", config=TURBO, noises=noises)
    sample(d, inv.latent, inv.sigmas, "euler_ancestral", noises=inv.noises)
    assert torch.equal(x0, x0_copy) and torch.equal(noises, noises_copy) and torch.equal(sigmas, sigmas_copy)
    assert inv.noises.data_ptr() != noises.data_ptr()


def test_works_under_inference_mode(mixture, turbo_sigmas):
    x0 = mixture.sample([1], seed=1)
    d = mixture.denoiser([1])
    outside = invert(d, x0, turbo_sigmas, "euler_ancestral", config=TURBO, seed=3)
    with torch.inference_mode():
        inside = invert(d, x0.clone(), turbo_sigmas, "euler_ancestral", config=TURBO, seed=3)
        replay = sample(d, inside.latent, inside.sigmas, "euler_ancestral", noises=inside.noises)
    assert torch.allclose(inside.latent, outside.latent, atol=1e-6)
    assert torch.isfinite(replay).all()


def test_partial_inversion_is_the_lower_part_of_the_full_one(mixture):
    full_sigmas = schedule(8)
    x0 = mixture.sample([5], seed=2)
    d = mixture.denoiser([5])
    full = invert(d, x0, full_sigmas, "euler_ancestral", config=TURBO, seed=9, keep_trajectory=True)
    partial = invert(d, x0, full_sigmas[3:], "euler_ancestral", config=TURBO, seed=9)
    assert torch.allclose(partial.latent, full.trajectory[3], atol=1e-5)
    assert torch.allclose(partial.noises, full.noises[3:], atol=1e-6)
    assert float(partial.sigmas[0]) == pytest.approx(float(full_sigmas[3]))


def test_convergence_tolerance_saves_calls_at_equal_quality(mixture, turbo_sigmas):
    """Adaptive stopping reaches the quality of a fixed K = 14 (60 calls) with at most 3/4 of its calls
    (measured: 43 calls, 68.5 dB against 60 calls, 65.3 dB)."""
    x0 = mixture.sample(CLASSES, seed=1)
    fixed_db, fixed = reconstruction_db(mixture, x0, "euler", turbo_sigmas, ReNoiseConfig(renoise_steps=14, average_start=14))
    adaptive_cfg = ReNoiseConfig(renoise_steps=30, average_start=30, convergence_tol=1e-3)
    adaptive_db, adaptive = reconstruction_db(mixture, x0, "euler", turbo_sigmas, adaptive_cfg)
    assert adaptive_db >= fixed_db, (fixed_db, adaptive_db)
    assert adaptive.denoiser_calls <= 0.75 * fixed.denoiser_calls, (adaptive.denoiser_calls, fixed.denoiser_calls)


def test_change_norms_decrease_on_average(mixture, turbo_sigmas):
    x0 = mixture.sample(CLASSES, seed=1)
    inv = invert(mixture.denoiser(CLASSES), x0, turbo_sigmas, "euler", config=ReNoiseConfig())
    for step in inv.steps:
        assert step.change_norms[-1].mean() < 0.5 * step.change_norms[0].mean()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(mixture, turbo_sigmas, dtype):
    x0 = mixture.sample([1], seed=1).to(dtype)
    base = mixture.denoiser([1])

    def low_precision_denoiser(x, sigma):  # a model that computes in the input's dtype, as fp16 UNets do
        return base(x.to(dtype), sigma.to(dtype))

    inv = invert(low_precision_denoiser, x0, turbo_sigmas, "euler_ancestral", config=TURBO, seed=1)
    assert inv.latent.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.isfinite(inv.latent).all() and torch.isfinite(inv.noises).all()


def test_optimize_noise_correction_matches_gradient_descent_on_the_norm():
    g = torch.Generator().manual_seed(0)
    noise, required = torch.randn((2, 4, 8, 8), generator=g), torch.randn((2, 4, 8, 8), generator=g)
    required[1] = noise[1] + 0.3 * (required[1] - noise[1]) / (required[1] - noise[1]).norm()  # within one step
    config = NoiseCorrectionConfig("optimize", steps=10, step_size=1.8)
    ours = correct_noise(noise, required, config)
    for b in range(2):
        n = noise[b].clone().requires_grad_(True)
        opt = torch.optim.SGD([n], lr=1.8)
        for _ in range(10):
            opt.zero_grad()
            (n - required[b]).norm().backward()
            opt.step()
        assert torch.allclose(ours[b], n.detach(), atol=1e-4)
    assert torch.equal(correct_noise(noise, required, NoiseCorrectionConfig("exact")), required)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(sigmas=[]), "at least 2"),
        (dict(sigmas=[0.5, 1.0, 0.0]), "strictly descending"),
        (dict(sampler="dpmpp_2m"), "unknown sampler"),
        (dict(noises=torch.zeros(3, 1, 4, 16, 16)), r"noises must have shape \[steps, B, C, H, W\] = \[4, 1, 4, 16, 16\]"),
        (dict(x0=torch.zeros(4, 16, 16)), r"\[B, C, H, W\]"),
        (dict(x0=torch.full((1, 4, 16, 16), float("nan"))), "NaN or Inf"),
        (dict(x0=torch.zeros(1, 4, 6, 16), config=TURBO), "edit losses need a latent of at least 8x8"),
    ],
)
def test_bad_arguments_raise_clear_errors(mixture, turbo_sigmas, kwargs, message):
    args = dict(x0=mixture.sample([0], seed=0), sigmas=turbo_sigmas, sampler="euler")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        invert(mixture.denoiser([0]), args.pop("x0"), args.pop("sigmas"), args.pop("sampler"), **args)


@pytest.mark.parametrize("field,value", [("renoise_steps", -1), ("average_start", -2), ("renoise_steps", 1.5), ("convergence_tol", 0.0)])
def test_bad_config_values(field, value):
    with pytest.raises(ValueError, match=field):
        ReNoiseConfig(**{field: value})


def test_replay_needs_noises_for_stochastic_samplers(mixture, turbo_sigmas):
    with pytest.raises(ValueError, match="pass the inversion's noises"):
        sample(mixture.denoiser([0]), torch.zeros(1, 4, 16, 16), turbo_sigmas, "lcm")
    assert len(make_steps("lcm", turbo_sigmas)) == 4


def test_editing_changes_the_class(mixture, turbo_sigmas):
    """Invert with the source class, sample with another: the result moves to the target component."""
    x0 = mixture.sample([2], seed=8)
    inv = invert(mixture.denoiser([2]), x0, turbo_sigmas, "euler_ancestral", config=TURBO, seed=1)
    edited = sample(mixture.denoiser([7]), inv.latent, inv.sigmas, "euler_ancestral", noises=inv.noises)
    to_target = (edited - mixture.means[7].float()).norm()
    to_source = (edited - mixture.means[2].float()).norm()
    assert to_target < to_source


def test_divergence_is_reported_not_returned(mixture, turbo_sigmas):
    absurd = dataclasses.replace(TURBO, edit_loss=EditLossConfig(lambda_ac=1e6))
    with pytest.raises(FloatingPointError, match="diverged"):
        invert(mixture.denoiser([0]), mixture.sample([0], seed=0), turbo_sigmas, "euler_ancestral", config=absurd)
