"""ComfyUI nodes for ReNoise inversion. Thin: each node translates widgets into one call of ``renoise_core``.

ComfyUI itself is reached only through ``comfy_bridge`` (see ``host.bridge``), so these classes load and are
tested without ComfyUI.
"""

from __future__ import annotations

import dataclasses

import torch

from ..renoise_core import EditLossConfig as EditLossSettings
from ..renoise_core import NoiseCorrectionConfig as NoiseCorrectionSettings
from ..renoise_core import (
    ReNoiseConfig,
    check_sigmas,
    edit_friendly_invert,
    invert,
    item_seeds,
    make_steps,
    planned_denoiser_calls,
    with_final_sigma,
)
from ..renoise_core.inversion import NOISE_CORRECTION_MODES
from ..renoise_core.local_edit import keep_outside_mask, latent_mask
from ..renoise_core.multistep import (
    NOT_INVERTIBLE,
    TWO_STAGE_SAMPLERS,
    anderson_solver,
    invert_multistep,
    is_multistep_sampler,
    make_multistep_steps,
    planned_multistep_calls,
)
from ..renoise_core.multistep import fixed_point as multistep_fixed_point
from ..renoise_core.solvers import SOLVERS
from . import host
from .inversion_data import (
    EDIT_LOSS_TYPE,
    INVERSION_TYPE,
    NOISE_CORRECTION_TYPE,
    SOLVER_TYPE,
    InversionData,
    SolverSettings,
    check_latent_shape,
    check_model_family,
    match_schedule,
    noise_replay,
    parameterization_of,
)

CATEGORY = "sampling/renoise"
#: samplers with an exact affine inverse (ComfyUI names)
INVERTIBLE_SAMPLERS = ["euler_ancestral", "euler", "ddim", "lcm", "ddpm", "heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2m_sde",
                       "dpmpp_2m_sde_heun", "res_multistep", "res_multistep_ancestral"]
#: samplers that add noise
STOCHASTIC_SAMPLERS = ["ddpm", "euler_ancestral", "lcm", "dpm_2_ancestral", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "res_multistep_ancestral"]
#: the stochastic samplers edit-friendly inversion implements (renoise_core.edit_friendly: one affine step each)
EDIT_FRIENDLY_SAMPLERS = ["ddpm", "euler_ancestral", "lcm"]
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_STEPS = 1000
#: ReNoiseSolver's defaults, and what ReNoiseInvert uses with its `solver` input unconnected for deterministic samplers
DEFAULT_SOLVER = SolverSettings()
#: ... and for the stochastic ones. Measured per latent (README, "Benchmarks"; scripts/solver_per_latent.py): with
#: euler and ddim anderson is better on every latent (by 16 dB or more at K = 2 and 9, on the spectral, isotropic,
#: learned and flow models); with euler_ancestral or lcm and noise correction it wins on average but loses 5 to 14 dB
#: on some latents, and with the Turbo defaults' edit losses it gains nothing (median +0.5 dB) and loses up to 7 dB on
#: 3 or 4 latents in 16. So these keep the paper's loop.
DEFAULT_STOCHASTIC_SOLVER = SolverSettings(method="fixed_point")


def default_solver(sampler_name: str) -> SolverSettings:
    """ReNoiseInvert's solver when its `solver` input is unconnected."""
    return DEFAULT_STOCHASTIC_SOLVER if sampler_name in STOCHASTIC_SAMPLERS else DEFAULT_SOLVER


