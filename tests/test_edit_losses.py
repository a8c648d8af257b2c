"""Editability losses: reference formulas, per-item behaviour, decrease under their own gradient steps."""

import numpy as np
import torch
import torch.nn.functional as F

from renoise_core.edit_losses import (
    EditLossConfig,
    draw_rolls,
    pair_loss,
    patch_kl_loss,
    pyramid_sizes,
    regularize_noise_prediction,
)


def release_patch_kl(x0, x1, patch_size=4, num_channels=4):
    """The reference release's patchify_latents_kl_divergence (batch 1), transcribed."""
    def patchify(t):
        p = t.unfold(1, patch_size, patch_size).unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
        return p.contiguous().view(-1, num_channels, patch_size, patch_size)

    a, b = patchify(x0), patchify(x1)
    a, b = a.view(a.shape[0], a.shape[1], -1), b.view(b.shape[0], b.shape[1], -1)
    m0, m1, v0, v1 = a.mean(-1), b.mean(-1), a.var(-1), b.var(-1)
    kl = torch.log((v1 + 1e-6) / (v0 + 1e-6)) + (v0 + (m0 - m1) ** 2) / (v1 + 1e-6) - 1
    return kl.abs().sum(-1).sum()


def release_pair_loss(x, rolls):
    """pix2pix-zero auto_corr_loss for one item with given per-(level, channel) rolls, transcribed."""
    loss = 0.0
    for c in range(x.shape[1]):
        noise = x[0, c][None, None]
        level = 0
        while True:
            r = int(rolls[level, c])
            loss += torch.mean(noise * torch.roll(noise, shifts=r, dims=2)) ** 2
            loss += torch.mean(noise * torch.roll(noise, shifts=r, dims=3)) ** 2
            if noise.shape[2] <= 8:
                break
            noise = F.avg_pool2d(noise, kernel_size=2)
            level += 1
    return loss


def test_patch_kl_matches_release():
    g = torch.Generator().manual_seed(0)
    eps, ref = torch.randn((1, 4, 16, 24), generator=g), torch.randn((1, 4, 16, 24), generator=g) * 1.3
    assert torch.allclose(patch_kl_loss(eps, ref)[0], release_patch_kl(eps, ref), rtol=1e-5)


def test_pair_loss_matches_release_and_is_per_item():
    g = torch.Generator().manual_seed(0)
    eps = torch.randn((2, 4, 32, 40), generator=g)
    rng = np.random.default_rng(0)
    rolls = np.stack([draw_rolls(rng, 32, 4, 1)[0] for _ in range(2)], axis=1)  # [levels, B, C]
    assert rolls.shape == (len(pyramid_sizes(32)), 2, 4)
    ours = pair_loss(eps, torch.from_numpy(rolls))
    for b in range(2):
        assert torch.allclose(ours[b], release_pair_loss(eps[b : b + 1], rolls[:, b]), rtol=1e-5)


def test_pyramid_sizes():
    assert pyramid_sizes(128) == [128, 64, 32, 16, 8]
    assert pyramid_sizes(8) == [8]
    assert pyramid_sizes(20) == [20, 10, 5]


def _correlated_noise(shape, seed):
    g = torch.Generator().manual_seed(seed)
    n = torch.randn(shape, generator=g)
    return n + 0.8 * torch.roll(n, 1, dims=2) + 0.8 * torch.roll(n, 1, dims=3) + 0.5  # correlated, off-mean


def test_losses_decrease_under_regularisation():
    eps = _correlated_noise((2, 4, 32, 32), 0)
    ref = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(1))
    config = EditLossConfig()
    rng = np.random.default_rng(0)
    count = config.reg_steps * config.ac_rolls
    rolls = torch.from_numpy(np.stack([draw_rolls(rng, 32, 4, count) for _ in range(2)], axis=-2)).view(
        config.reg_steps, config.ac_rolls, len(pyramid_sizes(32)), 2, 4
    )
    out = regularize_noise_prediction(eps, ref, rolls, config)
    fixed_rolls = rolls[0, 0]
    assert (patch_kl_loss(out, ref) < patch_kl_loss(eps, ref)).all()
    assert (pair_loss(out, fixed_rolls) < pair_loss(eps, fixed_rolls)).all()
    assert out.shape == eps.shape and not torch.equal(out, eps)


def test_regularisation_under_inference_mode_leaves_input_alone():
    eps = _correlated_noise((1, 4, 16, 16), 2)
    ref = torch.randn((1, 4, 16, 16))
    rolls = torch.zeros((4, 5, len(pyramid_sizes(16)), 1, 4), dtype=torch.long) + 1
    expected = regularize_noise_prediction(eps, ref, rolls, EditLossConfig())
    with torch.inference_mode():
        eps_inf, ref_inf = eps.clone(), ref.clone()
        before = eps_inf.clone()
        out = regularize_noise_prediction(eps_inf, ref_inf, rolls, EditLossConfig())
        assert torch.equal(eps_inf, before)
    assert torch.allclose(out, expected)


def test_bad_edit_loss_config():
    import pytest

    with pytest.raises(ValueError, match="lambda_kl"):
        EditLossConfig(lambda_kl=-1)
    with pytest.raises(ValueError, match="patch_size"):
        EditLossConfig(patch_size=0)
