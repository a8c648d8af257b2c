"""First-order samplers as affine steps, in k-diffusion units.

Every sampler this package supports takes one step from ``sigma`` down to ``sigma_next`` as

    x_next = phi * x + psi * eps_hat(x, sigma) + rho * noise,      eps_hat(x, sigma) = (x - D(x, sigma)) / sigma

(ReNoise paper, Eq. 1), where ``D`` is the denoiser (predicted x0) and ``noise ~ N(0, I)``. A sampler is therefore
nothing but its coefficients: adding one means adding a function that returns an :class:`AffineStep`. The
coefficients below are written to mirror ComfyUI's ``comfy/k_diffusion/sampling.py`` term by term, so a forward
step reproduces ComfyUI's arithmetic to float rounding. Sigmas are the samplers' sigmas, never DDPM timesteps.

Two parameterisations, as in ComfyUI:

- ``"eps"`` (EPS, V_PREDICTION, EDM, X0 models: SD1.5, SD2.x, SDXL): ``x = x0 + sigma * eps``;
- ``"flow"`` (CONST models, rectified flow: SD3, Flux): ``x = (1 - sigma) * x0 + sigma * eps``, sigma in [0, 1].

The samplers use the same ``eps_hat`` in both; only some coefficients differ (``FLOW_SAMPLERS``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class AffineStep:
    """One sampler step ``sigma -> sigma_next`` as ``x_next = phi * x + psi * eps_hat + rho * noise``.

    The coefficients are Python floats (no tensors, so using them never synchronises a device).
    """

    sigma: float
    sigma_next: float
    phi: float
    psi: float
    rho: float

    @property
    def is_stochastic(self) -> bool:
        return self.rho != 0.0

    @property
    def inverse_gain(self) -> float:
        """``-psi / (phi * sigma)``: the Jacobian of the inversion map ``G(z) = inverse(x_next, eps_hat(z))`` in the
        directions the denoiser ignores (there ``eps_hat`` moves by ``1 / sigma`` per unit of ``z``). Below 1 where
        the step contracts them (euler: ``1 - sigma_next / sigma``); 1 for lcm, whose step keeps only ``D(x)``: its
        fixed points form a family (every ``x`` with the same ``D(x)``)."""
        return -self.psi / (self.phi * self.sigma)

    def forward(self, x: Tensor, eps_hat: Tensor, noise: Tensor | None = None) -> Tensor:
        """The sampler's own step: the point at ``sigma_next`` reached from ``x`` at ``sigma``."""
        x_next = self.phi * x + self.psi * eps_hat
        if self.is_stochastic:
            x_next = x_next + self.rho * _require_noise(noise, self)
        return x_next

    def inverse(self, x_next: Tensor, eps_hat: Tensor, noise: Tensor | None = None) -> Tensor:
        """Solve the step for ``x`` given the lower point ``x_next`` and a prediction ``eps_hat`` (paper Eq. 2).

        Exact when ``eps_hat`` is the prediction at the returned point; ReNoise iterates to make it so.
        """
        x = x_next - self.psi * eps_hat
        if self.is_stochastic:
            x = x - self.rho * _require_noise(noise, self)
        return x / self.phi

    def required_noise(self, x: Tensor, x_next: Tensor, eps_hat: Tensor) -> Tensor:
        """The noise that makes the forward step from ``x`` land exactly on ``x_next`` (paper Eq. 4)."""
        if not self.is_stochastic:
            raise ValueError(f"step {self.sigma:g} -> {self.sigma_next:g} adds no noise (rho = 0)")
        return (x_next - self.phi * x - self.psi * eps_hat) / self.rho


def _require_noise(noise: Tensor | None, step: AffineStep) -> Tensor:
    if noise is None:
        raise ValueError(f"step {step.sigma:g} -> {step.sigma_next:g} is stochastic (rho = {step.rho:g}) and needs a noise")
    return noise


def euler_step(sigma: float, sigma_next: float) -> AffineStep:
    """ComfyUI ``sample_euler`` (s_churn = 0), and therefore ComfyUI's ``ddim``: ``x + d * (sigma_next - sigma)``."""
    return AffineStep(sigma, sigma_next, phi=1.0, psi=sigma_next - sigma, rho=0.0)


