"""Second-order samplers (heun, dpm_2, dpm_2_ancestral) and multistep samplers (dpmpp_2m, dpmpp_2m_sde,
res_multistep): steps and their inversion.

Units: k-diffusion, as in ``samplers.py``. ``D(x, sigma)`` is the denoiser (predicted x0),
``d(x, sigma) = (x - D(x, sigma)) / sigma`` ComfyUI's ``to_d`` (the eps prediction ``eps_hat``).

Two step shapes, each written to mirror ComfyUI 0.3.64's ``comfy/k_diffusion/sampling.py`` term by term:

- :class:`TwoStageStep` (heun, dpm_2, dpm_2_ancestral; ``s_churn = 0``): two model evaluations per step::

      x_mid  = x + stage_dt * d(x, sigma)
      x_next = scale * (x + dt * (w_first * d(x, sigma) + w_second * d(x_mid, sigma_mid))) + noise_coeff * noise

  with ``dt = sigma_down - sigma`` (``sigma_down = sigma_next``, ``scale = 1`` and no noise but for
  dpm_2_ancestral); one evaluation, Euler, where ``sigma_down == 0``, as ComfyUI does.
- :class:`MultistepStep` (dpmpp_2m, dpmpp_2m_sde, res_multistep): affine in the current prediction AND the previous one::

      x_next = x_coeff * x + denoised_coeff * D(x, sigma) + previous_coeff * D_prev + noise_coeff * noise

  where ``D_prev`` is the prediction the sampler made at the previous (higher) sigma.

Inversion (:func:`invert_multistep`):

- two-stage steps: each step is the fixed point ``x = x_next - dt * (w_first d1(x) + w_second d2(x))`` in its upper
  point, one map evaluation = two model calls (one on the last step). It starts from the probability-flow ODE solved
  up from ``x_next`` (:func:`extrapolate_up`) with ``D`` held at the prediction below (first order) or on the line
  through the last two (second order), per batch item the order that predicted the step below better;
- multistep steps: step ``i`` needs ``D_prev = D(x_{i-1})``, the prediction at the higher point that inversion only
  reaches later. The trajectory is solved jointly by sweeps: the first sweep (bottom up) predicts ``D_prev`` by
  the polynomial in ``log sigma`` through ``D(x_i)`` and the predictions at the two points below, known from the
  steps inverted before (:func:`previous_prediction_weights`, :meth:`MultistepStep.with_previous_predicted`; with
  one point below, dpmpp_2m's step becomes the trapezoidal rule; on stochastic steps and the lowest one,
  ``D(x_i)`` itself, :meth:`MultistepStep.collapsed`);
  every later sweep (bottom up again) writes ``D_prev = x_{i-1} - sigma_{i-1} eps_{i-1}``
  with ``x_{i-1}`` given linearly by the step above (its eps and its own ``D_prev`` held at the previous sweep's
  values, see :func:`_coupled`), and starts each step's fixed point from the previous sweep's ``x_i``. A fixed
  point of the sweeps satisfies every step's equation, so the stock sampler started at the inverted latent
  retraces the trajectory.
  Each step's fixed point is solved in eps form, ``x = (x_next + b sigma d(x) - c D_prev - r noise) / (a + b)``
  (``a, b, c, r`` the coefficients above), the ReNoise map, whose contraction is that of the eps prediction;
- stochastic steps (dpmpp_2m_sde, res_multistep_ancestral, dpm_2_ancestral) replay the stored noises (ComfyUI calls
  ``noise_sampler(sigma, sigma_next)`` once per step and scales it, e.g. by ``sigma_next * sqrt(-expm1(-2 h eta))
  * s_noise``; the stored noise is what ``noise_sampler`` returns). Noise enters each step linearly, so noise
  correction is a forward pass along the inverted trajectory: at each step the noise is moved toward the one that
  lands the sampler's own forward point on the inverted trajectory's next point (``exact``: all the way, which
  reproduces the photo to float rounding).

The solvers are pluggable: any ``solve(map_fn, z0, iterations) -> z`` (:func:`fixed_point`,
:func:`anderson_solver`), for each step's fixed point and, over the later sweeps, for the whole trajectory as the
fixed point of one sweep.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .edit_losses import EditLossConfig, regularize_noise_prediction
from .inversion import (
    Denoiser,
    Inversion,
    NoiseCorrectionConfig,
    StepDiagnostics,
    _check_noises,
    _seeds_for,
    check_edit_loss_latent,
    check_latent,
    correct_noise,
    draw_noises,
    draw_step_rolls,
)
from .samplers import ancestral_sigmas, check_sigmas, noised
from .solvers import accelerate

Solver = Callable[[Callable[[Tensor], Tensor], Tensor, int], Tensor]
"""``solve(map_fn, z0, iterations) -> z``: approximate the fixed point ``z = map_fn(z)`` with ``iterations``
evaluations of ``map_fn`` (each costs the step's model calls)."""


def fixed_point(map_fn: Callable[[Tensor], Tensor], z0: Tensor, iterations: int) -> Tensor:
    """Plain fixed-point iteration ``z(k+1) = map_fn(z(k))``; returns the last estimate (``z0`` if none)."""
    z = z0
    for _ in range(iterations):
        z = map_fn(z)
    return z


def anderson_solver(history: int = 3) -> Solver:
    """The :data:`Solver` that solves ``z = map_fn(z)`` by safeguarded Anderson acceleration
    (:func:`renoise_core.solvers.accelerate`) with ``history`` residuals. A secant step needs two residuals before
    it: with two evaluations it returns the plain iterate (or, where the residual grew, the first point's image)."""

    def solve(map_fn: Callable[[Tensor], Tensor], z0: Tensor, iterations: int) -> Tensor:
        return accelerate(lambda z, evaluation: (map_fn(z), None), z0, iterations, history).latent

    return solve


# ----------------------------------------------------------------------------------------------------------------
# Steps


@dataclass(frozen=True)
class TwoStageStep:
    """One heun / dpm_2 / dpm_2_ancestral step (see the module docstring). Coefficients are Python floats.

    ``w_second == 0`` means a single-evaluation (Euler) step, ComfyUI's rule where ``sigma_down == 0``.
    """

    sigma: float
    sigma_mid: float
    sigma_down: float
    sigma_next: float
    stage_dt: float
    w_first: float
    w_second: float
    scale: float = 1.0
    noise_coeff: float = 0.0

    @property
    def dt(self) -> float:
        return self.sigma_down - self.sigma

    @property
    def is_stochastic(self) -> bool:
        """Only dpm_2_ancestral adds noise (heun and dpm_2 with s_churn = 0 do not)."""
        return self.noise_coeff != 0.0

    @property
    def evaluations(self) -> int:
        """Model calls per step (and per inversion map evaluation)."""
        return 2 if self.w_second else 1

    def increment(self, x: Tensor, d_first: Tensor, derivative: Callable[[Tensor, float], Tensor]) -> Tensor:
        """``x_next - x`` given ``d(x, sigma)``; ``derivative(x, sigma) -> d`` makes the second evaluation."""
        if not self.w_second:
            return d_first * self.dt
        d_second = derivative(x + d_first * self.stage_dt, self.sigma_mid)
        if not self.w_first:
            return d_second * self.dt
        return (d_first * self.w_first + d_second * self.w_second) * self.dt

    def deterministic(self, x: Tensor, d_first: Tensor, derivative: Callable[[Tensor, float], Tensor]) -> Tensor:
        """The step from ``x`` (``d_first = d(x, sigma)``) without its noise: ``scale (x + increment(x))``."""
        x_next = x + self.increment(x, d_first, derivative)
        return x_next * self.scale if self.scale != 1.0 else x_next

    def forward(self, x: Tensor, d_first: Tensor, derivative: Callable[[Tensor, float], Tensor], noise: Tensor | None) -> Tensor:
        """The sampler's own step from ``x`` (``d_first = d(x, sigma)``), adding ``noise`` where it is stochastic."""
        x_next = self.deterministic(x, d_first, derivative)
        if self.is_stochastic:
            if noise is None:
                raise ValueError(f"step {self.sigma:g} -> {self.sigma_next:g} is stochastic and needs a noise")
            x_next = x_next + noise * self.noise_coeff
        return x_next

    def target(self, x_next: Tensor, noise: Tensor | None) -> Tensor:
        """``x + increment(x)`` for the ``x`` whose step lands on ``x_next`` with ``noise``: the inversion's fixed
        point is ``x = target - increment(x)``."""
        if self.is_stochastic:
            x_next = x_next - noise * self.noise_coeff
        return x_next / self.scale if self.scale != 1.0 else x_next


def heun_step(sigma: float, sigma_next: float) -> TwoStageStep:
    """ComfyUI ``sample_heun`` (s_churn = 0): ``x_2 = x + d dt``, ``x + (d + d_2) / 2 * dt``; Euler to sigma 0."""
    dt = sigma_next - sigma
    if sigma_next == 0:
        return TwoStageStep(sigma, sigma_next, sigma_next, sigma_next, dt, 1.0, 0.0)
    return TwoStageStep(sigma, sigma_next, sigma_next, sigma_next, dt, 0.5, 0.5)


def dpm_2_step(sigma: float, sigma_next: float) -> TwoStageStep:
    """ComfyUI ``sample_dpm_2`` (s_churn = 0): ``sigma_mid = exp(lerp(log sigma, log sigma_next, 0.5))``,
    ``x_2 = x + d (sigma_mid - sigma)``, ``x + d_2 (sigma_next - sigma)``; Euler to sigma 0."""
    return _dpm_2_stages(sigma, sigma_next, sigma_next)


def _dpm_2_stages(sigma: float, sigma_down: float, sigma_next: float, scale: float = 1.0, noise_coeff: float = 0.0) -> TwoStageStep:
    """DPM-Solver-2 from ``sigma`` to ``sigma_down`` (midpoint in log sigma), then ``scale`` and ``noise_coeff``."""
    if sigma_down == 0:
        return TwoStageStep(sigma, sigma_down, sigma_down, sigma_next, sigma_down - sigma, 1.0, 0.0)
    sigma_mid = math.exp(math.log(sigma) + 0.5 * (math.log(sigma_down) - math.log(sigma)))
    return TwoStageStep(sigma, sigma_mid, sigma_down, sigma_next, sigma_mid - sigma, 0.0, 1.0, scale, noise_coeff)


def dpm_2_ancestral_steps(
    sigmas: Sequence[float], parameterization: str = "eps", eta: float = 1.0, s_noise: float = 1.0
) -> list[TwoStageStep]:
    """ComfyUI ``sample_dpm_2_ancestral`` (eps) and ``sample_dpm_2_ancestral_RF`` (flow), with a given
    ``noise_sampler``: dpm_2 to ``sigma_down``, then (both evaluations made) the step's noise::

        eps:  (sigma_down, sigma_up) = get_ancestral_step(sigma, sigma_next, eta)
              x_next = x_down + noise_sampler(sigma, sigma_next) s_noise sigma_up
        flow: sigma_down = sigma_next (1 + (sigma_next / sigma - 1) eta)
              x_next = (1 - sigma_next) / (1 - sigma_down) x_down + noise_sampler(sigma, sigma_next) s_noise
                       sqrt(sigma_next^2 - sigma_down^2 (1 - sigma_next)^2 / (1 - sigma_down)^2)

    Where ``sigma_down == 0`` one Euler evaluation and no noise."""
    steps = []
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if parameterization == "flow":
            sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
            keep = (1 - sigma_next) / (1 - sigma_down)
            renoise = math.sqrt(max(sigma_next**2 - sigma_down**2 * keep**2, 0.0))
            steps.append(_dpm_2_stages(sigma, sigma_down, sigma_next, keep, s_noise * renoise))
        else:
            sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
            steps.append(_dpm_2_stages(sigma, sigma_down, sigma_next, 1.0, s_noise * sigma_up))
    return steps


@dataclass(frozen=True)
class MultistepStep:
    """One step ``x_next = x_coeff x + denoised_coeff D(x) + previous_coeff D_prev + noise_coeff noise``."""

    sigma: float
    sigma_next: float
    x_coeff: float
    denoised_coeff: float
    previous_coeff: float
    noise_coeff: float

    @property
    def is_stochastic(self) -> bool:
        return self.noise_coeff != 0.0

    @property
    def uses_previous(self) -> bool:
        return self.previous_coeff != 0.0

    @property
    def evaluations(self) -> int:
        """Model calls per step."""
        return 1

    def forward(self, x: Tensor, denoised: Tensor, previous: Tensor | None, noise: Tensor | None) -> Tensor:
        """The sampler's own step from ``x`` at ``sigma`` to ``sigma_next``."""
        x_next = self._deterministic(x, denoised, previous)
        if self.is_stochastic:
            if noise is None:
                raise ValueError(f"step {self.sigma:g} -> {self.sigma_next:g} is stochastic and needs a noise")
            x_next = x_next + noise * self.noise_coeff
        return x_next

    def _deterministic(self, x: Tensor, denoised: Tensor, previous: Tensor | None) -> Tensor:
        x_next = x * self.x_coeff + denoised * self.denoised_coeff
        if self.uses_previous:
            x_next = x_next + previous * self.previous_coeff
        return x_next

    def inverse(self, x_next: Tensor, eps_hat: Tensor, previous: Tensor | None, noise: Tensor | None) -> Tensor:
        """Solve the step for ``x`` given ``x_next``, the eps prediction at ``x`` and ``D_prev`` (eps form:
        ``x_next = (a + b) x - b sigma eps_hat + c D_prev + r noise``). Exact when ``eps_hat`` is the prediction
        at the returned point."""
        x = x_next + eps_hat * (self.denoised_coeff * self.sigma)
        if self.uses_previous:
            x = x - previous * self.previous_coeff
        if self.is_stochastic:
            x = x - noise * self.noise_coeff
        return x / (self.x_coeff + self.denoised_coeff)

    def required_noise(self, x: Tensor, x_next: Tensor, denoised: Tensor, previous: Tensor | None) -> Tensor:
        """The noise that makes the forward step from ``x`` land exactly on ``x_next``."""
        return (x_next - self._deterministic(x, denoised, previous)) / self.noise_coeff

    def collapsed(self) -> MultistepStep:
        """The step with ``D_prev`` replaced by ``D(x)``: same total weight on D (the first sweep's lowest step)."""
        return MultistepStep(self.sigma, self.sigma_next, self.x_coeff, self.denoised_coeff + self.previous_coeff, 0.0, self.noise_coeff)

    def with_previous_predicted(self, weight: float) -> MultistepStep:
        """The step with ``D_prev`` predicted as ``weight D(x) + P``, where ``P`` (the rest of the prediction, made of
        predictions already known) becomes the returned step's ``previous`` input: the first sweep's step, with the
        weights of :func:`previous_prediction_weights`.

        With the line through ``D(x)`` and the prediction ``D_next`` at the lower point (``weight = 1 + r``,
        ``P = -r D_next``) dpmpp_2m's step is the trapezoidal rule ``x_next = (sigma_next / sigma) x
        - expm1(-h) (D(x) + D_next) / 2``: half the weight on ``D(x)``, so its fixed point also contracts twice as
        fast as :meth:`collapsed`'s."""
        return MultistepStep(self.sigma, self.sigma_next, self.x_coeff, self.denoised_coeff + self.previous_coeff * weight,
                             self.previous_coeff, self.noise_coeff)


def previous_prediction_weights(sigma_previous: float, sigma: float, sigmas_below: Sequence[float]) -> list[float]:
    """Lagrange weights that predict ``D`` at ``sigma_previous`` (the step's upper neighbour) as a polynomial in
    ``log sigma`` through ``D`` at ``sigma`` (the first weight) and at ``sigmas_below`` (nearest first, the rest):
    a line with one point below, a parabola with two. Exact for ``D`` polynomial in ``log sigma`` of that degree."""
    nodes = [math.log(sigma)] + [math.log(s) for s in sigmas_below]
    target = math.log(sigma_previous)
    weights = []
    for j, node in enumerate(nodes):
        weight = 1.0
        for k, other in enumerate(nodes):
            if k != j:
                weight *= (target - other) / (node - other)
        weights.append(weight)
    return weights


def dpmpp_2m_steps(sigmas: Sequence[float], parameterization: str = "eps") -> list[MultistepStep]:
    """ComfyUI ``sample_dpmpp_2m`` (the same arithmetic on eps and flow models), ``t = -log sigma``::

        h = t_next - t
        first step or sigma_next == 0:  x_next = (sigma_next / sigma) x - expm1(-h) D
        otherwise, r = h_last / h:      x_next = (sigma_next / sigma) x - expm1(-h) ((1 + 1/(2r)) D - 1/(2r) D_prev)
    """
    steps = []
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if sigma_next == 0:
            steps.append(MultistepStep(sigma, sigma_next, 0.0, 1.0, 0.0, 0.0))  # expm1(-inf) = -1
            continue
        h = math.log(sigma) - math.log(sigma_next)
        first = -math.expm1(-h)
        if i == 0:
            steps.append(MultistepStep(sigma, sigma_next, sigma_next / sigma, first, 0.0, 0.0))
            continue
        r = (math.log(sigmas[i - 1]) - math.log(sigma)) / h
        steps.append(MultistepStep(sigma, sigma_next, sigma_next / sigma, first * (1 + 1 / (2 * r)), -first / (2 * r), 0.0))
    return steps


def half_log_snr(sigma: float, parameterization: str) -> float:
    """ComfyUI ``sigma_to_half_log_snr``: ``-log sigma`` (eps), ``-logit(sigma) = log((1 - sigma) / sigma)`` (flow)."""
    if parameterization == "flow":
        return math.log((1.0 - sigma) / sigma)
    return -math.log(sigma)


def dpmpp_2m_sde_steps(
    sigmas: Sequence[float], parameterization: str = "eps", eta: float = 1.0, s_noise: float = 1.0, solver_type: str = "midpoint"
) -> list[MultistepStep]:
    """ComfyUI ``sample_dpmpp_2m_sde`` with a given ``noise_sampler``; ``lambda`` is :func:`half_log_snr`::

        h = lambda_next - lambda,  h_eta = h (eta + 1),  alpha_next = sigma_next exp(lambda_next)
        x_next = sigma_next / sigma exp(-h eta) x + alpha_next (-expm1(-h_eta)) D
               + [not the first step] midpoint: 0.5 alpha_next (-expm1(-h_eta)) / r (D - D_prev)
                                       heun:     alpha_next ((-expm1(-h_eta)) / (-h_eta) + 1) / r (D - D_prev)
               + noise_sampler(sigma, sigma_next) sigma_next sqrt(-expm1(-2 h eta)) s_noise     [eta > 0, s_noise > 0]
        sigma_next == 0: x_next = D

    with ``r = h_last / h`` (``h_last`` the previous step's ``h``).
    """
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'heun' or 'midpoint', got {solver_type!r}")
    if parameterization == "flow" and sigmas[0] >= 1.0:
        raise ValueError(
            "dpmpp_2m_sde on a flow model moves a first sigma of 1 to an offset that depends on the model's shift; "
            "invert it with a schedule that starts below 1 (e.g. denoise < 1), or use dpmpp_2m or euler"
        )
    steps = []
    h_last = None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        if sigma_next == 0:
            steps.append(MultistepStep(sigma, sigma_next, 0.0, 1.0, 0.0, 0.0))
            continue
        lam, lam_next = half_log_snr(sigma, parameterization), half_log_snr(sigma_next, parameterization)
        h = lam_next - lam
        h_eta = h * (eta + 1)
        alpha_next = sigma_next * math.exp(lam_next)
        x_coeff = sigma_next / sigma * math.exp(-h * eta)
        denoised_coeff = alpha_next * -math.expm1(-h_eta)
        previous_coeff = 0.0
        if h_last is not None:
            r = h_last / h
            if solver_type == "heun":
                correction = alpha_next * (-math.expm1(-h_eta) / (-h_eta) + 1) * (1 / r)
            else:
                correction = 0.5 * alpha_next * -math.expm1(-h_eta) * (1 / r)
            denoised_coeff, previous_coeff = denoised_coeff + correction, -correction
        noise_coeff = sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise if eta > 0 and s_noise > 0 else 0.0
        steps.append(MultistepStep(sigma, sigma_next, x_coeff, denoised_coeff, previous_coeff, noise_coeff))
        h_last = h
    return steps


def res_multistep_steps(
    sigmas: Sequence[float], parameterization: str = "eps", eta: float = 0.0, s_noise: float = 1.0
) -> list[MultistepStep]:
    """ComfyUI ``res_multistep`` (``eta = 0``: ``sample_res_multistep``; ``eta = 1``: ``sample_res_multistep_ancestral``),
    the same arithmetic on eps and flow models, ``t = -log sigma``, ``(sigma_down, sigma_up)`` the ancestral step::

        first step or sigma_down == 0:  x_next = x + d (sigma_down - sigma)            (Euler to sigma_down)
        otherwise:  h = t(sigma_down) - t(sigma),  c2 = (t(sigma_prev) - t(sigma_down_prev)) / h,
                    b1 = phi1(-h) - phi2(-h) / c2,  b2 = phi2(-h) / c2
                    x_next = exp(-h) x + h (b1 D + b2 D_prev)
        + noise_sampler(sigma, sigma_next) s_noise sigma_up                             [sigma_next > 0]

    with ``phi1(t) = expm1(t) / t``, ``phi2(t) = (phi1(t) - 1) / t``, and ``sigma_prev``, ``sigma_down_prev`` the
    previous step's sigma and sigma_down.
    """
    steps = []
    previous_sigma_down = None
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
        noise_coeff = s_noise * sigma_up if sigma_next > 0 else 0.0
        if sigma_down == 0 or previous_sigma_down is None:
            ratio = sigma_down / sigma
            steps.append(MultistepStep(sigma, sigma_next, ratio, 1.0 - ratio, 0.0, noise_coeff))
        else:
            t, t_down = -math.log(sigma), -math.log(sigma_down)
            t_prev, t_down_prev = -math.log(sigmas[i - 1]), -math.log(previous_sigma_down)
            h = t_down - t
            c2 = (t_prev - t_down_prev) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            steps.append(MultistepStep(sigma, sigma_next, math.exp(-h), h * b1, h * b2, noise_coeff))
        previous_sigma_down = sigma_down
    return steps


def _res_multistep_ancestral(sigmas, parameterization="eps", eta=1.0, s_noise=1.0):
    return res_multistep_steps(sigmas, parameterization, eta, s_noise)


def _two_stage(step_function):
    def make(sigmas: Sequence[float], parameterization: str = "eps") -> list[TwoStageStep]:
        return [step_function(hi, lo) for hi, lo in zip(sigmas[:-1], sigmas[1:])]

    return make


def _sde_heun(sigmas, parameterization="eps", eta=1.0, s_noise=1.0):
    return dpmpp_2m_sde_steps(sigmas, parameterization, eta, s_noise, solver_type="heun")


#: ComfyUI sampler name -> ``make(sigmas, parameterization, **options) -> steps``
MULTISTEP_SAMPLERS: dict[str, Callable[..., list]] = {
    "heun": _two_stage(heun_step),
    "dpm_2": _two_stage(dpm_2_step),
    "dpm_2_ancestral": dpm_2_ancestral_steps,
    "dpmpp_2m": dpmpp_2m_steps,
    "dpmpp_2m_sde": dpmpp_2m_sde_steps,
    "dpmpp_2m_sde_heun": _sde_heun,
    "res_multistep": res_multistep_steps,
    "res_multistep_ancestral": _res_multistep_ancestral,
}
#: the samplers whose steps are :class:`TwoStageStep` (two model evaluations per step)
TWO_STAGE_SAMPLERS = ("heun", "dpm_2", "dpm_2_ancestral")
_OPTIONS = {"dpm_2_ancestral": frozenset({"eta", "s_noise"}), "dpmpp_2m_sde": frozenset({"eta", "s_noise"}),
            "dpmpp_2m_sde_heun": frozenset({"eta", "s_noise"}),
            "res_multistep_ancestral": frozenset({"eta", "s_noise"})}

#: ComfyUI samplers this package does not invert, and why (shown in errors and the README).
NOT_INVERTIBLE: dict[str, str] = {
    "dpmpp_sde": "its noise enters twice per step, between its two model evaluations (at the midpoint) and at the end, "
    "so the step is not affine in one stored noise per step; not implemented yet",
    "dpmpp_2s_ancestral": "an ancestral two-stage step: its noise enters linearly after both model evaluations, so it "
    "could be inverted like dpm_2 with one stored noise per step, but that is not implemented yet",
    "uni_pc": "its corrector re-evaluates the model at the already-stepped point and the predictor-corrector pair "
    "spans three steps; not implemented yet",
    "lms": "a 4th-order linear multistep method (four previous predictions per step); not implemented yet",
    "dpm_fast": "chooses its own step sizes (not the given schedule), so no trajectory exists to invert",
    "dpm_adaptive": "chooses its own step sizes adaptively (error control), so no trajectory exists to invert",
}


def make_multistep_steps(sampler: str, sigmas: Tensor | Sequence[float], parameterization: str = "eps", **options: float) -> list:
    """The steps of a second-order or multistep ``sampler`` along a descending ``sigmas`` schedule."""
    if parameterization not in ("eps", "flow"):
        raise ValueError(f"parameterization must be 'eps' or 'flow', got {parameterization!r}")
    if sampler not in MULTISTEP_SAMPLERS:
        if sampler in NOT_INVERTIBLE:
            raise ValueError(f"sampler {sampler!r} cannot be inverted by this package: {NOT_INVERTIBLE[sampler]}")
        raise ValueError(f"unknown sampler {sampler!r}; supported here: {', '.join(MULTISTEP_SAMPLERS)}")
    unknown = set(options) - _OPTIONS.get(sampler, frozenset())
    if unknown:
        raise ValueError(f"sampler {sampler!r} takes no option(s) {sorted(unknown)}")
    values = check_sigmas(sigmas)
    if parameterization == "flow" and values[0] > 1.0:
        raise ValueError(f"flow-model sigmas lie in [0, 1]; the schedule starts at {values[0]:g}")
    return MULTISTEP_SAMPLERS[sampler](values, parameterization, **options)


def is_multistep_sampler(sampler: str) -> bool:
    return sampler in MULTISTEP_SAMPLERS


# ----------------------------------------------------------------------------------------------------------------
# Sampling (forward, replaying noises)


def sample_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    sampler: str,
    *,
    noises: Tensor | None = None,
    sampler_options: dict[str, float] | None = None,
    parameterization: str = "eps",
) -> Tensor:
    """Run ``sampler`` from ``x`` at ``sigmas[0]`` down the schedule (ComfyUI's arithmetic), replaying ``noises``
    ``[S, B, C, H, W]`` for stochastic steps. Returns a new tensor."""
    steps = make_multistep_steps(sampler, sigmas, parameterization, **(sampler_options or {}))
    stochastic = any(s.is_stochastic for s in steps)
    if stochastic:
        if noises is None:
            raise ValueError(f"sampler {sampler!r} is stochastic: pass the inversion's noises to replay")
        _check_noises(noises, len(steps), x)
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    batch = x.shape[0]

    def denoise(z: Tensor, sigma: float) -> Tensor:
        return denoiser(z, torch.full((batch,), sigma, device=z.device, dtype=dtype)).to(dtype)

    def derivative(z: Tensor, sigma: float) -> Tensor:
        return (z - denoise(z, sigma)) / sigma

    previous = None
    for i, step in enumerate(steps):
        if isinstance(step, TwoStageStep):
            x = step.forward(x, derivative(x, step.sigma), derivative, noises[i].to(x) if step.is_stochastic else None)
        else:
            denoised = denoise(x, step.sigma)
            x = step.forward(x, denoised, previous, noises[i].to(x) if step.is_stochastic else None)
            previous = denoised
    return x


