"""The example workflows: parse, are what scripts/make_workflows.py writes, links type-check, our nodes' widget
values match their INPUT_TYPES, and the UI and API copies agree. (Against a real ComfyUI: tests/integration.)"""

import importlib.util
import json
import sys
from pathlib import Path

import fake_comfy
import pytest
from renoise_pack import nodes as pack_nodes
from renoise_pack.nodes import host

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
spec = importlib.util.spec_from_file_location("make_workflows", ROOT / "scripts" / "make_workflows.py")
make_workflows = importlib.util.module_from_spec(spec)
sys.modules["make_workflows"] = make_workflows  # dataclasses look their module up
spec.loader.exec_module(make_workflows)

NAMES = sorted(make_workflows.WORKFLOWS)
CORE_NODE_TYPES = {"CheckpointLoaderSimple", "LoraLoader", "ModelSamplingDiscrete", "CLIPTextEncode", "LoadImage", "ImageScale",
                   "VAEEncode", "VAEDecode", "ImageBatch", "SaveImage", "KSamplerAdvanced", "SamplerCustom", "MaskToImage",
                   "ImageToMask", "PreviewImage"}
WIDGET_TYPES = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}


@pytest.fixture(autouse=True)
def fake_host(monkeypatch):
    monkeypatch.setattr(host, "bridge", lambda: fake_comfy)


def load(name):
    return json.loads((WORKFLOWS / f"{name}.json").read_text()), json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())


def test_the_required_workflows_exist():
    assert {"sdxl_turbo_edit", "lcm_lora_edit", "sd15_ddim_edit", "sdxl_ddim_reconstruct"} <= set(NAMES)
    assert sorted(p.stem for p in WORKFLOWS.glob("*.json")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_files_are_what_the_generator_writes(name):
    for filename, text in make_workflows.render(name).items():
        assert (WORKFLOWS / filename).read_text() == text, f"run python scripts/make_workflows.py ({filename} is stale)"


@pytest.mark.parametrize("name", NAMES)
def test_node_types_exist(name):
    ui, _ = load(name)
    for node in ui["nodes"]:
        assert node["type"] in pack_nodes.NODE_CLASS_MAPPINGS or node["type"] in CORE_NODE_TYPES, node["type"]


@pytest.mark.parametrize("name", NAMES)
def test_links_match_socket_types(name):
    ui, _ = load(name)
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, src, src_slot, dst, dst_slot, type_ in ui["links"]:
        output = nodes[src]["outputs"][src_slot]
        target = nodes[dst]["inputs"][dst_slot]
        assert output["type"] == target["type"] == type_, (link_id, output, target)
        assert link_id in output["links"] and target["link"] == link_id
    for node in ui["nodes"]:
        for socket in node["inputs"]:
            if socket["link"] is None:
                continue
            assert any(link[0] == socket["link"] for link in ui["links"])


def _widget_inputs(cls):
    spec = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, (kind, *options) in spec.get(section, {}).items():
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                yield name, kind, (options[0] if options else {})


def test_generator_specs_of_our_nodes_match_input_types():
    for type_, cls in pack_nodes.NODE_CLASS_MAPPINGS.items():
        if type_ not in make_workflows.NODE_SPECS:
            continue  # not used by any workflow
        spec = cls.INPUT_TYPES()
        declared = [(name, kind if isinstance(kind, str) and kind not in WIDGET_TYPES else "WIDGET")
                    for section in ("required", "optional") for name, (kind, *_) in spec.get(section, {}).items()]
        generator = [(name, "WIDGET" if kind in make_workflows.WIDGET_KINDS else kind)
                     for name, kind in make_workflows.NODE_SPECS[type_][0]]
        assert generator == declared, type_
        assert [t for _, t in make_workflows.NODE_SPECS[type_][1]] == list(cls.RETURN_TYPES), type_


@pytest.mark.parametrize("name", NAMES)
def test_our_widget_values_match_input_types(name):
    ui, _ = load(name)
    for node in ui["nodes"]:
        cls = pack_nodes.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue
        values = list(node["widgets_values"])
        for widget, kind, options in _widget_inputs(cls):
            value = values.pop(0)
            if isinstance(kind, list):
                assert value in kind, (node["type"], widget, value)
            else:
                assert isinstance(value, WIDGET_TYPES[kind]) and not (kind != "BOOLEAN" and isinstance(value, bool)), (widget, value)
                assert options.get("min", value) <= value <= options.get("max", value), (widget, value)
            if options.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), widget
        assert values == [], (node["type"], "extra widget values", values)


