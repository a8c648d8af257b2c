"""ReNoiseSaveInversion / ReNoiseLoadInversion: keep an inversion for many edits, across restarts and machines."""

from __future__ import annotations

import os
from pathlib import Path

from ..renoise_core import __version__
from . import host
from .inversion_data import INVERSION_TYPE, InversionData
from .inversion_file import file_digest, is_inversion_file, load_inversion, resolve_inside, save_inversion

CATEGORY = "sampling/renoise"
EXTENSION = ".safetensors"


class ReNoiseSaveInversion:
    DESCRIPTION = (
        "Saves an inversion (the inverted latent and its per-step noises, schedule and settings) as one .safetensors "
        "file in ComfyUI's output folder. Load it with ReNoiseLoadInversion to edit again without inverting."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ()

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "latent": ("LATENT", {"tooltip": "ReNoiseInvert's `latent` output."}),
                "inversion": (INVERSION_TYPE, {"tooltip": "ReNoiseInvert's `inversion` output."}),
                "filename_prefix": ("STRING", {"default": "renoise/inversion",
                                               "tooltip": "File name prefix, relative to ComfyUI's output folder."}),
            }
        }

    def save(self, latent, inversion, filename_prefix):
        if not isinstance(inversion, InversionData):
            raise ValueError("ReNoiseSaveInversion: connect the `inversion` output of ReNoiseInvert.")
        if tuple(latent["samples"].shape) != inversion.latent_shape:
            raise ValueError(
                f"ReNoiseSaveInversion: the latent {list(latent['samples'].shape)} is not the one this inversion produced "
                f"{list(inversion.latent_shape)}; connect ReNoiseInvert's `latent` and `inversion` outputs together."
            )
        folder, filename, counter, subfolder = host.bridge().save_path(filename_prefix)
        name = f"{filename}_{counter:05}_{EXTENSION}"
        save_inversion(Path(folder) / name, latent, inversion, __version__)
        return {"ui": {"renoise_inversions": [{"filename": name, "subfolder": subfolder, "type": "output"}]}}


class ReNoiseLoadInversion:
    DESCRIPTION = (
        "Loads an inversion saved by ReNoiseSaveInversion (from ComfyUI's input or output folder) and returns exactly "
        "what ReNoiseInvert returned: connect to ReNoiseSampler and SamplerCustom as usual."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("LATENT", INVERSION_TYPE, "SIGMAS")
    RETURN_NAMES = ("latent", "inversion", "sigmas")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"inversion_file": (list_inversion_files(), {
            "tooltip": "Inversions saved in the output folder (marked [output]) or copied to the input folder."})}}

    def load(self, inversion_file):
        latent, inversion = load_inversion(_path_of(inversion_file))
        return (latent, inversion, inversion.sigmas.clone())

    @classmethod
    def IS_CHANGED(cls, inversion_file):
        return file_digest(_path_of(inversion_file))

    @classmethod
    def VALIDATE_INPUTS(cls, inversion_file):
        try:
            if not _path_of(inversion_file).is_file():
                return f"ReNoiseLoadInversion: no file {inversion_file!r}; save one with ReNoiseSaveInversion first."
        except ValueError as error:
            return str(error)
        return True


def list_inversion_files() -> list[str]:
    """Inversion files under the input folder (plain names) and the output folder (names marked ``[output]``)."""
    bridge = host.bridge()
    names = []
    for base, mark in ((bridge.input_directory(), ""), (bridge.output_directory(), " [output]")):
        for root, _, files in os.walk(base):
            for file in sorted(files):
                path = Path(root) / file
                if file.endswith(EXTENSION) and is_inversion_file(path):
                    names.append(path.relative_to(base).as_posix() + mark)
    return sorted(names)


def _path_of(name: str) -> Path:
    bridge = host.bridge()
    if name.endswith(" [output]"):
        return resolve_inside(name[: -len(" [output]")], bridge.output_directory())
    return resolve_inside(name, bridge.input_directory())
