"""The RENOISE_INVERSION payload and the noise replay used by ReNoiseSampler. No ComfyUI import here.

Everything a later sampling run needs to reproduce (or edit) an inversion: the per-step noises in the sampler's
latent space, the schedule, the sampler and its options, and what was done to get them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..renoise_core import StepDiagnostics

#: socket type names (the public contract of shared workflows)
INVERSION_TYPE = "RENOISE_INVERSION"
EDIT_LOSS_TYPE = "EDIT_LOSS_CONFIG"
NOISE_CORRECTION_TYPE = "NOISE_CORRECTION"
SOLVER_TYPE = "RENOISE_SOLVER"


@dataclass(frozen=True)
class SolverSettings:
    """What the ReNoiseSolver node configures: how each inversion step's fixed point is solved.

    method: ``"anderson"`` (accelerated) or ``"fixed_point"`` (the paper's loop). history: anderson's secant
    history. average_start, first_step_average_start: fixed_point's averaging windows (evaluation indices).
    first_step_below_timestep: steps whose upper sigma lies below this timestep (0..1000 scale; 0 = off) make at
    most first_step_renoise_steps + 1 evaluations (both methods). convergence_tol: stop a step once every item's
    relative residual is below it (0 = off).
    """

    method: str = "anderson"
    history: int = 3
    average_start: int = 8
    first_step_below_timestep: int = 250
    first_step_renoise_steps: int = 4
    first_step_average_start: int = 0
    convergence_tol: float = 0.0

_SIGMA_RTOL = 1e-4


@dataclass(frozen=True)
class InversionData:
    """What ReNoiseInvert hands to ReNoiseSampler (and to save/load). Never mutated after creation.

    noises: ``[S, B, C, H, W]`` float32 on ComfyUI's intermediate device; ``noises[i]`` is the noise of the
        sampling step ``sigmas[i] -> sigmas[i + 1]``, in the sampler's (``process_in``) latent space.
    sigmas: ``[S + 1]`` float32, descending k-diffusion sigmas.
    sampler_name: the ComfyUI sampler name the inversion used (euler, ddim, euler_ancestral, lcm, ddpm).
    sampler_options: keyword options of that sampler (eta, s_noise for euler_ancestral).
    model_sampling: the model's sampling kind, e.g. ``"EPS"``, ``"V_PREDICTION"``, ``"EPS+LCM"``.
    model_family: ComfyUI's model config name (``"SD15"``, ``"SDXL"``, ...), checked when sampling.
    settings: the inversion settings, JSON-compatible (saved with the inversion).
    start_latent: ``[B, C, H, W]``, the inverted latent in the sampler's space, kept only where a LATENT cannot
        carry it: a flow model inverted up to sigma 1, where ComfyUI's ``noise_scaling`` multiplies the starting
        latent by ``1 - sigma = 0``. ReNoiseSampler starts from it then.
    trajectory: ``[S + 1, B, C, H, W]`` float32 on the intermediate device, the photo's latent at every sigma
        (``trajectory[i]`` at ``sigmas[i]``, ``trajectory[0]`` the inverted latent, ``trajectory[-1]`` the photo's
        latent), in the sampler's latent space (what ReNoiseSampler's stock sampler steps on). None for
        inversions saved by 0.1.0 (format 1): masked sampling needs it.
    """

    noises: Tensor
    sigmas: Tensor
    sampler_name: str
    sampler_options: dict[str, float]
    model_sampling: str
    model_family: str
    seed: int
    method: str = "renoise"
    settings: dict[str, Any] = field(default_factory=dict)
    diagnostics: tuple[StepDiagnostics, ...] = ()
    denoiser_calls: int = 0
    start_latent: Tensor | None = None
    trajectory: Tensor | None = field(default=None, repr=False)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.noises.shape[1:])

    @property
    def steps(self) -> int:
        return self.noises.shape[0]

    @property
    def parameterization(self) -> str:
        """``"flow"`` for CONST (rectified-flow) models, else ``"eps"``."""
        return parameterization_of(self.model_sampling)


def parameterization_of(model_sampling: str) -> str:
    return "flow" if model_sampling.startswith("CONST") else "eps"


def match_schedule(sigmas: list[float], stored: list[float]) -> int:
    """Where ``sigmas`` (a sampling run's schedule) starts inside the inversion's schedule ``stored``.

    The run must walk a contiguous part of the stored schedule (the whole of it, or a tail as with ``skip``);
    returns the index of ``sigmas[0]`` in ``stored`` or raises ``ValueError`` saying what to connect.
    """
    start = _find_sigma(sigmas[0], stored)
    run = stored[start : start + len(sigmas)] if start is not None else []
    if start is None or len(run) != len(sigmas) or not all(_same_sigma(a, b) for a, b in zip(sigmas, run)):
        raise ValueError(
            "ReNoiseSampler: the sampling schedule does not match the inversion's "
            f"({_fmt(sigmas)} against {_fmt(stored)}). Connect ReNoiseInvert's `sigmas` output to the SIGMAS input "
            "of SamplerCustom (and add_noise off), or invert again with the schedule you want to sample with."
        )
    return start


def check_latent_shape(shape: tuple[int, ...], inversion: InversionData) -> None:
    if tuple(shape) != inversion.latent_shape:
        raise ValueError(
            f"ReNoiseSampler: the latent being sampled has shape {list(shape)} but the inversion was made for "
            f"{list(inversion.latent_shape)} (batch, channels, height/8, width/8). Connect ReNoiseInvert's `latent` "
            "output (or a latent of the same size and batch) to SamplerCustom's latent_image."
        )


def check_model_family(model_family: str, inversion: InversionData) -> None:
    if inversion.model_family and model_family and model_family != inversion.model_family:
        raise ValueError(
            f"ReNoiseSampler: this inversion was made with a {inversion.model_family} model but is being sampled with a "
            f"{model_family} model. Sample with the model you inverted with (or invert again with this one)."
        )


def noise_replay(inversion: InversionData, start: int, like: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """A k-diffusion ``noise_sampler(sigma, sigma_next)`` that returns the stored noise of the step starting at
    ``sigma``, looked up by sigma (not by call count: some samplers ask twice per step), on ``like``'s device
    and dtype. The noises are moved there once, here."""
    stored = inversion.sigmas.tolist()
    noises = inversion.noises.to(device=like.device, dtype=like.dtype)

    def replay(sigma: Tensor, sigma_next: Tensor) -> Tensor:
        index = _find_sigma(float(sigma), stored[:-1])
        if index is None or index < start:
            raise ValueError(
                f"ReNoiseSampler: the sampler asked for the noise of a step at sigma {float(sigma):.6g}, which the "
                f"inversion does not have (its schedule is {_fmt(stored)}). Sample with ReNoiseInvert's `sigmas`."
            )
        return noises[index]

    return replay


def _find_sigma(sigma: float, stored: list[float]) -> int | None:
    for i, s in enumerate(stored):
        if _same_sigma(sigma, s):
            return i
    return None


def _same_sigma(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_SIGMA_RTOL, abs_tol=1e-6)


def _fmt(sigmas: list[float]) -> str:
    return "[" + ", ".join(f"{s:.4g}" for s in sigmas) + "]"
