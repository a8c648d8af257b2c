"""No host-device synchronisation inside the renoise loop, checked by construction: the number of Python-level
reads of tensor values (item, bool, float, tolist, cpu, numpy) an inversion makes does not grow with the number
of renoising iterations or steps. Each such read is a synchronisation on a GPU."""

import pytest
import torch
from support import EARLY_BELOW_SIGMA, schedule

from renoise_core import EditLossConfig, NoiseCorrectionConfig, ReNoiseConfig, invert
from renoise_core.multistep import anderson_solver, invert_multistep
from renoise_core.schedules import karras_schedule

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


@pytest.mark.parametrize("sampler, settings", [
    ("heun", dict(iterations=4)),
    ("dpmpp_2m", dict(sweeps=4, sweep_iterations=2)),
    ("dpmpp_2m_sde", dict(sweeps=2, noise_correction=NoiseCorrectionConfig(), edit_loss=EditLossConfig())),
])
def test_multistep_reads_do_not_grow_with_steps(count_reads, mixture, sampler, settings):
    """The second-order and multistep inversions (anderson on each step or over the sweeps): only the final
    finiteness check and the diagnostics read values, whatever the number of steps and evaluations."""
    x0 = mixture.sample([1, 2], seed=0)
    denoiser = mixture.denoiser([1, 2])

    def reads(steps, **changes):
        solver = anderson_solver()
        merged = dict(settings, **changes)
        count_reads["reads"], count_reads["active"] = 0, True
        try:
            invert_multistep(denoiser, x0, karras_schedule(steps), sampler, seed=1, solver=solver, sweep_solver=solver,
                             **merged)
        finally:
            count_reads["active"] = False
        return count_reads["reads"]

    base = reads(4)
    assert reads(12) == base and base < 20, base
    more = dict(iterations=6) if sampler == "heun" else dict(sweeps=settings["sweeps"] + 2)
    assert reads(4, **more) == base
