"""The solver study of ``./dev bench``: reconstruction PSNR against denoiser calls for the paper's renoising loop
(``fixed_point``) and the accelerated solver (``anderson``), on models whose step maps have realistic structure.

Models (latents ``[4, 32, 32]``, 4 of them, classes 0, 3, 6, 9; seed 7865 for the step noises):

- ``isotropic``: the isotropic Gaussian mixture (a scalar Jacobian where one component dominates: flatters any
  secant method; kept as the old reference);
- ``spectral``: components sharing a natural-image power spectrum (``SpectralMixture``), eps model, SD schedule;
- ``spectral-flow``: the same as a flow (CONST) model, SD3-style discrete flow schedule with shift 3;
- ``learned``: the small trained network shipped in the package (``learned.py``), whose Jacobian is rough.

Samplers: euler (no noise), euler_ancestral and lcm with the paper's noise correction (``optimize``). lcm runs on
each model's exact consistency function (``MixtureModel.consistency_denoiser``) and, on the learned model, on the
network itself. lcm is left out on the flow model: its inverse step divides by ``1 - sigma_next`` (10 at the top
step of a shift-3 schedule): measured, the paper loop's reconstruction there is below 0 dB at every K and NaN at
K = 20, and the accelerated solver's is finite but poor below K = 6. 4 sampling steps, ComfyUI's ``simple``
scheduler. Both solvers make the same calls for a given K (the first-step rule caps K at 4 on steps below timestep 250 for both).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor

from .analytic import GaussianMixture, SpectralMixture, psnr
from .inversion import NoiseCorrectionConfig, ReNoiseConfig, invert, sample
from .schedules import flow_simple_schedule, sd_discrete_sigmas, sigma_at_timestep, simple_schedule

SEED = 7865
CLASSES = [0, 3, 6, 9]
STEPS = 4
#: the K (renoising iterations) the table measures, 1 to 20
SOLVER_KS = (1, 2, 3, 4, 6, 9, 14, 20)
#: the paper loop's Turbo defaults: K = 9 (the calls every table compares against)
TURBO_K = 9
CONSISTENCY_SUBSTEPS = 6


@dataclass
class Case:
    """One (model, sampler) cell: the data, its denoiser, the schedule and the paper-loop settings to compare."""

    model: str
    sampler: str
    x0: Tensor
    denoiser: Callable[[Tensor, Tensor], Tensor]
    sigmas: Tensor
    parameterization: str
    early_below_sigma: float | None
    noise_correction: NoiseCorrectionConfig | None

    @property
    def name(self) -> str:
        return f"{self.model} / {self.sampler}" + (" + correction" if self.noise_correction else "")

    def config(self, solver: str, k: int, **changes) -> ReNoiseConfig:
        base = ReNoiseConfig(renoise_steps=k, solver=solver, early_below_sigma=self.early_below_sigma,
                             noise_correction=self.noise_correction)
        return dataclasses.replace(base, **changes)

    def reconstruct(self, config: ReNoiseConfig) -> tuple[float, int]:
        """Mean PSNR (dB) of the 4-step reconstruction, and the inversion's denoiser calls."""
        inversion = invert(self.denoiser, self.x0, self.sigmas, self.sampler, config=config, seed=SEED,
                           parameterization=self.parameterization)
        out = sample(self.denoiser, inversion.latent, self.sigmas, self.sampler, noises=inversion.noises,
                     parameterization=self.parameterization)
        return psnr(out, self.x0).mean().item(), inversion.denoiser_calls


def spectral_model(parameterization: str = "eps") -> SpectralMixture:
    """The benches' mixture whose 16 components share a natural-image spectrum, latents ``[4, 32, 32]``."""
    return SpectralMixture.random(components=16, shape=(4, 32, 32), within=1.0, seed=0, parameterization=parameterization)


