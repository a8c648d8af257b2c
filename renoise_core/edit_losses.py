"""Editability losses on a noise prediction (ReNoise Sec. 3.2): patch-KL and the pix2pix-zero pair loss.

The losses act on ``eps_hat`` (shape ``[B, C, H, W]``, k-diffusion noise units) and are minimised by a few plain
gradient steps on that tensor alone; nothing is back-propagated through the denoiser. Every loss is a sum of
per-item terms, so each batch item gets exactly the gradient it would get alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_KL_EPSILON = 1e-6
_PYRAMID_MIN_SIZE = 8


@dataclass(frozen=True)
class EditLossConfig:
    """Weights of the editability regularisation. Defaults are the reference's SDXL-Turbo settings.

    ``reg_steps`` outer steps, each one patch-KL gradient step of size ``lambda_kl`` (gradient clipped to
    ``+-kl_grad_clip``) followed by ``ac_rolls`` pair-loss steps of size ``lambda_ac / ac_rolls``.
    """

    lambda_ac: float = 20.0
    lambda_kl: float = 0.065
    reg_steps: int = 4
    ac_rolls: int = 5
    patch_size: int = 4
    kl_grad_clip: float = 100.0

    def __post_init__(self) -> None:
        for name in ("lambda_ac", "lambda_kl", "kl_grad_clip"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"EditLossConfig.{name} must be finite and >= 0, got {getattr(self, name)}")
        for name in ("reg_steps", "ac_rolls", "patch_size"):
            if int(getattr(self, name)) != getattr(self, name) or getattr(self, name) < 1:
                raise ValueError(f"EditLossConfig.{name} must be an integer >= 1, got {getattr(self, name)}")

    @property
    def uses_reference(self) -> bool:
        """Whether the patch-KL term, and so the reference prediction, is needed."""
        return self.lambda_kl > 0

    @property
    def is_active(self) -> bool:
        return self.lambda_kl > 0 or self.lambda_ac > 0


def patch_kl_loss(eps: Tensor, eps_ref: Tensor, patch_size: int = 4) -> Tensor:
    """Per-item patch KL between ``eps`` and the reference prediction ``eps_ref``; returns shape ``[B]``.

    Both are cut into non-overlapping ``patch_size`` x ``patch_size`` patches (a remainder at the border is
    dropped); per patch and channel the mean and unbiased variance are compared with
    ``|log((v1 + e) / (v0 + e)) + (v0 + (m0 - m1)^2) / (v1 + e) - 1|`` (0 = eps, 1 = reference), summed.
    """
    mean, var = _patch_stats(eps, patch_size)
    mean_ref, var_ref = _patch_stats(eps_ref, patch_size)
    kl = torch.log((var_ref + _KL_EPSILON) / (var + _KL_EPSILON)) + (var + (mean - mean_ref) ** 2) / (var_ref + _KL_EPSILON) - 1
    return kl.abs().flatten(1).sum(1)


def _patch_stats(x: Tensor, p: int) -> tuple[Tensor, Tensor]:
    b, c, h, w = x.shape
    rows, cols = h // p, w // p
    if rows == 0 or cols == 0:
        raise ValueError(f"patch_size {p} is larger than the latent ({h}x{w}); use a smaller patch_size")
    patches = x[:, :, : rows * p, : cols * p].reshape(b, c, rows, p, cols, p).transpose(3, 4).reshape(b, c, rows, cols, p * p)
    return patches.mean(-1), patches.var(-1)


def pyramid_sizes(height: int) -> list[int]:
    """Heights of the pair-loss pyramid: halve by 2x2 average pooling until the height is at most 8."""
    sizes = [height]
    while sizes[-1] > _PYRAMID_MIN_SIZE:
        sizes.append(sizes[-1] // 2)
    return sizes


def pair_loss(eps: Tensor, rolls: Tensor) -> Tensor:
    """pix2pix-zero auto-correlation loss per item; returns shape ``[B]``.

    ``rolls`` is an integer tensor ``[levels, B, C]``: the shift of each channel at each pyramid level
    (``levels == len(pyramid_sizes(H))``). Per level and channel it adds
    ``mean(e * roll(e, r, H))^2 + mean(e * roll(e, r, W))^2``.
    """
    loss = eps.new_zeros(eps.shape[0])
    level = eps
    for level_index in range(rolls.shape[0]):
        if level_index > 0:
            level = F.avg_pool2d(level, kernel_size=2)
        shift = rolls[level_index][:, :, None, None]
        loss = loss + _shifted_mean_product(level, shift, dim=2).square().sum(1)
        loss = loss + _shifted_mean_product(level, shift, dim=3).square().sum(1)
    return loss


def _shifted_mean_product(x: Tensor, shift: Tensor, dim: int) -> Tensor:
    """``mean_{H,W}(x * roll(x, shift, dim))`` with a different shift per (item, channel); shape ``[B, C]``."""
    size = x.shape[dim]
    positions = torch.arange(size, device=x.device).view([1, 1] + [size if d == dim else 1 for d in (2, 3)])
    index = (positions - shift).remainder(size).expand_as(x)
    return (x * torch.gather(x, dim, index)).mean((2, 3))


def draw_rolls(rng: np.random.Generator, height: int, channels: int, count: int) -> np.ndarray:
    """``count`` sets of pair-loss shifts for one item: int64 array ``[count, levels, C]``.

    Shifts at a level of height h are uniform in ``[0, h // 2)`` (as in pix2pix-zero).
    """
    bounds = np.array([max(1, h // 2) for h in pyramid_sizes(height)])
    return (rng.random((count, len(bounds), channels)) * bounds[None, :, None]).astype(np.int64)


def regularize_noise_prediction(eps: Tensor, eps_ref: Tensor | None, rolls: Tensor | None, config: EditLossConfig) -> Tensor:
    """Apply the edit-loss gradient steps to ``eps`` (``[B, C, H, W]``); returns a new tensor.

    ``eps_ref`` is the reference prediction (needed when ``lambda_kl > 0``). ``rolls`` holds the pair-loss shifts,
    int64 ``[reg_steps, ac_rolls, levels, B, C]`` on ``eps``'s device (needed when ``lambda_ac > 0``). Works under
    ``torch.inference_mode()``: the gradient is taken on fresh copies outside it, and no input is modified.
    """
    if config.uses_reference and eps_ref is None:
        raise ValueError("lambda_kl > 0 needs the reference prediction eps_ref")
    if config.lambda_ac > 0 and rolls is None:
        raise ValueError("lambda_ac > 0 needs the pair-loss shifts (rolls)")
    with torch.inference_mode(False), torch.enable_grad():
        eps = eps.detach().clone()
        eps_ref = eps_ref.detach().clone() if config.uses_reference else None
        for outer in range(config.reg_steps):
            if config.lambda_kl > 0:
                grad = _gradient(lambda e: patch_kl_loss(e, eps_ref, config.patch_size).sum(), eps)
                eps = eps - config.lambda_kl * grad.clamp(-config.kl_grad_clip, config.kl_grad_clip)
            if config.lambda_ac > 0:
                for shifts in rolls[outer]:
                    grad = _gradient(lambda e, shifts=shifts: pair_loss(e, shifts).sum(), eps)
                    eps = eps - (config.lambda_ac / config.ac_rolls) * grad
    return eps.detach()


def _gradient(loss_fn, x: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(x), x)
    return grad