def ancestral_sigmas(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """ComfyUI ``get_ancestral_step``: ``(sigma_down, sigma_up)``."""
    if not eta:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def euler_ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0, s_noise: float = 1.0) -> AffineStep:
    """ComfyUI ``sample_euler_ancestral``: ``x + d * (sigma_down - sigma) + noise * s_noise * sigma_up``.

    (Where ``sigma_down == 0`` ComfyUI returns ``denoised``, which is the same expression: ``x - sigma * d``.)
    """
    sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next, eta)
    return AffineStep(sigma, sigma_next, phi=1.0, psi=sigma_down - sigma, rho=s_noise * sigma_up)


def lcm_step(sigma: float, sigma_next: float) -> AffineStep:
    """ComfyUI ``sample_lcm`` on an EPS/V model: ``denoised + sigma_next * noise`` (``noise_scaling``).

    ``denoised = x - sigma * eps_hat``. The LCM boundary conditions (c_skip, c_out) live inside the denoiser.
    """
    return AffineStep(sigma, sigma_next, phi=1.0, psi=-sigma, rho=sigma_next)


def ddpm_step(sigma: float, sigma_next: float) -> AffineStep:
    """ComfyUI ``sample_ddpm`` (``DDPMSampler_step`` inside ``generic_step_sampler``), expanded.

    ComfyUI works in DDPM units ``x / sqrt(1 + sigma^2)``::

        mu = (x_ddpm - (1 - alpha) * eps / sqrt(1 - abar)) / sqrt(alpha)
             + sqrt((1 - alpha) * (1 - abar_next) / (1 - abar)) * noise
        x_next = mu * sqrt(1 + sigma_next^2)

    with ``abar = 1 / (1 + sigma^2)`` and ``alpha = abar / abar_next``. (Analytically this equals
    euler_ancestral with eta = 1; it is kept in ComfyUI's form so its rounding follows ComfyUI's.)
    """
    abar = 1.0 / (sigma * sigma + 1.0)
    abar_next = 1.0 / (sigma_next * sigma_next + 1.0)
    alpha = abar / abar_next
    to_ddpm = 1.0 / math.sqrt(1.0 + sigma**2)
    from_ddpm = math.sqrt(1.0 + sigma_next**2)
    phi = from_ddpm * to_ddpm / math.sqrt(alpha)
    psi = -from_ddpm * (1.0 - alpha) / (math.sqrt(alpha) * math.sqrt(1.0 - abar))
    rho = from_ddpm * math.sqrt((1.0 - alpha) * (1.0 - abar_next) / (1.0 - abar)) if sigma_next > 0 else 0.0
    return AffineStep(sigma, sigma_next, phi=phi, psi=psi, rho=rho)


def euler_ancestral_rf_step(sigma: float, sigma_next: float, eta: float = 1.0, s_noise: float = 1.0) -> AffineStep:
    """ComfyUI ``sample_euler_ancestral_RF`` (what euler_ancestral runs on flow models)::

        sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
        x = (sigma_down / sigma) * x + (1 - sigma_down / sigma) * denoised      # = x + (sigma_down - sigma) * eps_hat
        x = (alpha_next / alpha_down) * x + noise * s_noise * renoise_coeff     # alpha = 1 - sigma

    with ``renoise_coeff = sqrt(sigma_next^2 - sigma_down^2 * alpha_next^2 / alpha_down^2)``; ``denoised`` when
    ``sigma_next == 0``.
    """
    if sigma_next == 0:
        return AffineStep(sigma, sigma_next, phi=1.0, psi=-sigma, rho=0.0)
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * eta)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    if eta <= 0:
        return AffineStep(sigma, sigma_next, phi=1.0, psi=sigma_down - sigma, rho=0.0)
    renoise_coeff = (sigma_next**2 - sigma_down**2 * alpha_next**2 / alpha_down**2) ** 0.5
    scale = alpha_next / alpha_down
    return AffineStep(sigma, sigma_next, phi=scale, psi=scale * (sigma_down - sigma), rho=s_noise * renoise_coeff)


