"""Saving and loading inversions: bit-identical round trip, fresh-process load, atomic writes, every refusal."""

import json
import subprocess
import sys
from pathlib import Path

import fake_comfy
import pytest
import torch
from fake_comfy import FakeModel, conditioning
from renoise_pack import nodes as pack_nodes
from renoise_pack.nodes import host, inversion_file
from renoise_pack.renoise_core import EditLossConfig, NoiseCorrectionConfig
from safetensors import safe_open
from safetensors.torch import save_file

NODES = pack_nodes.NODE_CLASS_MAPPINGS
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fake_host(monkeypatch, tmp_path):
    monkeypatch.setattr(host, "bridge", lambda: fake_comfy)
    monkeypatch.setitem(fake_comfy.DIRECTORIES, "input", str(tmp_path / "input"))
    monkeypatch.setitem(fake_comfy.DIRECTORIES, "output", str(tmp_path / "output"))
    (tmp_path / "input").mkdir()
    (tmp_path / "output").mkdir()
    return tmp_path


@pytest.fixture
def inverted(mixture):
    x0 = mixture.sample([3, 5], seed=1)
    latent = {"samples": x0 / fake_comfy.LATENT_SCALE, "batch_index": [4, 5]}
    return NODES["ReNoiseInvert"]().invert(
        FakeModel(mixture), conditioning(mixture, 3), conditioning(mixture, None), latent, "euler_ancestral", "simple", 4, 1.0, 1.0,
        3, 11, edit_loss=EditLossConfig(), noise_correction=NoiseCorrectionConfig(),
    )


def save(inverted, prefix="renoise/inv"):
    latent, inversion, _ = inverted
    return NODES["ReNoiseSaveInversion"]().save(latent, inversion, prefix)["ui"]["renoise_inversions"][0]


def test_round_trip_is_bit_identical(inverted, fake_host):
    info = save(inverted)
    assert info["filename"] == "inv_00001_.safetensors" and info["subfolder"] == "renoise"
    choices = NODES["ReNoiseLoadInversion"].INPUT_TYPES()["required"]["inversion_file"][0]
    assert choices == ["renoise/inv_00001_.safetensors [output]"]
    latent, inversion, sigmas = NODES["ReNoiseLoadInversion"]().load(choices[0])
    original_latent, original, original_sigmas = inverted
    assert torch.equal(latent["samples"], original_latent["samples"]) and latent["batch_index"] == [4, 5]
    assert torch.equal(inversion.noises, original.noises) and torch.equal(sigmas, original_sigmas)
    for field in ("sampler_name", "sampler_options", "model_sampling", "model_family", "seed", "method", "settings", "denoiser_calls"):
        assert getattr(inversion, field) == getattr(original, field), field
    for a, b in zip(inversion.diagnostics, original.diagnostics, strict=True):
        assert (a.sigma, a.sigma_next, a.evaluations, a.denoiser_calls) == (b.sigma, b.sigma_next, b.evaluations, b.denoiser_calls)
        assert torch.equal(a.change_norms, b.change_norms) and torch.equal(a.relative_changes, b.relative_changes)


def test_counter_advances_and_input_folder_is_listed(inverted, fake_host):
    save(inverted)
    assert save(inverted)["filename"] == "inv_00002_.safetensors"
    (fake_host / "input" / "shared.safetensors").write_bytes((fake_host / "output" / "renoise" / "inv_00001_.safetensors").read_bytes())
    save_file({"weight": torch.zeros(2)}, str(fake_host / "input" / "a_checkpoint.safetensors"))  # not an inversion: not listed
    choices = NODES["ReNoiseLoadInversion"].INPUT_TYPES()["required"]["inversion_file"][0]
    assert "shared.safetensors" in choices and "a_checkpoint.safetensors" not in choices and len(choices) == 3


