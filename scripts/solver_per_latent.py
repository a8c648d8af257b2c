"""Per-latent comparison of the two solvers, where the bench reports means over 4 latents.

16 latents (one per class) of the bench's spectral and isotropic mixtures, 4 steps of SD's ``simple`` schedule,
the reference's first-step rule. For each sampler setting and K: the median PSNR of each solver and how many
latents anderson wins or loses by more than 1 dB. This is the measurement behind ReNoiseInvert's unconnected
solver (anderson for euler and ddim, the paper's loop for the stochastic samplers). About 3 minutes on 2 cores:

    python scripts/solver_per_latent.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renoise_core.analytic import GaussianMixture, SpectralMixture, psnr  # noqa: E402
from renoise_core.edit_losses import EditLossConfig  # noqa: E402
from renoise_core.inversion import NoiseCorrectionConfig, ReNoiseConfig, invert, sample  # noqa: E402
from renoise_core.schedules import sd_discrete_sigmas, sigma_at_timestep, simple_schedule  # noqa: E402

CLASSES = list(range(16))
OPTIMIZE = NoiseCorrectionConfig("optimize")
#: (sampler, noise correction, edit losses, K values)
SETTINGS = [
    ("euler", None, None, (2, 9)),
    ("euler_ancestral", OPTIMIZE, None, (2, 4, 9)),
    ("euler_ancestral", OPTIMIZE, EditLossConfig(), (9,)),
    ("lcm", OPTIMIZE, None, (2, 4, 9)),
]


def main() -> None:
    training_sigmas = sd_discrete_sigmas()
    sigmas, early = simple_schedule(training_sigmas, 4), sigma_at_timestep(training_sigmas, 250)
    models = {"spectral": SpectralMixture.random(components=16, shape=(4, 32, 32), within=1.0, seed=0),
              "isotropic": GaussianMixture.random(components=16, shape=(4, 32, 32), std=1.0, seed=0)}
    print("| model | sampler | K | median fixed_point | median anderson | anderson +1 dB | anderson -1 dB | worst |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mixture in models.items():
        x0 = mixture.sample(CLASSES, seed=1)
        for sampler, correction, edit_loss, ks in SETTINGS:
            consistency = sampler == "lcm"
            denoiser = mixture.consistency_denoiser(CLASSES, substeps=6) if consistency else mixture.denoiser(CLASSES)
            label = sampler + (" + optimize" if correction else "") + (" + edit losses" if edit_loss else "")
            for k in ks:
                db = {}
                for solver in ("fixed_point", "anderson"):
                    config = ReNoiseConfig(renoise_steps=k, solver=solver, early_below_sigma=early, edit_loss=edit_loss,
                                           noise_correction=correction)
                    inversion = invert(denoiser, x0, sigmas, sampler, config=config, seed=0)
                    db[solver] = psnr(sample(denoiser, inversion.latent, sigmas, sampler, noises=inversion.noises), x0)
                gain = db["anderson"] - db["fixed_point"]
                print(f"| {name} | {label} | {k} | {db['fixed_point'].median():.1f} | {db['anderson'].median():.1f} | "
                      f"{int((gain > 1).sum())}/16 | {int((gain < -1).sum())}/16 | {gain.min():+.1f} |", flush=True)


if __name__ == "__main__":
    main()
