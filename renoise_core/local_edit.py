"""Local edits: keep the photo exactly outside a mask, and find the mask from two prompts (DiffEdit).

Masked sampling. An inversion knows the photo's latent at every sigma of its schedule (its *trajectory*,
``trajectory[i]`` at ``sigmas[i]``, ``trajectory[-1]`` the photo's latent). With a mask ``m`` (1 = edit, 0 = keep,
soft values blend) every sampler step is made to land on

    x_{i+1} = m * step_i(x_i, D(x_i)) + (1 - m) * trajectory[i + 1]                                   (1)

so the kept region follows the photo's own trajectory and ends on the photo's latent, while the edited region
proceeds as without a mask (seeing the kept region as context). The blend is done on the *prediction*, not on
``x``: the affine step ``x_next = phi x + psi (x - D) / sigma + rho noise`` is affine in ``D``, so the prediction

    D_keep = x - sigma * (trajectory[i + 1] - phi x - rho noise) / psi                                (2)

makes the step from ``x`` land exactly on ``trajectory[i + 1]``, and the blended prediction
``m * D + (1 - m) * D_keep`` makes the sampler's own step compute (1). Blending the prediction lets the stock
sampler run unchanged (its loop, noise draws, callbacks, previews and progress), needs no hook between steps, and
corrects any drift of the kept region at every step (each ``D_keep`` is computed from the actual ``x``), so the
kept region ends on the photo's latent to float rounding whatever the inversion's own reconstruction error.

An all-one mask returns the model's prediction untouched (``1 * D + 0 * D_keep``), the unmasked edit bit for bit.

DiffEdit (Couairon et al., ICLR 2023): noise the photo's latent to a middle noise level, predict under the source
and the target prompt, and mark where the two predictions differ (averaged over channels and noise draws,
normalised to [0, 1]); threshold and smooth that map to get the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .inversion import Denoiser, draw_noises, sample
from .samplers import AffineStep, make_steps, noised

#: a prediction adjuster ``(x [B, C, H, W], denoised [B, C, H, W]) -> denoised``, applied once per sampler step
PredictionAdjuster = Callable[[Tensor, Tensor], Tensor]
#: ``pair_denoiser(x [B, C, H, W], sigma [B]) -> (D_source, D_target)``, the predictions under the two prompts
PairDenoiser = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

#: image pixels per latent pixel (SD1.5, SDXL, SD3, Flux VAEs)
LATENT_SCALE_FACTOR = 8


def latent_mask(mask: Tensor, latent_shape: Sequence[int]) -> Tensor:
    """A ComfyUI MASK (``[B, H, W]`` or ``[H, W]``, image resolution, 1 = edit) resized to a latent
    ``[B, C, h, w]`` the way ComfyUI resizes a ``noise_mask`` (``comfy.utils.reshape_mask``: bilinear interpolation
    to the latent size). Returns ``[B, 1, h, w]`` float32 on the mask's device (broadcasts over channels).

    The mask must hold one mask for all images or one per image, values in [0, 1], and an aspect ratio that fits
    the latent's (within one latent pixel); otherwise ``ValueError`` naming both shapes.
    """
    batch, _, height, width = latent_shape
    shape = list(mask.shape)
    pixels = f"{height * LATENT_SCALE_FACTOR}x{width * LATENT_SCALE_FACTOR}"
    latent_text = f"the latent being sampled is {list(latent_shape)} (images of {pixels} px)"
    if mask.ndim not in (2, 3) or mask.numel() == 0:
        raise ValueError(f"the mask has shape {shape} but {latent_text}; connect a MASK [batch, height, width] or [height, width].")
    if mask.ndim == 3 and mask.shape[0] not in (1, batch):
        raise ValueError(f"the mask has shape {shape} (batch {mask.shape[0]}) but {latent_text}; "
                         "use one mask for all images or one per image.")
    mask_height, mask_width = mask.shape[-2:]
    if abs(mask_height * width / mask_width - height) >= 1.0:
        raise ValueError(f"the mask has shape {shape} but {latent_text}: its size does not fit the image; "
                         "paint the mask on the image you encoded.")
    if not bool(((mask >= 0) & (mask <= 1)).all()):  # also refuses NaN; one read before any sampling
        raise ValueError(f"the mask (shape {shape}) has values outside [0, 1] or NaN; a MASK holds 0 (keep) to 1 (edit).")
    resized = F.interpolate(mask.reshape(-1, 1, mask_height, mask_width).float(), size=(height, width), mode="bilinear")
    return resized.expand(batch, -1, -1, -1) if resized.shape[0] == 1 else resized


def kept_prediction(step: AffineStep, x: Tensor, x_next: Tensor, noise: Tensor | None = None) -> Tensor:
    """Eq. (2): the prediction ``D`` with which ``step`` goes from ``x`` exactly to ``x_next`` (same shapes)."""
    if step.psi == 0.0:
        raise ValueError(f"step {step.sigma:g} -> {step.sigma_next:g} does not use the prediction (psi = 0); it cannot be steered")
    target = x_next - step.phi * x
    if step.is_stochastic:
        target = target - step.rho * noise
    return x - step.sigma * (target / step.psi)


def keep_outside_mask(steps: Sequence[AffineStep], trajectory: Tensor, mask: Tensor, noises: Tensor | None = None) -> PredictionAdjuster:
    """The prediction adjuster that makes ``steps`` follow ``trajectory`` outside ``mask`` (Eq. 1 via Eq. 2).

    steps: the run's affine steps, in sampling order (the sampler calls the model once per step, in order: the
        adjuster counts calls, so it reads nothing back from the device).
    trajectory: ``[S + 1, B, C, H, W]``, the photo's latent at the run's sigmas (``trajectory[i]`` at
        ``steps[i].sigma``, ``trajectory[-1]`` at the last ``sigma_next``).
    mask: ``[B, 1, H, W]`` (or broadcastable), 1 = edit, 0 = keep.
    noises: ``[S, B, C, H, W]``, the noises the sampler adds (needed for stochastic steps).
    Tensors are moved to the prediction's device and dtype at the first call, once.
    """
    if trajectory.shape[0] != len(steps) + 1:
        raise ValueError(f"the trajectory has {trajectory.shape[0]} latents for {len(steps)} steps; it needs {len(steps) + 1}")
    if any(step.is_stochastic for step in steps) and (noises is None or noises.shape[0] != len(steps)):
        raise ValueError(f"stochastic steps need their noises [{len(steps)}, B, C, H, W]")
    calls = 0
    moved: dict[str, Tensor] = {}

    def adjust(x: Tensor, denoised: Tensor) -> Tensor:
        nonlocal calls
        if calls >= len(steps):
            raise RuntimeError(
                f"the sampler evaluated the model more than once per step ({calls + 1} calls for {len(steps)} steps); "
                "masked sampling supports the one-evaluation samplers euler, ddim, euler_ancestral, lcm and ddpm"
            )
        if not moved:
            like = {"device": denoised.device, "dtype": denoised.dtype}
            moved.update(trajectory=trajectory.to(**like), edit=mask.to(**like), keep=(1 - mask).to(**like))
            if noises is not None:
                moved["noises"] = noises.to(**like)
        i, step = calls, steps[calls]
        calls += 1
        noise = moved["noises"][i] if step.is_stochastic else None
        keep = kept_prediction(step, x.to(denoised.dtype), moved["trajectory"][i + 1], noise)
        return moved["edit"] * denoised + moved["keep"] * keep

    return adjust


def with_adjusted_prediction(denoiser: Denoiser, adjust: PredictionAdjuster) -> Denoiser:
    """``denoiser`` whose every prediction goes through ``adjust(x, prediction)``."""
    return lambda x, sigma: adjust(x, denoiser(x, sigma))


def sample_masked(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    sampler: str,
    trajectory: Tensor,
    mask: Tensor,
    *,
    noises: Tensor | None = None,
    sampler_options: dict[str, float] | None = None,
    parameterization: str = "eps",
) -> Tensor:
    """:func:`renoise_core.sample` with the region where ``mask`` (``[B, 1, H, W]``, 1 = edit) is 0 following
    ``trajectory`` (``[S + 1, B, C, H, W]`` at ``sigmas``): the core of ReNoiseSampler's ``mask`` input."""
    steps = make_steps(sampler, sigmas, parameterization, **(sampler_options or {}))
    adjust = keep_outside_mask(steps, trajectory, mask, noises)
    return sample(with_adjusted_prediction(denoiser, adjust), x, sigmas, sampler, noises=noises,
                  sampler_options=sampler_options, parameterization=parameterization)