def test_file_written_by_one_process_loads_in_a_fresh_one(inverted, fake_host):
    save(inverted)
    path = fake_host / "output" / "renoise" / "inv_00001_.safetensors"
    script = (
        "import sys, importlib.util, json, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(ROOT)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); sys.modules['pack'] = pack; spec.loader.exec_module(pack)\n"
        "from pack.nodes.inversion_file import load_inversion\n"
        f"latent, inv = load_inversion({str(path)!r})\n"
        "print(json.dumps([float(latent['samples'].double().sum()), float(inv.noises.double().sum()), inv.sampler_name]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    latent_sum, noise_sum, sampler = json.loads(out)
    assert latent_sum == float(inverted[0]["samples"].double().sum()) and noise_sum == float(inverted[1].noises.double().sum())
    assert sampler == "euler_ancestral"


def test_a_failed_write_leaves_nothing_behind(inverted, fake_host, monkeypatch):
    def crash(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a file")
        raise KeyboardInterrupt("cancelled while writing")

    monkeypatch.setattr(inversion_file, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save(inverted)
    assert list((fake_host / "output").rglob("*")) == [fake_host / "output" / "renoise"]


@pytest.fixture
def saved_path(inverted, fake_host):
    save(inverted)
    return fake_host / "output" / "renoise" / "inv_00001_.safetensors"


def load_error(path):
    with pytest.raises(ValueError) as error:
        inversion_file.load_inversion(path)
    return str(error.value)


def test_truncated_file_is_refused(saved_path):
    data = saved_path.read_bytes()
    saved_path.write_bytes(data[: len(data) // 2])
    assert "truncated or damaged" in load_error(saved_path)


def test_tampered_file_is_refused(saved_path):
    data = bytearray(saved_path.read_bytes())
    data[-10] ^= 0xFF  # flip bits inside the tensor data
    saved_path.write_bytes(bytes(data))
    assert "does not match its checksum" in load_error(saved_path)


def test_foreign_file_is_refused(fake_host):
    path = fake_host / "input" / "model.safetensors"
    save_file({"weight": torch.zeros(2)}, str(path))
    assert "is not a ReNoise inversion" in load_error(path)
    (fake_host / "input" / "notes.safetensors").write_text("hello")
    assert "not a complete safetensors file" in load_error(fake_host / "input" / "notes.safetensors")


def test_newer_format_is_refused(saved_path):
    with safe_open(str(saved_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = dict(f.metadata())
    metadata["format_version"] = "99"
    save_file(tensors, str(saved_path), metadata=metadata)
    assert "newer pack" in load_error(saved_path)


def test_paths_cannot_escape(fake_host, inverted):
    assert "outside" in NODES["ReNoiseLoadInversion"].VALIDATE_INPUTS("../../etc/passwd")
    assert "outside" in NODES["ReNoiseLoadInversion"].VALIDATE_INPUTS("/etc/passwd [output]")
    assert "no file" in NODES["ReNoiseLoadInversion"].VALIDATE_INPUTS("missing.safetensors")
    with pytest.raises(Exception, match="outside the output folder"):
        save(inverted, prefix="../../escape")


def test_changed_file_is_loaded_again(saved_path):
    before = NODES["ReNoiseLoadInversion"].IS_CHANGED("renoise/inv_00001_.safetensors [output]")
    saved_path.write_bytes(saved_path.read_bytes() + b"")
    assert NODES["ReNoiseLoadInversion"].IS_CHANGED("renoise/inv_00001_.safetensors [output]") == before
    data = bytearray(saved_path.read_bytes())
    data[-1] ^= 1
    saved_path.write_bytes(bytes(data))
    assert NODES["ReNoiseLoadInversion"].IS_CHANGED("renoise/inv_00001_.safetensors [output]") != before


def test_save_refuses_a_latent_from_elsewhere(inverted):
    _, inversion, _ = inverted
    with pytest.raises(ValueError, match="connect ReNoiseInvert's `latent` and `inversion` outputs together"):
        NODES["ReNoiseSaveInversion"]().save({"samples": torch.zeros(1, 4, 8, 8)}, inversion, "x")


def test_trajectory_round_trip_and_format_1_files(saved_path, inverted, mixture):
    """Format 2 carries the trajectory bit for bit; a file written by 0.1.0 (format 1, no trajectory) still loads
    and samples, and masked sampling from it stops with a message saying to re-invert."""
    _, original, _ = inverted
    latent, inversion = inversion_file.load_inversion(saved_path)
    assert inversion.trajectory is not None and torch.equal(inversion.trajectory, original.trajectory)

    with safe_open(str(saved_path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "trajectory"}
        metadata = dict(f.metadata())
    assert metadata["format_version"] == "2"
    metadata["format_version"] = "1"
    metadata["sha256"] = inversion_file._checksum(tensors)  # what 0.1.0 wrote: the same layout without the trajectory
    save_file(tensors, str(saved_path), metadata=metadata)
    latent, legacy = inversion_file.load_inversion(saved_path)
    assert legacy.trajectory is None and torch.equal(legacy.noises, original.noises)
    (sampler,) = NODES["ReNoiseSampler"]().get_sampler(legacy)  # unmasked sampling works as before
    model, positive = FakeModel(mixture), conditioning(mixture, 3)
    sampler.sample_custom(model, positive, conditioning(mixture, None), 1.0, latent, legacy.sigmas)
    with pytest.raises(ValueError, match=r"file format 1.*Invert the image again"):
        NODES["ReNoiseSampler"]().get_sampler(legacy, mask=torch.zeros(128, 128))