class ReNoiseInvert:
    DESCRIPTION = (
        "Inverts a latent into the model's noise space with ReNoise (fixed-point renoising, averaging, optional "
        "edit losses and noise correction). Sample from the result with ReNoiseSampler + SamplerCustom (any sampler) "
        "or KSamplerAdvanced with add_noise disabled (euler/ddim) to reconstruct with the source prompt or edit "
        "with a new one."
    )
    CATEGORY = CATEGORY
    FUNCTION = "invert"
    RETURN_TYPES = ("LATENT", INVERSION_TYPE, "SIGMAS")
    RETURN_NAMES = ("latent", "inversion", "sigmas")
    OUTPUT_TOOLTIPS = (
        "The inverted noisy latent at the top of the schedule; continue from it with add_noise off.",
        "Per-step noises, schedule and sampler settings: connect to ReNoiseSampler.",
        "The schedule to denoise with (connect to SamplerCustom).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to invert with (the one you will edit with)."}),
                "positive": ("CONDITIONING", {"tooltip": "The source prompt: a description of the input image."}),
                "negative": ("CONDITIONING", {"tooltip": "Negative prompt; only used when cfg > 1."}),
                "latent_image": ("LATENT", {"tooltip": "The VAE-encoded image to invert."}),
                "sampler_name": (INVERTIBLE_SAMPLERS, {"default": "euler_ancestral",
                                 "tooltip": "The sampler to invert (and later sample) with. ddim is ComfyUI's ddim (= euler)."}),
                "scheduler": (host.bridge().scheduler_names(), {"default": "simple",
                              "tooltip": "Scheduler for the schedule. 'simple' gives ReNoise's SDXL-Turbo timesteps 999/749/499/249."}),
                "steps": ("INT", {"default": 4, "min": 1, "max": MAX_STEPS, "tooltip": "Sampling steps (4 for Turbo/LCM, 50 for SD1.5/SDXL)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                            "tooltip": "Invert only part of the way (img2img strength): less noise, edits stay closer to the input."}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                        "tooltip": "Guidance during inversion. 1 = conditional prediction only (the paper's setting)."}),
                "renoise_steps": ("INT", {"default": 9, "min": 0, "max": 100,
                                  "tooltip": "Renoising iterations per step (K): K + 1 model calls per step. More = better reconstruction. 0 = plain DDIM inversion."}),
                "seed": ("INT", {"default": 7865, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                         "tooltip": "Seed of the per-step noises (stochastic samplers) and the edit-loss reference noise."}),
            },
            "optional": {
                "solver": (SOLVER_TYPE, {"tooltip": "How each step's fixed point is solved (ReNoiseSolver node). Unconnected: anderson (accelerated) for euler, ddim, heun, dpm_2, dpmpp_2m and res_multistep; the paper's loop for euler_ancestral, lcm, ddpm, dpm_2_ancestral, dpmpp_2m_sde* and res_multistep_ancestral, where anderson was measured to lose on some images. heun and dpm_2* use its method and history on each step; dpmpp_2m* and res_multistep* on the whole trajectory over the sweeps (renoise_steps >= 3); they ignore its other settings."}),
                "edit_loss": (EDIT_LOSS_TYPE, {"tooltip": "Editability losses (EditLossConfig node). Unconnected: none."}),
                "noise_correction": (NOISE_CORRECTION_TYPE, {"tooltip": "Noise correction for stochastic samplers (NoiseCorrection node)."}),
                "sigmas": ("SIGMAS", {"tooltip": "A custom schedule; overrides scheduler, steps and denoise."}),
                "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "euler_ancestral eta."}),
                "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": "euler_ancestral s_noise."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, s_noise=1.0):
        try:
            _check_s_noise(s_noise)
        except ValueError as error:
            return str(error)
        return True

    def invert(self, model, positive, negative, latent_image, sampler_name, scheduler, steps, denoise, cfg, renoise_steps, seed,
               solver=None, edit_loss=None, noise_correction=None, sigmas=None, eta=1.0, s_noise=1.0):
        solver = default_solver(sampler_name) if solver is None else solver
        if not isinstance(solver, SolverSettings):
            raise ValueError("ReNoiseInvert: the `solver` input takes a ReNoiseSolver node.")
        _check_s_noise(s_noise)
        bridge, schedule, model_sampling = _prepare("ReNoiseInvert", model, positive, negative, latent_image, sampler_name,
                                                    INVERTIBLE_SAMPLERS, scheduler, steps, denoise, sigmas)
        parameterization = parameterization_of(model_sampling)
        below = solver.first_step_below_timestep
        config = ReNoiseConfig(
            renoise_steps=renoise_steps,
            solver=solver.method,
            history=solver.history,
            average_start=solver.average_start,
            early_renoise_steps=solver.first_step_renoise_steps,
            early_average_start=solver.first_step_average_start,
            early_below_sigma=bridge.sigma_at_timestep(model, below) if below > 0 else None,
            convergence_tol=solver.convergence_tol if solver.convergence_tol > 0 else None,
            edit_loss=edit_loss,
            noise_correction=noise_correction,
        )
        options = _sampler_options(sampler_name, eta, s_noise)

        multistep = is_multistep_sampler(sampler_name)  # heun, dpm_2, dpmpp_2m*, res_multistep*: renoise_core.multistep
        # heun, dpm_2*: renoise_steps + 1 evaluations of each step's fixed point, solved by the chosen method;
        # dpmpp_2m*, res_multistep*: one first sweep, then renoise_steps sweeps of 2, the sweeps solved by it
        multistep_solver = anderson_solver(solver.history) if solver.method == "anderson" else multistep_fixed_point
        if sampler_name in TWO_STAGE_SAMPLERS:
            multistep_settings, multistep_solvers = {"iterations": renoise_steps + 1}, {"solver": multistep_solver}
        else:
            multistep_settings = {"iterations": 1, "sweeps": renoise_steps + 1, "sweep_iterations": 2}
            multistep_solvers = {"sweep_solver": multistep_solver}

        def run(denoiser, x0, sigmas_descending, seeds, callback):
            if multistep:
                return invert_multistep(denoiser, x0, sigmas_descending, sampler_name, seed=seeds, noise_correction=noise_correction,
                                        edit_loss=edit_loss, parameterization=parameterization, callback=callback,
                                        **multistep_settings, **multistep_solvers)
            return invert(denoiser, x0, sigmas_descending, sampler_name, config=config, seed=seeds, sampler_options=options,
                          parameterization=parameterization, callback=callback, keep_trajectory=True)

        settings = {"cfg": cfg, "renoise_steps": renoise_steps, "solver": dataclasses.asdict(solver),
                    "edit_loss": dataclasses.asdict(edit_loss) if edit_loss else None,
                    "noise_correction": dataclasses.asdict(noise_correction) if noise_correction else None}
        if multistep:
            calls = planned_multistep_calls(schedule, sampler_name, noise_correction=noise_correction, parameterization=parameterization,
                                            **multistep_settings)
        else:
            calls = planned_denoiser_calls(schedule, sampler_name, config, parameterization, **options)
        return _run("ReNoiseInvert", bridge, model, positive, negative, cfg, latent_image, schedule, seed, calls, run,
                    method="renoise", model_sampling=model_sampling, sampler_name=sampler_name, options=options, settings=settings)


class EditFriendlyInvert:
    DESCRIPTION = (
        "Edit-friendly DDPM inversion (Huberman-Spiegelglas et al.): noisy copies of the image at every level with "
        "independent noises, and per-step noises extracted so that the sampler lands exactly on them. Reconstructs "
        "exactly (any step count); with skip > 0 edits keep more of the photo's structure. Same outputs as "
        "ReNoiseInvert: sample with ReNoiseSampler + SamplerCustom."
    )
    CATEGORY = CATEGORY
    FUNCTION = "invert"
    RETURN_TYPES = ("LATENT", INVERSION_TYPE, "SIGMAS")
    RETURN_NAMES = ("latent", "inversion", "sigmas")
    OUTPUT_TOOLTIPS = (
        "The noisy latent at the step `skip` starts from; sample from it with add_noise off.",
        "Per-step noises, schedule and sampler settings: connect to ReNoiseSampler.",
        "The schedule to sample with, from `skip` on, ending at the model's smallest sigma (connect to SamplerCustom).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        invert_inputs = ReNoiseInvert.INPUT_TYPES()
        required = {name: invert_inputs["required"][name] for name in ("model", "positive", "negative", "latent_image")}
        required["sampler_name"] = (EDIT_FRIENDLY_SAMPLERS, {"default": "ddpm", "tooltip": "A stochastic sampler to invert and sample with."})
        for name in ("scheduler", "steps", "denoise"):
            required[name] = invert_inputs["required"][name]
        required["cfg"] = ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                     "tooltip": "Guidance while extracting the noises (the paper: 3.5 for SD; sample the reconstruction with the same)."})
        required["skip"] = ("INT", {"default": 0, "min": 0, "max": MAX_STEPS,
                                    "tooltip": "Start the edit this many steps later (the paper's T_skip; 36 of 100): more structure kept."})
        required["seed"] = ("INT", {**invert_inputs["required"]["seed"][1],
                                    "tooltip": "Seed of the independent noises of the photo's noisy copies, one per step; item b of a batch uses seed + b (its batch_index)."})
        optional = {name: invert_inputs["optional"][name] for name in ("sigmas", "eta", "s_noise")}
        return {"required": required, "optional": optional}

    def invert(self, model, positive, negative, latent_image, sampler_name, scheduler, steps, denoise, cfg, skip, seed,
               sigmas=None, eta=1.0, s_noise=1.0):
        bridge, schedule, model_sampling = _prepare("EditFriendlyInvert", model, positive, negative, latent_image, sampler_name,
                                                    EDIT_FRIENDLY_SAMPLERS, scheduler, steps, denoise, sigmas)
        parameterization = parameterization_of(model_sampling)
        schedule = with_final_sigma(schedule, bridge.sigma_min(model))  # keep the last step's noise: exact reconstruction
        if not 0 <= skip < len(schedule) - 1:
            raise ValueError(f"EditFriendlyInvert: skip must be between 0 and steps - 1 = {len(schedule) - 2}, got {skip}")
        options = _sampler_options(sampler_name, eta, s_noise)

        def run(denoiser, x0, sigmas_descending, seeds, callback):
            return edit_friendly_invert(denoiser, x0, sigmas_descending, sampler_name, seed=seeds, sampler_options=options,
                                        parameterization=parameterization, skip=skip, callback=callback, keep_trajectory=True)

        return _run("EditFriendlyInvert", bridge, model, positive, negative, cfg, latent_image, schedule, seed, len(schedule) - 1 - skip,
                    run, method="edit_friendly", model_sampling=model_sampling, sampler_name=sampler_name, options=options,
                    settings={"cfg": cfg, "skip": skip})


def _check_s_noise(s_noise: float) -> None:
    """ComfyUI restores a UI workflow's widgets by position. A workflow saved with ReNoise 0.1.0, whose
    ReNoiseInvert had five more widgets before eta and s_noise, hands them 8 and 250 (average_start and
    first_step_below_timestep): say so instead of sampling with them. (ReNoiseInvert.VALIDATE_INPUTS runs this
    before the prompt is queued; ComfyUI then leaves s_noise's range check to it.)"""
    if s_noise < 0.0:
        raise ValueError(f"ReNoiseInvert: s_noise must be >= 0, got {s_noise:g}.")
    if s_noise > 10.0:
        raise ValueError(
            f"ReNoiseInvert: s_noise = {s_noise:g} is far outside its useful range (about 1). If this workflow was saved "
            "with ReNoise 0.1.0, its ReNoiseInvert widgets shifted: the averaging and first-step settings moved to the "
            "ReNoiseSolver node. Set eta and s_noise back to 1.0 (or replace the node), and connect a ReNoiseSolver "
            "only if you had changed those settings."
        )


def _sampler_options(sampler_name: str, eta: float, s_noise: float) -> dict:
    return {"eta": eta, "s_noise": s_noise} if sampler_name == "euler_ancestral" else {}


def _prepare(node, model, positive, negative, latent_image, sampler_name, allowed, scheduler, steps, denoise, sigmas):
    """Checks shared by the inversion nodes; returns the bridge, the schedule (float32, descending) and the model's
    sampling kind (``"EPS"``, ``"CONST"``, ...)."""
    bridge = host.bridge()
    model_sampling = bridge.model_sampling_kind(model)
    parameterization = parameterization_of(model_sampling)
    if sampler_name not in allowed:
        reason = f" ({sampler_name} cannot be inverted: {NOT_INVERTIBLE[sampler_name]})" if sampler_name in NOT_INVERTIBLE else ""
        raise ValueError(f"{node}: sampler_name must be one of {allowed}, got {sampler_name!r}{reason}")
    if parameterization == "flow" and sampler_name == "ddpm":
        raise ValueError(f"{node}: ddpm works in DDPM units, which flow models (SD3, Flux) do not have; use euler_ancestral or lcm.")
    samples = _latent_samples(latent_image, node)
    _check_conditioning_batch(positive, "positive", samples.shape[0], node)
    _check_conditioning_batch(negative, "negative", samples.shape[0], node)
    if sigmas is None:
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"{node}: steps must be between 1 and {MAX_STEPS}, got {steps}")
        if not 0.0 < denoise <= 1.0:
            raise ValueError(f"{node}: denoise must be in (0, 1], got {denoise}; 0 would invert nothing")
        sigmas = bridge.schedule(model, scheduler, steps, denoise)
    schedule = _checked_schedule(sigmas, node)
    if parameterization == "flow" and float(schedule[0]) > 1.0:
        raise ValueError(f"{node}: a flow model's sigmas lie in [0, 1]; the schedule starts at {float(schedule[0]):g}.")
    return bridge, schedule, model_sampling


