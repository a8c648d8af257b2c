"""anderson against plain iteration for heun (per step) and dpmpp_2m (over the sweeps), at equal calls, on three
models and four karras step counts: the measurement behind their default solver (README, "Second-order and
multistep samplers"). 4 latents per model; about 4 minutes on 2 cores:

    python scripts/multistep_solvers.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renoise_core.analytic import GaussianMixture  # noqa: E402
from renoise_core.bench_solvers import spectral_model  # noqa: E402
from renoise_core.learned import load_learned_denoiser  # noqa: E402
from renoise_core.multistep import anderson_solver  # noqa: E402
from renoise_core.sampler_bench import CLASSES, _row  # noqa: E402
from renoise_core.schedules import karras_schedule  # noqa: E402


class LearnedModel:
    """The shipped network, tested on held-out samples of the spectral mixture it was trained on."""

    def __init__(self, data):
        self.network, self.data = load_learned_denoiser(), data

    def denoiser(self, classes):
        return self.network.denoiser(classes)

    def sample(self, classes, seed):
        return self.data.sample(classes, seed)


def main() -> None:
    spectral = spectral_model()
    models = {"spectral": spectral, "isotropic": GaussianMixture.random(16, (4, 32, 32), seed=0), "learned": LearnedModel(spectral)}
    print("| model | steps | sampler | setting | calls | plain (dB) | anderson (dB) | difference |")
    print("|---|---|---|---|---|---|---|---|")
    for name, model in models.items():
        x0 = model.sample(CLASSES, seed=1)
        for steps in (10, 15, 20, 30):
            sigmas = karras_schedule(steps)
            settings = [("heun", f"iterations={n}", {"iterations": n}, "solver") for n in (3, 4)]
            settings += [("dpmpp_2m", f"sweeps={n}", {"sweeps": n, "sweep_iterations": 2}, "sweep_solver") for n in (4, 5, 6)]
            for sampler, label, options, which in settings:
                plain = _row(model, x0, sigmas, sampler, label, **options)
                fast = _row(model, x0, sigmas, sampler, label, **options, **{which: anderson_solver()})
                print(f"| {name} | {steps} | {sampler} | {label} | {plain.calls} | {plain.psnr_db:.1f} | {fast.psnr_db:.1f} | "
                      f"{fast.psnr_db - plain.psnr_db:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
