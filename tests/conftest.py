import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _load_pack_as_package(name: str = "renoise_pack"):
    """Import the pack the way ComfyUI does: its folder as a package (relative imports inside it resolve)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_load_pack_as_package()

from support import schedule  # noqa: E402

from renoise_core.analytic import GaussianMixture  # noqa: E402


@pytest.fixture(scope="session")
def mixture() -> GaussianMixture:
    return GaussianMixture.random(components=16, shape=(4, 16, 16), std=1.0, seed=0)


@pytest.fixture(scope="session")
def turbo_sigmas() -> torch.Tensor:
    """ComfyUI ``simple`` with 4 steps on the SD table: timesteps 999, 749, 499, 249."""
    return schedule(4)