# ----------------------------------------------------------------------------------------------------------------
# Inversion


def planned_multistep_calls(
    sigmas: Tensor | Sequence[float], sampler: str, *, iterations: int = 1, sweeps: int = 2, sweep_iterations: int | None = 2,
    noise_correction: NoiseCorrectionConfig | None = None, parameterization: str = "eps", sampler_options=None,
) -> int:
    """Denoiser calls :func:`invert_multistep` makes with these settings."""
    steps = make_multistep_steps(sampler, sigmas, parameterization, **(sampler_options or {}))
    if isinstance(steps[0], TwoStageStep):
        calls = iterations * sum(s.evaluations for s in steps)
    else:
        later = iterations if sweep_iterations is None else sweep_iterations
        calls = len(steps) * (iterations + (sweeps - 1) * later) if any(s.uses_previous for s in steps) else len(steps) * iterations
    if noise_correction is not None:  # one forward pass up to the last stochastic step
        calls += sum(s.evaluations for s in steps[: _last_stochastic(steps) + 1])
    return calls


def _last_stochastic(steps: list) -> int:
    indices = [i for i, s in enumerate(steps) if s.is_stochastic]
    return indices[-1] if indices else -1


def invert_multistep(
    denoiser: Denoiser,
    x0: Tensor,
    sigmas: Tensor | Sequence[float],
    sampler: str,
    *,
    iterations: int = 1,
    sweeps: int = 2,
    sweep_iterations: int | None = 2,
    seed: int | Sequence[int] = 0,
    noise_correction: NoiseCorrectionConfig | None = None,
    edit_loss: EditLossConfig | None = None,
    parameterization: str = "eps",
    sampler_options: dict[str, float] | None = None,
    noises: Tensor | None = None,
    solver: Solver = fixed_point,
    sweep_solver: Solver = fixed_point,
    keep_trajectory: bool = False,
    callback: Callable[[int], None] | None = None,
) -> Inversion:
    """Invert ``x0`` (the latent at ``sigmas[-1]``) up to ``sigmas[0]`` for heun, dpm_2(_ancestral), dpmpp_2m,
    dpmpp_2m_sde(_heun), res_multistep(_ancestral).

    iterations: map evaluations per step (first sweep); a heun/dpm_2* evaluation costs 2 model calls.
    sweeps: trajectory sweeps for samplers whose step uses the previous prediction (dpmpp_2m*); ignored otherwise.
    sweep_iterations: map evaluations per step in sweeps after the first (default: ``iterations``); each starts
        from the previous sweep's point.
    noise_correction: for the stochastic samplers: after the inversion, one forward pass along the inverted
        trajectory corrects each stored noise toward the one that lands on the trajectory's next point (the step's
        own model calls: one, two for dpm_2_ancestral).
    edit_loss: the editability regularisation of each step's noise prediction inside its fixed-point map, as
        :func:`renoise_core.inversion.invert` makes it (the reference prediction rides along in the step's first
        model call as a doubled batch; one set of pair-loss shifts per step, so each map is a fixed function).
        Without it a stochastic sampler's inversion, noise-corrected, follows the photo so closely that a new
        prompt hardly changes it. Two-stage steps regularise their effective prediction (see
        :func:`_invert_two_stage`).
    solver: ``solve(map_fn, z0, iterations) -> z`` for each step's fixed point (default :func:`fixed_point`).
    sweep_solver: the same for the trajectory ``[B, S, C, H, W]`` as the fixed point of one later sweep, with
        ``sweeps - 1`` evaluations (default :func:`fixed_point`: the sweeps one after the other).
    Returns an :class:`Inversion` (``noises[i]`` is what ComfyUI's ``noise_sampler(sigmas[i], sigmas[i+1])`` must
    return). ``steps`` diagnostics carry the calls per step; their change norms are empty.
    """
    sampler_options = dict(sampler_options or {})
    steps = make_multistep_steps(sampler, sigmas, parameterization, **sampler_options)
    check_latent(x0)
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations}")
    if int(sweeps) != sweeps or sweeps < 1:
        raise ValueError(f"sweeps must be an integer >= 1, got {sweeps}")
    later_iterations = iterations if sweep_iterations is None else sweep_iterations
    if int(later_iterations) != later_iterations or later_iterations < 1:
        raise ValueError(f"sweep_iterations must be an integer >= 1, got {sweep_iterations}")

    edit = edit_loss if edit_loss is not None and edit_loss.is_active else None
    if edit is not None:
        check_edit_loss_latent(x0)

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
    x0 = x0.to(dtype)
    calls = [0] * len(steps)

    def denoise(z: Tensor, sigma: float, index: int) -> Tensor:
        calls[index] += 1
        if callback is not None:
            callback(sum(calls))
        return denoiser(z, torch.full((z.shape[0],), sigma, device=device, dtype=dtype)).to(dtype)

    regularizers = [None] * len(steps)
    if edit is not None:
        regularizers = _edit_loss_regularizers(steps, edit, x0, reference_noise.to(device=device, dtype=dtype), seeds,
                                               parameterization, denoise)

    trajectory: list[Tensor] = [x0] * (len(steps) + 1)
    if isinstance(steps[0], TwoStageStep):
        # Each step starts from the ODE solved up from the point below (no call): D held at the last prediction
        # below, or on the line through the last two, per item the order that predicted the step below better.
        # Measured on the spectral model with one evaluation per step (chosen / held / line): 20 karras steps, heun
        # 79.6 / 64.0 / 79.6 dB, dpm_2 98.1 / 62.8 / 97.8; 6 steps, predictions 1.5 log-sigma apart, heun 50.1 / 60.8
        # / 45.7 (the line overshoots; the choice recovers part), dpm_2 60.5 / 47.0 / 61.3. A stricter choice (the
        # line only where it was twice as close, or closer twice running) won some of these cells and lost others.
        below: list[tuple[float, Tensor]] = []  # (sigma, D) at the last two points inverted (their last evaluation), nearest first
        second_order = torch.zeros((batch,), device=device, dtype=torch.bool)
        for i in reversed(range(len(steps))):
            step = steps[i]
            target = step.target(trajectory[i + 1], noises[i] if step.is_stochastic else None)  # at sigma_down
            evaluate = functools.partial(_denoise_at_step, denoise, i)
            first = second = target
            if below and step.is_stochastic:
                # dpm_2_ancestral: target sits at sigma_down, below sigma_next, where the prediction below was made;
                # an Euler step up from it with that prediction's eps (as invert does for euler_ancestral; holding D
                # instead multiplies the noise in target - D by sigma / sigma_down, and measured it diverged)
                first = second = target - (trajectory[i + 1] - below[0][1]) / below[0][0] * step.dt
            elif below:
                first = second = extrapolate_up(target, step.sigma, below[:1])
                if len(below) >= 2:
                    second = extrapolate_up(target, step.sigma, below[:2])
            start = torch.where(_per_item(second_order, target), second, first)
            trajectory[i], denoised = _invert_two_stage(step, target, start, evaluate, solver, iterations, regularizers[i])
            if len(below) >= 2 and not step.is_stochastic:
                second_order = _distance(second, trajectory[i]) < _distance(first, trajectory[i])
            below = [(step.sigma, denoised)] + below[:1]
    else:
        # The first sweep (bottom up): D_prev predicted from below (extrapolated from the prediction at the lower
        # point; on stochastic steps, whose fresh noise that prediction carries, and on the lowest step: D(x) itself);
        # each step starts from the step taken with the eps last evaluated below.
        eps_below = None
        below: list[tuple[float, Tensor]] = []  # (sigma, D) at the last two points inverted (their last evaluation), nearest first
        for i in reversed(range(len(steps))):
            step, x_next = steps[i], trajectory[i + 1]
            noise = noises[i] if step.is_stochastic else None
            if not below or not step.uses_previous or step.is_stochastic:
                step, previous = step.collapsed(), None
            else:
                weights = previous_prediction_weights(steps[i - 1].sigma, step.sigma, [s for s, _ in below])
                step = step.with_previous_predicted(weights[0])
                previous = sum(denoised * weight for (_, denoised), weight in zip(below, weights[1:]))
            start = x_next if eps_below is None else step.inverse(x_next, eps_below, previous, noise)
            evaluate = regularizers[i].evaluate if regularizers[i] is not None else functools.partial(_denoise_at_step, denoise, i)
            map_fn = _MultistepMap(step, x_next, previous, noise, evaluate, start, None, regularizers[i])
            trajectory[i] = solver(map_fn, start, iterations)
            eps_below = map_fn.last_eps
            below = [(step.sigma, map_fn.last_denoised)] + below[:1]
        if any(s.uses_previous for s in steps) and sweeps > 1:
            # Later sweeps: the whole trajectory (stacked [B, S, C, H, W], each item its own) is the fixed point of one
            # sweep, solved by ``sweep_solver``.
            def sweep(stacked: Tensor) -> Tensor:
                points = list(stacked.unbind(1)) + [x0]
                # the predictions at the last sweep's points are each step's D_prev and its fixed point's first
                # evaluation (no call is repeated)
                known = [denoise(points[i], s.sigma, i) for i, s in enumerate(steps)]
                for i in reversed(range(len(steps))):
                    step, previous = _coupled(steps, i, points, known, noises)
                    noise = noises[i] if step.is_stochastic else None
                    evaluate = functools.partial(_denoise_at_step, denoise, i)
                    map_fn = _MultistepMap(step, points[i + 1], previous, noise, evaluate, points[i], known[i], regularizers[i])
                    points[i] = solver(map_fn, points[i], later_iterations)
                return torch.stack(points[:-1], 1)

            # Each point in units of its own scale (the standard deviation of a unit-variance photo noised to its
            # sigma), so that no level dominates an accelerated solver's least squares: measured, unscaled
            # anderson sweeps lost up to 30 dB to plain ones where scaled ones gain 20 to 50 dB.
            scales = [_latent_scale(s.sigma, parameterization) for s in steps]
            scale = torch.tensor(scales, dtype=dtype, device=device).view(1, -1, *([1] * (x0.ndim - 1)))
            start = torch.stack(trajectory[:-1], 1) / scale
            solved = sweep_solver(lambda units: sweep(units * scale) / scale, start, sweeps - 1) * scale
            trajectory = list(solved.unbind(1)) + [x0]
    if noise_correction is not None:
        _correct_noises(steps, trajectory, noises, noise_correction, denoise)

    latent = trajectory[0]
    if not bool(torch.isfinite(latent).all()):
        remedy = "lower the iterations or use euler"
        if edit is not None:
            remedy = "lower the edit-loss weights (lambda_ac, lambda_kl) or disconnect them"
        raise FloatingPointError(f"the {sampler} inversion diverged (NaN or Inf); {remedy}")
    empty = torch.zeros((0, batch))
    diagnostics = tuple(
        StepDiagnostics(s.sigma, s.sigma_next, calls[i], calls[i], empty, empty) for i, s in enumerate(steps)
    )
    return Inversion(
        latent=latent,
        noises=noises,
        sigmas=torch.tensor([s.sigma for s in steps] + [steps[-1].sigma_next], dtype=torch.float64),
        sampler=sampler,
        sampler_options=sampler_options,
        seeds=seeds,
        steps=diagnostics,
        trajectory=torch.stack(trajectory) if keep_trajectory else None,
    )


