"""The shipped learned test denoiser (renoise_core/learned.py): loading, tensor behaviour, and measured quality
against the exact posterior mean of the spectral mixture it was trained on."""

import math
import runpy
import sys

import pytest
import torch

from renoise_core import ReNoiseConfig, invert, sample
from renoise_core.analytic import SpectralMixture, psnr
from renoise_core.learned import DEFAULT_WEIGHTS, LearnedDenoiser, load_learned_denoiser
from renoise_core.schedules import sd_discrete_sigmas, simple_schedule

# The training data's model (scripts/train_learned_denoiser.py); held-out samples use seeds the script never draws.
DATA = SpectralMixture.random(components=16, shape=(4, 32, 32), within=1.0, alpha=2.0, seed=0, parameterization="eps")


@pytest.fixture(scope="module")
def learned() -> LearnedDenoiser:
    return load_learned_denoiser()


@pytest.fixture(scope="module")
def held_out():
    classes = [c % 16 for c in range(32)]
    x0 = DATA.sample(classes, seed=2024)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2025))
    return classes, x0, noise


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean())


def test_shipped_weights_are_small_and_documented(learned):
    assert DEFAULT_WEIGHTS.stat().st_size <= 2 * 1024 * 1024
    for key in ("command", "seed", "data", "steps", "final_loss", "storage"):
        assert learned.metadata.get(key), key
    assert "train_learned_denoiser.py" in learned.metadata["command"]
    assert learned.num_components == DATA.num_components


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_learned_denoiser.py"):
        load_learned_denoiser(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_shape_dtype_and_no_mutation(learned, held_out, dtype):
    _, x0, noise = held_out
    x = (x0[:3] + 2.0 * noise[:3]).to(dtype)
    before = x.clone()
    sigma = torch.tensor([2.0, 0.5, 8.0], dtype=dtype)
    with torch.inference_mode():
        out = learned.denoiser([1, 2, 3])(x, sigma)
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.equal(x, before)
    assert torch.isfinite(out).all()
    reference = learned.denoiser([1, 2, 3])(x.float(), sigma.float())
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-4}.get(dtype, 0.1)
    assert torch.allclose(out.float(), reference, atol=tolerance), (out.float() - reference).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda(learned, held_out):
    _, x0, noise = held_out
    x, sigma = x0[:2] + noise[:2], torch.ones(2)
    out = learned.denoiser([0, 1])(x.cuda().half(), sigma.cuda())
    assert out.device.type == "cuda" and out.dtype == torch.float16
    assert torch.allclose(out.float().cpu(), learned.denoiser([0, 1])(x, sigma), atol=0.05)


def test_deterministic_and_batch_independent(learned, held_out):
    classes, x0, noise = held_out
    x, sigma = x0[:4] + 1.5 * noise[:4], torch.tensor([1.5, 0.2, 5.0, 1.5])
    denoise = learned.denoiser(classes[:4])
    first, second = denoise(x, sigma), denoise(x, sigma)
    assert torch.equal(first, second)
    one_by_one = torch.cat([learned.denoiser([c])(x[i : i + 1], sigma[i : i + 1]) for i, c in enumerate(classes[:4])])
    assert torch.allclose(first, one_by_one, atol=1e-5)


def test_cfg_combines_like_the_analytic_models(learned):
    sigma = 14.6146  # the top of SD's schedule, from pure noise: there the prior moves the prediction
    x, sigmas = sigma * torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(5)), torch.full((2,), sigma)
    cond, uncond = learned.denoiser([4, 5])(x, sigmas), learned.denoiser(None)(x, sigmas)
    guided = learned.denoiser([4, 5], cfg=3.0)(x, sigmas)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-5)
    assert mse(cond, uncond) > 1e-3


# Measured on the shipped weights (README, "The learned test model"): MSE(net) / MSE(exact posterior mean) at
# these sigmas. The bounds are loose enough for other BLAS builds, tight enough to catch a broken model.
RATIO_BOUND = 1.3
WRONG_CLASS_BOUND = 1.5
GENERATION_HITS = 6