def _run(node, bridge, model, positive, negative, cfg, latent_image, schedule, seed, total_calls, invert_function, *,
         method, model_sampling, sampler_name, options, settings):
    """Run ``invert_function(denoiser, x0, sigmas, seeds, callback) -> Inversion`` through ComfyUI's guider and
    package the three outputs."""
    samples = latent_image["samples"]
    seeds = item_seeds(seed, latent_image.get("batch_index", samples.shape[0]))
    if len(seeds) != samples.shape[0]:
        raise ValueError(f"{node}: the latent's batch_index has {len(seeds)} entries for a batch of {samples.shape[0]}.")
    progress = bridge.Progress(total_calls)
    results = []

    def run(denoiser, x0, sigmas_descending):
        results.append(invert_function(denoiser, x0, sigmas_descending, seeds, progress.update))
        return results[-1].latent

    latent_out, start_latent = bridge.run_inversion(model, positive, negative, cfg, latent_image, schedule, run, seed)
    inversion = results[-1]
    sigmas_out = inversion.sigmas.float()
    data = InversionData(
        noises=inversion.noises.to(device=bridge.intermediate_device(), dtype=torch.float32),
        sigmas=sigmas_out,
        sampler_name=sampler_name,
        sampler_options=options,
        model_sampling=model_sampling,
        model_family=bridge.model_family(model),
        seed=seed,
        method=method,
        settings=settings,
        diagnostics=inversion.steps,
        denoiser_calls=inversion.denoiser_calls,
        start_latent=start_latent,
        trajectory=None if inversion.trajectory is None else inversion.trajectory.to(device=bridge.intermediate_device(), dtype=torch.float32),
    )
    out = {key: value for key, value in latent_image.items() if key not in ("samples", "noise_mask")}
    out["samples"] = latent_out
    return (out, data, sigmas_out.clone())