def models() -> dict[str, tuple[object, object, str]]:
    """name -> (model with ``denoiser`` (and, for the exact ones, ``consistency_denoiser``), the mixture whose
    ``sample`` gives the test latents, parameterization). The learned network is tested on held-out samples of the
    spectral mixture it was trained on."""
    spectral, flow = spectral_model(), spectral_model("flow")
    isotropic = GaussianMixture.random(components=16, shape=(4, 32, 32), std=1.0, seed=0)
    found = {"isotropic": (isotropic, isotropic, "eps"), "spectral": (spectral, spectral, "eps"), "spectral-flow": (flow, flow, "flow")}
    try:
        from .learned import load_learned_denoiser
    except ImportError:  # a checkout without the shipped network
        return found
    found["learned"] = (load_learned_denoiser(), spectral, "eps")
    return found


def cases(model_names: Sequence[str] | None = None) -> list[Case]:
    training_sigmas = sd_discrete_sigmas()
    early = sigma_at_timestep(training_sigmas, 250)
    correction = NoiseCorrectionConfig("optimize")
    found = []
    for name, (model, data, parameterization) in models().items():
        if model_names is not None and name not in model_names:
            continue
        if parameterization == "flow":
            sigmas, early_below = flow_simple_schedule(STEPS, shift=3.0), None  # timestep 250 is sigma 0.5, not below
        else:
            sigmas, early_below = simple_schedule(training_sigmas, STEPS), early
        x0 = data.sample(CLASSES, seed=1)
        for sampler, nc in (("euler", None), ("euler_ancestral", correction), ("lcm", correction)):
            if sampler == "lcm" and parameterization == "flow":
                continue
            consistency = getattr(model, "consistency_denoiser", None) if sampler == "lcm" else None
            denoiser = consistency(CLASSES, substeps=CONSISTENCY_SUBSTEPS) if consistency else model.denoiser(CLASSES)
            found.append(Case(name, sampler, x0, denoiser, sigmas, parameterization, early_below, nc))
    return found


def curves(case: Case, ks: Sequence[int] = SOLVER_KS) -> dict[str, list[tuple[int, float]]]:
    """solver -> [(calls, dB)] for each K."""
    return {solver: [case.reconstruct(case.config(solver, k))[::-1] for k in ks] for solver in ("fixed_point", "anderson")}


def calls_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    return next((calls for calls, db in points if db >= target), None)


def solver_report(model_names: Sequence[str] | None = None, ks: Sequence[int] = SOLVER_KS) -> tuple[list[str], dict]:
    """The markdown tables and the raw curves (``{case name: {solver: [(calls, dB)]}}``)."""
    lines = ["## Solvers: reconstruction PSNR (dB) and denoiser calls, 4 sampling steps", ""]
    lines += ["| model / sampler | solver | " + " | ".join(f"K={k}" for k in ks) + " | worst margin | calls to the paper's K=9 dB |"]
    lines += ["|---|---|" + "---|" * (len(ks) + 2)]
    data = {}
    for case in cases(model_names):
        results = curves(case, ks)
        data[case.name] = results
        paper, accelerated = results["fixed_point"], results["anderson"]
        turbo_quality = paper[list(ks).index(TURBO_K)][1] if TURBO_K in ks else None
        margin = min(a[1] - p[1] for a, p in zip(accelerated, paper))
        for solver, points in results.items():
            cells = [f"{db:.1f} ({calls})" for calls, db in points]
            reach = calls_to_reach(points, turbo_quality) if turbo_quality is not None else None
            extra = [f"{margin:+.1f} dB" if solver == "anderson" else "", str(reach) if reach is not None else "not reached"]
            lines.append(f"| {case.name} | {solver} | " + " | ".join(cells + extra) + " |")
    return lines, data


def tolerance_report(model_name: str = "spectral", tols: Sequence[float] = (1e-2, 3e-3, 1e-3, 3e-4)) -> list[str]:
    """Adaptive stopping (``convergence_tol``) with both solvers on euler: calls and dB per tolerance."""
    (case,) = [c for c in cases([model_name]) if c.sampler == "euler"]
    lines = [f"## convergence_tol on {model_name} / euler (K up to 30)", "", "| tol | " + " | ".join(f"{t:g}" for t in tols) + " |",
             "|---|" + "---|" * len(tols)]
    for solver in ("fixed_point", "anderson"):
        cells = []
        for tol in tols:
            db, calls = case.reconstruct(case.config(solver, 30, average_start=30, convergence_tol=tol))
            cells.append(f"{db:.1f} dB ({calls} calls)")
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    return lines
