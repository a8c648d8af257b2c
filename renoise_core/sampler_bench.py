"""``python -m renoise_core.sampler_bench``: reconstruction against denoiser calls, per sampler, on a karras schedule.

Each row inverts the same latents with one sampler and one setting, samples them back with the same sampler (and,
for stochastic ones, the stored noises) and reports the mean PSNR against the original and the calls the inversion
made. The model is a parameter (anything with ``denoiser(classes)`` and ``sample(classes, seed)``): the command
uses the spectral mixture (``--model spectral``, components sharing a natural-image spectrum) or the isotropic one;
the default schedule is ComfyUI's ``karras`` for SD1.5 (sigma_min 0.0292, sigma_max 14.6146, rho 7) with 20 steps.
euler, heun, dpm_2 and dpmpp_2m appear with both solvers: plain iteration (the paper's loop for euler) and anderson
(ReNoiseInvert's default for them; on heun and dpm_2 per step, on dpmpp_2m over the sweeps).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from torch import Tensor

from .analytic import GaussianMixture, psnr
from .bench_solvers import spectral_model
from .inversion import NoiseCorrectionConfig, ReNoiseConfig, invert, sample
from .multistep import anderson_solver, invert_multistep, sample_multistep
from .schedules import karras_schedule

CLASSES = [0, 3, 6, 9]
SEED = 7865


@dataclass(frozen=True)
class Row:
    sampler: str
    setting: str
    calls: int
    psnr_db: float


def _euler_row(model, x0, sigmas, solver: str, k: int) -> Row:
    """euler with K renoising iterations (no averaging: the last estimate, like the multistep solvers)."""
    denoiser = model.denoiser(CLASSES)
    config = ReNoiseConfig(renoise_steps=k, average_start=k, solver=solver)
    inversion = invert(denoiser, x0, sigmas, "euler", config=config, seed=SEED)
    reconstruction = sample(denoiser, inversion.latent, sigmas, "euler")
    return Row("euler", f"{solver} K={k}", inversion.denoiser_calls, psnr(reconstruction, x0).mean().item())


def _row(model, x0, sigmas, sampler, setting, **settings) -> Row:
    """A :mod:`multistep` sampler with ``invert_multistep``'s ``settings``."""
    denoiser = model.denoiser(CLASSES)
    inversion = invert_multistep(denoiser, x0, sigmas, sampler, seed=SEED, **settings)
    reconstruction = sample_multistep(denoiser, inversion.latent, sigmas, sampler, noises=inversion.noises)
    return Row(sampler, setting, inversion.denoiser_calls, psnr(reconstruction, x0).mean().item())


def sampler_table(model, sigmas: Tensor | None = None, quick: bool = False) -> list[Row]:
    """Reconstruction (dB) against inversion calls for euler and every sampler :mod:`multistep` inverts."""
    sigmas = karras_schedule(20) if sigmas is None else sigmas
    x0 = model.sample(CLASSES, seed=1)
    rows = []
    for solver in ("fixed_point", "anderson"):
        for k in (0, 1) if quick else (0, 1, 2, 3, 4):
            rows.append(_euler_row(model, x0, sigmas, solver, k))
    # anderson needs three evaluations before it differs from plain iteration: only those rows are shown for it
    for sampler in ("heun",) if quick else ("heun", "dpm_2"):
        for iterations in (1, 2) if quick else (1, 2, 3):
            rows.append(_row(model, x0, sigmas, sampler, f"fixed_point iterations={iterations}", iterations=iterations))
        for iterations in (3,) if quick else (3, 4):
            rows.append(_row(model, x0, sigmas, sampler, f"anderson iterations={iterations}", iterations=iterations,
                             solver=anderson_solver()))
    for sweeps in (1, 2) if quick else (1, 2, 3, 4):
        setting = f"fixed_point iterations=1 sweeps={sweeps} sweep_iterations=2"
        rows.append(_row(model, x0, sigmas, "dpmpp_2m", setting, iterations=1, sweeps=sweeps, sweep_iterations=2))
    for sweeps in (4,) if quick else (4, 5):
        setting = f"anderson iterations=1 sweeps={sweeps} sweep_iterations=2"
        rows.append(_row(model, x0, sigmas, "dpmpp_2m", setting, iterations=1, sweeps=sweeps, sweep_iterations=2,
                         sweep_solver=anderson_solver()))
    for sweeps in (1,) if quick else (1, 2):
        setting = f"fixed_point iterations=1 sweeps={sweeps} sweep_iterations=2"
        rows.append(_row(model, x0, sigmas, "res_multistep", setting, iterations=1, sweeps=sweeps, sweep_iterations=2))
    for sampler in ("dpmpp_2m_sde",) if quick else ("dpmpp_2m_sde", "res_multistep_ancestral", "dpm_2_ancestral"):
        sweeping = sampler != "dpm_2_ancestral"
        for mode in (None, "optimize", "exact"):
            correction = NoiseCorrectionConfig(mode) if mode else None
            setting = f"iterations=1{' sweeps=2 sweep_iterations=2' if sweeping else ''} noise_correction={mode}"
            rows.append(_row(model, x0, sigmas, sampler, setting, sweeps=2, sweep_iterations=2, noise_correction=correction))
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| sampler | setting | calls | PSNR (dB) |", "|---|---|---:|---:|"]
    lines += [f"| {r.sampler} | {r.setting} | {r.calls} | {r.psnr_db:.1f} |" for r in rows]
    return "\n".join(lines)


def report(steps: int = 20) -> list[str]:
    """The markdown section ``./dev bench`` prints: every sampler on the spectral model, ``steps`` karras steps."""
    title = f"## Samplers: reconstruction against inversion calls, {steps} karras steps (SD1.5 sigmas), spectral model"
    return [title, "", markdown(sampler_table(spectral_model(), karras_schedule(steps)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", choices=("spectral", "isotropic"), default="spectral")
    args = parser.parse_args()
    if args.model == "spectral":
        model = spectral_model()
    else:
        model = GaussianMixture.random(16, (4, 32, 32), seed=0)
    print(markdown(sampler_table(model, karras_schedule(args.steps), quick=args.quick)))


if __name__ == "__main__":
    main()
