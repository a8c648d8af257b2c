"""An exact analytic diffusion model: latents drawn from an isotropic Gaussian mixture.

With data ``x0 ~ sum_k w_k N(mu_k, s_k^2 I)`` and ``x = a * x0 + sigma * eps`` (``a = 1`` for eps models,
``a = 1 - sigma`` for flow models), the ideal denoiser ``E[x0 | x]`` is closed-form:

    v_k = a^2 s_k^2 + sigma^2
    r_k(x) ∝ w_k N(x; a mu_k, v_k I)                                               (posterior over components)
    E[x0 | x] = sum_k r_k(x) (mu_k + a s_k^2 / v_k (x - a mu_k))

The "prompt" is the component prior ``w``: conditioning on class ``c`` means ``w = one_hot(c)`` (with a little
mass elsewhere), so the model is class-conditional, and the trajectories bend where the posterior switches
between components. Reconstruction error can then be measured against a known truth, with no weights to download.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


class GaussianMixture:
    """A Gaussian mixture over latents of shape ``[C, H, W]``; means ``[K, C, H, W]``, stds ``[K]``."""

    def __init__(self, means: Tensor, stds: Tensor, parameterization: str = "eps"):
        if means.ndim != 4 or stds.shape != means.shape[:1]:
            raise ValueError("means must be [K, C, H, W] and stds [K]")
        if parameterization not in ("eps", "flow"):
            raise ValueError(f"parameterization must be 'eps' or 'flow', got {parameterization!r}")
        self.means = means.double()
        self.stds = stds.double()
        self.parameterization = parameterization

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
        generator = torch.Generator().manual_seed(seed)
        idx = torch.as_tensor(classes).long()
        noise = torch.randn((len(idx),) + tuple(self.means.shape[1:]), generator=generator, dtype=torch.float64)
        return (self.means[idx] + self.stds[idx].view(-1, 1, 1, 1) * noise).float()

    def posterior_mean(self, x: Tensor, sigma: Tensor, prior: Tensor) -> Tensor:
        """``E[x0 | x]`` for ``x`` ``[B, C, H, W]``, ``sigma`` ``[B]``, ``prior`` ``[b, K]`` (repeated to B).

        Computed in float64 on ``x``'s device and returned in ``x``'s dtype.
        """
        batch = x.shape[0]
        prior = _repeat_to_batch(prior.to(x.device), batch)
        means, stds = self.means.to(x.device), self.stds.to(x.device)
        xd = x.double()
        sigma = sigma.double().view(-1, 1)  # [B, 1]
        a = 1 - sigma if self.parameterization == "flow" else torch.ones_like(sigma)  # signal scale
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