def draw_mask_noises(shape: Sequence[int], draws: int, seeds: Sequence[int]) -> Tensor:
    """``[draws, B, C, H, W]`` float32 CPU noises, item ``b`` from its own generator seeded ``seeds[b]`` (so an
    image gets the same draws alone or in a batch, on any device)."""
    noises, _ = draw_noises(shape, draws, seeds)
    return noises.flip(0)  # draw_noises fills from the last step up; draw 0 first


def prediction_difference(pair_denoiser: PairDenoiser, x0: Tensor, sigma: float, noises: Tensor,
                          parameterization: str = "eps", callback: Callable[[int], None] | None = None) -> Tensor:
    """DiffEdit's difference map: ``|eps_source - eps_target|`` averaged over channels and noise draws.

    x0: ``[B, C, h, w]`` the photo's latent (the sampler's space); sigma: the noise level; noises:
    ``[N, B, C, h, w]``, one draw per entry. ``eps_hat = (x - D) / sigma`` for both parameterisations, so the
    difference is ``|D_source - D_target| / sigma``. One ``pair_denoiser`` call per draw; ``callback(draws done)``
    after each. Returns ``[B, h, w]`` float32 (not normalised).
    """
    dtype = torch.promote_types(x0.dtype, torch.float32)
    x0 = x0.to(dtype)
    sigma_batch = torch.full((x0.shape[0],), sigma, device=x0.device, dtype=dtype)
    total = torch.zeros(x0.shape[0], *x0.shape[2:], device=x0.device, dtype=dtype)
    for n in range(noises.shape[0]):
        x = noised(x0, noises[n].to(x0), sigma, parameterization)
        source, target = pair_denoiser(x, sigma_batch)
        total = total + (source.to(dtype) - target.to(dtype)).abs().mean(1) / sigma
        if callback is not None:
            callback(n + 1)
    return (total / noises.shape[0]).float()


