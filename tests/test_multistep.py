"""heun, dpm_2, dpmpp_2m, dpmpp_2m_sde: forward steps against ComfyUI's arithmetic (re-derived below term by term
from comfy/k_diffusion/sampling.py, 0.3.64), inverse identities, and reconstruction on the exact analytic model."""

import math

import pytest
import torch

from renoise_core.analytic import GaussianMixture, psnr
from renoise_core.edit_losses import EditLossConfig
from renoise_core.inversion import NoiseCorrectionConfig
from renoise_core.multistep import (
    MULTISTEP_SAMPLERS,
    NOT_INVERTIBLE,
    anderson_solver,
    dpmpp_2m_steps,
    extrapolate_up,
    fixed_point,
    invert_multistep,
    make_multistep_steps,
    planned_multistep_calls,
    previous_prediction_weights,
    sample_multistep,
)
from renoise_core.samplers import ancestral_sigmas
from renoise_core.schedules import karras_schedule

CLASSES = [0, 3]


@pytest.fixture(scope="module")
def model():
    return GaussianMixture.random(8, (4, 16, 16), seed=2)


@pytest.fixture(scope="module")
def photo(model):
    return model.sample(CLASSES, seed=5)


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def comfy_heun(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * x.new_ones([x.shape[0]])))
            x = x + (d + d_2) / 2 * dt
    return x


def comfy_dpm_2(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        d = to_d(x, sigmas[i], model(x, sigmas[i] * x.new_ones([x.shape[0]])))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * x.new_ones([x.shape[0]])))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def comfy_dpm_2_ancestral(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, flow=False):
    """ComfyUI's ``sample_dpm_2_ancestral`` and (``flow``) ``sample_dpm_2_ancestral_RF``, transcribed."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if flow:
            downstep_ratio = 1 + (sigmas[i + 1] / sigmas[i] - 1) * eta
            sigma_down = sigmas[i + 1] * downstep_ratio
            alpha_ip1, alpha_down = 1 - sigmas[i + 1], 1 - sigma_down
            renoise_coeff = (sigmas[i + 1] ** 2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
        else:
            sigma_up = min(sigmas[i + 1], eta * (sigmas[i + 1] ** 2 * (sigmas[i] ** 2 - sigmas[i + 1] ** 2) / sigmas[i] ** 2) ** 0.5)
            sigma_down = (sigmas[i + 1] ** 2 - sigma_up**2) ** 0.5
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * x.new_ones([x.shape[0]])))
            x = x + d_2 * (sigma_down - sigmas[i])
            if flow:
                x = (alpha_ip1 / alpha_down) * x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * renoise_coeff
            else:
                x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def comfy_dpmpp_2m(model, x, sigmas):
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised
        else:
            r = (t + sigmas[i - 1].log()) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (t_next.neg().exp() / t.neg().exp()) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def comfy_dpmpp_2m_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, solver_type="midpoint"):
    old_denoised, h, h_last = None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = -sigmas[i].log(), -sigmas[i + 1].log()
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sigmas[i + 1] * lambda_t.exp()
            x = sigmas[i + 1] / sigmas[i] * (-h * eta).exp() * x + alpha_t * (-h_eta).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + alpha_t * ((-h_eta).expm1().neg() / (-h_eta) + 1) * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * alpha_t * (-h_eta).expm1().neg() * (1 / r) * (denoised - old_denoised)
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        old_denoised = denoised
        h_last = h
    return x


def comfy_res_multistep(model, x, sigmas, noise_sampler, eta=0.0, s_noise=1.0):
    """ComfyUI 0.3.64's ``res_multistep`` (cfg_pp off), transcribed."""
    old_sigma_down, old_denoised = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones([x.shape[0]]))
        sigma_down, sigma_up = ancestral_sigmas(float(sigmas[i]), float(sigmas[i + 1]), eta)
        sigma_down, sigma_up = torch.tensor(sigma_down, dtype=x.dtype), torch.tensor(sigma_up, dtype=x.dtype)
        if sigma_down == 0 or old_denoised is None:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_old, t_next, t_prev = -sigmas[i].log(), -old_sigma_down.log(), -sigma_down.log(), -sigmas[i - 1].log()
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x = (-h).exp() * x + h * (b1 * denoised + b2 * old_denoised)
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        old_denoised, old_sigma_down = denoised, sigma_down
    return x


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
                                     "res_multistep", "res_multistep_ancestral"])
