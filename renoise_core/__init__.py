"""renoise_core: ReNoise real-image inversion for any affine diffusion sampler, in plain torch.

No ComfyUI import anywhere in this package: it works on a denoiser callable ``D(x, sigma) -> x0`` in
k-diffusion units, which is exactly what a ComfyUI sampler function receives.
"""

from .edit_friendly import edit_friendly_invert, with_final_sigma
from .edit_losses import EditLossConfig, pair_loss, patch_kl_loss, regularize_noise_prediction
from .inversion import (
    Denoiser,
    Inversion,
    NoiseCorrectionConfig,
    ReNoiseConfig,
    StepDiagnostics,
    correct_noise,
    draw_noises,
    invert,
    item_seeds,
    planned_denoiser_calls,
    sample,
)
from .samplers import SAMPLERS, AffineStep, check_sigmas, make_steps

__version__ = "0.2.0"

__all__ = [
    "SAMPLERS",
    "AffineStep",
    "Denoiser",
    "EditLossConfig",
    "Inversion",
    "NoiseCorrectionConfig",
    "ReNoiseConfig",
    "StepDiagnostics",
    "check_sigmas",
    "correct_noise",
    "draw_noises",
    "edit_friendly_invert",
    "invert",
    "item_seeds",
    "make_steps",
    "pair_loss",
    "patch_kl_loss",
    "planned_denoiser_calls",
    "regularize_noise_prediction",
    "sample",
    "with_final_sigma",
]
