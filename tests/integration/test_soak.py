"""A long-running ComfyUI: many inversions in one process, a cancelled one, and two prompts queued at once.

Slow (a few minutes on 2 CPU cores); deselect with ``-m "not slow"``. Runs with ``COMFYUI_PATH`` (README, 'Tests'):
the soak and the cancel in ``comfy_harness.py`` subprocesses, the queue through the HTTP API of a real ComfyUI
server (``main.py``) with the pack and the harness's analytic model installed as custom nodes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("comfy_harness.py")
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH is not set: the soak test needs a ComfyUI checkout (README, 'Tests')"),
]


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFYUI_PATH or "", ".venv", "bin", "python")
    return str(venv) if venv.exists() else sys.executable


def run_scenario(name: str, workdir: Path) -> dict:
    completed = subprocess.run([comfy_python(), str(HARNESS), name, str(workdir)], capture_output=True, text=True, timeout=1200,
                               env={**os.environ, "COMFYUI_PATH": COMFYUI_PATH})
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, f"harness printed no results (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
    results = json.loads(lines[-1][len("RESULTS "):])
    assert "harness_error" not in results, results["harness_error"]
    return results


@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> dict:
    return run_scenario("soak", tmp_path_factory.mktemp("soak"))


def test_200_inversions_and_edits_all_succeed(soak):
    assert soak["runs"] == 200 and soak["failure_count"] == 0, soak["failures"]
    assert all(c["probe_ok"] for c in soak["checkpoints"])


def test_live_tensors_and_loaded_models_stay_flat(soak):
    """Counted after the same probe prompt every 20 runs: a tensor kept per run would add 180 by the end."""
    first, *rest = soak["checkpoints"]
    assert max(c["tensors"] for c in rest) <= first["tensors"] + 2, soak["checkpoints"]
    assert {c["loaded_models"] for c in soak["checkpoints"]} == {first["loaded_models"]}


def test_resident_memory_stays_flat(soak):
    """From run 20 (caches warm) to run 200: growth under 16 MB, and the second half grows no faster than the first."""
    by_run = {c["run"]: c["rss_mb"] for c in soak["checkpoints"]}
    assert by_run[200] - by_run[20] < 16, soak["checkpoints"]
    assert by_run[200] - by_run[100] <= by_run[100] - by_run[20] + 2, soak["checkpoints"]


def test_a_cancelled_inversion_leaves_nothing_behind(soak, tmp_path):
    """Cancelled mid-way (ComfyUI's interrupt), then run again in the same process: bit-identical to the same
    prompt run in a fresh process."""
    assert soak["cancelled"]["interrupted"] and not soak["cancelled"]["success"]
    assert soak["again"]["success"], soak["again"]
    reference = run_scenario("cancel_reference", tmp_path)
    assert reference["result"]["success"], reference["result"]
    assert set(soak["after_cancel"]) == {"inverted", "reconstruction"}
    assert soak["after_cancel"] == reference["digests"]


# --- two prompts queued at once through the HTTP API -------------------------------------------------------------

def _load_driver():
    spec = importlib.util.spec_from_file_location("comfy_browser", ROOT / "scripts" / "comfy_browser.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ANALYTIC_NODES_SHIM = """import sys
sys.path.insert(0, {harness_dir!r})
from comfy_harness import TEST_NODES as NODE_CLASS_MAPPINGS  # noqa: E402
"""


def inversion_prompt(prefix: str, *, sampler: str, renoise_steps: int, classes: str, edit_class: int, height: int, width: int,
                     noise_correction: bool) -> dict:
    """Analytic model -> ReNoiseInvert -> ReNoiseSampler + SamplerCustom (an edit) -> SaveLatent (inverted and edited)."""
    prompt = {
        "1": {"class_type": "AnalyticModel", "inputs": {"prediction": "eps"}},
        "2": {"class_type": "ClassConditioning", "inputs": {"class_index": int(classes.split(",")[0]), "context_dim": 768}},
        "3": {"class_type": "ClassConditioning", "inputs": {"class_index": -1, "context_dim": 768}},
        "4": {"class_type": "AnalyticLatent", "inputs": {"classes": classes, "seed": 1, "height": height, "width": width}},
        "5": {"class_type": "ClassConditioning", "inputs": {"class_index": edit_class, "context_dim": 768}},
        "6": {"class_type": "ReNoiseInvert", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "sampler_name": sampler,
            "scheduler": "simple", "steps": 4, "denoise": 1.0, "cfg": 1.0, "renoise_steps": renoise_steps, "seed": 7865}},
        "7": {"class_type": "ReNoiseSampler", "inputs": {"inversion": ["6", 1]}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["5", 0], "negative": ["3", 0],
            "sampler": ["7", 0], "sigmas": ["6", 2], "latent_image": ["6", 0]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"{prefix}_inverted"}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["8", 0], "filename_prefix": f"{prefix}_edited"}},
    }
    if noise_correction:
        prompt["11"] = {"class_type": "NoiseCorrection", "inputs": {"mode": "optimize", "steps": 10, "step_size": 1.8}}
        prompt["6"]["inputs"]["noise_correction"] = ["11", 0]
    return prompt


INVERSIONS = {
    "a": dict(sampler="euler_ancestral", renoise_steps=9, classes="3", edit_class=9, height=16, width=16, noise_correction=True),
    "b": dict(sampler="ddim", renoise_steps=3, classes="5,6", edit_class=1, height=12, width=20, noise_correction=False),
}


def post(url: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_for(url: str, prompt_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=30) as response:
            history = json.loads(response.read())
        if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
            return history[prompt_id]
        time.sleep(0.2)
    raise TimeoutError(prompt_id)


def saved_latents(output: Path, prefix: str) -> dict:
    from safetensors.torch import load_file

    return {kind: load_file(next(output.glob(f"{prefix}_{kind}_*.latent")))["latent_tensor"] for kind in ("inverted", "edited")}


def test_two_prompts_queued_at_once_give_what_each_gives_alone(tmp_path):
    driver = _load_driver()
    base = tmp_path / "comfy"
    shim = base / "custom_nodes" / "renoise_analytic_test_nodes"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(ANALYTIC_NODES_SHIM.format(harness_dir=str(HARNESS.parent)))
    with driver.comfy_server(Path(COMFYUI_PATH), python=comfy_python(), base_directory=base, extra_args=("--cache-none",)) as url:
        for name, settings in INVERSIONS.items():  # one after the other
            prompt_id = post(url, "/prompt", {"prompt": inversion_prompt(f"alone_{name}", **settings)})["prompt_id"]
            assert wait_for(url, prompt_id)["status"]["status_str"] == "success"
        ids, barrier = {}, threading.Barrier(len(INVERSIONS))

        def queue(name):
            barrier.wait()
            ids[name] = post(url, "/prompt", {"prompt": inversion_prompt(f"together_{name}", **INVERSIONS[name])})["prompt_id"]

        threads = [threading.Thread(target=queue, args=(name,)) for name in INVERSIONS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name in INVERSIONS:
            assert wait_for(url, ids[name])["status"]["status_str"] == "success"
    output = base / "output"
    for name in INVERSIONS:
        alone, together = saved_latents(output, f"alone_{name}"), saved_latents(output, f"together_{name}")
        for kind in ("inverted", "edited"):
            assert alone[kind].shape[0] == len(INVERSIONS[name]["classes"].split(","))
            assert alone[kind].dtype == together[kind].dtype and (alone[kind] == together[kind]).all(), (name, kind)
    a, b = saved_latents(output, "alone_a"), saved_latents(output, "alone_b")
    assert a["inverted"].shape != b["inverted"].shape  # two different inversions