def _latent_scale(sigma: float, parameterization: str) -> float:
    """The standard deviation of a unit-variance latent noised to ``sigma``: ``sqrt(1 + sigma^2)`` (eps; the
    factor between k-diffusion and DDPM units), ``sqrt((1 - sigma)^2 + sigma^2)`` (flow)."""
    if parameterization == "flow":
        return math.sqrt((1.0 - sigma) ** 2 + sigma**2)
    return math.sqrt(1.0 + sigma**2)


def _coupled(steps: list[MultistepStep], i: int, trajectory: list[Tensor], known: list[Tensor], noises: Tensor):
    """Step ``i`` of a later sweep with its coupling to the point above taken into account to first order.

    ``D_prev = x_{i-1} - sigma_{i-1} eps_{i-1}`` and step ``i - 1`` gives ``x_{i-1} = x_i / (a' + b') + k`` when its
    eps and its own ``D_prev`` are held at the last sweep's values. So ``D_prev = g x_i + m`` with ``g = 1 / (a' + b')``:
    the step becomes ``x_next = (a + c g) x + b D(x) + c m + r noise``, exact in the strong (linear) coupling through
    ``x_{i-1}``; only the weak couplings through eps and the prediction two steps up are lagged by one sweep.
    Returns ``(step, m)`` (``m = None`` where the step does not use the previous prediction)."""
    step = steps[i]
    if not step.uses_previous:
        return step, None
    above = steps[i - 1]
    eps_above = (trajectory[i - 1] - known[i - 1]) / above.sigma
    previous_above = known[i - 2] if above.uses_previous else None
    offset = above.inverse(torch.zeros_like(eps_above), eps_above, previous_above, noises[i - 1] if above.is_stochastic else None)
    gain = 1.0 / (above.x_coeff + above.denoised_coeff)
    linear = MultistepStep(step.sigma, step.sigma_next, step.x_coeff + step.previous_coeff * gain, step.denoised_coeff,
                           step.previous_coeff, step.noise_coeff)
    return linear, offset - eps_above * above.sigma


