"""Solvers for the fixed point of one inversion step.

Inverting the sampler step ``sigma -> sigma_next`` means finding the upper point ``z`` whose forward step lands on
the known lower point ``x_next``. For the affine steps of ``samplers.py`` that is the fixed point

    z = G(z),    G(z) = step.inverse(x_next, R(eps_hat(z, sigma)), noise)

where ``R`` is the editability regularisation (identity without edit losses). Each evaluation of ``G`` costs one
denoiser call; a solver decides where to evaluate and what to return. Two solvers:

- :func:`fixed_point`: the ReNoise paper's loop (its Algorithm 1, as the reference release runs it): every
  estimate is ``G`` of the previous one, and the result is the inverse step of the average of the window's
  predictions.
- :func:`anderson`: Anderson acceleration (type II; Walker & Ni 2011; AIDI, Pan et al. 2023 for inversion), per
  batch item, with safeguards that run on the device. The speed of plain iteration in each direction is the
  Jacobian eigenvalue of ``G`` there; on real latents fine detail contracts slowly (eigenvalues near 1), which a
  secant model over the last few residuals removes.

Shapes: latents ``[B, C, H, W]``; per-item quantities ``[B]``. Nothing here reads a value back from the device,
except the optional convergence check (one read per evaluation, documented in ``ReNoiseConfig``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .samplers import AffineStep

#: the solvers, the accelerated one first (the node's default)
SOLVERS = ("anderson", "fixed_point")


@dataclass
class StepProblem:
    """One inversion step's fixed point.

    predict: ``predict(z, evaluation) -> eps_hat(z, sigma)``, one denoiser call (``evaluation`` is 0, 1, ...).
    regularize: the editability regularisation ``R`` of a prediction (a new tensor), or None for none.
    """

    step: AffineStep
    x_next: Tensor
    noise: Tensor | None
    predict: Callable[[Tensor, int], Tensor]
    regularize: Callable[[Tensor], Tensor] | None = None

    def inverse(self, eps: Tensor) -> Tensor:
        """The upper point whose forward step with prediction ``eps`` lands on ``x_next``."""
        return self.step.inverse(self.x_next, eps, self.noise)


@dataclass
class StepSolution:
    """latent: the upper point ``x`` ``[B, C, H, W]``. prediction: the (regularised) noise prediction the result was
    made from, which warm-starts the next step up. residual_norms, relative_residuals: ``[B]`` each, for the
    evaluations 1..E-1: ``||G(z_k) - z_k||`` and the same divided by ``||G(z_k)||``."""

    latent: Tensor
    prediction: Tensor
    evaluations: int
    residual_norms: list[Tensor] = field(default_factory=list)
    relative_residuals: list[Tensor] = field(default_factory=list)


def _norms(v: Tensor) -> Tensor:
    return v.flatten(1).norm(dim=1)


def _relative(residual: Tensor, image: Tensor) -> Tensor:
    return residual / _norms(image).clamp_min(torch.finfo(image.dtype).tiny)


def _converged(relative: Tensor, tol: float | None) -> bool:
    """The optional early stop: one read from the device."""
    return tol is not None and bool((relative < tol).all())


def fixed_point(problem: StepProblem, start: Tensor, evaluations: int, average_start: int, tol: float | None = None) -> StepSolution:
    """The paper's renoising loop: ``z(0) = start`` (the lower point), ``z(k+1) = G(z(k))``.

    Predictions from evaluation ``average_start`` on are averaged; the result is the inverse step of that
    average. With edit losses the reference release regularises each prediction in the window only to compute
    the next estimate, averages the *raw* predictions, and regularises the average once: so does this.
    """
    z = start
    eps_sum, averaged, eps = None, 0, None
    solution = StepSolution(start, start, 0)
    for k in range(evaluations):
        eps = problem.predict(z, k)
        if k >= average_start:
            eps_sum = eps if eps_sum is None else eps_sum + eps
            averaged += 1
            if problem.regularize is not None:
                eps_next = problem.regularize(eps)
            else:
                eps_next = eps
        else:
            eps_next = eps
        image = problem.inverse(eps_next)
        solution.evaluations = k + 1
        if k >= 1:
            residual = _norms(image - z)
            solution.residual_norms.append(residual)
            solution.relative_residuals.append(_relative(residual, image))
            if _converged(solution.relative_residuals[-1], tol):
                break
        z = image
    if averaged == 0:  # stopped early, before the averaging window: the last prediction is the estimate
        eps_sum, averaged = eps, 1
    eps_mean = eps_sum / averaged
    if problem.regularize is not None:
        eps_mean = problem.regularize(eps_mean)
    solution.latent = problem.inverse(eps_mean)
    solution.prediction = eps_mean
    return solution


# Anderson safeguards. The Gram matrix of residual differences is singular once an item has converged or its
# residuals are collinear: it is regularised relative to its trace.
_GRAM_REGULARIZATION = 1e-7
#: the accelerated correction is kept within ``radius * ||residual||`` of the plain update; the radius starts here,
#: grows where the secant model predicted the next residual well and shrinks where it did not (a trust region).
_INITIAL_RADIUS = 2.0
_RADIUS_GROWTH, _RADIUS_SHRINK = 4.0, 0.5
#: "predicted well": the observed residual is at most this multiple of the secant model's prediction
_PREDICTION_SLACK = 2.0


def anderson(problem: StepProblem, start: Tensor, evaluations: int, history: int, tol: float | None = None) -> StepSolution:
    """Anderson acceleration (:func:`accelerate`) of one inversion step's map ``G(z) = inverse(R(eps_hat(z)))``."""

    def evaluate(z: Tensor, evaluation: int) -> tuple[Tensor, Tensor]:
        eps = problem.predict(z, evaluation)
        if problem.regularize is not None:
            eps = problem.regularize(eps)
        return problem.inverse(eps), eps

    return accelerate(evaluate, start, evaluations, history, tol)


