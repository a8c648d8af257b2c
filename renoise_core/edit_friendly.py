"""Edit-friendly DDPM inversion (Huberman-Spiegelglas, Kulikov and Michaeli, CVPR 2024), on the affine steps.

Instead of inverting the sampler, draw auxiliary latents ``x_i = x0 + sigma_i * n_i`` (flow models:
``(1 - sigma_i) x0 + sigma_i n_i``) with statistically independent ``n_i ~ N(0, I)`` and extract, from the top
step down, the noise that makes each forward step land exactly on the next auxiliary latent (the paper's
Algorithm 1, Eq. 4 per step)::

    z_i = required_noise(x_i, x_{i+1}, eps_hat(x_i, sigma_i))
    x_{i+1} <- step_i.forward(x_i, eps_hat, z_i)          (recomputed, so rounding does not accumulate)

Sampling from ``x_0`` with the same sampler and the noises ``z`` then reproduces the image. A step that adds no
noise (the last one of a schedule ending at sigma 0) cannot be matched; end the schedule at a small positive sigma
instead (:func:`with_final_sigma`, the model's sigma_min) to keep that last noise and reconstruct exactly even with
few steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .inversion import Denoiser, Inversion, StepDiagnostics, _seeds_for, check_latent, draw_noises
from .samplers import check_sigmas, make_steps, noised


def with_final_sigma(sigmas: Tensor | Sequence[float], final_sigma: float) -> Tensor:
    """The schedule with a trailing 0 replaced by ``final_sigma`` (> 0, below the previous sigma), float32."""
    values = check_sigmas(sigmas)
    if values[-1] == 0.0:
        if not 0.0 < final_sigma < values[-2]:
            raise ValueError(f"final_sigma must be in (0, {values[-2]:g}), got {final_sigma}")
        values[-1] = final_sigma
    return torch.tensor(values, dtype=torch.float32)


def edit_friendly_invert(
    denoiser: Denoiser,
    x0: Tensor,
    sigmas: Tensor | Sequence[float],
    sampler: str = "ddpm",
    *,
    seed: int | Sequence[int] = 0,
    sampler_options: dict[str, float] | None = None,
    parameterization: str = "eps",
    skip: int = 0,
    callback: Callable[[int], None] | None = None,
    keep_trajectory: bool = False,
) -> Inversion:
    """Edit-friendly inversion of ``x0`` (``[B, C, H, W]``, the latent at ``sigmas[-1]``) for a stochastic sampler.

    skip: the paper's T_skip: the result starts ``skip`` steps down the schedule. ``Inversion.latent`` is the
        auxiliary latent at ``sigmas[skip]``; ``Inversion.sigmas`` and ``noises`` cover the steps from there on.
    keep_trajectory: also return ``Inversion.trajectory`` ``[S - skip + 1, B, C, H, W]``: the auxiliary latents
        the noises were fitted to land on (``trajectory[0]`` is ``latent``, ``trajectory[-1]`` is ``x0``), i.e.
        the sampler's forward trajectory up to rounding.
    One denoiser call per stochastic step; nothing the caller passed in is modified.
    """
    sampler_options = dict(sampler_options or {})
    steps = make_steps(sampler, sigmas, parameterization, **sampler_options)
    if not any(step.is_stochastic for step in steps):
        raise ValueError(f"edit-friendly inversion needs a stochastic sampler (ddpm, euler_ancestral, lcm); {sampler!r} adds no noise")
    if not 0 <= skip < len(steps):
        raise ValueError(f"skip must be between 0 and {len(steps) - 1} (steps - 1), got {skip}")
    check_latent(x0)

    dtype = torch.promote_types(x0.dtype, torch.float32)
    batch = x0.shape[0]
    seeds = _seeds_for(seed, batch)
    independent, _ = draw_noises(x0.shape, len(steps), seeds)
    independent = independent.to(device=x0.device, dtype=dtype)
    x0 = x0.to(dtype)

    noises = torch.zeros_like(independent)
    diagnostics = []
    calls = 0
    x = noised(x0, independent[skip], steps[skip].sigma, parameterization)
    latent = x
    trajectory = [x]
    for i in range(skip, len(steps)):
        step = steps[i]
        x_next = noised(x0, independent[i + 1], step.sigma_next, parameterization) if i + 1 < len(steps) else x0
        if keep_trajectory:
            trajectory.append(x_next)
        if not step.is_stochastic:  # nothing to fit: a plain step, reconstructed as the sampler makes it
            diagnostics.append(_diagnostics(step, 0, batch, x.device))
            continue
        sigma_batch = torch.full((batch,), step.sigma, device=x.device, dtype=dtype)
        eps = (x - denoiser(x, sigma_batch).to(dtype)) / step.sigma
        calls += 1
        if callback is not None:
            callback(calls)
        noises[i] = step.required_noise(x, x_next, eps)
        x = step.forward(x, eps, noises[i])  # == x_next up to rounding; the paper's error correction
        diagnostics.append(_diagnostics(step, 1, batch, x.device))

    schedule = [s.sigma for s in steps] + [steps[-1].sigma_next]
    return Inversion(
        latent=latent,
        noises=noises[skip:],
        sigmas=torch.tensor(schedule[skip:], dtype=torch.float64),
        sampler=sampler,
        sampler_options=sampler_options,
        seeds=seeds,
        steps=tuple(diagnostics),
        trajectory=torch.stack(trajectory) if keep_trajectory else None,
    )


def _diagnostics(step, calls: int, batch: int, device) -> StepDiagnostics:
    empty = torch.zeros((0, batch))
    return StepDiagnostics(step.sigma, step.sigma_next, evaluations=calls, denoiser_calls=calls, change_norms=empty, relative_changes=empty)