def _denoise_at_step(denoise, index: int, z: Tensor, sigma: float) -> Tensor:
    return denoise(z, sigma, index)


class _MultistepMap:
    """The fixed-point map of one multistep step, ``z -> inverse(x_next, R(d(z)), D_prev, noise)`` (one model call;
    none for ``start`` when its prediction is already known; ``R`` the edit-loss regularisation, or none). Keeps the
    last (regularised) eps it used and the model's own prediction ``D``."""

    def __init__(self, step: MultistepStep, x_next: Tensor, previous, noise, evaluate, start: Tensor, start_denoised,
                 regularizer: _EditLossRegularizer | None = None):
        self.step, self.x_next, self.previous, self.noise = step, x_next, previous, noise
        self.evaluate, self.start, self.start_denoised = evaluate, start, start_denoised
        self.regularizer = regularizer
        self.last_eps: Tensor | None = None
        self.last_denoised: Tensor | None = None

    def __call__(self, z: Tensor) -> Tensor:
        known = self.start_denoised is not None and z is self.start
        denoised = self.start_denoised if known else self.evaluate(z, self.step.sigma)
        self.last_denoised = denoised
        self.last_eps = (z - denoised) / self.step.sigma
        if self.regularizer is not None:
            self.last_eps = self.regularizer(self.last_eps)
        return self.step.inverse(self.x_next, self.last_eps, self.previous, self.noise)


