"""Per-latent comparison of the two solvers, where the bench reports means over 4 latents.

16 latents of the bench's spectral mixture (one per class), euler_ancestral with noise correction ``optimize``,
4 steps of SD's ``simple`` schedule, K = 9, with and without the default edit losses. Prints the median PSNR of
each solver and how many latents anderson wins or loses by more than 1 dB. About a minute on 2 CPU cores:

    python scripts/solver_per_latent.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renoise_core.analytic import SpectralMixture, psnr  # noqa: E402
from renoise_core.edit_losses import EditLossConfig  # noqa: E402
from renoise_core.inversion import NoiseCorrectionConfig, ReNoiseConfig, invert, sample  # noqa: E402
from renoise_core.schedules import sd_discrete_sigmas, sigma_at_timestep, simple_schedule  # noqa: E402


def main() -> None:
    training_sigmas = sd_discrete_sigmas()
    sigmas, early = simple_schedule(training_sigmas, 4), sigma_at_timestep(training_sigmas, 250)
    mixture = SpectralMixture.random(components=16, shape=(4, 32, 32), within=1.0, seed=0)
    classes = list(range(16))
    x0, denoiser = mixture.sample(classes, seed=1), mixture.denoiser(classes)
    for edit_loss in (None, EditLossConfig()):
        db = {}
        for solver in ("fixed_point", "anderson"):
            config = ReNoiseConfig(renoise_steps=9, solver=solver, early_below_sigma=early, edit_loss=edit_loss,
                                   noise_correction=NoiseCorrectionConfig("optimize"))
            inversion = invert(denoiser, x0, sigmas, "euler_ancestral", config=config, seed=0)
            db[solver] = psnr(sample(denoiser, inversion.latent, sigmas, "euler_ancestral", noises=inversion.noises), x0)
        gain = db["anderson"] - db["fixed_point"]
        print(f"edit losses {'on ' if edit_loss else 'off'}: median {db['fixed_point'].median():.1f} dB (fixed_point) -> "
              f"{db['anderson'].median():.1f} dB (anderson); latents gaining > 1 dB: {int((gain > 1).sum())}/16, "
              f"losing > 1 dB: {int((gain < -1).sum())}/16 (worst {gain.min():.1f} dB)")


if __name__ == "__main__":
    main()
