"""``python -m renoise_core.bench``: the paper's two reconstruction experiments on the built-in analytic model.

Data are latents ``[4, 32, 32]`` drawn from a 16-component Gaussian mixture (see ``analytic.py``); the denoiser is
exact, so every dB lost is lost by the inversion. Euler and euler_ancestral use the ideal (posterior-mean)
denoiser; lcm uses the ideal consistency function (the flow map to sigma 0), which is what an LCM approximates.
The schedule is ComfyUI's ``simple`` with 4 steps on the SD sigma table (timesteps 999, 749, 499, 249).

1. PSNR against denoiser calls: sampler reversal with more inversion steps, versus ReNoise at 4 steps with more
   renoising iterations (paper Fig. 11). The 4-step sampler reconstructs in both cases. For the stochastic
   samplers a noise belongs to a step, so there "reversal with N steps" inverts and samples with N steps.
2. The ablation ladder at 4 steps (paper Table 2): plain reversal, +9 renoise iterations, +averaging,
   +edit losses, +noise correction; and, for reference, exact noise correction (Eq. 4).
3. The solvers (``bench_solvers.py``): the paper's loop against the accelerated solver, PSNR against calls on the
   isotropic, spectral, spectral-flow and learned models; and adaptive stopping with both.
4. The samplers (``sampler_bench.py``): every sampler ReNoiseInvert inverts, reconstruction against inversion
   calls at 20 karras steps on the spectral model.

Prints tables and writes ``bench.png``, ``solvers.png`` and ``bench.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import bench_solvers, sampler_bench
from .analytic import GaussianMixture, psnr
from .edit_losses import EditLossConfig
from .inversion import NoiseCorrectionConfig, ReNoiseConfig, invert, sample
from .schedules import sd_discrete_sigmas, sigma_at_timestep, simple_schedule

SAMPLER_NAMES = ("euler", "euler_ancestral", "lcm")
STEPS = 4
SEED = 7865
CLASSES = [0, 3, 6, 9]
REVERSAL_STEPS = (4, 8, 12, 20, 40)
RENOISE_STEPS = (0, 1, 2, 4, 6, 9)


def _denoiser(model: GaussianMixture, sampler: str, classes):
    return model.consistency_denoiser(classes) if sampler == "lcm" else model.denoiser(classes)


def reconstruct_psnr(model, x0, sampler, sigmas_invert, sigmas_sample, config) -> tuple[float, int]:
    """Invert ``x0`` on one schedule, sample on another with the stored noises; mean PSNR (dB) and calls."""
    denoiser = _denoiser(model, sampler, CLASSES)
    inversion = invert(denoiser, x0, sigmas_invert, sampler, config=config, seed=SEED)
    noises = inversion.noises if len(sigmas_sample) == len(sigmas_invert) else None
    reconstruction = sample(denoiser, inversion.latent, sigmas_sample, sampler, noises=noises)
    return psnr(reconstruction, x0).mean().item(), inversion.denoiser_calls


def ladder_configs(early_below_sigma: float) -> list[tuple[str, ReNoiseConfig]]:
    renoise = ReNoiseConfig(average_start=9, early_average_start=4, early_below_sigma=early_below_sigma)
    averaged = dataclasses.replace(renoise, average_start=8, early_average_start=0)
    edited = dataclasses.replace(averaged, edit_loss=EditLossConfig())
    corrected = dataclasses.replace(edited, noise_correction=NoiseCorrectionConfig("optimize"))
    exact = dataclasses.replace(averaged, noise_correction=NoiseCorrectionConfig("exact"))
    return [
        ("plain reversal (K=0)", ReNoiseConfig(renoise_steps=0)),
        ("+ renoise (K=9)", renoise),
        ("+ averaging", averaged),
        ("+ edit losses", edited),
        ("+ noise correction", corrected),
        ("(exact noise correction, no edit losses)", exact),
    ]


def run(out: Path) -> str:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    training_sigmas = sd_discrete_sigmas()
    schedule = simple_schedule(training_sigmas, STEPS)
    early_below_sigma = sigma_at_timestep(training_sigmas, 250)
    model = GaussianMixture.random(components=16, shape=(4, 32, 32), std=1.0, seed=0)
    x0 = model.sample(CLASSES, seed=1)

    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    lines = ["## Reconstruction PSNR (dB) against denoiser calls, 4 sampling steps", ""]
    lines += ["| sampler | method | " + " | ".join(["calls / dB"] * max(len(REVERSAL_STEPS), len(RENOISE_STEPS))) + " |"]
    lines += ["|---|---|" + "---|" * max(len(REVERSAL_STEPS), len(RENOISE_STEPS))]
    for sampler in SAMPLER_NAMES:
        reversal = []
        for n in REVERSAL_STEPS:
            fine = simple_schedule(training_sigmas, n)
            sampling = schedule if sampler == "euler" else fine
            reversal.append(reconstruct_psnr(model, x0, sampler, fine, sampling, ReNoiseConfig(renoise_steps=0))[::-1])
        renoise = []
        for k in RENOISE_STEPS:
            config = ReNoiseConfig(renoise_steps=k, early_below_sigma=early_below_sigma)
            renoise.append(reconstruct_psnr(model, x0, sampler, schedule, schedule, config)[::-1])
        curves[sampler] = {"sampler reversal": reversal, "ReNoise": renoise}
        for name, points in curves[sampler].items():
            lines.append(f"| {sampler} | {name} | " + " | ".join(f"{c} / {p:.1f}" for c, p in points) + " |")

    lines += ["", "## Ablation ladder at 4 steps (mean PSNR dB over 4 latents; denoiser calls)", ""]
    lines += ["| configuration | " + " | ".join(SAMPLER_NAMES) + " |", "|---|" + "---|" * len(SAMPLER_NAMES)]
    for name, config in ladder_configs(early_below_sigma):
        cells = []
        for sampler in SAMPLER_NAMES:
            stochastic = sampler != "euler"
            if config.noise_correction is not None and not stochastic:
                cells.append("n/a (deterministic)")
                continue
            value, calls = reconstruct_psnr(model, x0, sampler, schedule, schedule, config)
            cells.append(f"{value:.1f} ({calls})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    solver_lines, solver_curves = bench_solvers.solver_report()
    lines += [""] + solver_lines + [""] + bench_solvers.tolerance_report()
    lines += [""] + sampler_bench.report()
    lines += ["", f"Run time: {time.perf_counter() - started:.1f} s on {torch.get_num_threads()} CPU threads."]

    out.mkdir(parents=True, exist_ok=True)
    report = "\n".join(lines) + "\n"
    (out / "bench.md").write_text(report)
    plot_curves(curves, out / "bench.png")
    shown = [name for name in solver_curves if name.endswith("/ euler") or name == "spectral / euler_ancestral + correction"]
    plot_curves({name: solver_curves[name] for name in shown if not name.startswith("isotropic")}, out / "solvers.png")
    return report


# --- a small line chart with Pillow (no plotting dependency) ---------------------------------------------------

_COLOURS = {"sampler reversal": (200, 80, 40), "ReNoise": (30, 100, 200), "fixed_point": (200, 80, 40), "anderson": (30, 100, 200)}


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    """One panel per sampler: PSNR (y) against denoiser calls (x), one line per method."""
    panel_w, panel_h, margin = 360, 300, 48
    image = Image.new("RGB", (panel_w * len(curves), panel_h + 40), "white")
    draw = ImageDraw.Draw(image)
    values = [p for c in curves.values() for pts in c.values() for _, p in pts]
    calls = [n for c in curves.values() for pts in c.values() for n, _ in pts]
    y_lo, y_hi = min(values) - 1, max(values) + 1
    x_hi = max(calls)
    for col, (sampler, methods) in enumerate(curves.items()):
        left, top = col * panel_w + margin, 30
        width, height = panel_w - margin - 16, panel_h - margin - 10

        def to_px(n: float, p: float, left=left, top=top, width=width, height=height) -> tuple[float, float]:
            return left + width * n / x_hi, top + height * (1 - (p - y_lo) / (y_hi - y_lo))

        draw.rectangle([left, top, left + width, top + height], outline=(0, 0, 0))
        draw.text((left + 4, 8), f"{sampler}, {STEPS} sampling steps"[:52], fill=(0, 0, 0))
        for tick in range(0, x_hi + 1, 10):
            x, _ = to_px(tick, y_lo)
            draw.line([x, top + height, x, top + height + 4], fill=(0, 0, 0))
            draw.text((x - 6, top + height + 6), str(tick), fill=(0, 0, 0))
        for tick in range(int(y_lo) + 1, int(y_hi) + 1, 5):
            _, y = to_px(0, tick)
            draw.line([left - 4, y, left, y], fill=(0, 0, 0))
            draw.text((left - 30, y - 6), str(tick), fill=(0, 0, 0))
        draw.text((left + width // 2 - 40, top + height + 20), "denoiser calls", fill=(0, 0, 0))
        draw.text((left - 44, top - 16), "PSNR dB", fill=(0, 0, 0))
        for row, (method, points) in enumerate(methods.items()):
            colour = _COLOURS[method]
            pixels = [to_px(n, p) for n, p in points]
            draw.line(pixels, fill=colour, width=2)
            for x, y in pixels:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            draw.text((left + 8, top + 8 + 14 * row), method, fill=colour)
    image.save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m renoise_core.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench_out"), help="folder for bench.png, solvers.png and bench.md")
    args = parser.parse_args(argv)
    print(run(args.out), end="")
    print(f"Wrote {args.out / 'bench.png'}, {args.out / 'solvers.png'} and {args.out / 'bench.md'}")


if __name__ == "__main__":
    main()