class _EditLossRegularizer:
    """Step ``index``'s edit-loss regularisation ``R(eps)``. :meth:`evaluate` is the step's model call that also
    makes the reference prediction (eps at ``x0`` noised with the reference noise to the step's sigma) while it is
    still missing, as one doubled batch."""

    def __init__(self, edit: EditLossConfig, x0: Tensor, reference_noise: Tensor, parameterization: str, rolls: Tensor | None,
                 denoise, index: int):
        self.edit, self.x0, self.reference_noise, self.parameterization = edit, x0, reference_noise, parameterization
        self.rolls, self.denoise, self.index = rolls, denoise, index
        self.reference_eps: Tensor | None = None

    def evaluate(self, z: Tensor, sigma: float) -> Tensor:
        if self.reference_eps is not None or not self.edit.uses_reference:
            return self.denoise(z, sigma, self.index)
        x_reference = noised(self.x0, self.reference_noise, sigma, self.parameterization)
        both = self.denoise(torch.cat([z, x_reference]), sigma, self.index)
        self.reference_eps = (x_reference - both[z.shape[0]:]) / sigma
        return both[: z.shape[0]]

    def __call__(self, eps: Tensor) -> Tensor:
        return regularize_noise_prediction(eps, self.reference_eps, self.rolls, self.edit)


