"""Exact analytic diffusion models: latents drawn from a Gaussian mixture, isotropic or with a natural-image spectrum.

With data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x = a * x0 + sigma * eps`` (``a = 1`` for eps models,
``a = 1 - sigma`` for flow models), the ideal denoiser ``E[x0 | x]`` is closed-form:

    v_k = a^2 s_k^2 + sigma^2
    r_k(x) ∝ w_k N(x; a mu_k, v_k I)                                               (posterior over components)
    E[x0 | x] = sum_k r_k(x) (mu_k + a s_k^2 / v_k (x - a mu_k))

The "prompt" is the component prior ``w``: conditioning on class ``c`` means ``w = one_hot(c)`` (with a little
mass elsewhere), so the model is class-conditional, and the trajectories bend where the posterior switches
between components. Reconstruction error can then be measured against a known truth, with no weights to download.

The isotropic mixture's step maps have a Jacobian that is a multiple of the identity wherever one component
dominates, which any secant method solves in two evaluations: it says nothing about a fixed-point solver.
:class:`SpectralMixture` has components that share a covariance with a natural-image power spectrum (diagonal in
the 2-D Fourier basis, variance ~ 1 / (f + f0)^alpha), so fine detail has little variance and converges slowly,
as in real latents; its posterior mean is a per-component Wiener filter computed by FFT.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class MixtureModel:
    """What both mixtures share: component means ``[K, C, H, W]`` (float64), the class prior, the (guided)
    denoiser and the exact consistency function. Subclasses define ``posterior_mean`` and ``sample``."""

    def __init__(self, means: Tensor, parameterization: str = "eps"):
        if means.ndim != 4:
            raise ValueError("means must be [K, C, H, W]")
        if parameterization not in ("eps", "flow"):
            raise ValueError(f"parameterization must be 'eps' or 'flow', got {parameterization!r}")
        self.means = means.double()
        self.parameterization = parameterization

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def prior(self, classes: Tensor | list[int] | None, confidence: float = 0.98) -> Tensor:
        """Component prior ``[B, K]`` for a batch of class labels (None: the unconditional, uniform prior)."""
        k = self.num_components
        if classes is None:
            return torch.full((1, k), 1.0 / k, dtype=torch.float64)
        classes = torch.as_tensor(classes).long().view(-1)
        prior = torch.full((len(classes), k), (1.0 - confidence) / (k - 1), dtype=torch.float64)
        prior[torch.arange(len(classes)), classes] = confidence
        return prior

    def sample(self, classes: list[int], seed: int = 0) -> Tensor:
        """Clean latents ``[B, C, H, W]`` (float32), item b from component ``classes[b]``."""
        raise NotImplementedError

    def posterior_mean(self, x: Tensor, sigma: Tensor, prior: Tensor) -> Tensor:
        """``E[x0 | x]`` for ``x`` ``[B, C, H, W]``, ``sigma`` ``[B]``, ``prior`` ``[b, K]`` (repeated to B).

        Computed in float64 on ``x``'s device and returned in ``x``'s dtype.
        """
        raise NotImplementedError

    def _signal_scale(self, sigma: Tensor) -> Tensor:
        """``a`` in ``x = a x0 + sigma eps``: 1 for eps models, ``1 - sigma`` for flow models (sigma's shape)."""
        return 1 - sigma if self.parameterization == "flow" else torch.ones_like(sigma)

    def denoiser(self, classes: Tensor | list[int] | None = None, cfg: float = 1.0, uncond_classes=None):
        """A denoiser ``D(x, sigma)`` conditioned on ``classes``; with ``cfg != 1`` classifier-free guided
        against ``uncond_classes`` (None: the uniform prior), as ComfyUI combines predictions."""
        cond = self.prior(classes)
        uncond = self.prior(uncond_classes)

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            positive = self.posterior_mean(x, sigma, cond)
            if cfg == 1.0:
                return positive
            negative = self.posterior_mean(x, sigma, uncond)
            return negative + cfg * (positive - negative)

        return denoise

    def consistency_denoiser(self, classes: Tensor | list[int] | None = None, substeps: int = 48):
        """The ideal consistency function for LCM-style models: ``D(x, sigma)`` is where the probability-flow
        ODE ``dx/dsigma = (x - E[x0|x]) / sigma`` carries ``x`` at ``sigma`` to sigma = 0 (what an LCM is trained
        to predict), integrated with ``substeps`` Heun steps on a log-spaced grid to ``sigma = 1e-3``.

        The MMSE denoiser is not invertible at high sigma (every x maps near a class mean), so the lcm sampler
        on it loses the image; the consistency function is the flow map, as with a real LCM.
        """
        cond = self.prior(classes)

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            out = torch.empty_like(x)
            for value in torch.unique(sigma):
                rows = (sigma == value).nonzero().flatten()
                out[rows] = self._flow_to_zero(x[rows], float(value), _repeat_to_batch(cond, x.shape[0])[rows.cpu()], substeps)
            return out

        return denoise

    def _flow_to_zero(self, x: Tensor, sigma: float, prior: Tensor, substeps: int) -> Tensor:
        xd = x.double()
        grid = torch.logspace(math.log10(sigma), -3, substeps + 1, dtype=torch.float64).tolist()
        ones = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)

        def slope(y: Tensor, s: float) -> Tensor:
            return (y - self.posterior_mean(y, s * ones, prior)) / s

        for s, s_next in zip(grid[:-1], grid[1:]):
            d = slope(xd, s)
            y = xd + (s_next - s) * d
            xd = xd + (s_next - s) * 0.5 * (d + slope(y, s_next))
        return self.posterior_mean(xd, grid[-1] * ones, prior).to(x.dtype)


