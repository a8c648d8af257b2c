"""The shipped workflows in the real ComfyUI frontend, in headless Chromium.

``scripts/comfy_browser.py check`` (run with ComfyUI's Python, which needs Playwright) starts ComfyUI on 127.0.0.1
from a temporary base directory with the pack linked in, loads every workflow through ``app.loadGraphData`` in a
1920 x 1080 window, and reports what the frontend made of it; a second server without the pack gives the console
messages ComfyUI logs anyway. Setup: README, 'Tests'.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "scripts" / "comfy_browser.py"
COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
NAMES = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
PACK_NAME = "comfyui-renoise"
#: nodes whose saved width may exceed the frontend's minimum to show a widget's value in full (file and sampler names)
VALUE_WIDGET_NODES = {"CheckpointLoaderSimple", "LoraLoader", "ReNoiseInvert", "EditFriendlyInvert", "KSamplerAdvanced"}


def comfy_python() -> str:
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    venv = Path(COMFYUI_PATH or "", ".venv", "bin", "python")
    return str(venv) if venv.exists() else sys.executable


def _missing() -> str | None:
    if not COMFYUI_PATH:
        return "COMFYUI_PATH is not set: the browser test needs a ComfyUI checkout (README, 'Tests')"
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; or set CHROMIUM)"
    probe = subprocess.run([comfy_python(), "-c", "import playwright.sync_api"], capture_output=True)
    if probe.returncode != 0:
        return f"Playwright is not installed in ComfyUI's Python ({comfy_python()} -m pip install playwright)"
    return None


MISSING = _missing()
pytestmark = [pytest.mark.integration, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]


@pytest.fixture(scope="module")
def frontend(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("browser") / "frontend.json"
    completed = subprocess.run([comfy_python(), str(DRIVER), "check", str(out)], capture_output=True, text=True, timeout=900,
                               env={**os.environ, "COMFYUI_PATH": COMFYUI_PATH, "CHROMIUM": CHROMIUM})
    assert completed.returncode == 0 and out.exists(), completed.stderr[-4000:]
    return json.loads(out.read_text())


def errors(messages) -> list:
    return [m for m in messages if m[0] in ("error", "pageerror", "http")]


def test_the_template_browser_lists_every_workflow(frontend):
    assert sorted(frontend["templates"][PACK_NAME]) == NAMES
    assert sorted(frontend["workflows"]) == NAMES


def test_the_pack_adds_no_console_errors_at_start_up(frontend):
    baseline = {tuple(m) for m in frontend["baseline_console"]}
    assert [m for m in errors(frontend["startup_console"]) if tuple(m) not in baseline] == []


@pytest.mark.parametrize("name", NAMES)
def test_every_node_type_is_known(frontend, name):
    loaded = frontend["workflows"][name]
    assert loaded["unknown"] == []
    assert [n["type"] for n in loaded["nodes"] if n["has_errors"]] == []


@pytest.mark.parametrize("name", NAMES)
def test_loading_logs_no_errors(frontend, name):
    assert errors(frontend["workflows"][name]["console"]) == []


@pytest.mark.parametrize("name", NAMES)
def test_every_node_is_on_screen_at_the_saved_view(frontend, name):
    loaded = frontend["workflows"][name]
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    assert loaded["scale"] == pytest.approx(workflow["extra"]["ds"]["scale"]) and loaded["scale"] >= 0.8
    left, top, right, bottom = loaded["canvas"]
    assert (right, bottom) == tuple(loaded["window"]) == (1920, 1080)
    for node in loaded["nodes"]:
        x0, y0, x1, y1 = node["screen"]
        assert left <= x0 and top <= y0 and x1 <= right and y1 <= bottom, (node["type"], node["title"], node["screen"])
        assert node["covered"] == [], (node["type"], node["title"], "under", node["covered"])


@pytest.mark.parametrize("name", NAMES)
def test_widget_values_are_the_files(frontend, name):
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
    loaded = {n["id"]: n for n in frontend["workflows"][name]["nodes"]}
    assert set(loaded) == {n["id"] for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        assert loaded[node["id"]]["widgets_values"] == node["widgets_values"], (node["type"], node.get("title"))


@pytest.mark.parametrize("name", NAMES)
def test_saved_sizes_fit_the_content(frontend, name):
    """At least the frontend's minimum (computeSize), and not much more: 50 px taller at most (the prompt boxes
    get three lines), 40 px wider unless a widget's value is shown in full."""
    for node in frontend["workflows"][name]["nodes"]:
        (width, height), (min_width, min_height) = node["size"], node["min_size"]
        what = (node["type"], node["title"], node["size"], [round(v) for v in node["min_size"]])
        assert width >= min_width - 0.5 and height >= min_height - 0.5, what
        assert height <= min_height + 50, what
        assert width <= (420 if node["type"] in VALUE_WIDGET_NODES else min_width + 40), what