def _edit_loss_regularizers(steps, edit: EditLossConfig, x0: Tensor, reference_noise: Tensor, seeds, parameterization: str,
                            denoise) -> list[_EditLossRegularizer]:
    """One :class:`_EditLossRegularizer` per step, with one set of pair-loss shifts each (drawn as
    :func:`renoise_core.inversion.invert` draws them for anderson)."""
    rolls = draw_step_rolls([1] * len(steps), edit, x0.shape, seeds, x0.device) if edit.lambda_ac > 0 else [None] * len(steps)
    return [_EditLossRegularizer(edit, x0, reference_noise, parameterization, None if rolls[i] is None else rolls[i][0], denoise, i)
            for i in range(len(steps))]


def extrapolate_up(x_next: Tensor, sigma: float, below: Sequence[tuple[float, Tensor]]) -> Tensor:
    """Predict the point at ``sigma`` above ``x_next`` (a new tensor, no model call) by solving the probability-flow
    ODE ``dx/dsigma = (x - D) / sigma`` exactly, with ``D`` held at ``below[0] = (sigma_b, D_b)`` (``sigma_b`` the
    sigma of ``x_next``; the Euler / DDIM step up) or, given ``below[1] = (sigma_c, D_c)`` too, on the line
    through both in ``log sigma``::

        H = log(sigma / sigma_b),   s = (D_b - D_c) / log(sigma_b / sigma_c)
        x = e^H x_next - expm1(H) D_b - (expm1(H) - H) s

    (``x / sigma`` changes by ``-D / sigma^2 dsigma``; integrated with ``D = D_b + s log(sigma / sigma_b)``.)"""
    sigma_b, denoised_b = below[0]
    growth = math.log(sigma / sigma_b)
    x = x_next * math.exp(growth) - denoised_b * math.expm1(growth)
    if len(below) >= 2:
        sigma_c, denoised_c = below[1]
        slope = (denoised_b - denoised_c) / math.log(sigma_b / sigma_c)
        x = x - slope * (math.expm1(growth) - growth)
    return x