class ReNoiseSampler:
    DESCRIPTION = (
        "A stock ComfyUI sampler (the inversion's) that replays the inversion's per-step noises. Use it in "
        "SamplerCustom / SamplerCustomAdvanced with add_noise off, ReNoiseInvert's latent and sigmas: the source "
        "prompt reconstructs the image, a new prompt edits it. With a mask, only the masked region changes: the rest "
        "follows the photo's own trajectory and ends exactly on it."
    )
    CATEGORY = CATEGORY
    FUNCTION = "get_sampler"
    RETURN_TYPES = ("SAMPLER",)
    OUTPUT_TOOLTIPS = ("Connect to SamplerCustom's sampler input.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"inversion": (INVERSION_TYPE, {"tooltip": "The inversion output of ReNoiseInvert."})},
            "optional": {"mask": ("MASK", {"tooltip": "Local edit: 1 = edit, 0 = keep the photo exactly (soft values blend). "
                                                      "Paint it in Load Image's mask editor or make it with ReNoiseEditMask."})},
        }

    def get_sampler(self, inversion, mask=None):
        if not isinstance(inversion, InversionData):
            raise ValueError("ReNoiseSampler: connect the `inversion` output of ReNoiseInvert.")
        adjust_prediction = _keep_outside(inversion, mask) if mask is not None else None

        def prepare_run(x, sigmas, model_family):
            """Validate a sampling run; returns the latent to start from and the noise sampler (None: none needed)."""
            check_model_family(model_family, inversion)
            check_latent_shape(tuple(x.shape), inversion)
            schedule = sigmas.tolist()
            start = match_schedule(schedule, inversion.sigmas.tolist())
            make = make_multistep_steps if is_multistep_sampler(inversion.sampler_name) else make_steps
            steps = make(inversion.sampler_name, schedule, inversion.parameterization, **inversion.sampler_options)
            if start == 0 and inversion.start_latent is not None:  # flow model at sigma 1: ComfyUI zeroed the latent
                x = inversion.start_latent.to(x)
            return x, noise_replay(inversion, start, x) if any(step.is_stochastic for step in steps) else None

        if adjust_prediction is None:
            return (host.bridge().replaying_sampler(inversion.sampler_name, dict(inversion.sampler_options), prepare_run),)
        return (host.bridge().replaying_sampler(inversion.sampler_name, dict(inversion.sampler_options), prepare_run, adjust_prediction),)