def normalise(difference: Tensor, quantile: float = 0.99) -> Tensor:
    """Each map of ``[B, h, w]`` to [0, 1]: minus its minimum, over its ``quantile`` value (DiffEdit removes
    extreme values before normalising), clipped. A constant map (the prompts agree everywhere) gives zeros."""
    flat = difference.flatten(1)
    low = flat.amin(1)
    high = torch.quantile(flat, quantile, dim=1)
    span = (high - low).view(-1, 1, 1)
    scaled = (difference - low.view(-1, 1, 1)) / span.clamp_min(torch.finfo(difference.dtype).tiny)
    return torch.where(span > 0, scaled.clamp(0.0, 1.0), torch.zeros_like(scaled))


def gaussian_blur(mask: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur of ``[B, H, W]`` with a ``2 * radius + 1`` kernel (std ``radius / 2``), edges
    replicated. ``radius = 0`` returns the input."""
    if radius <= 0:
        return mask
    offsets = torch.arange(-radius, radius + 1, device=mask.device, dtype=mask.dtype)
    kernel = torch.exp(-0.5 * (offsets / (radius / 2.0)) ** 2)
    kernel = kernel / kernel.sum()
    x = F.pad(mask.unsqueeze(1), (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def edit_mask(difference: Tensor, threshold: float = 0.5, blur: int = 0, scale: int = LATENT_SCALE_FACTOR) -> Tensor:
    """The MASK from a difference map ``[B, h, w]``: normalised to [0, 1], resized to image resolution
    (``scale`` x, bilinear), thresholded (1 where above ``threshold``), then smoothed by a Gaussian of ``blur``
    pixels. Returns ``[B, scale * h, scale * w]`` float32 in [0, 1]."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if blur < 0:
        raise ValueError(f"blur must be >= 0 pixels, got {blur}")
    normalised = normalise(difference.float())
    height, width = normalised.shape[-2:]
    upscaled = F.interpolate(normalised.unsqueeze(1), size=(height * scale, width * scale), mode="bilinear").squeeze(1)
    return gaussian_blur((upscaled > threshold).float(), blur)