def _per_item(mask: Tensor, like: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (like.ndim - 1)))


def _distance(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).flatten(1).norm(dim=1)


def _invert_two_stage(
    step: TwoStageStep, target: Tensor, start: Tensor, denoise, solver: Solver, iterations: int,
    regularizer: _EditLossRegularizer | None = None,
) -> tuple[Tensor, Tensor]:
    """The fixed point ``x = target - increment(x)`` of one heun / dpm_2 / dpm_2_ancestral step
    (:meth:`TwoStageStep.target`), from ``start``. With edit losses the step's effective noise prediction
    ``increment / dt`` (heun: the mean of its two; dpm_2: the midpoint's) is what they regularise:
    ``x = target - dt R(increment(x) / dt)``; the first stage's call carries the reference prediction.

    Returns ``(x, D(x', sigma))`` with ``x'`` the last point the solver evaluated (the prediction the next step's
    start extrapolates from)."""
    last = {}
    first_stage = denoise if regularizer is None else regularizer.evaluate
    derivative = functools.partial(_derivative, denoise)

    def map_fn(z: Tensor) -> Tensor:
        last["denoised"] = first_stage(z, step.sigma)
        increment = step.increment(z, (z - last["denoised"]) / step.sigma, derivative)
        if regularizer is not None:
            increment = regularizer(increment / step.dt) * step.dt
        return target - increment

    return solver(map_fn, start, iterations), last["denoised"]


