"""Train the pack's small learned test denoiser (renoise_core/learned.py) on the spectral Gaussian mixture.

The shipped weights were made with (2 CPU threads; under load from other jobs this reached step 520 in its 20
minutes, see README, "The learned test model"):

    nice -n 5 .venv/bin/python scripts/train_learned_denoiser.py --seed 0 --steps 8000 --minutes 20 \
        --out renoise_core/data/learned_denoiser.safetensors

Data: fresh samples every step from ``SpectralMixture.random(components=16, shape=(4, 32, 32), within=1.0,
alpha=2.0, seed=0, parameterization="eps")`` (nothing downloaded). Each item gets a "prompt": with probability 0.9
a class ``c`` with ``MixtureModel.prior(c)`` (0.98 on ``c``), otherwise (classifier-free dropout) the uniform
prior; its component is then drawn from that prior, so the loss's minimiser is the exact posterior mean
``SpectralMixture.posterior_mean(x, sigma, prior)``. Sigmas are log-uniform on SD's range [0.0292, 14.6146], with 15 % drawn
log-uniform on [14.6146, 80] instead: there the class prior decides the prediction, which teaches the class memory
how much to trust the prior at the top of SD's range.
Loss: EDM's weighted denoising loss, ``|| F(c_in x, c_noise, prior) - (x0 - c_skip x) / c_out ||^2`` (mean over
pixels and batch). Adam, linear warm-up then cosine decay, EMA of the weights (the EMA weights are saved).

``--minutes`` caps the wall clock: the learning rate decays over the steps or the minutes, whichever runs out
first, so a slow (or shared) machine gets a model trained on fewer steps, never a longer run; the file's metadata
records the steps done.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from renoise_core.analytic import SpectralMixture, _colour  # noqa: E402
from renoise_core.learned import DenoiserNet, LearnedDenoiser, edm_scalings, save_learned_denoiser  # noqa: E402

SIGMA_MIN, SIGMA_MAX, SIGMA_ABOVE = 0.0292, 14.6146, 80.0
DATA = "SpectralMixture.random(components=16, shape=(4, 32, 32), within=1.0, alpha=2.0, seed=0, parameterization='eps')"


def make_data_model() -> SpectralMixture:
    return SpectralMixture.random(components=16, shape=(4, 32, 32), within=1.0, alpha=2.0, seed=0, parameterization="eps")


def data_sigma(model: SpectralMixture) -> float:
    """The data's pixel std: class means' mean square plus the within-class variance (the spectrum's mean)."""
    return math.sqrt(float(model.means.pow(2).mean() + model.spectrum.mean()))


def draw_batch(model: SpectralMixture, batch: int, generator: torch.Generator, uncond_prob: float = 0.1):
    """``(x0, prior)``: ``[B, C, H, W]`` float32 clean latents and the ``[B, K]`` float32 priors they were drawn under."""
    k = model.num_components
    classes = torch.randint(0, k, (batch,), generator=generator)
    prior = model.prior(classes)
    uncond = torch.rand((batch,), generator=generator) < uncond_prob
    prior[uncond] = 1.0 / k
    components = torch.multinomial(prior, 1, generator=generator).view(-1)
    white = torch.randn((batch,) + tuple(model.means.shape[1:]), generator=generator, dtype=torch.float64)
    x0 = model.means[components] + _colour(white, model.spectrum)
    return x0.float(), prior.float()


def empirical_class_means(model: SpectralMixture, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """``[K, C, H, W]``: the mean of ``per_class`` fresh samples of each component (an estimate from data)."""
    white = torch.randn((per_class,) + tuple(model.means.shape), generator=generator, dtype=torch.float64)
    return (model.means + _colour(white, model.spectrum)).mean(0).float()


def draw_sigmas(batch: int, generator: torch.Generator, above: float = 0.15) -> torch.Tensor:
    """Log-uniform on SD's range; a fraction ``above`` log-uniform on [SIGMA_MAX, SIGMA_ABOVE] instead."""
    u = torch.rand((batch,), generator=generator)
    low = torch.full((batch,), math.log(SIGMA_MIN))
    high = torch.full((batch,), math.log(SIGMA_MAX))
    beyond = torch.rand((batch,), generator=generator) < above
    low[beyond], high[beyond] = math.log(SIGMA_MAX), math.log(SIGMA_ABOVE)
    return torch.exp(low + u * (high - low))


def loss_fn(net: DenoiserNet, x0: torch.Tensor, prior: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
            sigma_data: float) -> torch.Tensor:
    c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise
    target = (x0 - c_skip * x) / c_out
    return (net(c_in * x, c_noise, prior) - target).pow(2).mean()


@torch.no_grad()
def exact_loss(model: SpectralMixture, generator: torch.Generator, sigma_data: float, batch: int = 512) -> float:
    """The training loss of the exact posterior mean (the loss's floor) on a fresh batch."""
    x0, prior = draw_batch(model, batch, generator)
    sigma = draw_sigmas(batch, generator)
    c_skip, c_out, _, _ = edm_scalings(sigma, sigma_data)
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=generator)
    best = (model.posterior_mean(x, sigma, prior.double()).float() - c_skip * x) / c_out
    return float((best - (x0 - c_skip * x) / c_out).pow(2).mean())


@torch.no_grad()
def evaluate(model: SpectralMixture, learned: LearnedDenoiser, sigmas=(0.1, 0.5, 2.0, 8.0), seed: int = 12345) -> dict[str, float]:
    """The loss floor, and MSE(net) / MSE(exact posterior mean) per sigma on held-out conditional samples."""
    generator = torch.Generator().manual_seed(seed)
    x0, prior = draw_batch(model, 128, generator, uncond_prob=0.0)
    noise = torch.randn(x0.shape, generator=generator)
    ratios = {"exact_loss": exact_loss(model, generator, sigma_data=learned.sigma_data)}
    for s in sigmas:
        sigma = torch.full((x0.shape[0],), s)
        x = x0 + s * noise
        mse_net = (learned.denoise(x, sigma, prior) - x0).pow(2).mean()
        mse_exact = (model.posterior_mean(x, sigma, prior.double()) - x0).pow(2).mean()
        ratios[f"mse_ratio_sigma_{s}"] = float(mse_net / mse_exact)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8000, help="optimizer steps (the learning-rate schedule's length)")
    parser.add_argument("--minutes", type=float, default=20.0, help="stop early after this much wall-clock time")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--half", action="store_true", help="store float16 weights (default float32)")
    parser.add_argument("--out", type=Path, default=Path("renoise_core/data/learned_denoiser.safetensors"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = make_data_model()
    sigma_data = data_sigma(model)
    net = DenoiserNet(sigma_data=sigma_data)
    with torch.no_grad():  # start the class memory at per-class sample means (in c_in units at sigma -> 0)
        net.templates.copy_(empirical_class_means(model, 64, generator) / sigma_data)
    ema = copy.deepcopy(net).requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    warmup = max(1, args.steps // 50)

    def lr_at(step: int, seconds: float) -> float:
        """Warm-up, then cosine decay over the steps or the minutes, whichever runs out first."""
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = max((step - warmup) / max(1, args.steps - warmup), seconds / (60 * args.minutes))
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    start = time.monotonic()
    running, step = None, 0
    for step in range(args.steps):
        seconds = time.monotonic() - start
        if seconds > 60 * args.minutes:
            print(f"time budget of {args.minutes} min reached at step {step}", flush=True)
            break
        lr = lr_at(step, seconds)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x0, prior = draw_batch(model, args.batch, generator)
        sigma = draw_sigmas(args.batch, generator)
        noise = torch.randn(x0.shape, generator=generator)
        loss = loss_fn(net, x0, prior, sigma, noise, sigma_data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {running:.4f}  lr {lr:.2e}  {time.monotonic() - start:6.0f} s", flush=True)
    steps_done = step if seconds > 60 * args.minutes else step + 1
    seconds = time.monotonic() - start

    learned = LearnedDenoiser(ema, sigma_data)
    ratios = evaluate(model, learned)
    print(f"trained {steps_done} steps in {seconds:.0f} s; final running loss {running:.4f}; " +
          ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()), flush=True)
    metadata = {
        "command": "python scripts/train_learned_denoiser.py " + shlex.join(sys.argv[1:]),
        "seed": str(args.seed), "data": DATA, "steps": str(steps_done), "batch": str(args.batch),
        "final_loss": f"{running:.5f}", "train_seconds": f"{seconds:.0f}", "threads": str(args.threads),
        "torch": torch.__version__, "parameterization": "eps", "preconditioning": "EDM",
        "storage": "float16" if args.half else "float32", **{k: f"{v:.4f}" for k, v in ratios.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_learned_denoiser(learned, args.out, metadata, half=args.half)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
