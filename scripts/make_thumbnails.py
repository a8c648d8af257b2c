"""Writes the template thumbnails (``workflows/NAME.jpg``) and the README's screenshots (``docs/``) from the real
ComfyUI frontend in headless Chromium:

    COMFYUI_PATH=../comfyui ../comfyui/.venv/bin/python scripts/make_thumbnails.py

(ComfyUI's Python with ``pip install playwright``; the system Chromium, see scripts/comfy_browser.py.)

A thumbnail shows what tells the workflows apart, as the frontend draws it: the model loaders (checkpoint, LoRA,
model sampling) above the top of the inversion node (its sampler settings), under a one-line description
(make_workflows.DESCRIPTIONS; the template browser itself shows only the file name). ``docs/workflow_NAME.jpg`` is
the whole window at the saved view of the first workflow (the quick start); ``docs/template_browser.jpg`` the
template browser.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_browser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
THUMBNAIL_SIZE = (512, 512)  # the template browser shows a 256 x 256 square
CAPTION_HEIGHT = 120
INVERSION_WIDGET_ROWS = 6  # of the inversion node: sampler, scheduler, steps, denoise, cfg, renoise steps / skip
BACKGROUND = (32, 32, 36)
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_workflows", ROOT / "scripts" / "make_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_workflows"] = module
    spec.loader.exec_module(module)
    return module


SHOW_NODE = """([id, margin]) => {
  const app = window.app, node = app.graph.getNodeById(id), ds = app.canvas.ds;
  const rect = app.canvas.canvas.getBoundingClientRect();
  const title = window.LiteGraph.NODE_TITLE_HEIGHT;
  ds.scale = 1;
  ds.offset[0] = margin - node.pos[0];
  ds.offset[1] = margin + title - node.pos[1];
  app.canvas.deselectAll?.();
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return [rect.left + margin - 2, rect.top + margin - 2, node.size[0] + 4, node.size[1] + title + 4];
}"""


def node_picture(page, node_id: int, max_height: float | None = None):
    """The node as the frontend draws it at 100 % zoom (a PIL image), its top ``max_height`` px if given."""
    import io

    from PIL import Image

    x, y, width, height = page.evaluate(SHOW_NODE, [node_id, 40])
    page.wait_for_timeout(150)
    height = min(height, max_height or height)
    png = page.screenshot(clip={"x": x, "y": y, "width": width, "height": height})
    return Image.open(io.BytesIO(png)).convert("RGB")


def distinguishing_nodes(workflow: dict) -> tuple[list[int], list[tuple[int, int]]]:
    """(model loaders, (inversion node, height of its title + sockets + first widgets)): the nodes whose settings
    differ between the workflows."""
    loaders = [n["id"] for n in workflow["nodes"] if "Loader" in n["type"] or n["type"].startswith("ModelSampling")]
    inversions = [(n["id"], 30 + 20 * max(len(n["inputs"]), len(n["outputs"])) + 24 * INVERSION_WIDGET_ROWS + 6)
                  for n in workflow["nodes"] if any(o["type"] == "RENOISE_INVERSION" for o in n["outputs"])]
    return loaders, inversions


def font(size: int):
    from PIL import ImageFont

    return ImageFont.truetype(FONT, size) if Path(FONT).exists() else ImageFont.load_default(size)


def wrap(text: str, width: float, size: int, draw) -> list[str]:
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if draw.textlength(candidate, font=font(size)) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines


def compose_thumbnail(caption: str, pictures: list):
    """Caption on top (two lines at most); the node pictures below, stacked, scaled to fit."""
    from PIL import Image, ImageDraw

    body = Image.new("RGB", (max(p.width for p in pictures), sum(p.height for p in pictures) + 12 * (len(pictures) - 1)), BACKGROUND)
    y = 0
    for p in pictures:
        body.paste(p, (0, y))
        y += p.height + 12
    area = (THUMBNAIL_SIZE[0] - 24, THUMBNAIL_SIZE[1] - CAPTION_HEIGHT - 16)
    scale = min(area[0] / body.width, area[1] / body.height)
    body = body.resize((round(body.width * scale), round(body.height * scale)), Image.LANCZOS)
    image = Image.new("RGB", THUMBNAIL_SIZE, BACKGROUND)
    image.paste(body, ((THUMBNAIL_SIZE[0] - body.width) // 2, CAPTION_HEIGHT + 4))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, THUMBNAIL_SIZE[0], CAPTION_HEIGHT - 8], fill=(20, 110, 120))
    size = 40
    while len(wrap(caption, THUMBNAIL_SIZE[0] - 32, size, draw)) > 2 and size > 16:
        size -= 1
    lines = wrap(caption, THUMBNAIL_SIZE[0] - 32, size, draw)
    top = (CAPTION_HEIGHT - 8 - len(lines) * size * 1.2) / 2
    for row, line in enumerate(lines):
        draw.text((16, top + row * size * 1.2), line, fill=(245, 245, 245), font=font(size))
    return image


def main() -> None:
    generator = load_generator()
    comfyui_path = Path(os.environ["COMFYUI_PATH"]).resolve()
    DOCS.mkdir(exist_ok=True)
    names = list(generator.WORKFLOWS)
    with comfy_browser.comfy_server(comfyui_path) as url, comfy_browser.frontend(url) as (page, _console):
        for name in names:
            workflow = json.loads((comfy_browser.WORKFLOWS_DIR / f"{name}.json").read_text())
            comfy_browser.load_workflow(page, name)
            page.wait_for_timeout(800)
            if name == names[0]:  # the quick start, shown in the README
                page.screenshot(path=str(DOCS / f"workflow_{name}.jpg"), type="jpeg", quality=85)
                print(f"wrote docs/workflow_{name}.jpg")
            loaders, inversions = distinguishing_nodes(workflow)
            pictures = [node_picture(page, i) for i in loaders] + [node_picture(page, i, height) for i, height in inversions]
            compose_thumbnail(generator.DESCRIPTIONS[name], pictures).save(comfy_browser.WORKFLOWS_DIR / f"{name}.jpg", quality=88)
            print(f"wrote workflows/{name}.jpg")
        page.evaluate("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        page.wait_for_timeout(1500)
        page.get_by_text(comfy_browser.PACK_NAME).first.click()
        page.wait_for_timeout(2000)
        page.screenshot(path=str(DOCS / "template_browser.jpg"), type="jpeg", quality=85)
        print("wrote docs/template_browser.jpg")


if __name__ == "__main__":
    main()
