"""ReNoise inversion (Garibi et al., ECCV 2024) and noise-replaying sampling, for any affine sampler.

Units: k-diffusion. ``denoiser(x, sigma)`` takes ``x`` ``[B, C, H, W]`` and ``sigma`` ``[B]`` and returns the
predicted clean latent; ``eps_hat = (x - denoiser(x, sigma)) / sigma``. ``sigmas`` is a descending sampling
schedule whose last entry may be 0. Step ``i`` of a schedule goes from ``sigmas[i]`` down to ``sigmas[i + 1]``;
inversion walks the steps from the last to the first.

One inversion step, from the known lower point ``x_next`` up to ``x``, solves the fixed point
``z = G(z) = inverse_step(x_next, eps_hat(z, sigma))`` with K + 1 evaluations of ``G`` (``solvers.py``):

- ``fixed_point`` (paper, Algorithm 1): ``z(0) = x_next``, ``z(k+1) = G(z(k))``; edit losses on the predictions of
  the averaging window; ``x = inverse_step(x_next, edit(mean of the window's raw predictions))``.
- ``anderson``: the same fixed point (with edit losses, of the regularised map) solved by safeguarded Anderson
  acceleration, warm-started from the step below's prediction.

Then, for stochastic samplers, the step's noise is corrected so that the forward step from x lands on x_next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .edit_losses import EditLossConfig, draw_rolls, pyramid_sizes, regularize_noise_prediction
from .samplers import AffineStep, make_steps, noised
from .solvers import SOLVERS, StepProblem, anderson, fixed_point

Denoiser = Callable[[Tensor, Tensor], Tensor]
"""``denoiser(x [B, C, H, W], sigma [B]) -> predicted x0 [B, C, H, W]`` (k-diffusion units).