def _keep_outside(inversion: InversionData, mask):
    """ReNoiseSampler's mask as ``adjust_prediction(x, sigmas)`` for the bridge's replaying sampler (None for an
    all-one mask: the unmasked path, bit for bit). The blending is ``renoise_core.local_edit.keep_outside_mask``:
    the prediction is blended, so the stock sampler's own step lands on the trajectory outside the mask."""
    if not isinstance(mask, torch.Tensor):
        raise ValueError("ReNoiseSampler: `mask` must be a MASK (Load Image's MASK output, ReNoiseEditMask, ...).")
    if is_multistep_sampler(inversion.sampler_name):
        raise ValueError(
            f"ReNoiseSampler: masked sampling supports the first-order samplers (euler, ddim, euler_ancestral, lcm, ddpm); "
            f"this inversion used {inversion.sampler_name}. Invert with one of those to edit with a mask."
        )
    if inversion.trajectory is None:
        raise ValueError(
            "ReNoiseSampler: this inversion has no trajectory (saved by ReNoise 0.1.0, file format 1), which masked "
            "sampling needs. Invert the image again (and save it again) to edit with a mask."
        )
    if mask.numel() > 0 and bool((mask == 1).all()):  # edit everywhere: exactly the unmasked edit
        return None

    def adjust_prediction(x, sigmas):
        start = match_schedule(sigmas.tolist(), inversion.sigmas.tolist())
        steps = make_steps(inversion.sampler_name, sigmas, inversion.parameterization, **inversion.sampler_options)
        try:
            edit = latent_mask(mask, tuple(x.shape))
        except ValueError as error:
            raise ValueError(f"ReNoiseSampler: {error}") from None
        trajectory = inversion.trajectory[start : start + len(steps) + 1]
        noises = inversion.noises[start : start + len(steps)]
        return keep_outside_mask(steps, trajectory, edit.to(x.device), noises)

    return adjust_prediction


