"""Inversions on disk: one ``.safetensors`` file with the inverted latent, the RENOISE_INVERSION and a checksum.

Only safetensors (never pickle). Writes are atomic (a temporary file in the same folder, then a rename), and a
file is either loaded whole and verified or refused with a message saying why. No ComfyUI import here.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..renoise_core import StepDiagnostics
from .inversion_data import InversionData

FORMAT = "renoise-inversion"
#: 2 (0.2.0): adds the optional ``trajectory`` tensor (masked sampling); format 1 files load without it
FORMAT_VERSION = 2


class InversionFileError(ValueError):
    """A file that cannot be loaded as an inversion; the message says why and what to do."""


def save_inversion(path: str | os.PathLike, latent: dict, inversion: InversionData, pack_version: str) -> None:
    """Write ``latent`` (a LATENT dict) and ``inversion`` to ``path`` atomically."""
    tensors = {"latent": latent["samples"], "noises": inversion.noises, "sigmas": inversion.sigmas}
    if inversion.start_latent is not None:
        tensors["start_latent"] = inversion.start_latent
    if inversion.trajectory is not None:
        tensors["trajectory"] = inversion.trajectory
    steps = []
    for i, step in enumerate(inversion.diagnostics):
        tensors[f"diagnostics.{i}.change_norms"] = step.change_norms
        tensors[f"diagnostics.{i}.relative_changes"] = step.relative_changes
        steps.append([step.sigma, step.sigma_next, step.evaluations, step.denoiser_calls])
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    description = {
        "sampler_name": inversion.sampler_name,
        "sampler_options": inversion.sampler_options,
        "model_sampling": inversion.model_sampling,
        "model_family": inversion.model_family,
        "seed": inversion.seed,
        "method": inversion.method,
        "settings": inversion.settings,
        "diagnostics": steps,
        "denoiser_calls": inversion.denoiser_calls,
        "batch_index": list(latent["batch_index"]) if "batch_index" in latent else None,
    }
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "pack_version": pack_version,
        "inversion": json.dumps(description),
        "sha256": _checksum(tensors),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def is_inversion_file(path: str | os.PathLike) -> bool:
    """Cheap check (header only) for listing files."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def load_inversion(path: str | os.PathLike) -> tuple[dict, InversionData]:
    """Load and verify a file written by :func:`save_inversion`; returns ``(latent, inversion)``."""
    name = Path(path).name
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()} if metadata.get("format") == FORMAT else {}
    except (SafetensorError, OSError, ValueError) as error:
        raise InversionFileError(
            f"{name} is not a complete safetensors file ({error}); it may be truncated or damaged. Save the inversion again."
        ) from None
    if metadata.get("format") != FORMAT:
        raise InversionFileError(f"{name} is not a ReNoise inversion (no '{FORMAT}' metadata); pick a file saved by ReNoiseSaveInversion.")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise InversionFileError(f"{name} has an unreadable format version; save the inversion again.") from None
    if version > FORMAT_VERSION:
        raise InversionFileError(
            f"{name} was written in inversion format {version} by a newer pack ({metadata.get('pack_version')}); "
            f"this one reads format {FORMAT_VERSION}. Update the ReNoise pack."
        )
    if metadata.get("sha256") != _checksum(tensors):
        raise InversionFileError(f"{name}: its data does not match its checksum (modified or damaged); save the inversion again.")
    try:
        description = json.loads(metadata["inversion"])
        latent = {"samples": tensors["latent"]}
        if description.get("batch_index") is not None:
            latent["batch_index"] = description["batch_index"]
        diagnostics = tuple(
            StepDiagnostics(float(sigma), float(sigma_next), int(evaluations), int(calls),
                            tensors[f"diagnostics.{i}.change_norms"], tensors[f"diagnostics.{i}.relative_changes"])
            for i, (sigma, sigma_next, evaluations, calls) in enumerate(description["diagnostics"])
        )
        inversion = InversionData(
            noises=tensors["noises"], sigmas=tensors["sigmas"], sampler_name=description["sampler_name"],
            sampler_options=description["sampler_options"], model_sampling=description["model_sampling"],
            model_family=description["model_family"], seed=description["seed"], method=description["method"],
            settings=description["settings"], diagnostics=diagnostics, denoiser_calls=description["denoiser_calls"],
            start_latent=tensors.get("start_latent"), trajectory=tensors.get("trajectory"),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise InversionFileError(f"{name} is incomplete ({error!r} missing or malformed); save the inversion again.") from None
    steps = inversion.noises.shape[0]
    trajectory_fits = inversion.trajectory is None or tuple(inversion.trajectory.shape) == (steps + 1,) + inversion.latent_shape
    if inversion.sigmas.shape != (steps + 1,) or tuple(latent["samples"].shape) != inversion.latent_shape or not trajectory_fits:
        raise InversionFileError(f"{name} is inconsistent (latent, noises and sigmas do not fit together); save it again.")
    return latent, inversion


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key]
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (ComfyUI's IS_CHANGED: a changed file is loaded again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_inside(name: str, base_dir: str | os.PathLike) -> Path:
    """``base_dir / name``, refusing any name that escapes ``base_dir`` (``..``, absolute paths, symlinks out)."""
    base = Path(base_dir).resolve()
    candidate = (base / name).resolve()
    if candidate != base and base not in candidate.parents:
        raise InversionFileError(f"{name!r} points outside {base}; only files inside ComfyUI's input and output folders can be used.")
    return candidate