def test_forward_matches_comfyui_arithmetic(model, sampler):
    sigmas = karras_schedule(6).double()
    denoiser = model.denoiser(CLASSES)
    x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.float64) * sigmas[0]
    noises = torch.randn((6, 2, 4, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    index = {float(s): i for i, s in enumerate(sigmas[:-1])}
    noise_sampler = lambda s, s_next: noises[index[float(s)]]  # noqa: E731
    reference = {
        "heun": lambda: comfy_heun(denoiser, x, sigmas),
        "dpm_2": lambda: comfy_dpm_2(denoiser, x, sigmas),
        "dpm_2_ancestral": lambda: comfy_dpm_2_ancestral(denoiser, x, sigmas, noise_sampler, eta=0.8, s_noise=1.1),
        "dpmpp_2m": lambda: comfy_dpmpp_2m(denoiser, x, sigmas),
        "dpmpp_2m_sde": lambda: comfy_dpmpp_2m_sde(denoiser, x, sigmas, noise_sampler),
        "dpmpp_2m_sde_heun": lambda: comfy_dpmpp_2m_sde(denoiser, x, sigmas, noise_sampler, solver_type="heun"),
        "res_multistep": lambda: comfy_res_multistep(denoiser, x, sigmas, noise_sampler),
        "res_multistep_ancestral": lambda: comfy_res_multistep(denoiser, x, sigmas, noise_sampler, eta=1.0),
    }[sampler]()
    options = {"eta": 0.8, "s_noise": 1.1} if sampler == "dpm_2_ancestral" else {}
    ours = sample_multistep(denoiser, x, sigmas, sampler, noises=noises, sampler_options=options)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


def test_dpm_2_ancestral_rf_matches_comfyui_arithmetic():
    """On a flow model ComfyUI runs ``sample_dpm_2_ancestral_RF`` (a rescale before the noise)."""
    flow = GaussianMixture.random(8, (4, 16, 16), seed=2, parameterization="flow")
    denoiser = flow.denoiser(CLASSES)
    sigmas = torch.linspace(0.95, 0.0, 7, dtype=torch.float64)
    x = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noises = torch.randn((6, 2, 4, 16, 16), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    index = {float(s): i for i, s in enumerate(sigmas[:-1])}
    reference = comfy_dpm_2_ancestral(denoiser, x, sigmas, lambda s, s_next: noises[index[float(s)]], eta=0.8, flow=True)
    ours = sample_multistep(denoiser, x, sigmas, "dpm_2_ancestral", noises=noises, parameterization="flow", sampler_options={"eta": 0.8})
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "res_multistep", "res_multistep_ancestral"])
def test_multistep_inverse_undoes_forward(sampler):
    steps = make_multistep_steps(sampler, karras_schedule(5).double())
    g = torch.Generator().manual_seed(0)
    x, denoised, previous, noise = (torch.randn((1, 4, 8, 8), generator=g, dtype=torch.float64) for _ in range(4))
    for step in steps:
        x_next = step.forward(x, denoised, previous, noise)
        eps = (x - denoised) / step.sigma
        torch.testing.assert_close(step.inverse(x_next, eps, previous, noise), x, rtol=1e-12, atol=1e-12)
        if step.is_stochastic:
            torch.testing.assert_close(step.required_noise(x, x_next, denoised, previous), noise, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpm_2_ancestral"])
def test_two_stage_fixed_point_is_the_upper_point(model, sampler):
    denoiser = model.denoiser(CLASSES)
    offset = torch.randn((2, 4, 16, 16), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = model.sample(CLASSES, seed=3).double() + 2.0 * offset
    step = make_multistep_steps(sampler, [2.0, 1.0, 0.0])[0]

    def derivative(z, sigma):
        return (z - denoiser(z, torch.full((2,), sigma, dtype=torch.float64))) / sigma

    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) if step.is_stochastic else None
    assert step.is_stochastic == (sampler == "dpm_2_ancestral")
    x_next = step.forward(x, derivative(x, step.sigma), derivative, noise)
    torch.testing.assert_close(step.target(x_next, noise) - step.increment(x, derivative(x, step.sigma), derivative), x)


@pytest.mark.parametrize("sampler", ["heun", "dpm_2", "dpmpp_2m", "res_multistep"])
def test_reconstruction_at_20_karras_steps(model, photo, sampler):
    denoiser = model.denoiser(CLASSES)
    sigmas = karras_schedule(20)
    inversion = invert_multistep(denoiser, photo, sigmas, sampler, iterations=2)
    assert inversion.denoiser_calls == planned_multistep_calls(sigmas, sampler, iterations=2)
    reconstruction = sample_multistep(denoiser, inversion.latent, sigmas, sampler)
    assert psnr(reconstruction, photo).min() > 40


@pytest.mark.parametrize("sampler, iterations, exact_db, optimize_gain", [("dpmpp_2m_sde", 2, 60, 0), ("dpm_2_ancestral", 1, 100, 10)])
def test_stochastic_noise_correction(model, photo, sampler, iterations, exact_db, optimize_gain):
    """The noise enters each step linearly (dpm_2_ancestral: after both evaluations): exact noise correction
    reconstructs far better than without, optimize better than none; the calls are as planned."""
    denoiser = model.denoiser(CLASSES)
    sigmas = karras_schedule(20)
    results = {}
    for mode in (None, "optimize", "exact"):
        correction = NoiseCorrectionConfig(mode) if mode else None
        inversion = invert_multistep(denoiser, photo, sigmas, sampler, iterations=iterations, seed=3, noise_correction=correction)
        assert inversion.denoiser_calls == planned_multistep_calls(sigmas, sampler, iterations=iterations, noise_correction=correction)
        reconstruction = sample_multistep(denoiser, inversion.latent, sigmas, sampler, noises=inversion.noises)
        results[mode] = psnr(reconstruction, photo).min().item()
    assert results["exact"] > exact_db and results["optimize"] > results[None] + optimize_gain, results


def test_inputs_are_not_modified_and_seeded(model, photo):
    denoiser = model.denoiser(CLASSES)
    before = photo.clone()
    a = invert_multistep(denoiser, photo, karras_schedule(4), "dpmpp_2m_sde", seed=9, noise_correction=NoiseCorrectionConfig("optimize"))
    b = invert_multistep(denoiser, photo, karras_schedule(4), "dpmpp_2m_sde", seed=9, noise_correction=NoiseCorrectionConfig("optimize"))
    assert torch.equal(photo, before)
    assert torch.equal(a.latent, b.latent) and torch.equal(a.noises, b.noises)


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpm_2_ancestral"])
def test_edit_losses_make_a_noise_corrected_stochastic_inversion_editable(sampler):
    """Invert class 3, sample back with class 9 (cfg 4): without edit losses the noise-corrected inversion stays
    class 3 (its latent lies far off the noise distribution, where the class evidence swamps the prompt); with them
    the edit lands nearer class 9's mean than class 3's. Measured (20 karras steps), PSNR without -> with:
    dpmpp_2m_sde 86.3 -> 38.5 dB, dpm_2_ancestral 80.5 -> 39.4: the editability trade-off of ReNoise's edit losses."""
    boxed = GaussianMixture.boxed()
    photo = boxed.sample([3], seed=1)
    sigmas = karras_schedule(20)
    source, target = boxed.denoiser([3]), boxed.denoiser([9], cfg=4.0)
    correction = NoiseCorrectionConfig("optimize")

    def edit(edit_loss):
        inversion = invert_multistep(source, photo, sigmas, sampler, seed=5, noise_correction=correction, edit_loss=edit_loss)
        assert inversion.denoiser_calls == planned_multistep_calls(sigmas, sampler, noise_correction=correction)
        edited = sample_multistep(target, inversion.latent, sigmas, sampler, noises=inversion.noises)
        return (edited - boxed.means[9]).norm().item(), (edited - boxed.means[3]).norm().item()

    to_target, to_source = edit(None)
    assert to_target > to_source
    to_target, to_source = edit(EditLossConfig())
    assert to_target < to_source


@pytest.mark.parametrize("sampler", ["res_multistep_ancestral", "heun", "dpm_2_ancestral"])
def test_edit_losses_per_item_and_seeded(model, photo, sampler):
    """A batch gets what each item gets alone (own reference noise and pair-loss shifts, from its seed); the inputs
    are untouched; the losses change the inversion."""
    denoiser = model.denoiser(CLASSES)
    sigmas, edit = karras_schedule(6), EditLossConfig()
    before = photo.clone()
    both = invert_multistep(denoiser, photo, sigmas, sampler, seed=[9, 10], edit_loss=edit)
    assert torch.equal(photo, before)
    for b, seed in enumerate((9, 10)):
        alone = invert_multistep(model.denoiser(CLASSES[b:b + 1]), photo[b:b + 1], sigmas, sampler, seed=seed, edit_loss=edit)
        torch.testing.assert_close(both.latent[b:b + 1], alone.latent, rtol=1e-5, atol=1e-5)
    plain = invert_multistep(denoiser, photo, sigmas, sampler, seed=[9, 10])
    assert not torch.allclose(plain.latent, both.latent, atol=1e-3)


def test_solver_is_pluggable(model, photo):
    seen = []

    def solver(map_fn, z0, iterations):
        seen.append(iterations)
        return fixed_point(map_fn, z0, iterations)

    denoiser = model.denoiser(CLASSES)
    invert_multistep(denoiser, photo, karras_schedule(3), "dpmpp_2m", iterations=2, sweeps=2, sweep_iterations=1, solver=solver)
    assert seen == [2, 2, 2, 1, 1, 1]


@pytest.mark.parametrize("sampler", sorted(NOT_INVERTIBLE))
def test_samplers_not_inverted_say_why(sampler):
    with pytest.raises(ValueError, match="cannot be inverted") as error:
        make_multistep_steps(sampler, [1.0, 0.0])
    assert NOT_INVERTIBLE[sampler][:20] in str(error.value)


def test_flow_sde_from_sigma_one_is_refused():
    with pytest.raises(ValueError, match="starts below 1"):
        make_multistep_steps("dpmpp_2m_sde", [1.0, 0.5, 0.0], "flow")


def test_stochastic_sampling_needs_noises(model, photo):
    with pytest.raises(ValueError, match="stochastic"):
        sample_multistep(model.denoiser(CLASSES), photo, karras_schedule(3), "dpmpp_2m_sde")


def test_karras_schedule_is_comfyuis():
    sigmas = karras_schedule(20)
    assert len(sigmas) == 21 and sigmas[-1] == 0
    assert math.isclose(sigmas[0].item(), 14.6146, rel_tol=1e-6) and math.isclose(sigmas[-2].item(), 0.0292, rel_tol=1e-5)
    assert set(MULTISTEP_SAMPLERS) >= {"heun", "dpmpp_2m", "dpmpp_2m_sde"}


def test_dpmpp_2m_sweeps_converge_toward_the_joint_solution(model, photo):
    denoiser = model.denoiser(CLASSES)
    sigmas = karras_schedule(20)
    db = []
    for sweeps in (1, 2, 3):
        inversion = invert_multistep(denoiser, photo, sigmas, "dpmpp_2m", iterations=1, sweeps=sweeps, sweep_iterations=2)
        db.append(psnr(sample_multistep(denoiser, inversion.latent, sigmas, "dpmpp_2m"), photo).min().item())
    assert db[1] > db[0] + 3 and db[2] > db[1] + 3, db


def test_sampler_bench_rows():
    """The per-sampler table ``./dev bench`` prints: every sampler, finite, calls as planned; on the spectral model
    anderson's euler beats the paper loop's at equal calls, and exact noise correction reconstructs dpmpp_2m_sde."""
    from renoise_core.bench_solvers import spectral_model
    from renoise_core.sampler_bench import sampler_table

    rows = {(row.sampler, row.setting): row for row in sampler_table(spectral_model(), karras_schedule(8), quick=True)}
    assert {sampler for sampler, _ in rows} == {"euler", "heun", "dpmpp_2m", "res_multistep", "dpmpp_2m_sde"}
    assert all(math.isfinite(row.psnr_db) for row in rows.values())
    paper, accelerated = rows["euler", "fixed_point K=1"], rows["euler", "anderson K=1"]
    assert paper.calls == accelerated.calls == 16 and accelerated.psnr_db > paper.psnr_db
    exact = rows["dpmpp_2m_sde", "iterations=1 sweeps=2 sweep_iterations=2 noise_correction=exact"]
    none = rows["dpmpp_2m_sde", "iterations=1 sweeps=2 sweep_iterations=2 noise_correction=None"]
    assert exact.psnr_db > max(60.0, none.psnr_db)


def test_dpmpp_2m_first_sweep_with_the_line_is_the_trapezoidal_rule():
    """With ``D_prev`` predicted by the line through ``D(x)`` and the prediction at the lower point, dpmpp_2m's step is
    ``x_next = (sigma_next / sigma) x - expm1(-h) (D(x) + D_next) / 2`` whatever the step ratio."""
    sigmas = karras_schedule(6).tolist()
    for i, step in enumerate(dpmpp_2m_steps(sigmas)[1:-1], start=1):
        half = -math.expm1(-(math.log(step.sigma) - math.log(step.sigma_next))) / 2
        weight_here, weight_below = previous_prediction_weights(sigmas[i - 1], step.sigma, [step.sigma_next])
        trapezoid = step.with_previous_predicted(weight_here)
        assert math.isclose(trapezoid.denoised_coeff, half, rel_tol=1e-12)
        assert math.isclose(trapezoid.previous_coeff * weight_below, half, rel_tol=1e-12)
        assert trapezoid.x_coeff == step.x_coeff


def test_previous_prediction_weights_are_exact_for_a_parabola_in_log_sigma():
    def parabola(sigma):
        return 0.3 - 1.7 * math.log(sigma) + 0.45 * math.log(sigma) ** 2

    sigma_previous, sigma, below = 7.1, 3.2, [1.9, 0.8]
    weights = previous_prediction_weights(sigma_previous, sigma, below)
    predicted = sum(w * parabola(s) for w, s in zip(weights, [sigma] + below))
    assert math.isclose(predicted, parabola(sigma_previous), rel_tol=1e-12)
    line = previous_prediction_weights(sigma_previous, sigma, below[:1])
    assert not math.isclose(sum(w * parabola(s) for w, s in zip(line, [sigma] + below[:1])), parabola(sigma_previous), rel_tol=1e-3)
    assert math.isclose(sum(line), 1.0) and math.isclose(sum(weights), 1.0)


def test_extrapolate_up_solves_the_ode_for_a_prediction_linear_in_log_sigma():
    """Against a fine Heun integration of ``dx/dsigma = (x - D(sigma)) / sigma``; with one known prediction the
    start is the Euler / DDIM step up."""
    a, b = torch.tensor([0.4, -1.0, 2.0], dtype=torch.float64), torch.tensor([0.3, 0.1, -0.5], dtype=torch.float64)

    def denoised(sigma):
        return a + b * math.log(sigma)

    x_next, sigma_next, sigma = torch.tensor([1.0, -0.2, 0.7], dtype=torch.float64), 0.9, 2.6
    x, grid = x_next.clone(), torch.linspace(sigma_next, sigma, 20001, dtype=torch.float64).tolist()
    for lo, hi in zip(grid[:-1], grid[1:]):
        d = (x - denoised(lo)) / lo
        x_2 = x + d * (hi - lo)
        x = x + (d + (x_2 - denoised(hi)) / hi) / 2 * (hi - lo)
    predicted = extrapolate_up(x_next, sigma, [(sigma_next, denoised(sigma_next)), (0.5, denoised(0.5))])
    torch.testing.assert_close(predicted, x, rtol=1e-8, atol=1e-8)  # the integration error, ~2e-9
    euler = extrapolate_up(x_next, sigma, [(sigma_next, denoised(sigma_next))])
    torch.testing.assert_close(euler, x_next + (x_next - denoised(sigma_next)) / sigma_next * (sigma - sigma_next))


def _mean_db(denoiser, photo, sigmas, sampler, **settings):
    inversion = invert_multistep(denoiser, photo, sigmas, sampler, **settings)
    return psnr(sample_multistep(denoiser, inversion.latent, sigmas, sampler), photo).mean().item()


def _predictions_from(count):
    """``previous_prediction_weights`` limited to ``count`` points below (0: ``D_prev := D(x)``)."""
    import renoise_core.multistep as multistep

    full = multistep.previous_prediction_weights
    return lambda sigma_previous, sigma, below: full(sigma_previous, sigma, below[:count])


def test_dpmpp_2m_first_sweep_parabola_beats_line_beats_collapsed(model, photo):
    """Measured on the bench's spectral model (20 karras steps, 20 calls): parabola 68.7, line 55.1, D_prev := D(x)
    44.0 dB."""
    import renoise_core.multistep as multistep

    denoiser = model.denoiser(CLASSES)
    sigmas = karras_schedule(20)
    db = {}
    for count in (0, 1, 2):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(multistep, "previous_prediction_weights", _predictions_from(count))
            db[count] = _mean_db(denoiser, photo, sigmas, "dpmpp_2m", iterations=1, sweeps=1)
    assert db[2] > db[1] + 5.0 and db[1] > db[0] + 5.0, db


def _starts_of_order(order):
    """``extrapolate_up`` limited to ``order`` predictions (1: D held)."""
    import renoise_core.multistep as multistep

    full = multistep.extrapolate_up
    return lambda x_next, sigma, below: full(x_next, sigma, below[:order])


@pytest.mark.parametrize("sampler", ["heun", "dpm_2"])
def test_two_stage_start_chooses_its_order_by_the_step_below(model, photo, sampler):
    """One evaluation per step. At 20 karras steps the second-order start gains (measured on the bench's spectral
    model: heun 79.6 against 61.4 dB, dpm_2 98.1 against 60.3); at 5 steps, where it overshoots (40.8 against
    51.5 for heun), the choice keeps the first order's result."""
    import renoise_core.multistep as multistep

    denoiser = model.denoiser(CLASSES)
    for steps, gain in ((20, 10.0), (5, -1.0)):
        sigmas = karras_schedule(steps)
        chosen = _mean_db(denoiser, photo, sigmas, sampler, iterations=1)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(multistep, "extrapolate_up", _starts_of_order(1))
            first = _mean_db(denoiser, photo, sigmas, sampler, iterations=1)
        assert chosen > first + gain, (steps, chosen, first)


@pytest.mark.parametrize("sampler, settings", [("heun", {"iterations": 4}), ("dpmpp_2m", {"sweeps": 5, "sweep_iterations": 2})])
def test_anderson_solver_accelerates_heun_steps_and_dpmpp_2m_sweeps(model, photo, sampler, settings):
    """At equal calls. Measured on the bench's spectral model, 20 karras steps: heun, 4 evaluations per step,
    108.9 -> 143.8 dB; dpmpp_2m, 5 sweeps, 98.2 -> 132.2 dB."""
    denoiser = model.denoiser(CLASSES)
    sigmas = karras_schedule(10)
    which = "solver" if sampler == "heun" else "sweep_solver"
    db, calls = [], []
    for solver in (fixed_point, anderson_solver()):
        inversion = invert_multistep(denoiser, photo, sigmas, sampler, **settings, **{which: solver})
        db.append(psnr(sample_multistep(denoiser, inversion.latent, sigmas, sampler), photo).mean().item())
        calls.append(inversion.denoiser_calls)
    assert calls[0] == calls[1] and db[1] > db[0] + 5.0, db


def test_anderson_solver_with_two_evaluations_is_plain_iteration(model, photo):
    denoiser = model.denoiser(CLASSES)
    sigmas = karras_schedule(6)
    plain = invert_multistep(denoiser, photo, sigmas, "heun", iterations=2)
    accelerated = invert_multistep(denoiser, photo, sigmas, "heun", iterations=2, solver=anderson_solver())
    assert torch.equal(plain.latent, accelerated.latent)
