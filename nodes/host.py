"""Where the nodes find ComfyUI."""


def bridge():
    """The ComfyUI bridge module (``comfy_bridge``), imported on first use so the node modules load without
    ComfyUI. Tests replace this function with one returning a fake bridge."""
    from . import comfy_bridge

    return comfy_bridge
