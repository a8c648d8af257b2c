"""No host-device synchronisation inside the renoise loop, checked by construction: the number of Python-level
reads of tensor values (item, bool, float, tolist, cpu, numpy) an inversion makes does not grow with the number
of renoising iterations or steps. Each such read is a synchronisation on a GPU."""

import pytest
import torch
from support import EARLY_BELOW_SIGMA, schedule

from renoise_core import EditLossConfig, NoiseCorrectionConfig, ReNoiseConfig, invert

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.fixture
def count_reads(monkeypatch):
    counter = {"reads": 0, "active": False}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *args, __original=original, **kwargs):
            if counter["active"]:
                counter["reads"] += 1
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counter


def reads_during_inversion(counter, mixture, steps, renoise, **config):
    x0 = mixture.sample([1, 2], seed=0)
    denoiser = mixture.denoiser([1, 2])
    sigmas = schedule(steps)
    cfg = ReNoiseConfig(renoise_steps=renoise, average_start=max(0, renoise - 1), early_below_sigma=EARLY_BELOW_SIGMA, **config)
    counter["reads"], counter["active"] = 0, True
    try:
        invert(denoiser, x0, sigmas, "euler_ancestral", config=cfg, seed=1)
    finally:
        counter["active"] = False
    return counter["reads"]


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_reads_do_not_grow_with_renoising_or_steps(count_reads, mixture, solver):
    full = dict(edit_loss=EditLossConfig(), noise_correction=NoiseCorrectionConfig(), solver=solver)
    base = reads_during_inversion(count_reads, mixture, 4, 1, **full)
    assert reads_during_inversion(count_reads, mixture, 4, 9, **full) == base
    assert reads_during_inversion(count_reads, mixture, 12, 9, **full) <= base + 2 * (12 - 4)  # per-step diagnostics .cpu() at the end
    # the analytic denoiser makes none: every read is the engine's, outside the loop (schedule in, checks, results out)
    assert base < 20, base


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_adaptive_stopping_is_the_one_documented_read_per_evaluation(count_reads, mixture, solver):
    without = reads_during_inversion(count_reads, mixture, 4, 9, solver=solver)
    with_tol = reads_during_inversion(count_reads, mixture, 4, 9, convergence_tol=1e-12, solver=solver)  # never stops early
    assert with_tol - without == 3 * 9 + 4  # one check per evaluation after the first (9, 9, 9 and the early step's 4)
