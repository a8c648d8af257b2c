"""Drives the real ComfyUI frontend in headless Chromium (Playwright) with this pack installed.

Used by ``scripts/make_thumbnails.py`` (template thumbnails, README screenshots) and by
``tests/integration/test_browser.py`` (``python scripts/comfy_browser.py check OUT.json``: loads every workflow and
writes what the frontend made of it). Runs with ComfyUI's Python, which needs ``pip install playwright``; the browser
is the system's Chromium (Debian: ``apt-get install chromium``), never a downloaded one.

The server runs from a temporary base directory (``--base-directory``): the pack is linked into its
``custom_nodes``, placeholder model files carry the workflows' file names (so the loaders' lists hold them), and
the ComfyUI checkout itself is not written to.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = PACK_DIR / "workflows"
PACK_NAME = "comfyui-renoise"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
WINDOW = (1920, 1080)
#: the pack's node types (what "caused by the pack" means for console messages)
PACK_NODE_TYPES = ("ReNoise", "EditFriendlyInvert", "NoiseCorrection", "EditLossConfig")


def workflow_names() -> list[str]:
    """Every UI-format workflow shipped in workflows/ (the template browser lists exactly these)."""
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_photo(size: int = 512):
    """A synthetic 'photo' for Load Image (no image files are shipped): sky, ground, sun, a bench."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (120, 170, 220))
    draw = ImageDraw.Draw(image)
    for y in range(size // 2):
        shade = int(220 - 60 * y / (size / 2))
        draw.line([(0, y), (size, y)], fill=(shade - 80, shade - 40, shade))
    draw.rectangle([0, size * 0.62, size, size], fill=(90, 130, 70))
    draw.ellipse([size * 0.7, size * 0.1, size * 0.88, size * 0.28], fill=(250, 220, 120))
    draw.rectangle([size * 0.2, size * 0.55, size * 0.8, size * 0.6], fill=(140, 95, 55))
    draw.rectangle([size * 0.25, size * 0.6, size * 0.28, size * 0.72], fill=(110, 75, 45))
    draw.rectangle([size * 0.72, size * 0.6, size * 0.75, size * 0.72], fill=(110, 75, 45))
    draw.ellipse([size * 0.4, size * 0.38, size * 0.56, size * 0.56], fill=(60, 60, 60))
    draw.ellipse([size * 0.43, size * 0.3, size * 0.53, size * 0.42], fill=(60, 60, 60))
    return image


def prepare_base_directory(base: Path, with_pack: bool = True) -> None:
    """custom_nodes/<pack> -> this checkout (unless ``with_pack`` is false: the baseline); placeholder models named
    as the workflows name them; an input image; settings that skip the first-run template dialog."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_NAME
    if with_pack and not link.exists():
        link.symlink_to(PACK_DIR, target_is_directory=True)
    for path in WORKFLOWS_DIR.glob("*.json"):
        for node in json.loads(path.read_text())["nodes"]:
            for value in node.get("widgets_values") or []:
                if isinstance(value, str) and value.endswith(".safetensors"):
                    folder = "loras" if node["type"] == "LoraLoader" else "checkpoints"
                    (base / "models" / folder).mkdir(parents=True, exist_ok=True)
                    (base / "models" / folder / value).touch()
    (base / "input").mkdir(exist_ok=True)
    example_photo().save(base / "input" / "example.png")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Validation.Workflows": True}))


@contextlib.contextmanager
def comfy_server(comfyui_path: Path, python: str | None = None, log_path: Path | None = None, with_pack: bool = True,
                 base_directory: Path | None = None, extra_args: tuple[str, ...] = ()):
    """Starts ``main.py --cpu`` on a free port of 127.0.0.1 from a base directory (``base_directory``, or a
    temporary one, removed afterwards); yields its URL. The link to the pack is removed afterwards."""
    base = base_directory or Path(tempfile.mkdtemp(prefix="renoise_browser_"))
    prepare_base_directory(base, with_pack)
    port = free_port()
    python = python or sys.executable
    log = open(log_path or base / "server.log", "w")  # noqa: SIM115
    process = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
         "--disable-auto-launch", *extra_args],
        cwd=comfyui_path, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {process.returncode}:\n{Path(log.name).read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/system_stats", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not answer in 240 s:\n{Path(log.name).read_text()[-4000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        if with_pack:
            (base / "custom_nodes" / PACK_NAME).unlink()
        if base_directory is None:
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def frontend(url: str):
    """A 1920 x 1080 page with the ComfyUI frontend loaded; yields (page, console), where console collects
    ``(kind, text)`` of every console error/warning and uncaught page error."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": WINDOW[0], "height": WINDOW[1]})
            console: list[tuple[str, str]] = []
            page.on("console", lambda m: console.append((m.type, f"{m.text} ({m.location.get('url', '')})"))
                    if m.type in ("error", "warning") else None)
            page.on("response", lambda r: console.append(("http", f"{r.status} {r.url}")) if r.status >= 400 else None)
            page.on("pageerror", lambda e: console.append(("pageerror", str(e))))
            page.goto(url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas && window.LiteGraph", timeout=120_000)
            page.wait_for_timeout(1500)
            yield page, console
        finally:
            browser.close()


LOAD_AND_MEASURE = """async ([workflow, name]) => {
  const app = window.app, LiteGraph = window.LiteGraph;
  const unknown = workflow.nodes.map(n => n.type).filter(t => !LiteGraph.registered_node_types[t]);
  await app.loadGraphData(structuredClone(workflow), true, true, name);
  await new Promise(r => setTimeout(r, 300));
  app.canvas.draw(true, true);
  const canvasRect = app.canvas.canvas.getBoundingClientRect();
  const ds = app.canvas.ds;
  const titleHeight = LiteGraph.NODE_TITLE_HEIGHT;
  const saved = app.graph.serialize();
  const nodes = app.graph._nodes.map(n => {
    const x0 = (n.pos[0] + ds.offset[0]) * ds.scale + canvasRect.left;
    const y0 = (n.pos[1] - titleHeight + ds.offset[1]) * ds.scale + canvasRect.top;
    const x1 = (n.pos[0] + n.size[0] + ds.offset[0]) * ds.scale + canvasRect.left;
    const y1 = (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale + canvasRect.top;
    const s = saved.nodes.find(m => m.id === n.id);
    // points of the node (corners of title and body, centre) where something else than the canvas is on top
    const points = [[x0 + 3, y0 + 3], [x1 - 3, y0 + 3], [x0 + 3, y1 - 3], [x1 - 3, y1 - 3], [(x0 + x1) / 2, (y0 + y1) / 2]];
    const onTop = (x, y) => document.elementFromPoint(x, y);
    const graphOnTop = (e) => e === app.canvas.canvas || (e && e.closest(".dom-widget"));
    const covered = points.filter(([x, y]) => !graphOnTop(onTop(x, y)))
      .map(([x, y]) => { const e = document.elementFromPoint(x, y); return [x, y, e ? e.tagName + "." + e.className : null]; });
    return {id: n.id, type: n.type, title: n.title, has_errors: !!n.has_errors, pos: [n.pos[0], n.pos[1]],
            size: [n.size[0], n.size[1]], min_size: Array.from(n.computeSize()), screen: [x0, y0, x1, y1],
            widgets_values: s ? s.widgets_values ?? null : null, covered};
  });
  return {unknown, scale: ds.scale, offset: [ds.offset[0], ds.offset[1]],
          canvas: [canvasRect.left, canvasRect.top, canvasRect.right, canvasRect.bottom],
          window: [window.innerWidth, window.innerHeight], nodes};
}"""


def load_workflow(page, name: str) -> dict:
    """Loads workflows/NAME.json through ``app.loadGraphData`` (the saved view applies) and measures the result:
    each node's screen rectangle (title bar included), its size and the frontend's minimum size, and the widget
    values as the frontend would save them."""
    workflow = json.loads((WORKFLOWS_DIR / f"{name}.json").read_text())
    return page.evaluate(LOAD_AND_MEASURE, [workflow, name])


def normalized(messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Console messages without the server's port (which differs between runs)."""
    import re

    return [(kind, re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1", text)) for kind, text in messages]


def check(out_path: Path) -> None:
    """Loads every workflow and writes, per workflow, the measurements and the console messages it caused; and
    the console messages at start-up with the pack and without it (the baseline: what ComfyUI logs anyway)."""
    comfyui_path = Path(os.environ["COMFYUI_PATH"]).resolve()
    results = {"workflows": {}}
    with comfy_server(comfyui_path, with_pack=False) as url, frontend(url) as (page, console):
        page.wait_for_timeout(1000)
        results["baseline_console"] = normalized(console)
    with comfy_server(comfyui_path) as url, frontend(url) as (page, console):
        page.wait_for_timeout(1000)
        results["startup_console"] = normalized(console)
        results["node_types"] = page.evaluate("() => Object.keys(window.LiteGraph.registered_node_types)")
        for name in workflow_names():
            console.clear()
            measured = load_workflow(page, name)
            page.wait_for_timeout(500)
            measured["console"] = normalized(console)
            results["workflows"][name] = measured
        with urllib.request.urlopen(url + "/api/workflow_templates", timeout=10) as response:
            results["templates"] = json.loads(response.read())
    out_path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "check":
        sys.exit("usage: COMFYUI_PATH=... python scripts/comfy_browser.py check OUT.json")
    check(Path(sys.argv[2]))
