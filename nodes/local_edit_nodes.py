"""ReNoiseEditMask: the region to edit, found from the source and target prompts (DiffEdit). Thin: the math is
``renoise_core.local_edit``; ComfyUI is reached through the bridge (``host.bridge``)."""

from __future__ import annotations

from ..renoise_core import item_seeds
from ..renoise_core.local_edit import LATENT_SCALE_FACTOR, draw_mask_noises, edit_mask, prediction_difference
from . import host
from .inversion_data import parameterization_of
from .renoise_nodes import CATEGORY, MAX_SEED, _check_conditioning_batch, _latent_samples


class ReNoiseEditMask:
    DESCRIPTION = (
        "Finds where an edit should happen (DiffEdit): noises the photo's latent, predicts under the source and the "
        "target prompt, and marks where the predictions differ, averaged over noise draws, normalised, thresholded "
        "and blurred. Connect the MASK to ReNoiseSampler's mask to keep the rest of the photo exactly."
    )
    CATEGORY = CATEGORY
    FUNCTION = "make_mask"
    RETURN_TYPES = ("MASK",)
    RETURN_NAMES = ("mask",)
    OUTPUT_TOOLTIPS = ("1 = edit, 0 = keep, at image resolution (the latent's size x 8); soft at the edges (blur).",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model you edit with."}),
                "latent_image": ("LATENT", {"tooltip": "The photo's latent (VAE Encode), not the inverted one."}),
                "source": ("CONDITIONING", {"tooltip": "A description of the photo (the inversion's prompt)."}),
                "target": ("CONDITIONING", {"tooltip": "The edit prompt."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the noise draws."}),
                "noise_level": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01,
                                          "tooltip": "How far to noise the photo: timestep / 1000 (DiffEdit: 0.5)."}),
                "samples": ("INT", {"default": 5, "min": 1, "max": 100,
                                    "tooltip": "Noise draws averaged (2 predictions each, both prompts batched in one evaluation)."}),
                "threshold": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": "Edit where the normalised difference is above this (DiffEdit: 0.5)."}),
                "blur": ("INT", {"default": 4, "min": 0, "max": 256,
                                 "tooltip": "Radius (pixels) of the Gaussian that softens the mask's edges. 0 = hard edges."}),
            }
        }

    def make_mask(self, model, latent_image, source, target, seed, noise_level, samples, threshold, blur):
        node = "ReNoiseEditMask"
        bridge = host.bridge()
        latent = _latent_samples(latent_image, node)
        batch = latent.shape[0]
        _check_conditioning_batch(source, "source", batch, node)
        _check_conditioning_batch(target, "target", batch, node)
        if not 0.0 < noise_level <= 1.0:
            raise ValueError(f"{node}: noise_level must be in (0, 1], got {noise_level}")
        if samples < 1:
            raise ValueError(f"{node}: samples must be >= 1, got {samples}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"{node}: threshold must be in [0, 1], got {threshold}")
        if blur < 0:
            raise ValueError(f"{node}: blur must be >= 0 pixels, got {blur}")
        seeds = item_seeds(seed, latent_image.get("batch_index", batch))
        if len(seeds) != batch:
            raise ValueError(f"{node}: the latent's batch_index has {len(seeds)} entries for a batch of {batch}.")
        sigma = bridge.sigma_at_timestep(model, 1000.0 * noise_level)
        parameterization = parameterization_of(bridge.model_sampling_kind(model))
        noises = draw_mask_noises(latent.shape, samples, seeds)
        progress = bridge.Progress(2 * samples)  # predictions: both prompts per evaluation

        def run(pair_denoiser, x0):
            return prediction_difference(pair_denoiser, x0, sigma, noises, parameterization,
                                         callback=lambda draws: progress.update(2 * draws))

        difference = bridge.run_prompt_pair(model, source, target, {"samples": latent}, run, seed)
        mask = edit_mask(difference, threshold, blur, LATENT_SCALE_FACTOR)
        return (mask.to(bridge.intermediate_device()),)