def _correct_noises(steps: list, trajectory: list[Tensor], noises: Tensor, config: NoiseCorrectionConfig, denoise) -> None:
    """Forward along the inverted trajectory, moving each stochastic step's noise (in place in ``noises``, our copy)
    toward the one that lands the forward point on ``trajectory[i + 1]``. The step's own model calls (one, two for a
    two-stage step) up to the last stochastic one."""
    x, previous = trajectory[0], None
    for i in range(_last_stochastic(steps) + 1):
        step = steps[i]
        if isinstance(step, TwoStageStep):
            derivative = functools.partial(_derivative, functools.partial(_denoise_at_step, denoise, i))
            landed = step.deterministic(x, derivative(x, step.sigma), derivative)
            if step.is_stochastic:
                noises[i] = correct_noise(noises[i], (trajectory[i + 1] - landed) / step.noise_coeff, config)
                landed = landed + noises[i] * step.noise_coeff
            x = landed
            continue
        denoised = denoise(x, step.sigma, i)
        if step.is_stochastic:
            required = step.required_noise(x, trajectory[i + 1], denoised, previous)
            noises[i] = correct_noise(noises[i], required, config)
        x = step.forward(x, denoised, previous, noises[i] if step.is_stochastic else None)
        previous = denoised


def _derivative(denoise, z: Tensor, sigma: float) -> Tensor:
    return (z - denoise(z, sigma)) / sigma
