"""Writes the example workflows in ``workflows/``: each graph is defined once here and written twice, in ComfyUI's
UI format (``NAME.json``, what artists drag into ComfyUI; the template browser lists it) and in the API format
(``api/NAME.json``, for headless ``/prompt`` use; in a subfolder so the template browser does not list it).
Run ``python scripts/make_workflows.py`` after changing a graph; ``tests/test_workflows.py`` checks the files are
what this script writes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parents[1] / "workflows"

# Socket layout of every node type used: inputs in INPUT_TYPES order as (name, type), where type "WIDGET" is a
# widget ("SEED" a widget followed by its control_after_generate value, "IMAGE_UPLOAD" one followed by the upload
# button's value), and outputs as (name, type). Our nodes are checked against their INPUT_TYPES by the tests, the
# core ones against a real ComfyUI by the integration tests.
NODE_SPECS: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]] = {
    "CheckpointLoaderSimple": ([("ckpt_name", "WIDGET")], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP"), ("lora_name", "WIDGET"), ("strength_model", "WIDGET"),
                    ("strength_clip", "WIDGET")], [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "ModelSamplingDiscrete": ([("model", "MODEL"), ("sampling", "WIDGET"), ("zsnr", "WIDGET")], [("MODEL", "MODEL")]),
    "CLIPTextEncode": ([("text", "WIDGET"), ("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")]),
    "LoadImage": ([("image", "IMAGE_UPLOAD")], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "ImageScale": ([("image", "IMAGE"), ("upscale_method", "WIDGET"), ("width", "WIDGET"), ("height", "WIDGET"),
                    ("crop", "WIDGET")], [("IMAGE", "IMAGE")]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")]),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE"), ("filename_prefix", "WIDGET")], []),
    "KSamplerAdvanced": ([("model", "MODEL"), ("add_noise", "WIDGET"), ("noise_seed", "SEED"), ("steps", "WIDGET"),
                          ("cfg", "WIDGET"), ("sampler_name", "WIDGET"), ("scheduler", "WIDGET"), ("positive", "CONDITIONING"),
                          ("negative", "CONDITIONING"), ("latent_image", "LATENT"), ("start_at_step", "WIDGET"),
                          ("end_at_step", "WIDGET"), ("return_with_leftover_noise", "WIDGET")], [("LATENT", "LATENT")]),
    "SamplerCustom": ([("model", "MODEL"), ("add_noise", "WIDGET"), ("noise_seed", "SEED"), ("cfg", "WIDGET"),
                       ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                       ("latent_image", "LATENT")], [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "ReNoiseInvert": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT"),
                       ("sampler_name", "WIDGET"), ("scheduler", "WIDGET"), ("steps", "WIDGET"), ("denoise", "WIDGET"),
                       ("cfg", "WIDGET"), ("renoise_steps", "WIDGET"), ("seed", "SEED"), ("solver", "RENOISE_SOLVER"),
                       ("edit_loss", "EDIT_LOSS_CONFIG"), ("noise_correction", "NOISE_CORRECTION"), ("sigmas", "SIGMAS"),
                       ("eta", "WIDGET"), ("s_noise", "WIDGET")],
                      [("latent", "LATENT"), ("inversion", "RENOISE_INVERSION"), ("sigmas", "SIGMAS")]),
    "ReNoiseSolver": ([("method", "WIDGET"), ("history", "WIDGET"), ("average_start", "WIDGET"), ("first_step_below_timestep", "WIDGET"),
                       ("first_step_renoise_steps", "WIDGET"), ("first_step_average_start", "WIDGET"), ("convergence_tol", "WIDGET")],
                      [("solver", "RENOISE_SOLVER")]),
    "EditFriendlyInvert": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                            ("latent_image", "LATENT"), ("sampler_name", "WIDGET"), ("scheduler", "WIDGET"), ("steps", "WIDGET"),
                            ("denoise", "WIDGET"), ("cfg", "WIDGET"), ("skip", "WIDGET"), ("seed", "SEED"), ("sigmas", "SIGMAS"),
                            ("eta", "WIDGET"), ("s_noise", "WIDGET")],
                           [("latent", "LATENT"), ("inversion", "RENOISE_INVERSION"), ("sigmas", "SIGMAS")]),
    "ReNoiseSampler": ([("inversion", "RENOISE_INVERSION"), ("mask", "MASK")], [("SAMPLER", "SAMPLER")]),
    "ReNoiseEditMask": ([("model", "MODEL"), ("latent_image", "LATENT"), ("source", "CONDITIONING"), ("target", "CONDITIONING"),
                         ("seed", "SEED"), ("noise_level", "WIDGET"), ("samples", "WIDGET"), ("threshold", "WIDGET"),
                         ("blur", "WIDGET")], [("mask", "MASK")]),
    "MaskToImage": ([("mask", "MASK")], [("IMAGE", "IMAGE")]),
    "ImageToMask": ([("image", "IMAGE"), ("channel", "WIDGET")], [("MASK", "MASK")]),
    "PreviewImage": ([("images", "IMAGE")], []),
    "NoiseCorrection": ([("mode", "WIDGET"), ("steps", "WIDGET"), ("step_size", "WIDGET")], [("noise_correction", "NOISE_CORRECTION")]),
    "EditLossConfig": ([("lambda_ac", "WIDGET"), ("lambda_kl", "WIDGET"), ("reg_steps", "WIDGET"), ("ac_rolls", "WIDGET"),
                        ("patch_size", "WIDGET")], [("edit_loss", "EDIT_LOSS_CONFIG")]),
}

WIDGET_KINDS = ("WIDGET", "SEED", "IMAGE_UPLOAD")

#: ReNoiseInvert's optional widgets at their defaults
RENOISE_DEFAULTS = {"eta": 1.0, "s_noise": 1.0}


@dataclass
class Node:
    id: int
    type: str
    values: dict = field(default_factory=dict)  # widget name -> value, socket name -> (Node, output name)
    title: str | None = None


class Graph:
    def __init__(self):
        self.nodes: list[Node] = []

    def add(self, type_: str, pos: tuple[int, int] | None = None, title: str | None = None, **values) -> Node:
        """Adds a node. ``pos`` is ignored (kept so that graph definitions written with positions still run):
        ``layout`` places every node."""
        inputs = dict(NODE_SPECS[type_][0])
        unknown = set(values) - set(inputs)
        if unknown:
            raise KeyError(f"{type_} has no input(s) {sorted(unknown)}")
        node = Node(len(self.nodes) + 1, type_, values, title)
        self.nodes.append(node)
        return node

    # --- API format ---
    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            inputs = {}
            for name, kind in NODE_SPECS[node.type][0]:
                if name not in node.values:
                    continue
                value = node.values[name]
                if kind in WIDGET_KINDS:
                    inputs[name] = value
                else:
                    source, output = value
                    inputs[name] = [str(source.id), _output_index(source, output)]
            prompt[str(node.id)] = {"class_type": node.type, "inputs": inputs, "_meta": {"title": node.title or node.type}}
        return prompt

    # --- UI format ---
    def ui(self) -> dict:
        placed, view = layout(self)
        links = []
        outgoing: dict[tuple[int, int], list[int]] = {}
        ui_nodes = []
        for order, node in enumerate(self.nodes):
            inputs, widgets_values = [], []
            for name, kind in NODE_SPECS[node.type][0]:
                if kind in WIDGET_KINDS:
                    if name not in node.values:
                        raise KeyError(f"{node.type} #{node.id}: widget {name!r} needs a value in the UI format")
                    widgets_values.append(node.values[name])
                    if kind == "SEED":
                        widgets_values.append("fixed")
                    elif kind == "IMAGE_UPLOAD":
                        widgets_values.append("image")
                    continue
                link_id = None
                if name in node.values:
                    source, output = node.values[name]
                    slot = _output_index(source, output)
                    link_id = len(links) + 1
                    links.append([link_id, source.id, slot, node.id, len(inputs), kind])
                    outgoing.setdefault((source.id, slot), []).append(link_id)
                inputs.append({"name": name, "type": kind, "link": link_id})
            pos, size = placed[node.id]
            ui_nodes.append({"id": node.id, "type": node.type, "pos": list(pos), "size": list(size),
                             "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": [],
                             "properties": {"Node name for S&R": node.type}, "widgets_values": widgets_values})
            if node.title:
                ui_nodes[-1]["title"] = node.title
        for ui_node, node in zip(ui_nodes, self.nodes):
            ui_node["outputs"] = [{"name": name, "type": type_, "links": outgoing.get((node.id, slot), []), "slot_index": slot}
                                  for slot, (name, type_) in enumerate(NODE_SPECS[node.type][1])]
        return {"last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": view}, "version": 0.4}


def _output_index(node: Node, output: str) -> int:
    names = [name for name, _ in NODE_SPECS[node.type][1]]
    return names.index(output)


# --- layout -----------------------------------------------------------------------------------------------------
# Node sizes follow the frontend's LGraphNode.computeSize (ComfyUI frontend 1.27, litegraph): the body (the title
# bar of NODE_TITLE_HEIGHT is drawn above ``pos``) is max(socket inputs, outputs) rows of NODE_SLOT_HEIGHT, then
# every widget's height + 4, + 8 under the widgets, + 6; the width is the largest of the title, the widest widget
# label + widget padding, the socket labels, and NODE_WIDTH (x 1.5 with widgets). Text widths are estimated per
# character (the frontend measures them with canvas fonts; CHAR_WIDTH errs on the wide side). Widgets whose value
# must be readable (file names, sampler names) get room for label and value. tests/integration/test_browser.py
# checks every saved size against the real frontend's computeSize.

TITLE_HEIGHT, SLOT_HEIGHT, WIDGET_HEIGHT, NODE_WIDTH = 30, 20, 20, 140
CHAR_WIDTH = 7.0
WIDGET_PADDING = 86  # BaseWidget.minValueWidth + 2 * (margin + arrowMargin + arrowWidth)
#: (body height, minimum width) of widgets drawn larger than one row: multiline text boxes (their 50 px minimum
#: + 40 px, three lines of text; add every multiline widget here), and by kind, an image upload's combo + upload
#: button + image preview (220 x 128 at least)
LARGE_WIDGETS = {("CLIPTextEncode", "text"): (50 + 40, 0)}
IMAGE_UPLOAD_SIZE = (WIDGET_HEIGHT + 4 + WIDGET_HEIGHT + 4 + 220, 128 + WIDGET_PADDING)
#: value shown in full (label + value); others may be elided by the frontend
VALUE_WIDGETS = {"ckpt_name", "lora_name", "sampler_name", "scheduler", "image"}
#: the frontend's titles of core nodes (the pack's come from nodes/__init__.py)
CORE_DISPLAY_NAMES = {"CheckpointLoaderSimple": "Load Checkpoint", "LoraLoader": "Load LoRA", "LoadImage": "Load Image",
                      "ImageScale": "Upscale Image", "VAEEncode": "VAE Encode", "VAEDecode": "VAE Decode",
                      "ImageBatch": "Batch Images", "SaveImage": "Save Image", "KSamplerAdvanced": "KSampler (Advanced)",
                      "CLIPTextEncode": "CLIP Text Encode (Prompt)"}

# The saved view: a 1920 x 1080 window, of which the frontend's canvas is the part right of the 64 px side bar and
# under the 78 px top bars; the minimap and the zoom controls cover its bottom-right corner (OVERLAY_CORNER, screen
# px). The graph must fit the rest at MIN_SCALE or more.
CANVAS_SCREEN = (1920 - 64, 1080 - 78)
OVERLAY_CORNER = (340, 285)
SCREEN_MARGIN = 24
MIN_SCALE, MAX_SCALE = 0.8, 1.0
COLUMN_GAP, NODE_GAP, ROW_GAP = 40, 14, 40


def _pack_display_names() -> dict[str, str]:
    """NODE_DISPLAY_NAME_MAPPINGS of nodes/__init__.py, read without importing the pack (it imports torch)."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "nodes" / "__init__.py").read_text())
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and getattr(statement.targets[0], "id", "") == "NODE_DISPLAY_NAME_MAPPINGS":
            try:
                return ast.literal_eval(statement.value)
            except ValueError:  # not a plain dict: titles fall back to type names (the browser test checks the sizes)
                return {}
    return {}