@pytest.mark.parametrize("name", NAMES)
def test_ui_and_api_copies_agree(name):
    ui, api = load(name)
    assert {str(n["id"]) for n in ui["nodes"]} == set(api)
    links = {link[0]: link for link in ui["links"]}
    for node in ui["nodes"]:
        entry = api[str(node["id"])]
        assert entry["class_type"] == node["type"]
        specs = make_workflows.NODE_SPECS[node["type"]][0]
        values = list(node["widgets_values"])
        for input_name, kind in specs:
            if kind in make_workflows.WIDGET_KINDS:
                assert entry["inputs"][input_name] == values.pop(0), (name, node["type"], input_name)
                if kind != "WIDGET":
                    values.pop(0)
        for socket in node["inputs"]:
            if socket["link"] is None:
                assert socket["name"] not in entry["inputs"]
            else:
                _, src, slot, _, _, _ = links[socket["link"]]
                assert entry["inputs"][socket["name"]] == [str(src), slot]


def test_turbo_workflow_uses_the_reference_defaults():
    _, api = load("sdxl_turbo_edit")
    by_type = {entry["class_type"]: entry["inputs"] for entry in api.values()}
    invert = by_type["ReNoiseInvert"]
    assert (invert["sampler_name"], invert["scheduler"], invert["steps"], invert["renoise_steps"], invert["cfg"]) == \
        ("euler_ancestral", "simple", 4, 9, 1.0)
    assert by_type["EditLossConfig"] == {"lambda_ac": 20.0, "lambda_kl": 0.065, "reg_steps": 4, "ac_rolls": 5, "patch_size": 4}
    assert by_type["NoiseCorrection"] == {"mode": "optimize", "steps": 10, "step_size": 1.8}
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == "sd_xl_turbo_1.0_fp16.safetensors"


def test_local_edit_workflows_drive_the_sampler_with_a_mask():
    """sdxl_turbo_local_edit: LoadImage's painted MASK, scaled like the photo, into ReNoiseSampler's mask;
    sdxl_turbo_auto_mask_edit: ReNoiseEditMask into it, with a preview of the mask."""
    _, api = load("sdxl_turbo_local_edit")
    sampler = next(e for e in api.values() if e["class_type"] == "ReNoiseSampler")
    chain = []
    source = sampler["inputs"]["mask"][0]
    while True:
        entry = api[source]
        chain.append(entry["class_type"])
        links = [v for v in entry["inputs"].values() if isinstance(v, list)]
        if not links:
            break
        source = links[0][0]
    assert chain == ["ImageToMask", "ImageScale", "MaskToImage", "LoadImage"]
    scales = [e["inputs"] for e in api.values() if e["class_type"] == "ImageScale"]
    assert len(scales) == 2 and {k: v for k, v in scales[0].items() if k != "image"} == {k: v for k, v in scales[1].items() if k != "image"}

    _, api = load("sdxl_turbo_auto_mask_edit")
    sampler = next(e for e in api.values() if e["class_type"] == "ReNoiseSampler")
    assert api[sampler["inputs"]["mask"][0]]["class_type"] == "ReNoiseEditMask"
    previews = [e for e in api.values() if e["class_type"] == "PreviewImage"]
    assert len(previews) == 1 and api[previews[0]["inputs"]["images"][0]]["class_type"] == "MaskToImage"


@pytest.mark.parametrize("name", NAMES)
def test_every_workflow_has_a_thumbnail(name):
    from PIL import Image

    with Image.open(WORKFLOWS / f"{name}.jpg") as image:
        assert image.format == "JPEG" and image.size == (512, 512)  # scripts/make_thumbnails.py


def test_nodes_do_not_overlap_in_the_ui():
    for name in NAMES:
        ui, _ = load(name)
        boxes = [(n["pos"][0], n["pos"][1], n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1], n["id"]) for n in ui["nodes"]]
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
                assert not overlap, (name, a[4], b[4])