def lcm_flow_step(sigma: float, sigma_next: float) -> AffineStep:
    """ComfyUI ``sample_lcm`` on a flow model: ``noise_scaling`` is ``sigma_next * noise + (1 - sigma_next) * denoised``."""
    return AffineStep(sigma, sigma_next, phi=1.0 - sigma_next, psi=-(1.0 - sigma_next) * sigma, rho=sigma_next)


StepFunction = Callable[..., AffineStep]

#: ComfyUI sampler name -> step function. Keyword options (eta, s_noise) are passed through.
SAMPLERS: dict[str, StepFunction] = {
    "euler": euler_step,
    "ddim": euler_step,  # ComfyUI's ddim is euler (with random noise only for inpainting masks)
    "euler_ancestral": euler_ancestral_step,
    "lcm": lcm_step,
    "ddpm": ddpm_step,
}

#: the same names on flow (CONST) models; ddpm works in DDPM units, which do not exist there
FLOW_SAMPLERS: dict[str, StepFunction] = {
    "euler": euler_step,
    "ddim": euler_step,
    "euler_ancestral": euler_ancestral_rf_step,
    "lcm": lcm_flow_step,
}

PARAMETERIZATIONS = {"eps": SAMPLERS, "flow": FLOW_SAMPLERS}

_SAMPLER_OPTIONS: dict[str, frozenset[str]] = {"euler_ancestral": frozenset({"eta", "s_noise"})}


def noised(x0: Tensor, noise: Tensor, sigma: float, parameterization: str = "eps") -> Tensor:
    """The latent at noise level ``sigma``: ``x0 + sigma * noise`` (eps) or ``(1 - sigma) * x0 + sigma * noise`` (flow)."""
    if parameterization == "flow":
        return (1.0 - sigma) * x0 + sigma * noise
    return x0 + sigma * noise


def sampler_options_allowed(sampler: str) -> frozenset[str]:
    return _SAMPLER_OPTIONS.get(sampler, frozenset())


def check_sigmas(sigmas: Tensor | Sequence[float]) -> list[float]:
    """Validate a sampling schedule and return it as Python floats.

    A schedule is descending, finite, non-negative, has at least two entries, and only its last entry may be 0.
    This is the one place a schedule is read back from a device (once, before any loop).
    """
    if isinstance(sigmas, Tensor):
        if sigmas.ndim != 1:
            raise ValueError(f"sigmas must be a 1-D schedule, got shape {tuple(sigmas.shape)}")
        values = sigmas.detach().double().cpu().tolist()
    else:
        values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError(
            f"the sigma schedule has {len(values)} entries; it needs at least 2 (one step). "
            "Use steps >= 1 and denoise > 0."
        )
    if not all(math.isfinite(s) for s in values):
        raise ValueError(f"the sigma schedule contains NaN or Inf: {values}")
    if any(s < 0 for s in values):
        raise ValueError(f"sigmas must be >= 0, got {values}")
    for i, (hi, lo) in enumerate(zip(values[:-1], values[1:])):
        if not lo < hi:
            raise ValueError(
                f"sigmas must be strictly descending (a sampling schedule, high noise to low); "
                f"sigmas[{i}] = {hi:g} is followed by {lo:g}. Use the SIGMAS a scheduler node gives, not flipped ones."
            )
    return values


def make_steps(sampler: str, sigmas: Tensor | Sequence[float], parameterization: str = "eps", **options: float) -> list[AffineStep]:
    """The affine steps of ``sampler`` along a descending ``sigmas`` schedule (``len(sigmas) - 1`` steps)."""
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {sorted(PARAMETERIZATIONS)}, got {parameterization!r}")
    samplers = PARAMETERIZATIONS[parameterization]
    if sampler not in samplers:
        raise ValueError(f"unknown sampler {sampler!r} for {parameterization} models; supported: {', '.join(samplers)}")
    unknown = set(options) - sampler_options_allowed(sampler)
    if unknown:
        raise ValueError(f"sampler {sampler!r} takes no option(s) {sorted(unknown)}")
    values = check_sigmas(sigmas)
    if parameterization == "flow" and values[0] > 1.0:
        raise ValueError(f"flow-model sigmas lie in [0, 1]; the schedule starts at {values[0]:g}")
    step_function = samplers[sampler]
    return [step_function(hi, lo, **options) for hi, lo in zip(values[:-1], values[1:])]