DISPLAY_NAMES = {**CORE_DISPLAY_NAMES, **_pack_display_names()}


def _text_width(text: str) -> float:
    return CHAR_WIDTH * len(text)


def _widget_size(node: Node, name: str, kind: str) -> tuple[int, int]:
    """(height, minimum width) of one widget."""
    if kind == "IMAGE_UPLOAD":
        return IMAGE_UPLOAD_SIZE
    return LARGE_WIDGETS.get((node.type, name), (WIDGET_HEIGHT, 0))


def node_size(node: Node) -> tuple[int, int]:
    """(width, height) of the node's body, as the frontend computes its minimum, rounded up to 10 px."""
    inputs, outputs = NODE_SPECS[node.type]
    sockets = [name for name, kind in inputs if kind not in WIDGET_KINDS]
    widgets = [(name, kind) for name, kind in inputs if kind in WIDGET_KINDS]
    rows = max(len(sockets), len(outputs), 1)
    widgets_height = 0
    for name, kind in widgets:
        widgets_height += _widget_size(node, name, kind)[0] + 4
        if kind == "SEED":  # control_after_generate
            widgets_height += WIDGET_HEIGHT + 4
    height = rows * SLOT_HEIGHT + (widgets_height + 8 if widgets else 0) + 6
    title = node.title or DISPLAY_NAMES.get(node.type, node.type)
    label_widths = [max(_text_width(name) + WIDGET_PADDING, _widget_size(node, name, kind)[1]) for name, kind in widgets]
    label_widths += [_text_width(f"{name} {node.values.get(name, '')}") + WIDGET_PADDING for name, _ in widgets if name in VALUE_WIDGETS]
    socket_width = max((_text_width(n) for n in sockets), default=0) + max((_text_width(n) for n, _ in outputs), default=0)
    width = max(TITLE_HEIGHT * 1.33 + _text_width(title), max(label_widths, default=0), socket_width + 2 * SLOT_HEIGHT + 5,
                NODE_WIDTH * (1.5 if widgets else 1))
    return int(-(-width // 10) * 10), int(-(-height // 10) * 10)


def _sources(node: Node) -> list[Node]:
    return [value[0] for value in node.values.values() if isinstance(value, tuple) and isinstance(value[0], Node)]


def columns(graph: Graph) -> list[list[Node]]:
    """Nodes by graph depth (longest path from a node without inputs), in data-flow order. A node without inputs
    that feeds only later columns (a config node) moves next to its first consumer. Within a column, nodes are
    ordered by the mean row of their inputs (fewer crossing links), then by creation order."""
    depth: dict[int, int] = {}
    for node in graph.nodes:  # nodes are created after their inputs
        depth[node.id] = 1 + max((depth[s.id] for s in _sources(node)), default=-1)
    consumers: dict[int, list[Node]] = {n.id: [] for n in graph.nodes}
    for node in graph.nodes:
        for source in _sources(node):
            consumers[source.id].append(node)
    for node in graph.nodes:
        if not _sources(node) and consumers[node.id]:
            depth[node.id] = min(depth[c.id] for c in consumers[node.id]) - 1
    result: list[list[Node]] = [[] for _ in range(max(depth.values()) + 1)]
    row: dict[int, float] = {}
    for column in range(len(result)):
        def key(n: Node) -> tuple[float, int]:
            rows = [row[s.id] for s in _sources(n)]  # sources are in earlier columns
            return (sum(rows) / len(rows) if rows else -1.0, n.id)

        members = sorted((n for n in graph.nodes if depth[n.id] == column), key=key)
        for index, n in enumerate(members):
            row[n.id] = index / max(len(members) - 1, 1)
        result[column] = members
    return [c for c in result if c]


def _band(cols: list[list[Node]], sizes: dict[int, tuple[int, int]], x0: int, y0: int) -> tuple[dict, int, int]:
    """Places columns left to right from (x0, y0); returns positions, band width and height (title bars included)."""
    positions, x, height = {}, x0, 0
    for column in cols:
        y = y0
        for node in column:
            positions[node.id] = (x, y + TITLE_HEIGHT)
            y += TITLE_HEIGHT + sizes[node.id][1] + NODE_GAP
        height = max(height, y - NODE_GAP - y0)
        x += max(sizes[n.id][0] for n in column) + COLUMN_GAP
    return positions, x - COLUMN_GAP - x0, height


def _fits(rects: list[tuple[int, int, int, int]], scale: float) -> bool:
    """Whether boxes (canvas units, title bars included) are on screen and clear of the overlays, at ``scale`` with
    the view offset SCREEN_MARGIN / scale."""
    corner_x, corner_y = CANVAS_SCREEN[0] - OVERLAY_CORNER[0], CANVAS_SCREEN[1] - OVERLAY_CORNER[1]
    for x0, y0, x1, y1 in rects:
        sx0, sy0, sx1, sy1 = (SCREEN_MARGIN + scale * v for v in (x0, y0, x1, y1))
        if sx1 > CANVAS_SCREEN[0] - SCREEN_MARGIN or sy1 > CANVAS_SCREEN[1] - SCREEN_MARGIN:
            return False
        if sx1 > corner_x and sy1 > corner_y:
            return False
    return True


def layout(graph: Graph) -> tuple[dict[int, tuple[tuple[int, int], tuple[int, int]]], dict]:
    """Positions and sizes of every node, and the saved view (``extra.ds``): the columns of ``columns`` in one
    band, or wrapped into two bands (rows) at the split that allows the largest zoom; the view shows the whole
    graph, clear of the frontend's overlays, in a 1920 x 1080 window at the largest zoom (5 % steps) up to 100 %.
    Raises if that is under 80 %."""
    sizes = {n.id: node_size(n) for n in graph.nodes}
    cols = columns(graph)
    best = (0.0, {})
    for split in range(1, len(cols) + 1):
        top, _, height_top = _band(cols[:split], sizes, 0, 0)
        bottom = _band(cols[split:], sizes, 0, height_top + ROW_GAP)[0] if split < len(cols) else {}
        positions = {**top, **bottom}
        rects = [(x, y - TITLE_HEIGHT, x + sizes[i][0], y + sizes[i][1]) for i, (x, y) in positions.items()]
        scale = next((s / 20 for s in range(round(MAX_SCALE * 20), round(MIN_SCALE * 20) - 1, -1) if _fits(rects, s / 20)), 0.0)
        if scale > best[0]:
            best = (scale, positions)
    scale, positions = best
    if scale < MIN_SCALE:
        raise ValueError(f"the graph does not fit a 1920 x 1080 window at {MIN_SCALE:.0%} zoom: split it or shrink its nodes")
    view = {"scale": scale, "offset": [round(SCREEN_MARGIN / scale, 2), round(SCREEN_MARGIN / scale, 2)]}
    return {n.id: (positions[n.id], sizes[n.id]) for n in graph.nodes}, view


# --- the workflows ----------------------------------------------------------------------------------------------

SOURCE = "a photo of a cat sitting on a wooden bench"
TARGET = "a photo of a dog sitting on a wooden bench"


def photo_and_prompts(g: Graph, clip, vae, *, size: int, x0: int = 0):
    """Load -> scale -> encode the photo, and the three prompts."""
    image = g.add("LoadImage", (x0, 500), image="example.png")
    scaled = g.add("ImageScale", (x0, 860), image=(image, "IMAGE"), upscale_method="lanczos", width=size, height=size,
                   crop="center")
    latent = g.add("VAEEncode", (x0 + 340, 860), pixels=(scaled, "IMAGE"), vae=vae)
    source = g.add("CLIPTextEncode", (x0 + 340, 40), title="Source prompt (describe the photo)", text=SOURCE, clip=clip)
    target = g.add("CLIPTextEncode", (x0 + 340, 200), title="Target prompt (the edit)", text=TARGET, clip=clip)
    negative = g.add("CLIPTextEncode", (x0 + 340, 360), title="Negative prompt", text="", clip=clip)
    return latent, source, target, negative


def reconstruction_and_edit(g: Graph, model, vae, invert: Node, source, target, negative, *, source_cfg: float, edit_cfg: float,
                            continue_with: str, prefix: str, sampler: str = "", scheduler: str = "", steps: int = 0,
                            x0: int = 0, mask=None) -> None:
    """Sample the inverted latent with the source prompt and with the target prompt; save both side by side.
    ``mask`` (a MASK socket) goes to ReNoiseSampler: both branches keep the photo outside it."""
    decoded = []
    branches = (("Reconstruction (source prompt)", source, source_cfg), ("Edit (target prompt)", target, edit_cfg))
    for row, (name, prompt, cfg) in enumerate(branches):
        if continue_with == "ksampleradvanced":
            out = g.add("KSamplerAdvanced", (x0 + 1180, 40 + 520 * row), title=name, model=model, add_noise="disable",
                        noise_seed=0, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
                        positive=(prompt, "CONDITIONING"), negative=(negative, "CONDITIONING"),
                        latent_image=(invert, "latent"), start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable")
            out_name = "LATENT"
        else:
            if row == 0:
                replay = g.add("ReNoiseSampler", (x0 + 1180, 620), inversion=(invert, "inversion"),
                               **({"mask": mask} if mask is not None else {}))
            out = g.add("SamplerCustom", (x0 + 1500, 40 + 520 * row), title=name, model=model, add_noise=False, noise_seed=0,
                        cfg=cfg, positive=(prompt, "CONDITIONING"), negative=(negative, "CONDITIONING"),
                        sampler=(replay, "SAMPLER"), sigmas=(invert, "sigmas"), latent_image=(invert, "latent"))
            out_name = "output"
        decoded.append(g.add("VAEDecode", (x0 + 1860, 200 + 300 * row), samples=(out, out_name), vae=vae))
    both = g.add("ImageBatch", (x0 + 2220, 300), title="Reconstruction | Edit", image1=(decoded[0], "IMAGE"),
                 image2=(decoded[1], "IMAGE"))
    g.add("SaveImage", (x0 + 2580, 300), images=(both, "IMAGE"), filename_prefix=prefix)


def inversion_and_edit(g: Graph, model, clip, vae, *, size: int, sampler: str, scheduler: str, steps: int,
                       renoise_steps: int, edit_cfg: float, edit_loss=None, noise_correction=None,
                       continue_with: str = "samplercustom", prefix: str, x0: int = 0, mask_from=None) -> None:
    """The ReNoise graph: photo and prompts -> ReNoiseInvert -> reconstruction and edit. ``mask_from(g, model, latent,
    source, target)`` (local edits) returns the MASK socket for ReNoiseSampler."""
    latent, source, target, negative = photo_and_prompts(g, clip, vae, size=size, x0=x0)
    mask = mask_from(g, model, latent, source, target) if mask_from is not None else None
    extra = {}
    if edit_loss is not None:
        extra["edit_loss"] = (g.add("EditLossConfig", (x0 + 340, 1000), **edit_loss), "edit_loss")
    if noise_correction is not None:
        extra["noise_correction"] = (g.add("NoiseCorrection", (x0 + 340, 1220), **noise_correction), "noise_correction")
    invert = g.add("ReNoiseInvert", (x0 + 760, 300), model=model, positive=(source, "CONDITIONING"),
                   negative=(negative, "CONDITIONING"), latent_image=(latent, "LATENT"), sampler_name=sampler,
                   scheduler=scheduler, steps=steps, denoise=1.0, cfg=1.0, renoise_steps=renoise_steps, seed=7865,
                   **extra, **RENOISE_DEFAULTS)
    reconstruction_and_edit(g, model, vae, invert, source, target, negative, source_cfg=1.0, edit_cfg=edit_cfg,
                            continue_with=continue_with, prefix=prefix, sampler=sampler, scheduler=scheduler, steps=steps, x0=x0,
                            mask=mask)


EDIT_LOSS_DEFAULTS = {"lambda_ac": 20.0, "lambda_kl": 0.065, "reg_steps": 4, "ac_rolls": 5, "patch_size": 4}
NOISE_CORRECTION_DEFAULTS = {"mode": "optimize", "steps": 10, "step_size": 1.8}

CHECKPOINTS = {
    "sdxl_turbo": "sd_xl_turbo_1.0_fp16.safetensors",
    "sdxl_base": "sd_xl_base_1.0.safetensors",
    "sd15": "v1-5-pruned-emaonly.safetensors",
    "lcm_lora_sdxl": "lcm-lora-sdxl.safetensors",
    "flux_schnell": "flux1-schnell-fp8.safetensors",
}


def sdxl_turbo_edit() -> Graph:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (-380, 300), ckpt_name=CHECKPOINTS["sdxl_turbo"])
    inversion_and_edit(g, (ckpt, "MODEL"), (ckpt, "CLIP"), (ckpt, "VAE"), size=512, sampler="euler_ancestral",
                       scheduler="simple", steps=4, renoise_steps=9, edit_cfg=1.0, edit_loss=EDIT_LOSS_DEFAULTS,
                       noise_correction=NOISE_CORRECTION_DEFAULTS, prefix="renoise/sdxl_turbo_edit")
    return g


def painted_mask(g: Graph, model, latent, source, target):
    """The mask painted in Load Image's mask editor (LoadImage's MASK: 1 where painted), scaled and cropped exactly as
    the photo is (MaskToImage -> the same ImageScale -> ImageToMask)."""
    image = next(n for n in g.nodes if n.type == "LoadImage")
    photo_scale = next(n for n in g.nodes if n.type == "ImageScale")
    as_image = g.add("MaskToImage", (0, 1100), title="Painted mask (edit where painted)", mask=(image, "MASK"))
    scaled = g.add("ImageScale", (0, 1220), image=(as_image, "IMAGE"),
                   **{k: photo_scale.values[k] for k in ("upscale_method", "width", "height", "crop")})
    mask = g.add("ImageToMask", (0, 1440), image=(scaled, "IMAGE"), channel="red")
    return (mask, "MASK")


def sdxl_turbo_local_edit() -> Graph:
    """sdxl_turbo_edit with a painted mask: right-click Load Image -> Open in MaskEditor, paint what to change."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (-380, 300), ckpt_name=CHECKPOINTS["sdxl_turbo"])
    inversion_and_edit(g, (ckpt, "MODEL"), (ckpt, "CLIP"), (ckpt, "VAE"), size=512, sampler="euler_ancestral",
                       scheduler="simple", steps=4, renoise_steps=9, edit_cfg=1.0, edit_loss=EDIT_LOSS_DEFAULTS,
                       noise_correction=NOISE_CORRECTION_DEFAULTS, prefix="renoise/sdxl_turbo_local_edit", mask_from=painted_mask)
    return g


def prompt_mask(g: Graph, model, latent, source, target):
    """ReNoiseEditMask (DiffEdit) at its defaults, with a preview of the mask."""
    mask = g.add("ReNoiseEditMask", (760, 1000), title="Edit mask from the prompts (DiffEdit)", model=model,
                 latent_image=(latent, "LATENT"), source=(source, "CONDITIONING"), target=(target, "CONDITIONING"), seed=0,
                 noise_level=0.5, samples=5, threshold=0.5, blur=4)
    preview = g.add("MaskToImage", (1180, 1000), mask=(mask, "mask"))
    g.add("PreviewImage", (1180, 1120), title="Edit mask", images=(preview, "IMAGE"))
    return (mask, "mask")


def sdxl_turbo_auto_mask_edit() -> Graph:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (-380, 300), ckpt_name=CHECKPOINTS["sdxl_turbo"])
    inversion_and_edit(g, (ckpt, "MODEL"), (ckpt, "CLIP"), (ckpt, "VAE"), size=512, sampler="euler_ancestral",
                       scheduler="simple", steps=4, renoise_steps=9, edit_cfg=1.0, edit_loss=EDIT_LOSS_DEFAULTS,
                       noise_correction=NOISE_CORRECTION_DEFAULTS, prefix="renoise/sdxl_turbo_auto_mask_edit", mask_from=prompt_mask)
    return g


def lcm_lora_edit() -> Graph:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (-760, 300), ckpt_name=CHECKPOINTS["sdxl_base"])
    lora = g.add("LoraLoader", (-760, 480), model=(ckpt, "MODEL"), clip=(ckpt, "CLIP"), lora_name=CHECKPOINTS["lcm_lora_sdxl"],
                 strength_model=1.0, strength_clip=1.0)
    lcm = g.add("ModelSamplingDiscrete", (-380, 480), model=(lora, "MODEL"), sampling="lcm", zsnr=False)
    inversion_and_edit(g, (lcm, "MODEL"), (lora, "CLIP"), (ckpt, "VAE"), size=1024, sampler="lcm", scheduler="simple",
                       steps=4, renoise_steps=9, edit_cfg=1.0, noise_correction=NOISE_CORRECTION_DEFAULTS,
                       prefix="renoise/lcm_lora_edit")
    return g


def sd15_ddim_edit() -> Graph:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (-380, 300), ckpt_name=CHECKPOINTS["sd15"])
    inversion_and_edit(g, (ckpt, "MODEL"), (ckpt, "CLIP"), (ckpt, "VAE"), size=512, sampler="ddim", scheduler="ddim_uniform",
                       steps=50, renoise_steps=1, edit_cfg=4.0, continue_with="ksampleradvanced", prefix="renoise/sd15_ddim_edit")
    return g


def sdxl_ddim_reconstruct() -> Graph:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (-380, 300), ckpt_name=CHECKPOINTS["sdxl_base"])
    inversion_and_edit(g, (ckpt, "MODEL"), (ckpt, "CLIP"), (ckpt, "VAE"), size=1024, sampler="ddim", scheduler="ddim_uniform",
                       steps=50, renoise_steps=1, edit_cfg=2.0, continue_with="ksampleradvanced",
                       prefix="renoise/sdxl_ddim_reconstruct")
    return g


def sd15_edit_friendly_ddpm() -> Graph:
    """The edit-friendly DDPM paper's settings: ddpm, 100 steps, cfg 3.5 to invert (and reconstruct), 15 to edit,
    skip 36."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (-380, 300), ckpt_name=CHECKPOINTS["sd15"])
    latent, source, target, negative = photo_and_prompts(g, (ckpt, "CLIP"), (ckpt, "VAE"), size=512)
    invert = g.add("EditFriendlyInvert", (760, 300), model=(ckpt, "MODEL"), positive=(source, "CONDITIONING"),
                   negative=(negative, "CONDITIONING"), latent_image=(latent, "LATENT"), sampler_name="ddpm", scheduler="normal",
                   steps=100, denoise=1.0, cfg=3.5, skip=36, seed=7865, eta=1.0, s_noise=1.0)
    reconstruction_and_edit(g, (ckpt, "MODEL"), (ckpt, "VAE"), invert, source, target, negative, source_cfg=3.5, edit_cfg=15.0,
                            continue_with="samplercustom", prefix="renoise/sd15_edit_friendly_ddpm")
    return g


def flux_schnell_edit() -> Graph:
    """Flux schnell (a flow model), 4 steps: euler_ancestral (ComfyUI runs its RF variant) with noise correction;
    no edit losses (tuned for SDXL-Turbo) and no guidance (schnell is distilled)."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (-380, 300), ckpt_name=CHECKPOINTS["flux_schnell"])
    inversion_and_edit(g, (ckpt, "MODEL"), (ckpt, "CLIP"), (ckpt, "VAE"), size=1024, sampler="euler_ancestral",
                       scheduler="simple", steps=4, renoise_steps=9, edit_cfg=1.0, noise_correction=NOISE_CORRECTION_DEFAULTS,
                       prefix="renoise/flux_schnell_edit")
    return g


#: every workflow, the quick start first (the thumbnails' order, see scripts/make_thumbnails.py)
WORKFLOWS = {
    "sdxl_turbo_edit": sdxl_turbo_edit,
    "lcm_lora_edit": lcm_lora_edit,
    "sd15_ddim_edit": sd15_ddim_edit,
    "sdxl_ddim_reconstruct": sdxl_ddim_reconstruct,
    "sd15_edit_friendly_ddpm": sd15_edit_friendly_ddpm,
    "flux_schnell_edit": flux_schnell_edit,
    "sdxl_turbo_local_edit": sdxl_turbo_local_edit,
    "sdxl_turbo_auto_mask_edit": sdxl_turbo_auto_mask_edit,
}

#: one line per workflow, shown on its thumbnail (the template browser of ComfyUI 0.3.64 / frontend 1.27 shows a
#: custom node's template only by its file name; it reads no description from the pack)
DESCRIPTIONS = {
    "sdxl_turbo_edit": "Quick start: edit a photo with SDXL-Turbo, 4 steps",
    "lcm_lora_edit": "SDXL + LCM-LoRA, lcm sampler, 4 steps",
    "sd15_ddim_edit": "SD1.5, ddim 50 steps, edit with KSampler (Advanced)",
    "sdxl_ddim_reconstruct": "SDXL, ddim 50 steps: reconstruction and an edit",
    "sd15_edit_friendly_ddpm": "SD1.5 edit-friendly DDPM inversion, 100 steps",
    "flux_schnell_edit": "Flux schnell (flow model), 4 steps",
    "sdxl_turbo_local_edit": "SDXL-Turbo local edit: the photo kept outside a painted mask",
    "sdxl_turbo_auto_mask_edit": "SDXL-Turbo local edit, mask found from the prompts",
}


def render(name: str) -> dict[str, str]:
    """File name -> text, for one workflow."""
    graph = WORKFLOWS[name]()
    return {f"{name}.json": json.dumps(graph.ui(), indent=1) + "\n", f"api/{name}.json": json.dumps(graph.api(), indent=1) + "\n"}


def main() -> None:
    (WORKFLOWS_DIR / "api").mkdir(parents=True, exist_ok=True)
    for name in WORKFLOWS:
        for filename, text in render(name).items():
            (WORKFLOWS_DIR / filename).write_text(text)
            print(f"wrote workflows/{filename}")


if __name__ == "__main__":
    main()
