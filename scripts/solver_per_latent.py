"""Per-latent comparison of the two solvers, where the bench reports means over 4 latents.

16 latents (one per class) of the bench's spectral and isotropic mixtures, 4 steps of SD's ``simple`` schedule,
the reference's first-step rule; and euler on the shipped learned network and the spectral flow model. For each
sampler setting and K: the median PSNR of each solver and how many latents anderson wins or loses by more than
1 dB. This is the measurement behind ReNoiseInvert's unconnected solver (anderson for euler and ddim, the paper's
loop for the stochastic samplers). About 35 seconds on 2 cores:

    python scripts/solver_per_latent.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renoise_core.analytic import GaussianMixture, psnr  # noqa: E402
from renoise_core.bench_solvers import spectral_model  # noqa: E402
from renoise_core.edit_losses import EditLossConfig  # noqa: E402
from renoise_core.inversion import NoiseCorrectionConfig, ReNoiseConfig, invert, sample  # noqa: E402
from renoise_core.learned import load_learned_denoiser  # noqa: E402
from renoise_core.schedules import flow_simple_schedule, sd_discrete_sigmas, sigma_at_timestep, simple_schedule  # noqa: E402

CLASSES = list(range(16))
OPTIMIZE = NoiseCorrectionConfig("optimize")
#: (sampler, noise correction, edit losses, K values)
SETTINGS = [
    ("euler", None, None, (2, 9)),
    ("euler_ancestral", OPTIMIZE, None, (2, 4, 9)),
    ("euler_ancestral", OPTIMIZE, EditLossConfig(), (9,)),
    ("lcm", OPTIMIZE, None, (2, 4, 9)),
]


def compare(model: str, label: str, denoiser, x0, sigmas, sampler: str, k: int, early_below_sigma, parameterization="eps",
            correction=None, edit_loss=None) -> None:
    """Print one table row: both solvers on the same latents, same seeds and calls."""
    db = {}
    for solver in ("fixed_point", "anderson"):
        config = ReNoiseConfig(renoise_steps=k, solver=solver, early_below_sigma=early_below_sigma, edit_loss=edit_loss,
                               noise_correction=correction)
        inversion = invert(denoiser, x0, sigmas, sampler, config=config, seed=0, parameterization=parameterization)
        out = sample(denoiser, inversion.latent, sigmas, sampler, noises=inversion.noises, parameterization=parameterization)
        db[solver] = psnr(out, x0)
    gain = db["anderson"] - db["fixed_point"]
    print(f"| {model} | {label} | {k} | {db['fixed_point'].median():.1f} | {db['anderson'].median():.1f} | "
          f"{int((gain > 1).sum())}/16 | {int((gain < -1).sum())}/16 | {gain.min():+.1f} |", flush=True)


def main() -> None:
    training_sigmas = sd_discrete_sigmas()
    sigmas, early = simple_schedule(training_sigmas, 4), sigma_at_timestep(training_sigmas, 250)
    spectral = spectral_model()
    models = {"spectral": spectral, "isotropic": GaussianMixture.random(components=16, shape=(4, 32, 32), std=1.0, seed=0)}
    print("| model | sampler | K | median fixed_point | median anderson | anderson +1 dB | anderson -1 dB | worst |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mixture in models.items():
        x0 = mixture.sample(CLASSES, seed=1)
        for sampler, correction, edit_loss, ks in SETTINGS:
            consistency = sampler == "lcm"
            denoiser = mixture.consistency_denoiser(CLASSES, substeps=6) if consistency else mixture.denoiser(CLASSES)
            label = sampler + (" + optimize" if correction else "") + (" + edit losses" if edit_loss else "")
            for k in ks:
                compare(name, label, denoiser, x0, sigmas, sampler, k, early, correction=correction, edit_loss=edit_loss)
    # euler, the sampler anderson is the default for, also on the trained network and the flow model
    learned, x0 = load_learned_denoiser().denoiser(CLASSES), spectral.sample(CLASSES, seed=1)
    flow = spectral_model("flow")
    for k in (2, 9):
        compare("learned", "euler", learned, x0, sigmas, "euler", k, early)
    for k in (2, 9):
        compare("spectral-flow (shift 3)", "euler", flow.denoiser(CLASSES), flow.sample(CLASSES, seed=1),
                flow_simple_schedule(4, shift=3.0), "euler", k, None, parameterization="flow")


if __name__ == "__main__":
    main()