def _screen_rects(ui):
    """Each node's rectangle on screen (title bar included) at the saved view, in the canvas' pixels."""
    scale, (ox, oy) = ui["extra"]["ds"]["scale"], ui["extra"]["ds"]["offset"]
    title = make_workflows.TITLE_HEIGHT
    return {n["id"]: ((n["pos"][0] + ox) * scale, (n["pos"][1] - title + oy) * scale,
                      (n["pos"][0] + n["size"][0] + ox) * scale, (n["pos"][1] + n["size"][1] + oy) * scale) for n in ui["nodes"]}


@pytest.mark.parametrize("name", NAMES)
def test_the_saved_view_shows_every_node_at_80_percent_or_more(name):
    ui, _ = load(name)
    assert ui["extra"]["ds"]["scale"] >= 0.8
    width, height = make_workflows.CANVAS_SCREEN
    corner = (width - make_workflows.OVERLAY_CORNER[0], height - make_workflows.OVERLAY_CORNER[1])
    for x0, y0, x1, y1 in _screen_rects(ui).values():
        assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
        assert not (x1 > corner[0] and y1 > corner[1]), "under the minimap"


@pytest.mark.parametrize("name", NAMES)
def test_what_the_user_sets_is_top_left(name):
    ui, _ = load(name)
    rects = _screen_rects(ui)
    inputs = [n["id"] for n in ui["nodes"] if n["type"] in ("CheckpointLoaderSimple", "LoadImage")
              or n.get("title", "").startswith(("Source prompt", "Target prompt"))]
    assert len(inputs) == 4
    width, height = make_workflows.CANVAS_SCREEN
    for node_id in inputs:
        x0, y0, _, _ = rects[node_id]
        assert x0 < width / 2 and y0 < height / 2, node_id
    loader = next(n["id"] for n in ui["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert rects[loader][:2] == min(r[:2] for r in rects.values())


def test_the_layout_places_any_graph():
    """A longer graph (more nodes in the chain, a new node type) is laid out without overlaps and fits, or the
    generator says it does not fit."""
    g = make_workflows.sdxl_turbo_edit()
    invert = next(n for n in g.nodes if n.type == "ReNoiseInvert")
    extra = g.add("ReNoiseSampler", inversion=(invert, "inversion"))
    g.add("ReNoiseSampler", inversion=(invert, "inversion"), title="another replay of the same inversion")
    ui = g.ui()
    placed = {n["id"]: n for n in ui["nodes"]}
    assert extra.id in placed and ui["extra"]["ds"]["scale"] >= 0.8
    boxes = [(n["pos"][0], n["pos"][1] - make_workflows.TITLE_HEIGHT, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in ui["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3])
    huge = make_workflows.Graph()
    previous = huge.add("CheckpointLoaderSimple", ckpt_name="x.safetensors")
    for _ in range(30):
        previous = huge.add("ModelSamplingDiscrete", model=(previous, "MODEL"), sampling="eps", zsnr=False)
    with pytest.raises(ValueError, match="does not fit"):
        huge.ui()


def test_node_sizes_count_widgets_and_sockets_like_the_frontend():
    """ReNoiseInvert: 7 socket rows of 20 px, 15 widgets (seed's control included) of 24 px, + 8 + 6: 514 px, the
    frontend's computeSize (ComfyUI frontend 1.27); rounded up to 520."""
    g = make_workflows.sdxl_turbo_edit()
    invert = next(n for n in g.nodes if n.type == "ReNoiseInvert")
    sockets = sum(kind not in make_workflows.WIDGET_KINDS for _, kind in make_workflows.NODE_SPECS["ReNoiseInvert"][0])
    widgets = sum(1 + (kind == "SEED") for _, kind in make_workflows.NODE_SPECS["ReNoiseInvert"][0] if kind in make_workflows.WIDGET_KINDS)
    expected = 20 * max(sockets, 3) + 24 * widgets + 8 + 6
    width, height = make_workflows.node_size(invert)
    assert expected <= height < expected + 10
    assert 210 <= width <= 320
