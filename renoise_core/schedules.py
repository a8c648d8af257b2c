"""Noise schedules in k-diffusion sigmas, mirroring ComfyUI's discrete SD schedule and its ``simple`` scheduler.

Used by the built-in analytic model, the benchmark and the tests; inside ComfyUI the nodes take the schedule from
the loaded model instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def sd_discrete_sigmas(timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """The 1000 training sigmas of SD1.5 / SDXL (scaled-linear betas), ascending, float32 like ComfyUI's buffer.

    ``sigma_t = sqrt((1 - abar_t) / abar_t)``; index ``t`` is the DDPM timestep.
    """
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float()


def simple_schedule(training_sigmas: Tensor, steps: int) -> Tensor:
    """ComfyUI's ``simple`` scheduler: ``steps`` evenly spaced training sigmas from the top, then 0.

    On the SD schedule with 4 steps these are timesteps [999, 749, 499, 249] (ReNoise's SDXL-Turbo schedule).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    stride = len(training_sigmas) / steps
    sigmas = [float(training_sigmas[-(1 + int(i * stride))]) for i in range(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def denoise_schedule(schedule: Callable[[int], Tensor], steps: int, denoise: float) -> Tensor:
    """The schedule ComfyUI's KSampler uses for ``denoise < 1`` (img2img strength).

    ``schedule(n)`` returns a full n-step schedule; with ``denoise < 1`` it is computed for ``int(steps / denoise)``
    steps and its last ``steps + 1`` sigmas are kept, so inversion stops at an intermediate noise level.
    """
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if denoise > 0.9999:
        return schedule(steps)
    return schedule(int(steps / denoise))[-(steps + 1):]


def sigma_at_timestep(training_sigmas: Tensor, timestep: float) -> float:
    """ComfyUI ``ModelSamplingDiscrete.sigma(t)``: log-linear interpolation between training sigmas."""
    t = min(max(float(timestep), 0.0), len(training_sigmas) - 1.0)
    low, high = int(t // 1), int(-(-t // 1))
    log_sigmas = training_sigmas.double().log()
    frac = t - low
    return float(((1 - frac) * log_sigmas[low] + frac * log_sigmas[high]).exp())


def flow_simple_schedule(steps: int, shift: float = 3.0, timesteps: int = 1000) -> Tensor:
    """ComfyUI's ``simple`` scheduler on a discrete flow model (``ModelSamplingDiscreteFlow``, SD3's
    ``ModelSamplingSD3`` node): training sigmas ``shift t / (1 + (shift - 1) t)`` at ``t = 1/1000 .. 1``."""
    t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
    return simple_schedule((shift * t / (1 + (shift - 1) * t)).float(), steps)


def karras_schedule(steps: int, sigma_min: float = 0.0292, sigma_max: float = 14.6146, rho: float = 7.0) -> Tensor:
    """ComfyUI ``get_sigmas_karras`` (float32, with a final 0): ``steps + 1`` sigmas. The defaults are SD1.5's
    ``sigma_min`` / ``sigma_max`` as ComfyUI's ``karras`` scheduler reads them from the model."""
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])