@pytest.mark.parametrize("sigma", [0.1, 0.5, 2.0, 8.0, 14.6146])
def test_denoising_error_is_close_to_the_exact_posterior_mean(learned, held_out, sigma):
    classes, x0, noise = held_out
    x = x0 + sigma * noise
    sigmas = torch.full((x.shape[0],), sigma)
    prior = DATA.prior(classes)
    net = mse(learned.denoise(x, sigmas, prior), x0)
    exact = mse(DATA.posterior_mean(x, sigmas, prior), x0)
    assert net <= RATIO_BOUND * exact, (sigma, net / exact)
    if sigma >= 0.5:  # below, D = x is itself nearly optimal (the noise is under most of the signal's spectrum)
        trivial = min(mse(torch.zeros_like(x0), x0), mse(x, x0))  # D = 0, D = x
        # the exact posterior mean reaches 0.65 x the best trivial MSE at sigma 0.5, 0.29 at 2, 0.49 at 14.6
        assert net < (0.6 if sigma >= 2.0 else 0.8) * trivial, (sigma, net, trivial)


def test_class_conditioning_matters_where_the_prior_decides(learned, held_out):
    """The spectral mixture's 16 classes are so far apart in 4096 dimensions that at SD's sigmas the noisy latent
    itself tells the class (for the exact posterior mean, a wrong prior costs under 1 % MSE up to sigma 14.6).
    At sigma 40 (trained on, above SD's range) the prior decides: the wrong class must cost, as it does exactly."""
    classes, x0, noise = held_out
    sigma = 40.0
    x, sigmas = x0 + sigma * noise, torch.full((x0.shape[0],), sigma)
    wrong_classes = [(c + 1) % 16 for c in classes]
    right, wrong = mse(learned.denoiser(classes)(x, sigmas), x0), mse(learned.denoiser(wrong_classes)(x, sigmas), x0)
    exact_right = mse(DATA.denoiser(classes)(x, sigmas), x0)
    exact_wrong = mse(DATA.denoiser(wrong_classes)(x, sigmas), x0)
    assert exact_wrong > 2 * exact_right  # the premise
    assert wrong > WRONG_CLASS_BOUND * right, (right, wrong, exact_right, exact_wrong)


def test_generation_follows_the_class(learned):
    """Sampling from pure noise (euler, 10 steps) with class c lands nearest to component c more often than chance."""
    classes = [c % 16 for c in range(32)]
    sigmas = simple_schedule(sd_discrete_sigmas(), 10)
    start = sigmas[0] * torch.randn((32, 4, 32, 32), generator=torch.Generator().manual_seed(7))
    out = sample(learned.denoiser(classes), start, sigmas, "euler")
    nearest = torch.cdist(out.double().flatten(1), DATA.means.flatten(1)).argmin(1)
    hits = int((nearest == torch.tensor(classes)).sum())
    assert hits >= GENERATION_HITS, hits  # chance: 2 of 32


def test_renoise_reconstructs_better_than_plain_reversal(learned):
    x0 = DATA.sample([3, 7], seed=77)
    sigmas = simple_schedule(sd_discrete_sigmas(), 4)
    denoise = learned.denoiser([3, 7])
    results = {}
    for k in (0, 9):
        inversion = invert(denoise, x0, sigmas, "euler", config=ReNoiseConfig(renoise_steps=k))
        results[k] = psnr(sample(denoise, inversion.latent, sigmas, "euler"), x0)
    assert torch.isfinite(results[0]).all() and torch.isfinite(results[9]).all()
    assert (results[9] > results[0] + 3.0).all(), results


def test_training_script_runs_and_its_output_loads(tmp_path, monkeypatch):
    out = tmp_path / "tiny.safetensors"
    script = str(DEFAULT_WEIGHTS.parents[2] / "scripts" / "train_learned_denoiser.py")
    monkeypatch.setattr(sys, "argv", [script, "--steps", "2", "--batch", "4", "--seed", "3", "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    model = load_learned_denoiser(out)
    assert model.metadata["steps"] == "2" and model.metadata["seed"] == "3"
    assert "--steps 2" in model.metadata["command"]
    assert math.isfinite(float(model.metadata["final_loss"]))