class NoiseCorrection:
    DESCRIPTION = (
        "Noise correction for stochastic samplers: after each inversion step, move the step's noise toward the one "
        "that lands exactly on the image's trajectory. 'exact' reconstructs perfectly but edits less; 'optimize' is "
        "the paper's bounded version."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (NOISE_CORRECTION_TYPE,)
    RETURN_NAMES = ("noise_correction",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "mode": (list(NOISE_CORRECTION_MODES), {"default": "optimize",
                         "tooltip": "optimize: bounded steps toward the exact noise (paper). exact: the exact noise (Eq. 4)."}),
                "steps": ("INT", {"default": 10, "min": 0, "max": 1000, "tooltip": "optimize: number of steps."}),
                "step_size": ("FLOAT", {"default": 1.8, "min": 0.0, "max": 100.0, "step": 0.01,
                              "tooltip": "optimize: how far (L2) the noise moves per step."}),
            }
        }

    def build(self, mode, steps, step_size):
        return (NoiseCorrectionSettings(mode=mode, steps=steps, step_size=step_size),)


class ReNoiseSolver:
    DESCRIPTION = (
        "How ReNoiseInvert solves each inversion step: anderson (accelerated: the paper's reconstruction with a third "
        "of the model calls, or far better at the same calls) or fixed_point (the paper's renoising loop, exactly as "
        "the reference release runs it). Connect to ReNoiseInvert's `solver` input. Unconnected, ReNoiseInvert uses "
        "anderson with these defaults for euler, ddim, heun, dpm_2, dpmpp_2m and res_multistep, and fixed_point for "
        "euler_ancestral, lcm, ddpm, dpm_2_ancestral, dpmpp_2m_sde and res_multistep_ancestral (measured: with noise correction anderson "
        "wins on average there but loses on some images)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (SOLVER_TYPE,)
    RETURN_NAMES = ("solver",)
    OUTPUT_TOOLTIPS = ("Connect to ReNoiseInvert's `solver` input.",)

    @classmethod
    def INPUT_TYPES(cls):
        defaults = DEFAULT_SOLVER
        return {
            "required": {
                "method": (list(SOLVERS), {"default": defaults.method,
                           "tooltip": "anderson: extrapolates from the last few estimates (safeguarded). fixed_point: the paper's loop, each estimate from the previous one, averaged at the end."}),
                "history": ("INT", {"default": defaults.history, "min": 1, "max": 10,
                            "tooltip": "anderson: how many previous estimates it extrapolates from. fixed_point ignores it."}),
                "average_start": ("INT", {"default": defaults.average_start, "min": 0, "max": 100,
                                  "tooltip": "fixed_point: average the predictions of evaluations average_start..K (paper: 8..9). anderson ignores it."}),
                "first_step_below_timestep": ("INT", {"default": defaults.first_step_below_timestep, "min": 0, "max": 1000,
                                              "tooltip": "Steps below this timestep (0..1000) use the first-step settings; the reference's 250 is SDXL-Turbo's first inversion step. 0 = off. Both methods."}),
                "first_step_renoise_steps": ("INT", {"default": defaults.first_step_renoise_steps, "min": 0, "max": 100,
                                             "tooltip": "At most this many renoising iterations on those steps (reference: 4). Both methods."}),
                "first_step_average_start": ("INT", {"default": defaults.first_step_average_start, "min": 0, "max": 100,
                                             "tooltip": "fixed_point: averaging window start on those steps (reference: 0, all). anderson ignores it."}),
                "convergence_tol": ("FLOAT", {"default": defaults.convergence_tol, "min": 0.0, "max": 1.0, "step": 0.0001,
                                    "tooltip": "Stop a step once its relative residual is below this (saves calls; costs one GPU sync per call). 0 = off: every step makes renoise_steps + 1 calls."}),
            }
        }

    def build(self, method, history, average_start, first_step_below_timestep, first_step_renoise_steps, first_step_average_start,
              convergence_tol):
        if method not in SOLVERS:
            raise ValueError(f"ReNoiseSolver: method must be one of {list(SOLVERS)}, got {method!r}")
        return (SolverSettings(method=method, history=history, average_start=average_start,
                               first_step_below_timestep=first_step_below_timestep, first_step_renoise_steps=first_step_renoise_steps,
                               first_step_average_start=first_step_average_start, convergence_tol=convergence_tol),)


class EditLossConfig:
    DESCRIPTION = (
        "Editability losses applied to the model's noise predictions during inversion (patch KL against a noised "
        "copy of the image, and the pix2pix-zero pair loss). Better edits, slightly worse reconstruction."
    )
    CATEGORY = CATEGORY
    FUNCTION = "build"
    RETURN_TYPES = (EDIT_LOSS_TYPE,)
    RETURN_NAMES = ("edit_loss",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lambda_ac": ("FLOAT", {"default": 20.0, "min": 0.0, "max": 1000.0, "step": 0.1,
                              "tooltip": "Weight of the pair (auto-correlation) loss. 0 = off."}),
                "lambda_kl": ("FLOAT", {"default": 0.065, "min": 0.0, "max": 10.0, "step": 0.001,
                              "tooltip": "Weight of the patch-KL loss (0.055 in some reference demos). 0 = off."}),
                "reg_steps": ("INT", {"default": 4, "min": 1, "max": 100, "tooltip": "Outer regularisation steps."}),
                "ac_rolls": ("INT", {"default": 5, "min": 1, "max": 100, "tooltip": "Pair-loss steps (random shifts) per outer step."}),
                "patch_size": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Patch size (latent pixels) of the patch-KL loss."}),
            }
        }

    def build(self, lambda_ac, lambda_kl, reg_steps, ac_rolls, patch_size):
        return (EditLossSettings(lambda_ac=lambda_ac, lambda_kl=lambda_kl, reg_steps=reg_steps, ac_rolls=ac_rolls, patch_size=patch_size),)


