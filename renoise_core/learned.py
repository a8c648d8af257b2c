"""A small learned denoiser: a conditional conv net trained on the spectral Gaussian mixture, shipped as weights.

The exact analytic models (:mod:`renoise_core.analytic`) have smooth step maps; a real network's Jacobian is
rough. This network is the pack's real-network test model: trained by ``scripts/train_learned_denoiser.py`` on
samples of ``SpectralMixture.random(components=16, shape=(4, 32, 32), within=1.0, alpha=2.0, seed=0)``, it is
driven exactly like :meth:`MixtureModel.denoiser` (the "prompt" is a class prior ``[B, K]``), and its error
against the exact posterior mean is measured in ``tests/test_learned.py``.

Units: k-diffusion eps units, ``x = x0 + sigma * eps`` with ``x`` ``[B, 4, H, W]`` and ``sigma`` ``[B]``.
EDM preconditioning (Karras et al. 2022), ``sigma_data`` the data's pixel std:

    D(x, sigma) = c_skip x + c_out F(c_in x, c_noise, prior)
    c_in = 1 / sqrt(sigma^2 + sigma_data^2), c_skip = sigma_data^2 / (sigma^2 + sigma_data^2),
    c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2), c_noise = log(sigma) / 4

``F`` is a two-level UNet (32 and 64 channels, GroupNorm, SiLU) whose residual blocks are modulated (FiLM) by an
embedding of ``c_noise`` plus a class embedding. The class enters through a "class memory", the network's
counterpart of cross-attention to a prompt: ``K`` learned templates ``T_k`` ``[4, H, W]`` and attention weights

    r = softmax(log prior + a(sigma) <c_in x, T_k> + b(sigma) ||T_k||^2)

with ``a = s exp(m_a(sigma))``, ``b = -s^2 exp(m_b(sigma)) / 2``, ``s = sigma_data c_in`` and ``m_a``, ``m_b``
learned from the noise embedding. They start at zero, where (for templates ``mu_k / sigma_data``) the logits are
those of an isotropic Gaussian mixture of variance ``sigma_data^2`` per component: the logits are preconditioned
like the output. The net sees the prior-and-evidence-weighted template ``sum_k r_k T_k`` as extra input channels
and ``sum_k r_k E_k`` as its class embedding. A soft prior (the
uniform prior for unconditional prediction) works like a one-hot one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_WEIGHTS = Path(__file__).with_name("data") / "learned_denoiser.safetensors"


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with FiLM (scale, shift) from the embedding after the first conv."""

    def __init__(self, channels_in: int, channels_out: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * channels_out)
        self.norm2 = nn.GroupNorm(8, channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1)
        self.skip = nn.Conv2d(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        out = self.conv1(F.silu(self.norm1(h)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        out = self.norm2(out) * (1 + scale) + shift
        out = self.conv2(F.silu(out))
        return self.skip(h) + out


class DenoiserNet(nn.Module):
    """``F(c_in x, c_noise, prior)``: ``[B, C, H, W]``, ``[B]``, ``[B, K]`` -> ``[B, C, H, W]`` (H, W multiples of 4).

    The latent is folded 2x2 into channels (pixel unshuffle) and processed at H/2 (``width1`` channels) and H/4
    (``width2`` channels); a skip joins the two levels.
    """

    def __init__(self, channels: int = 4, height: int = 32, width: int = 32, num_classes: int = 16,
                 width1: int = 32, width2: int = 64, emb_dim: int = 128, fold: int = 2, sigma_data: float = 1.0):
        super().__init__()
        self.config = dict(channels=channels, height=height, width=width, num_classes=num_classes,
                           width1=width1, width2=width2, emb_dim=emb_dim, fold=fold, sigma_data=sigma_data)
        self.fold, self.sigma_data = fold, sigma_data
        self.templates = nn.Parameter(torch.zeros(num_classes, channels, height, width))
        self.class_emb = nn.Parameter(torch.zeros(num_classes, emb_dim))
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(64.0), emb_dim // 2)), persistent=False)
        self.noise_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.match = nn.Linear(emb_dim, 2)  # log a(sigma), log b(sigma) relative to the Gaussian values (below)
        nn.init.zeros_(self.match.weight)
        nn.init.zeros_(self.match.bias)
        self.emb_out = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(2 * fold * fold * channels, width1, 3, padding=1)
        self.down1 = ResBlock(width1, width1, emb_dim)
        self.downsample = nn.Conv2d(width1, width2, 3, stride=2, padding=1)
        self.mid1 = ResBlock(width2, width2, emb_dim)
        self.mid2 = ResBlock(width2, width2, emb_dim)
        self.upsample = nn.ConvTranspose2d(width2, width1, 2, stride=2)
        self.up1 = ResBlock(width1, width1, emb_dim)
        self.norm_out = nn.GroupNorm(8, width1)
        self.conv_out = nn.Conv2d(width1, fold * fold * channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_in: Tensor, c_noise: Tensor, prior: Tensor) -> Tensor:
        angles = c_noise[:, None] * self.freqs[None, :]
        noise_emb = self.noise_mlp(torch.cat([angles.sin(), angles.cos()], dim=1))
        # class memory: attention over the templates, logits = log prior + learned match score
        scale = self.sigma_data / torch.sqrt(torch.exp(8 * c_noise) + self.sigma_data**2)  # sigma_data c_in
        log_a, log_b = self.match(noise_emb).clamp(max=10.0).unbind(1)
        a, b = scale * log_a.exp(), -0.5 * scale**2 * log_b.exp()
        dots = x_in.flatten(1) @ self.templates.flatten(1).T  # [B, K]
        norms = self.templates.flatten(1).pow(2).sum(1)  # [K]
        logits = prior.clamp_min(1e-8).log() + a[:, None] * dots + b[:, None] * norms[None, :]
        weights = torch.softmax(logits, dim=1)
        template = torch.einsum("bk,kchw->bchw", weights, self.templates)
        emb = self.emb_out(noise_emb + weights @ self.class_emb)

        h_in = F.pixel_unshuffle(torch.cat([x_in, template], dim=1), self.fold)
        h1 = self.down1(self.conv_in(h_in), emb)
        h2 = self.mid2(self.mid1(self.downsample(F.silu(h1)), emb), emb)
        h = self.up1(h1 + self.upsample(h2), emb)
        return F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), 2)


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` ``[B]``; the first three shaped ``[B, 1, 1, 1]``."""
    s = sigma.view(-1, 1, 1, 1)
    total = s**2 + sigma_data**2
    return sigma_data**2 / total, s * sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4


class LearnedDenoiser:
    """The trained network with its preconditioning, driven like :class:`~renoise_core.analytic.MixtureModel`.

    ``denoise(x, sigma, prior)`` is ``D(x, sigma)`` for ``x`` ``[B, C, H, W]`` (any float dtype, any device: the
    net is copied once per device and dtype), ``sigma`` ``[B]`` and ``prior`` ``[b, K]`` (repeated to B).
    """

    def __init__(self, net: DenoiserNet, sigma_data: float, metadata: dict[str, str] | None = None):
        self.net = net.eval().requires_grad_(False)
        self.sigma_data = float(sigma_data)
        self.metadata = dict(metadata or {})
        self._copies: dict[tuple[torch.device, torch.dtype], DenoiserNet] = {}

    @property
    def num_components(self) -> int:
        return self.net.config["num_classes"]

    def prior(self, classes: Tensor | list[int] | None, confidence: float = 0.98) -> Tensor:
        """Class prior ``[B, K]`` as :meth:`MixtureModel.prior` builds it (None: the uniform prior)."""
        k = self.num_components
        if classes is None:
            return torch.full((1, k), 1.0 / k, dtype=torch.float64)
        classes = torch.as_tensor(classes).long().view(-1)
        prior = torch.full((len(classes), k), (1.0 - confidence) / (k - 1), dtype=torch.float64)
        prior[torch.arange(len(classes)), classes] = confidence
        return prior

    def _net_for(self, device: torch.device, dtype: torch.dtype) -> DenoiserNet:
        if next(self.net.parameters()).device == device and self.net.templates.dtype == dtype:
            return self.net
        key = (device, dtype)
        if key not in self._copies:
            with torch.inference_mode(False), torch.no_grad():
                copy = DenoiserNet(**self.net.config)
                copy.load_state_dict(self.net.state_dict())
                self._copies[key] = copy.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return self._copies[key]

    def denoise(self, x: Tensor, sigma: Tensor, prior: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32) if x.device.type == "cpu" and x.dtype == torch.float16 else x.dtype
        net = self._net_for(x.device, dtype)
        sigma = sigma.to(device=x.device, dtype=dtype).view(-1).expand(x.shape[0])
        prior = prior.to(device=x.device, dtype=dtype)
        prior = prior.repeat((math.ceil(x.shape[0] / prior.shape[0]), 1))[: x.shape[0]]
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        xd = x.to(dtype)
        return (c_skip * xd + c_out * net(c_in * xd, c_noise, prior)).to(x.dtype)

    def denoiser(self, classes: Tensor | list[int] | None = None, cfg: float = 1.0, uncond_classes=None):
        """``D(x, sigma)`` conditioned on ``classes``; with ``cfg != 1`` classifier-free guided against
        ``uncond_classes`` (None: the uniform prior), exactly as :meth:`MixtureModel.denoiser`."""
        cond = self.prior(classes)
        uncond = self.prior(uncond_classes)

        def denoise(x: Tensor, sigma: Tensor) -> Tensor:
            positive = self.denoise(x, sigma, cond)
            if cfg == 1.0:
                return positive
            negative = self.denoise(x, sigma, uncond)
            return negative + cfg * (positive - negative)

        return denoise


def save_learned_denoiser(model: LearnedDenoiser, path: str | Path, metadata: dict[str, str], half: bool = False) -> None:
    """Write the weights (float32, or float16 with ``half``) and the config with ``metadata`` as safetensors."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in model.net.state_dict().items() if name != "freqs"}
    if half:
        tensors = {name: t.half() for name, t in tensors.items()}
    meta = dict(metadata, config=json.dumps(model.net.config), sigma_data=repr(model.sigma_data))
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})


def load_learned_denoiser(path: str | Path | None = None) -> LearnedDenoiser:
    """Load the shipped weights (``renoise_core/data/learned_denoiser.safetensors``) or ``path``; float32, CPU."""
    from safetensors import safe_open

    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no learned-denoiser weights at {path}: run scripts/train_learned_denoiser.py --out {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name).float() for name in f.keys()}
    net = DenoiserNet(**json.loads(metadata["config"]))
    net.load_state_dict(tensors, strict=False)
    missing = set(net.state_dict()) - set(tensors) - {"freqs"}
    if missing:
        raise ValueError(f"{path} lacks weights {sorted(missing)}: not a learned-denoiser file of this version")
    return LearnedDenoiser(net, float(metadata["sigma_data"]), metadata)