During inversion with edit losses the first evaluation of each step is made on a doubled batch
``cat([x, x_ref])``; a conditioned denoiser must repeat its per-item conditioning to the batch it is given
(ComfyUI does).
"""

NOISE_CORRECTION_MODES = ("optimize", "exact")
#: The fewest evaluations with which anderson solves a step that adds noise; with fewer it runs the paper's loop
#: from the paper's start. With two (K = 1) it has no secant step to take and differs from the paper's loop only by
#: its warm start, which assumes a prediction that varies smoothly from step to step: on these steps fresh noise
#: enters each one (measured in the solver bench, ``./dev bench``: from 1.0 dB below the paper's loop to 2 dB above).
#: lcm's steps also do not contract where the denoiser ignores a direction (``AffineStep.inverse_gain`` 1: their
#: fixed points form a family, and which one an iteration ends near depends on where it starts and how it moves):
#: there anderson needs two checked secant steps, 4 evaluations (K = 2 measured up to 3.9 dB below the paper's loop).
#: Every sampler's last step, to sigma 0, has gain 1 too but adds no noise: there anderson is +10 dB and more at K = 1.
MIN_ANDERSON_EVALUATIONS_STOCHASTIC = 3
MIN_ANDERSON_EVALUATIONS_LCM = 4
#: smallest latent side the edit losses are defined for (the pair loss's pyramid stops at 8)
MIN_EDIT_LOSS_SIZE = 8


@dataclass(frozen=True)
class NoiseCorrectionConfig:
    """Noise correction for stochastic samplers (paper Sec. 3.2, Eqs. 4-5).

    ``exact`` replaces each step's noise with the one that lands exactly on the known lower point (Eq. 4: perfect
    reconstruction, less editable). ``optimize`` is the reference's bounded version: ``steps`` gradient steps of
    size ``step_size`` on ``||noise - required_noise||``, i.e. the noise moves at most ``steps * step_size`` (L2)
    toward the required one.
    """

    mode: str = "optimize"
    steps: int = 10
    step_size: float = 1.8

    def __post_init__(self) -> None:
        if self.mode not in NOISE_CORRECTION_MODES:
            raise ValueError(f"noise correction mode must be one of {NOISE_CORRECTION_MODES}, got {self.mode!r}")
        if int(self.steps) != self.steps or self.steps < 0:
            raise ValueError(f"noise correction steps must be an integer >= 0, got {self.steps}")
        if not np.isfinite(self.step_size) or self.step_size < 0:
            raise ValueError(f"noise correction step_size must be finite and >= 0, got {self.step_size}")


@dataclass(frozen=True)
class ReNoiseConfig:
    """ReNoise settings. Defaults reproduce the reference release (with edit losses and noise correction off).

    renoise_steps: K, renoising iterations per inversion step (K + 1 denoiser evaluations). 0 = plain reversal.
    solver: ``"fixed_point"`` (the paper's loop, the default here) or ``"anderson"`` (accelerated; see
        ``solvers.py``). Both make the same number of evaluations. On a step that adds noise anderson runs the
        paper's loop below 3 evaluations (lcm: 4), see ``MIN_ANDERSON_EVALUATIONS_STOCHASTIC``.
    history: anderson only: how many previous residuals its secant model uses.
    average_start: fixed_point only: evaluation index (0..K) where the averaging window starts; the window runs
        to the last evaluation. The reference averages evaluations 8 and 9. Clamped to K.
    early_renoise_steps, early_average_start: K and the window for "early" steps, those whose upper sigma is
        below ``early_below_sigma`` (the reference: timestep < 250, i.e. SDXL-Turbo's first inversion step, uses
        evaluations 0..4 and averages them all). ``early_below_sigma=None`` disables the rule. The window is
        fixed_point's; the cap on K applies to both solvers.
    convergence_tol: stop a step once every item's relative residual ``||G(z) - z|| / ||G(z)||`` falls below it.
        Off (None) by default; each check reads one number back from the device.
    edit_loss: editability regularisation, or None for none.
    noise_correction: for stochastic samplers, or None for none.
    """

    renoise_steps: int = 9
    solver: str = "fixed_point"
    history: int = 3
    average_start: int = 8
    early_renoise_steps: int = 4
    early_average_start: int = 0
    early_below_sigma: float | None = None
    convergence_tol: float | None = None
    edit_loss: EditLossConfig | None = None
    noise_correction: NoiseCorrectionConfig | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        for name in ("renoise_steps", "history", "average_start", "early_renoise_steps", "early_average_start"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value}")
        if self.convergence_tol is not None and not self.convergence_tol > 0:
            raise ValueError(f"convergence_tol must be > 0 (or None to disable), got {self.convergence_tol}")

    def plan(self, sigma: float) -> tuple[int, int]:
        """``(K, average_start)`` for an inversion step whose upper sigma is ``sigma``."""
        if self.early_below_sigma is not None and sigma < self.early_below_sigma:
            k = min(self.renoise_steps, self.early_renoise_steps)
            return k, min(self.early_average_start, k)
        return self.renoise_steps, min(self.average_start, self.renoise_steps)

    def edits(self) -> bool:
        return self.edit_loss is not None and self.edit_loss.is_active


@dataclass(frozen=True)
class StepDiagnostics:
    """What one inversion step did. ``change_norms`` and ``relative_changes`` are ``[E - 1, B]`` (CPU):
    ``||z(k+1) - z(k)||`` for k = 1..E-1 per item, absolute and relative to ``||z(k+1)||``."""

    sigma: float
    sigma_next: float
    evaluations: int
    denoiser_calls: int
    change_norms: Tensor
    relative_changes: Tensor


@dataclass(frozen=True)
class Inversion:
    """The result of :func:`invert`.

    latent: ``[B, C, H, W]``, the inverted latent at ``sigmas[0]`` (k-diffusion units: x0 + sigma * eps scale).
    noises: ``[S, B, C, H, W]``, the noise of each step, ``noises[i]`` for ``sigmas[i] -> sigmas[i + 1]``.
    sigmas: ``[S + 1]`` float64 on the CPU, the schedule to sample with.
    steps: per-step diagnostics, indexed like ``noises``.
    trajectory: ``[S + 1, B, C, H, W]`` latents at every sigma (``trajectory[i]`` at ``sigmas[i]``), if kept.
    """

    latent: Tensor
    noises: Tensor
    sigmas: Tensor
    sampler: str
    sampler_options: dict[str, float]
    seeds: tuple[int, ...]
    steps: tuple[StepDiagnostics, ...]
    trajectory: Tensor | None = field(default=None, repr=False)

    @property
    def denoiser_calls(self) -> int:
        return sum(s.denoiser_calls for s in self.steps)


def planned_denoiser_calls(
    sigmas: Sequence[float] | Tensor, sampler: str, config: ReNoiseConfig, parameterization: str = "eps", **sampler_options
) -> int:
    """Denoiser calls :func:`invert` makes without early stopping (the most it can make)."""
    steps = make_steps(sampler, sigmas, parameterization, **sampler_options)
    return sum(_calls_for_step(step, config) for step in steps)


def _calls_for_step(step: AffineStep, config: ReNoiseConfig) -> int:
    k, _ = config.plan(step.sigma)
    corrects = config.noise_correction is not None and step.is_stochastic
    return k + 1 + int(corrects)


def item_seeds(seed: int, batch: int | Sequence[int]) -> tuple[int, ...]:
    """One seed per batch item: ``seed + index`` (mod 2**64), where ``index`` is the item's position, or its entry
    in ``batch`` when that is a list of batch indices (ComfyUI's ``batch_index``)."""
    indices = range(batch) if isinstance(batch, (int, np.integer)) else batch
    return tuple((int(seed) + int(index)) % 2**64 for index in indices)


def _seeds_for(seed: int | Sequence[int], batch: int) -> tuple[int, ...]:
    seeds = item_seeds(seed, batch) if isinstance(seed, (int, np.integer)) else tuple(int(s) for s in seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for a batch of {batch}")
    return seeds


def check_edit_loss_latent(x0: Tensor) -> None:
    """Edit losses work on patches and a pyramid of the latent ``[B, C, H, W]``: refuse latents too small for them."""
    if min(x0.shape[2:]) < MIN_EDIT_LOSS_SIZE:
        raise ValueError(
            f"edit losses need a latent of at least {MIN_EDIT_LOSS_SIZE}x{MIN_EDIT_LOSS_SIZE} (images of 64 px and more), "
            f"got {tuple(x0.shape[2:])}; disconnect the edit losses for such small images"
        )


def draw_noises(shape: Sequence[int], num_steps: int, seeds: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Per-item Gaussian noises from seeded CPU generators (identical on every device).

    Returns ``(noises [S, B, *shape[1:]], reference_noise [B, *shape[1:]])`` in float32 on the CPU. Item ``b``
    draws the reference noise first, then the step noises from the last step up (inversion order), so an
    inversion over the tail of a schedule sees the same noises as the full one on those steps.
    """
    item_shape = tuple(shape[1:])
    noises = torch.empty((num_steps, len(seeds)) + item_shape)
    reference = torch.empty((len(seeds),) + item_shape)
    for b, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        reference[b] = torch.randn(item_shape, generator=generator)
        for i in reversed(range(num_steps)):
            noises[i, b] = torch.randn(item_shape, generator=generator)
    return noises, reference


def invert(
    denoiser: Denoiser,
    x0: Tensor,
    sigmas: Tensor | Sequence[float],
    sampler: str = "euler",
    *,
    config: ReNoiseConfig = ReNoiseConfig(),
    seed: int | Sequence[int] = 0,
    sampler_options: dict[str, float] | None = None,
    parameterization: str = "eps",
    noises: Tensor | None = None,
    keep_trajectory: bool = False,
    callback: Callable[[int], None] | None = None,
) -> Inversion:
    """Invert ``x0`` (the latent at ``sigmas[-1]``, clean when it is 0) up to ``sigmas[0]`` with ReNoise.

    x0: ``[B, C, H, W]``; never modified. Work happens on its device in ``promote(dtype, float32)``.
    parameterization: ``"eps"`` (``x = x0 + sigma * eps``) or ``"flow"`` (``x = (1 - sigma) x0 + sigma * eps``).
    noises: optional ``[S, B, C, H, W]`` step noises to use instead of drawing them from ``seed`` (copied).
    callback: called with the number of denoiser calls made so far after every call (progress, cancellation).
    A partial inversion (img2img ``denoise < 1``) is an inversion over a schedule that starts lower.
    """
    sampler_options = dict(sampler_options or {})
    steps = make_steps(sampler, sigmas, parameterization, **sampler_options)
    check_latent(x0)

    dtype = torch.promote_types(x0.dtype, torch.float32)
    device = x0.device
    batch = x0.shape[0]
    seeds = _seeds_for(seed, batch)
    drawn, reference_noise = draw_noises(x0.shape, len(steps), seeds)
    if noises is None:
        noises = drawn
    else:
        _check_noises(noises, len(steps), x0)
    noises = noises.to(device=device, dtype=dtype, copy=True)
    reference_noise = reference_noise.to(device=device, dtype=dtype)
    x0 = x0.to(dtype)

    edit = config.edit_loss if config.edits() else None
    if edit is not None:
        check_edit_loss_latent(x0)
    rolls = _draw_all_rolls(steps, config, x0.shape, seeds, device) if edit is not None and edit.lambda_ac > 0 else None
    calls = 0

    def eps_hat(x: Tensor, sigma: float, sigma_batch: Tensor) -> Tensor:
        nonlocal calls
        denoised = denoiser(x, sigma_batch).to(dtype)
        calls += 1
        if callback is not None:
            callback(calls)
        return (x - denoised) / sigma

    diagnostics: list[StepDiagnostics | None] = [None] * len(steps)
    trajectory: list[Tensor] = [x0] if keep_trajectory else []
    x = x0
    warm_start = None  # anderson: the prediction the step below ended with
    for i in reversed(range(len(steps))):
        step = steps[i]
        calls_before = calls
        k_max, average_start = config.plan(step.sigma)
        sigma_batch = torch.full((batch,), step.sigma, device=device, dtype=dtype)
        x_next, noise = x, noises[i]
        reference = {}  # the edit-loss reference prediction, made together with evaluation 0

        def predict(z: Tensor, evaluation: int, step=step, sigma_batch=sigma_batch, reference=reference) -> Tensor:
            if evaluation == 0 and edit is not None and edit.uses_reference:
                x_ref = noised(x0, reference_noise, step.sigma, parameterization)
                both = eps_hat(torch.cat([z, x_ref]), step.sigma, sigma_batch.repeat(2))
                reference["eps"] = both[batch:]
                return both[:batch]
            return eps_hat(z, step.sigma, sigma_batch)

        regularize = None
        if edit is not None:
            step_rolls = rolls[i] if rolls is not None else None
            shifts = iter(step_rolls) if step_rolls is not None else None

            def regularize(eps: Tensor, shifts=shifts, step_rolls=step_rolls, reference=reference) -> Tensor:
                # fixed_point: a fresh set of pair-loss shifts per regularisation, as the reference; anderson: the
                # step's one set every time, so that the map it solves is a fixed function
                rolls_now = None if step_rolls is None else (next(shifts) if config.solver == "fixed_point" else step_rolls[0])
                return regularize_noise_prediction(eps, reference.get("eps"), rolls_now, edit)

        problem = StepProblem(step, x_next, noise, predict, regularize)
        paper_loop = config.solver == "fixed_point" or (step.is_stochastic and k_max + 1 < _min_anderson_evaluations(step))
        if not paper_loop:
            start = x_next if warm_start is None else step.inverse(x_next, warm_start, noise)
            solution = anderson(problem, start, k_max + 1, config.history, config.convergence_tol)
        else:
            solution = fixed_point(problem, x_next, k_max + 1, average_start, config.convergence_tol)
        x, warm_start = solution.latent, solution.prediction

        if config.noise_correction is not None and step.is_stochastic:
            required = step.required_noise(x, x_next, eps_hat(x, step.sigma, sigma_batch))
            noises[i] = correct_noise(noise, required, config.noise_correction)

        diagnostics[i] = StepDiagnostics(
            sigma=step.sigma,
            sigma_next=step.sigma_next,
            evaluations=solution.evaluations,
            denoiser_calls=calls - calls_before,
            change_norms=_stack_rows(solution.residual_norms, batch, device),
            relative_changes=_stack_rows(solution.relative_residuals, batch, device),
        )
        if keep_trajectory:
            trajectory.append(x)

    if not bool(torch.isfinite(x).all()):  # one check at the end, not in the loop
        raise FloatingPointError(
            "the inversion diverged (NaN or Inf); lower the edit-loss weights (lambda_ac, lambda_kl) or renoise_steps"
        )
    # Diagnostics were kept on the device; one transfer at the end.
    diagnostics = [
        StepDiagnostics(d.sigma, d.sigma_next, d.evaluations, d.denoiser_calls, d.change_norms.cpu(), d.relative_changes.cpu())
        for d in diagnostics
    ]
    return Inversion(
        latent=x,
        noises=noises,
        sigmas=torch.tensor([s.sigma for s in steps] + [steps[-1].sigma_next], dtype=torch.float64),
        sampler=sampler,
        sampler_options=sampler_options,
        seeds=seeds,
        steps=tuple(diagnostics),
        trajectory=torch.stack(trajectory[::-1]) if keep_trajectory else None,
    )


def _min_anderson_evaluations(step: AffineStep) -> int:
    """See ``MIN_ANDERSON_EVALUATIONS_STOCHASTIC``: for a step that adds noise."""
    contracts = step.inverse_gain < 1.0 - 1e-9
    return MIN_ANDERSON_EVALUATIONS_STOCHASTIC if contracts else MIN_ANDERSON_EVALUATIONS_LCM


def check_latent(x0: Tensor) -> None:
    """A latent to invert: ``[B, C, H, W]``, not empty, finite (one read from the device, before any loop)."""
    if x0.ndim != 4:
        raise ValueError(f"x0 must be a latent batch [B, C, H, W], got shape {tuple(x0.shape)}")
    if x0.numel() == 0:
        raise ValueError(f"x0 is empty (shape {tuple(x0.shape)})")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains NaN or Inf values; check the image/VAE encode that produced the latent")


def _check_noises(noises: Tensor, steps: int, x: Tensor) -> None:
    if tuple(noises.shape) != (steps,) + tuple(x.shape):
        raise ValueError(f"noises must have shape [steps, B, C, H, W] = {[steps] + list(x.shape)}, got {list(noises.shape)}")


def _stack_rows(rows: list[Tensor], batch: int, device: torch.device) -> Tensor:
    return torch.stack(rows) if rows else torch.zeros((0, batch), device=device)


def correct_noise(noise: Tensor, required: Tensor, config: NoiseCorrectionConfig) -> Tensor:
    """Move each item's ``noise`` toward ``required`` (both ``[B, ...]``); returns a new tensor.

    ``optimize``: ``steps`` gradient steps of size ``step_size`` on the un-squared distance ``||noise - required||``.
    The gradient is the unit vector toward ``required``, so the iterate stays on the line between the two and the
    steps have a closed form: the signed distance ``p`` becomes ``p - step_size * sign(p)`` each step (it overshoots
    and oscillates once within one step size, as the reference's optimiser does).
    """
    if config.mode == "exact":
        return required.clone()
    offset = noise - required
    distance = offset.flatten(1).norm(dim=1)
    remaining = distance
    for _ in range(config.steps):
        remaining = remaining - config.step_size * remaining.sign()
    scale = torch.where(distance > 0, remaining / distance.clamp_min(torch.finfo(distance.dtype).tiny), torch.zeros_like(distance))
    return required + offset * scale.view(-1, *([1] * (noise.ndim - 1)))


def _draw_all_rolls(
    steps: list[AffineStep], config: ReNoiseConfig, shape: torch.Size, seeds: Sequence[int], device: torch.device
) -> list[Tensor]:
    """Pair-loss shifts for every regularisation an inversion can make (fixed_point: one set per prediction of the
    window and one for their average; anderson: one set per step); see :func:`draw_step_rolls`."""
    counts = []
    for step in steps:
        k, average_start = config.plan(step.sigma)
        counts.append((k + 1 - average_start) + 1 if config.solver == "fixed_point" else 1)  # the window plus the average
    return draw_step_rolls(counts, config.edit_loss, shape, seeds, device)


def draw_step_rolls(counts: Sequence[int], edit: EditLossConfig, shape: torch.Size, seeds: Sequence[int],
                    device: torch.device) -> list[Tensor]:
    """Pair-loss shifts for ``counts[i]`` regularisations at step ``i``, per step: int64
    ``[counts[i], reg_steps, ac_rolls, levels, B, C]``, moved to the device once, before the inversion loop. Drawn
    from the last step up (inversion order).

    Each item has its own generator (seeded from its seed), so a batch item gets the shifts it would get alone.
    """
    _, channels, height, _ = shape
    levels = len(pyramid_sizes(height))
    generators = [np.random.default_rng([seed, 0x5EED]) for seed in seeds]
    rolls = []
    for count in reversed(counts):
        per_item = [draw_rolls(g, height, channels, count * edit.reg_steps * edit.ac_rolls) for g in generators]
        stacked = np.stack(per_item, axis=-2).reshape(count, edit.reg_steps, edit.ac_rolls, levels, len(seeds), channels)
        rolls.append(stacked)
    rolls.reverse()
    return [torch.from_numpy(r).to(device) for r in rolls]


def sample(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    sampler: str = "euler",
    *,
    noises: Tensor | None = None,
    sampler_options: dict[str, float] | None = None,
    parameterization: str = "eps",
) -> Tensor:
    """Run ``sampler`` from ``x`` at ``sigmas[0]`` down the schedule, replaying ``noises`` ``[S, B, C, H, W]``.

    This is what editing does: the same sampler and noises as the inversion, with another conditioning inside
    ``denoiser``. Returns a new tensor; ``x`` and ``noises`` are not modified.
    """
    steps = make_steps(sampler, sigmas, parameterization, **(sampler_options or {}))
    if any(s.is_stochastic for s in steps):
        if noises is None:
            raise ValueError(f"sampler {sampler!r} is stochastic: pass the inversion's noises to replay")
        _check_noises(noises, len(steps), x)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    for i, step in enumerate(steps):
        sigma_batch = torch.full((x.shape[0],), step.sigma, device=x.device, dtype=dtype)
        eps = (x - denoiser(x, sigma_batch).to(dtype)) / step.sigma
        x = step.forward(x, eps, noises[i].to(x) if step.is_stochastic else None)
    return x
