import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from renoise_core.analytic import GaussianMixture  # noqa: E402
from renoise_core.schedules import sd_discrete_sigmas, sigma_at_timestep, simple_schedule  # noqa: E402

TRAINING_SIGMAS = sd_discrete_sigmas()
#: the reference's "timestep < 250" rule, in sigmas
EARLY_BELOW_SIGMA = sigma_at_timestep(TRAINING_SIGMAS, 250)


@pytest.fixture(scope="session")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(components=16, shape=(4, 16, 16), std=1.0, seed=0)


@pytest.fixture(scope="session")
def turbo_sigmas() -> torch.Tensor:
    """ComfyUI ``simple`` with 4 steps on the SD table: timesteps 999, 749, 499, 249."""
    return simple_schedule(TRAINING_SIGMAS, 4)


def schedule(steps: int) -> torch.Tensor:
    return simple_schedule(TRAINING_SIGMAS, steps)