def accelerate(
    evaluate: Callable[[Tensor, int], tuple[Tensor, Tensor | None]],
    start: Tensor,
    evaluations: int,
    history: int,
    tol: float | None = None,
) -> StepSolution:
    """Anderson acceleration of ``z = G(z)``, each batch item with its own mixing coefficients.

    evaluate: ``evaluate(z, evaluation) -> (G(z), prediction)``, where ``prediction`` is whatever the map made
        ``G(z)`` from (returned for the best point as ``StepSolution.prediction``), or None. ``z`` is ``[B, ...]``.

    With residuals ``f_k = G(z_k) - z_k`` and the differences of the last ``history`` residuals and images,
    ``dF``, ``dG``, the next point is ``z_{k+1} = G(z_k) - dG gamma`` with ``gamma = argmin ||f_k - dF gamma||``:
    the secant model's guess of where the residual vanishes. Safeguards, all per item and on the device:

    - the Gram matrix ``dF dF^T`` is regularised relative to its trace (converged or collinear histories);
    - a residual that grows drops the item's history and restarts it from the plain update of its best point;
    - the correction ``dG gamma`` is bounded by a trust radius times ``||f_k||``, which grows while the secant
      model predicts the next residual well and shrinks when it does not (ill-conditioned steps such as lcm's,
      whose exact fixed point can lie far off the data, are only approached as far as the model is right);
    - an evaluation at a secant point the model did not predict well is not trusted: the result then falls back to
      the image of the last trusted point; the result is the last secant extrapolation only where the model was
      right at the last evaluation (it cannot be checked without another call), and the best point's image where
      the last residual grew.

    The map's own evaluation is the only cost; the rest is O(history x size) arithmetic.
    """
    batch = start.shape[0]
    expand = (-1,) + (1,) * (start.ndim - 1)
    never = torch.zeros((batch,), device=start.device, dtype=torch.bool)
    z = start
    d_residuals: list[Tensor] = []
    d_images: list[Tensor] = []
    residual_prev = image_prev = norm_prev = None
    best_image = best_prediction = best_norm = trusted_image = None
    predicted = torch.zeros((batch,), device=start.device, dtype=start.dtype)
    radius = torch.full((batch,), _INITIAL_RADIUS, device=start.device, dtype=start.dtype)
    accelerated = confirmed = never  # z came from a secant step; and the model predicted its residual well
    solution = StepSolution(start, start, 0)
    for k in range(evaluations):
        image, prediction = evaluate(z, k)
        residual = (image - z).flatten(1)
        norm = residual.norm(dim=1)
        solution.evaluations = k + 1
        if k >= 1:
            solution.residual_norms.append(norm)
            solution.relative_residuals.append(_relative(norm, image))
        confirmed = accelerated & (norm <= _PREDICTION_SLACK * predicted)
        radius = torch.where(accelerated, torch.where(confirmed, radius * _RADIUS_GROWTH, radius * _RADIUS_SHRINK), radius)
        if best_norm is None:
            best_image, best_prediction, best_norm, trusted_image = image, prediction, norm, image
        else:
            better = norm < best_norm
            best_image = torch.where(better.view(expand), image, best_image)
            if prediction is not None:
                best_prediction = torch.where(better.view(expand), prediction, best_prediction)
            best_norm = torch.minimum(norm, best_norm)
            trusted_image = torch.where((confirmed | ~accelerated).view(expand), image, trusted_image)
        # a residual that grew (or is not finite) restarts the item's history from its best point
        grown = ~(norm <= norm_prev) if norm_prev is not None else ~torch.isfinite(norm)
        if residual_prev is not None:
            keep = (~grown).view(-1, 1)
            d_residuals = [_masked(d, keep) for d in d_residuals[-(history - 1):]] + [_masked(residual - residual_prev, keep)]
            d_images = [_masked(d, keep) for d in d_images[-(history - 1):]] + [_masked((image - image_prev).flatten(1), keep)]
        residual_prev, image_prev, norm_prev = residual, image, norm

        if d_residuals and history > 0:
            correction, predicted = _secant_correction(torch.stack(d_residuals, 1), torch.stack(d_images, 1), residual)
            scale = (radius * norm / _norms(correction).clamp_min(torch.finfo(norm.dtype).tiny)).clamp(max=1.0)
            correction = correction * scale.view(-1, 1)
            predicted = torch.where(scale < 1.0, norm, predicted)  # a clipped step predicts no more than progress
            z_next = torch.where(grown.view(expand), best_image, image - correction.view_as(image))
            accelerated = ~grown
        else:
            z_next, accelerated = image, never
        if k >= 1 and _converged(solution.relative_residuals[-1], tol):
            break
        if k + 1 < evaluations:
            z = z_next
    solution.latent = torch.where(grown.view(expand), best_image, trusted_image)
    solution.latent = torch.where((accelerated & confirmed).view(expand), z_next, solution.latent)
    solution.prediction = best_prediction
    return solution