def _latent_samples(latent, node: str) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"{node}: latent_image must be a LATENT (connect VAEEncode or Load Latent).")
    if samples.ndim != 4:
        raise ValueError(f"{node}: expected an image latent [batch, channels, height, width], got shape {list(samples.shape)}.")
    if samples.numel() == 0:
        raise ValueError(f"{node}: the latent is empty (shape {list(samples.shape)}).")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError(f"{node}: the latent contains NaN or Inf values; check the image and the VAE that encoded it.")
    return samples


def _check_conditioning_batch(conditioning, name: str, batch: int, node: str) -> None:
    """One prompt for the whole batch, or one per image: anything else would pair prompts and images wrongly."""
    for entry in conditioning:
        prompts = entry[0].shape[0] if isinstance(entry, (list, tuple)) and isinstance(entry[0], torch.Tensor) else 1
        if prompts not in (1, batch):
            raise ValueError(
                f"{node}: `{name}` holds {prompts} prompts but the latent has {batch} images; "
                "use one prompt for all images or exactly one per image."
            )


def _checked_schedule(sigmas, node: str) -> torch.Tensor:
    try:
        values = check_sigmas(sigmas)
    except ValueError as error:
        raise ValueError(f"{node}: bad schedule (sigmas input, or scheduler/steps/denoise): {error}") from None
    return torch.tensor(values, dtype=torch.float32)