class GaussianMixture(MixtureModel):
    """An isotropic Gaussian mixture over latents of shape ``[C, H, W]``; means ``[K, C, H, W]``, stds ``[K]``."""

    def __init__(self, means: Tensor, stds: Tensor, parameterization: str = "eps"):
        super().__init__(means, parameterization)
        if stds.shape != means.shape[:1]:
            raise ValueError("means must be [K, C, H, W] and stds [K]")
        self.stds = stds.double()

    @classmethod
    def random(cls, components: int = 8, shape=(4, 32, 32), std: float = 0.25, seed: int = 0,
               parameterization: str = "eps") -> GaussianMixture:
        """Smooth random component means with unit pixel variance (image-like latents), each of spread ``std``."""
        generator = torch.Generator().manual_seed(seed)
        channels, height, width = shape
        coarse = torch.randn((components, channels, max(2, height // 4), max(2, width // 4)), generator=generator, dtype=torch.float64)
        means = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
        means = means + 0.35 * torch.randn(means.shape, generator=generator, dtype=torch.float64)  # fine detail
        means = (means - means.mean((1, 2, 3), keepdim=True)) / means.std(dim=(1, 2, 3), keepdim=True)
        stds = std * (0.75 + 0.5 * torch.rand((components,), generator=generator, dtype=torch.float64))
        return cls(means, stds, parameterization)

    @classmethod
    def boxed(cls, components: int = 16, shape=(4, 16, 16), box=(slice(4, 12), slice(5, 13)), seed: int = 0) -> GaussianMixture:
        """Unit-variance components whose means agree outside ``box`` (latent rows, columns) and differ inside it
        along one +-1 pattern, by levels evenly spaced in [-0.5, 0.5] (classes 3 and 9 of 16: 0.4 apart). Classes
        only a local edit's region tells apart, close enough that a prompt (class) change can move a sample from one
        to the other."""
        generator = torch.Generator().manual_seed(seed)
        base = torch.randn((1,) + tuple(shape), generator=generator, dtype=torch.float64)
        means = base.repeat(components, 1, 1, 1)
        rows, cols = box
        box_shape = (1, shape[0], len(range(*rows.indices(shape[1]))), len(range(*cols.indices(shape[2]))))
        pattern = torch.randn(box_shape, generator=generator, dtype=torch.float64).sign()
        levels = torch.linspace(-0.5, 0.5, components, dtype=torch.float64).view(-1, 1, 1, 1)
        means[:, :, rows, cols] += levels * pattern
        return cls(means, torch.ones(components, dtype=torch.float64))

    def sample(self, classes: list[int], seed: int = 0) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        idx = torch.as_tensor(classes).long()
        noise = torch.randn((len(idx),) + tuple(self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return (self.means[idx] + self.stds[idx].view(-1, 1, 1, 1) * noise).float()

    def posterior_mean(self, x: Tensor, sigma: Tensor, prior: Tensor) -> Tensor:
        batch = x.shape[0]
        prior = _repeat_to_batch(prior.to(x.device), batch)
        means, stds = self.means.to(x.device), self.stds.to(x.device)
        xd = x.double()
        sigma = sigma.double().view(-1, 1)  # [B, 1]
        a = self._signal_scale(sigma)
        var = a**2 * stds.view(1, -1) ** 2 + sigma**2  # [B, K]
        dims = xd[0].numel()
        sq_dist = (xd.flatten(1).pow(2).sum(1, keepdim=True) - 2 * a * xd.flatten(1) @ means.flatten(1).T
                   + a**2 * means.flatten(1).pow(2).sum(1).view(1, -1))  # ||x - a mu_k||^2, [B, K]
        logits = prior.clamp_min(1e-300).log() - 0.5 * dims * var.log() - sq_dist / (2 * var)
        resp = torch.softmax(logits, dim=1)  # [B, K]
        gain = a * stds.view(1, -1) ** 2 / var  # [B, K]
        # sum_k r_k (mu_k + gain_k (x - a mu_k)) = sum_k r_k (1 - a gain_k) mu_k + (sum_k r_k gain_k) x
        mean_part = torch.einsum("bk,kchw->bchw", resp * (1 - a * gain), means)
        x_part = (resp * gain).sum(1).view(-1, 1, 1, 1) * xd
        return (mean_part + x_part).to(x.dtype)


def natural_spectrum(shape, alpha: float = 2.0, f0: float | None = None) -> Tensor:
    """Per-frequency variances ``[C, H, W]`` (float64, on the ``fft2`` grid) of a natural-image power spectrum:
    ``1 / (f + f0)^alpha`` with ``f`` the radial frequency in cycles per latent pixel, normalised so every channel
    has unit pixel variance. ``f0`` (default ``1 / min(H, W)``) keeps the lowest frequency finite."""
    channels, height, width = shape
    f0 = 1.0 / min(height, width) if f0 is None else f0
    fy = torch.fft.fftfreq(height, dtype=torch.float64).view(-1, 1)
    fx = torch.fft.fftfreq(width, dtype=torch.float64).view(1, -1)
    power = (fy**2 + fx**2).sqrt().add(f0).pow(-alpha)
    power = power / power.mean()  # orthonormal FFT: pixel variance = mean of the spectrum
    return power.expand(channels, height, width).clone()


class SpectralMixture(MixtureModel):
    """A Gaussian mixture whose components share a covariance with a natural-image power spectrum.

    ``x0 ~ sum_k w_k N(mu_k, Sigma)`` with ``Sigma = F^H diag(spectrum) F`` (``F`` the orthonormal 2-D DFT per
    channel). With ``x = a x0 + sigma eps`` and ``X = F x``, ``M_k = F mu_k``, all per frequency:

        r_k(x) ∝ w_k exp(-1/2 sum |X - a M_k|^2 / (a^2 S + sigma^2))     (the log-determinant is shared)
        E[x0 | x] = sum_k r_k mu_k + F^-1[ a S / (a^2 S + sigma^2) (X - a F sum_k r_k mu_k) ]   (Wiener filter)

    The step maps' Jacobians are then diagonal in Fourier space with a spread of eigenvalues, as in real latents.
    """

    def __init__(self, means: Tensor, spectrum: Tensor, parameterization: str = "eps"):
        super().__init__(means, parameterization)
        if spectrum.shape != means.shape[1:]:
            raise ValueError(f"spectrum must be [C, H, W] = {list(means.shape[1:])}, got {list(spectrum.shape)}")
        self.spectrum = spectrum.double()
        self.means_fft = torch.fft.fft2(self.means, norm="ortho")
        self.means_power = self.means_fft.abs() ** 2  # |M_k|^2 per frequency

    @classmethod
    def random(cls, components: int = 16, shape=(4, 32, 32), within: float = 1.0, alpha: float = 2.0, seed: int = 0,
               parameterization: str = "eps") -> SpectralMixture:
        """Means drawn from the natural spectrum (unit pixel variance); within-class covariance ``within^2`` times it."""
        spectrum = natural_spectrum(shape, alpha)
        generator = torch.Generator().manual_seed(seed)
        white = torch.randn((components,) + tuple(shape), generator=generator, dtype=torch.float64)
        return cls(_colour(white, spectrum), within**2 * spectrum, parameterization)

    def sample(self, classes: list[int], seed: int = 0) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        idx = torch.as_tensor(classes).long()
        white = torch.randn((len(idx),) + tuple(self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return (self.means[idx] + _colour(white, self.spectrum)).float()

    def posterior_mean(self, x: Tensor, sigma: Tensor, prior: Tensor) -> Tensor:
        batch = x.shape[0]
        prior = _repeat_to_batch(prior.to(x.device), batch)
        means, means_fft, spectrum = self.means.to(x.device), self.means_fft.to(x.device), self.spectrum.to(x.device)
        means_power = self.means_power.to(x.device)
        sigma = sigma.double().view(-1, 1, 1, 1)
        a = self._signal_scale(sigma)
        precision = 1.0 / (a**2 * spectrum + sigma**2)  # [B, C, H, W]
        big_x = torch.fft.fft2(x.double(), norm="ortho")
        a_flat = a.view(-1, 1)
        # ||X - a M_k||^2_P = X^H P X - 2 a Re(X^H P M_k) + a^2 M_k^H P M_k
        cross = torch.einsum("bchw,kchw->bk", big_x.conj() * precision, means_fft).real
        norms = torch.einsum("bchw,kchw->bk", precision, means_power)
        own = ((big_x.real**2 + big_x.imag**2) * precision).flatten(1).sum(1, keepdim=True)
        logits = prior.clamp_min(1e-300).log() - 0.5 * (own - 2 * a_flat * cross + a_flat**2 * norms)
        resp = torch.softmax(logits, dim=1)  # [B, K]
        mean = torch.einsum("bk,kchw->bchw", resp, means)
        residual = big_x - a * torch.fft.fft2(mean, norm="ortho")
        return (mean + torch.fft.ifft2(a * spectrum * precision * residual, norm="ortho").real).to(x.dtype)


def _colour(white: Tensor, spectrum: Tensor) -> Tensor:
    """White noise ``[..., C, H, W]`` coloured to covariance ``F^H diag(spectrum) F`` (real: the spectrum is even)."""
    return torch.fft.ifft2(spectrum.sqrt() * torch.fft.fft2(white, norm="ortho"), norm="ortho").real


def _repeat_to_batch(t: Tensor, batch: int) -> Tensor:
    """ComfyUI's ``repeat_to_batch_size``: tile along dim 0 and cut to ``batch``."""
    if t.shape[0] == batch:
        return t
    return t.repeat((math.ceil(batch / t.shape[0]),) + (1,) * (t.ndim - 1))[:batch]


def psnr(reconstruction: Tensor, target: Tensor) -> Tensor:
    """Per-item PSNR in dB with the target's own value range as the peak; shape ``[B]``."""
    target = target.double()
    mse = (reconstruction.double() - target).flatten(1).pow(2).mean(1)
    peak = target.flatten(1).amax(1) - target.flatten(1).amin(1)
    return 10 * torch.log10(peak**2 / mse.clamp_min(1e-30))