def _masked(values: Tensor, keep: Tensor) -> Tensor:
    """``values`` where ``keep``, else 0 (also where ``values`` is not finite: a multiplication would keep NaN)."""
    return torch.where(keep, values, torch.zeros_like(values))


def _secant_correction(d_residuals: Tensor, d_images: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    """``dG gamma`` with ``gamma = argmin ||residual - dF gamma||`` per item, and the predicted residual norm.

    d_residuals, d_images: ``[B, m, N]``; residual: ``[B, N]``. The ``m x m`` least-squares system is solved by
    the normal equations with a trace-relative ridge (no device read: ``solve_ex`` does not check for errors).
    """
    gram = d_residuals @ d_residuals.transpose(1, 2)
    ridge = _GRAM_REGULARIZATION * gram.diagonal(dim1=1, dim2=2).sum(-1) + torch.finfo(gram.dtype).tiny
    gram = gram + ridge.view(-1, 1, 1) * torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
    gamma, _ = torch.linalg.solve_ex(gram, d_residuals @ residual.unsqueeze(-1))
    gamma = torch.nan_to_num(gamma, nan=0.0, posinf=0.0, neginf=0.0)
    predicted = (residual - (gamma.transpose(1, 2) @ d_residuals).squeeze(1)).norm(dim=1)
    return (gamma.transpose(1, 2) @ d_images).squeeze(1), predicted
