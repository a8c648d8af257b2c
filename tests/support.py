"""Shared test helpers (imported as ``support``: pytest puts ``tests/`` on sys.path)."""

import torch

from renoise_core.schedules import sd_discrete_sigmas, sigma_at_timestep, simple_schedule

TRAINING_SIGMAS = sd_discrete_sigmas()
#: the reference's "timestep < 250" rule, in sigmas
EARLY_BELOW_SIGMA = sigma_at_timestep(TRAINING_SIGMAS, 250)


def schedule(steps: int) -> torch.Tensor:
    """ComfyUI ``simple`` on the SD sigma table."""
    return simple_schedule(TRAINING_SIGMAS, steps)
