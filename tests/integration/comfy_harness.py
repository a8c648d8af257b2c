"""Runs the pack inside a real ComfyUI, in this process, and prints one JSON line of results.

Usage: ``python comfy_harness.py SCENARIO WORKDIR`` with ``COMFYUI_PATH`` set; run by ``test_comfyui.py`` in a
subprocess (ComfyUI's top-level ``nodes`` module must not meet this repo's ``nodes`` package in one process).

Everything here is test scaffolding: an exact analytic denoiser installed as a ComfyUI model (a Gaussian mixture
whose class prior is read from the conditioning tensor), tiny random-weight checkpoints written with safetensors,
and a node that captures latents. The pack itself is loaded with ComfyUI's own custom-node loader.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import traceback
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[2]
COMFYUI_PATH = Path(os.environ["COMFYUI_PATH"]).resolve()
sys.path.insert(0, str(COMFYUI_PATH))
os.chdir(COMFYUI_PATH)

from comfy.cli_args import args  # noqa: E402

args.cpu = True

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
import execution  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's)

sys.path.append(str(PACK_DIR))  # after ComfyUI: `nodes` stays ComfyUI's; only renoise_core is taken from here
from renoise_core.analytic import GaussianMixture, SpectralMixture, psnr  # noqa: E402

NUM_CLASSES = 16
LATENT_SHAPE = (4, 16, 16)
MIXTURE = GaussianMixture.random(components=NUM_CLASSES, shape=LATENT_SHAPE, std=1.0, seed=0)
#: the exact models a graph can pick ("mixture" input of AnalyticModel / AnalyticLatent): the isotropic mixture and
#: one whose components share a natural-image spectrum (a realistic Jacobian for the solvers)
MIXTURES = {"isotropic": MIXTURE, "spectral": SpectralMixture.random(components=NUM_CLASSES, shape=(4, 32, 32), within=1.0, seed=0)}
SIZED_MIXTURES = {LATENT_SHAPE: MIXTURE}


def mixture_for(shape: tuple[int, ...]) -> GaussianMixture:
    """The isotropic mixture for latents of ``shape`` (C, H, W): MIXTURE, or one made (once) for that size."""
    shape = tuple(shape)
    if shape not in SIZED_MIXTURES:
        SIZED_MIXTURES[shape] = GaussianMixture.random(components=NUM_CLASSES, shape=shape, std=1.0, seed=0)
    return SIZED_MIXTURES[shape]
SD15_SCALE = 0.18215
#: local edits: classes whose means agree outside BOX (latent rows, columns) and differ (along one pattern) inside
BOX = (slice(4, 12), slice(5, 13))


MIXTURES["boxed"] = GaussianMixture.boxed(NUM_CLASSES, LATENT_SHAPE, BOX, seed=0)
CAPTURED: dict[str, torch.Tensor] = {}
NETWORK_CALLS = {"count": 0}  # forward calls of the analytic networks (one per denoiser call at cfg 1)


# --- models ---------------------------------------------------------------------------------------------------

def tiny_unet_config(context_dim: int = 768) -> dict:
    """An SD1.5-architecture UNet config as ComfyUI's detection produces it, one level deep (model_channels 320
    is what detection matches on)."""
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1], "channel_mult": [1],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": context_dim,
        "use_temporal_resblock": False, "use_temporal_attention": False, "num_heads": 8, "num_head_channels": -1,
    }


def fill_random(module: torch.nn.Module, seed: int) -> None:
    """ComfyUI's layers skip weight init: give every parameter sane seeded values (norm weights 1, biases 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim <= 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))


class Interrupt:
    """ComfyUI's cancel (interrupt_current_processing), requested after a given number of model calls."""

    def __init__(self):
        self.after_calls = None

    def count_call(self) -> None:
        if self.after_calls is not None:
            self.after_calls -= 1
            if self.after_calls == 0:
                self.after_calls = None
                comfy.model_management.interrupt_current_processing(True)


INTERRUPT = Interrupt()


class AnalyticUNet(torch.nn.Module):
    """Replaces ``diffusion_model``: receives ``x / sqrt(1 + sigma^2)`` and the integer timestep, returns the exact
    eps (or v) of the Gaussian mixture, conditioned on the class prior stored in ``context[:, 0, :K]``."""

    def __init__(self, training_sigmas: torch.Tensor, prediction: str, mixture=MIXTURE):
        super().__init__()
        self.register_buffer("training_sigmas", training_sigmas.float().clone())
        self.prediction = prediction
        self.mixture = mixture
        self.dtype = torch.float32

    def forward(self, x, timesteps=None, context=None, **kwargs):
        NETWORK_CALLS["count"] += 1
        sigma = self.training_sigmas[timesteps.round().long()].to(x.device)
        scale = torch.sqrt(1 + sigma.double() ** 2).view(-1, 1, 1, 1)
        x_k = (x.double() * scale).float()
        prior = context[:, 0, :NUM_CLASSES].double()
        prior = prior / prior.sum(1, keepdim=True)
        mixture = self.mixture
        if tuple(x_k.shape[1:]) != tuple(mixture.means.shape[1:]):
            if mixture is not MIXTURE:  # only the isotropic model exists at every size; never swap another one for it
                raise ValueError(f"latent {tuple(x_k.shape[1:])} does not fit the analytic model {tuple(mixture.means.shape[1:])}")
            mixture = mixture_for(x_k.shape[1:])
        x0 = mixture.posterior_mean(x_k, sigma, prior).double()
        INTERRUPT.count_call()
        eps = (x_k.double() - x0) / sigma.double().view(-1, 1, 1, 1)
        if self.prediction == "v":  # DDPM units: x_ddpm = a x0 + s eps, v = a eps - s x0
            a, s = 1 / scale, sigma.double().view(-1, 1, 1, 1) / scale
            return (a * eps - s * x0).float()
        return eps.float()


def with_network(model_config, make_network):
    """A ComfyUI model of ``model_config`` whose ``diffusion_model`` is ``make_network(model)``, as a MODEL."""
    model = model_config.get_model({}, device="cpu")
    model.diffusion_model = make_network(model)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def analytic_model(prediction: str = "eps", mixture: str = "isotropic"):
    """For "v", the graph patches the model with ModelSamplingDiscrete v_prediction."""
    return with_network(comfy.supported_models.SD15(tiny_unet_config()),
                        lambda m: AnalyticUNet(m.model_sampling.sigmas, prediction, MIXTURES[mixture]))


# --- test-only nodes ------------------------------------------------------------------------------------------

class AnalyticModel:
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"prediction": (["eps", "v"],)}, "optional": {"mixture": (list(MIXTURES),)}}

    def load(self, prediction, mixture="isotropic"):
        return (analytic_model(prediction, mixture),)


class ClassConditioning:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"class_index": ("INT", {"default": -1, "min": -1, "max": NUM_CLASSES - 1}),
                             "context_dim": ("INT", {"default": 768})}}

    def encode(self, class_index, context_dim):
        prior = MIXTURE.prior(None if class_index < 0 else [class_index])[0].float()
        context = torch.zeros((1, 77, context_dim))
        context[0, 0, :NUM_CLASSES] = prior
        return ([[context, {}]],)


class AnalyticLatent:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"classes": ("STRING", {"default": "3"}), "seed": ("INT", {"default": 1})},
                "optional": {"mixture": (list(MIXTURES),), "height": ("INT", {"default": 0}),  # 0: the model's own size
                             "width": ("INT", {"default": 0})}}

    def make(self, classes, seed, mixture="isotropic", height=None, width=None):
        """Samples of ``mixture`` at its own size; ``height`` / ``width`` (latent pixels) pick another size, which
        only the isotropic model has."""
        model = MIXTURES[mixture]
        size = (height or model.means.shape[2], width or model.means.shape[3])
        if size != tuple(model.means.shape[2:]):
            if mixture != "isotropic":
                raise ValueError(f"the {mixture} model's latents are {tuple(model.means.shape[2:])}, not {size}")
            model = mixture_for((LATENT_SHAPE[0], *size))  # other sizes: the isotropic model of that size
        x0 = model.sample([int(c) for c in classes.split(",")], seed=seed)
        CAPTURED["x0"] = x0
        return ({"samples": x0 / SD15_SCALE},)  # LATENT space; the sampler sees x0 after process_in


class CaptureLatent:
    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "name": ("STRING", {"default": "out"})}}

    def capture(self, samples, name):
        CAPTURED[name] = samples["samples"].clone() * SD15_SCALE  # back to the sampler's space
        return {}


class BoxMask:
    """The MASK of BOX at image resolution (8 px per latent pixel); ``size`` other than 128 gives a wrong-size mask."""

    RETURN_TYPES = ("MASK",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("FLOAT", {"default": 1.0}), "size": ("INT", {"default": 128})}}

    def make(self, value, size):
        mask = torch.zeros((1, 128, 128))
        mask[:, BOX[0].start * 8 : BOX[0].stop * 8, BOX[1].start * 8 : BOX[1].stop * 8] = value
        if value == 1.0 and size == 0:  # all ones
            mask.fill_(1.0)
        return (mask if size in (0, 128) else torch.zeros((1, size, 128)),)


class CaptureMask:
    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"mask": ("MASK",), "name": ("STRING", {"default": "mask"})}}

    def capture(self, mask, name):
        CAPTURED[name] = mask.clone()
        return {}


TEST_NODES = {"AnalyticModel": AnalyticModel, "ClassConditioning": ClassConditioning,
              "AnalyticLatent": AnalyticLatent, "CaptureLatent": CaptureLatent, "BoxMask": BoxMask, "CaptureMask": CaptureMask}


# --- running prompts ------------------------------------------------------------------------------------------

class FakeServer:
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


def setup(workdir: Path) -> None:
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    ok = asyncio.run(nodes.load_custom_node(str(PACK_DIR), module_parent="custom_nodes"))
    if not ok:
        raise RuntimeError("ComfyUI failed to load the pack")
    nodes.NODE_CLASS_MAPPINGS.update(TEST_NODES)
    for sub in ("input", "output", "temp", "checkpoints"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(workdir / "input"))
    folder_paths.set_output_directory(str(workdir / "output"))
    folder_paths.set_temp_directory(str(workdir / "temp"))
    folder_paths.add_model_folder_path("checkpoints", str(workdir / "checkpoints"), is_default=True)


def run_prompt(prompt: dict) -> dict:
    """Validate with ComfyUI's validate_prompt and execute in-process; returns status and error text."""
    CAPTURED_BEFORE = set(CAPTURED)
    valid = asyncio.run(execution.validate_prompt("1", prompt, None))
    if not valid[0]:
        return {"valid": False, "error": json.dumps(valid[1]) + json.dumps(valid[3])[:2000]}
    node_errors = {node: [e.get("details", "") + " " + e.get("message", "") for e in info["errors"]]
                   for node, info in valid[3].items()}
    server = FakeServer()
    executor = execution.PromptExecutor(server, cache_type=False)
    calls_before = NETWORK_CALLS["count"]
    executor.execute(prompt, "1", {}, valid[2])
    errors = [data for event, data in executor.status_messages if event == "execution_error"]
    return {"valid": True, "success": executor.success, "error": errors[0].get("exception_message") if errors else None,
            "captured": sorted(set(CAPTURED) - CAPTURED_BEFORE), "node_errors": node_errors,
            "network_calls": NETWORK_CALLS["count"] - calls_before}


def analytic_graph(sampler: str, renoise_steps: int, *, classes="3", edit_class: int | None = None, cfg=1.0,
                   noise_correction: str | None = None, continue_with="samplercustom", prediction="eps", patch=None,
                   sampling_sigmas_steps: int | None = None, steps=4, edit_loss=False, skip: int | None = None,
                   mixture: str = "isotropic", solver: str | None = None, scheduler="simple", sample_cfg: float | None = None) -> dict:
    """The standard graphs: ReNoiseInvert, then either ReNoiseSampler + SamplerCustom or KSamplerAdvanced.
    ``solver``: None leaves ReNoiseInvert's solver input unconnected; a method name connects a ReNoiseSolver.
    ``sample_cfg``: the sampling node's cfg (default: ``cfg``, the inversion's)."""
    context_dim = 768
    if prediction == "v":
        patch = "v_prediction"
    first_class = int(classes.split(",")[0])
    prompt = {
        "1": {"class_type": "AnalyticModel", "inputs": {"prediction": prediction, "mixture": mixture}},
        "2": {"class_type": "ClassConditioning", "inputs": {"class_index": first_class, "context_dim": context_dim}},
        "3": {"class_type": "ClassConditioning", "inputs": {"class_index": -1, "context_dim": context_dim}},
        "4": {"class_type": "AnalyticLatent", "inputs": {"classes": classes, "seed": 1, "mixture": mixture}},
        "6": {"class_type": "ReNoiseInvert", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "sampler_name": sampler, "scheduler": scheduler, "steps": steps, "denoise": 1.0, "cfg": cfg,
            "renoise_steps": renoise_steps, "seed": 7865}},
        "9": {"class_type": "CaptureLatent", "inputs": {"samples": ["8", 0], "name": "reconstruction"}},
        "10": {"class_type": "CaptureLatent", "inputs": {"samples": ["6", 0], "name": "inverted"}},
    }
    if skip is not None:  # EditFriendlyInvert instead of ReNoiseInvert
        inputs = prompt["6"]["inputs"]
        del inputs["renoise_steps"]
        prompt["6"] = {"class_type": "EditFriendlyInvert", "inputs": dict(inputs, skip=skip)}
    if patch is not None:
        prompt["11"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": patch, "zsnr": False}}
        prompt["6"]["inputs"]["model"] = ["11", 0]
    model_ref = prompt["6"]["inputs"]["model"]
    if noise_correction:
        prompt["5"] = {"class_type": "NoiseCorrection", "inputs": {"mode": noise_correction, "steps": 10, "step_size": 1.8}}
        prompt["6"]["inputs"]["noise_correction"] = ["5", 0]
    if solver is not None:
        prompt["15"] = {"class_type": "ReNoiseSolver", "inputs": solver_inputs(solver)}
        prompt["6"]["inputs"]["solver"] = ["15", 0]
    if edit_loss:
        prompt["12"] = {"class_type": "EditLossConfig", "inputs": {"lambda_ac": 20.0, "lambda_kl": 0.065, "reg_steps": 4,
                                                                    "ac_rolls": 5, "patch_size": 4}}
        prompt["6"]["inputs"]["edit_loss"] = ["12", 0]
    target = ["2", 0]
    if edit_class is not None:
        prompt["13"] = {"class_type": "ClassConditioning", "inputs": {"class_index": edit_class, "context_dim": context_dim}}
        target = ["13", 0]
    if continue_with == "ksampleradvanced":
        prompt["8"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": model_ref, "add_noise": "disable", "noise_seed": 0, "steps": steps, "cfg": sample_cfg or cfg, "sampler_name": sampler,
            "scheduler": scheduler, "positive": target, "negative": ["3", 0], "latent_image": ["6", 0],
            "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    else:
        sigmas = ["6", 2]
        if sampling_sigmas_steps is not None:
            prompt["14"] = {"class_type": "BasicScheduler", "inputs": {"model": model_ref, "scheduler": "simple",
                                                                        "steps": sampling_sigmas_steps, "denoise": 1.0}}
            sigmas = ["14", 0]
        prompt["7"] = {"class_type": "ReNoiseSampler", "inputs": {"inversion": ["6", 1]}}
        prompt["8"] = {"class_type": "SamplerCustom", "inputs": {
            "model": model_ref, "add_noise": False, "noise_seed": 0, "cfg": sample_cfg or cfg, "positive": target, "negative": ["3", 0],
            "sampler": ["7", 0], "sigmas": sigmas, "latent_image": ["6", 0]}}
    return prompt


def solver_inputs(method: str, **changes) -> dict:
    """ReNoiseSolver's widgets at their defaults (the paper's first-step rule), with ``method``."""
    inputs = {"method": method, "history": 3, "average_start": 8, "first_step_below_timestep": 250, "first_step_renoise_steps": 4,
              "first_step_average_start": 0, "convergence_tol": 0.0}
    inputs.update(changes)
    return inputs


def reconstruction_db(result: dict) -> float | None:
    if "reconstruction" not in CAPTURED or not result.get("success"):
        return None
    return psnr(CAPTURED["reconstruction"], CAPTURED["x0"]).mean().item()


def scenario_analytic(workdir: Path) -> dict:
    cases = {
        "euler_k0_ksampleradvanced": dict(sampler="euler", renoise_steps=0, continue_with="ksampleradvanced"),
        "euler_k9_ksampleradvanced": dict(sampler="euler", renoise_steps=9, continue_with="ksampleradvanced"),
        "ddim_k9_samplercustom": dict(sampler="ddim", renoise_steps=9),
        "ea_k9_none": dict(sampler="euler_ancestral", renoise_steps=9),
        "ea_k9_exact": dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="exact"),
        "ea_turbo_defaults": dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="optimize", edit_loss=True),
        "ea_k0": dict(sampler="euler_ancestral", renoise_steps=0),
        "ea_k9_exact_cfg3": dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="exact", cfg=3.0),
        "ddpm_k9_exact": dict(sampler="ddpm", renoise_steps=9, noise_correction="exact"),
        "lcm_patched_exact": dict(sampler="lcm", renoise_steps=9, noise_correction="exact", patch="lcm"),
        "vpred_euler_k0": dict(sampler="euler", renoise_steps=0, prediction="v", continue_with="ksampleradvanced"),
        "vpred_euler_k9": dict(sampler="euler", renoise_steps=9, prediction="v", continue_with="ksampleradvanced"),
        "batch2_ea_exact": dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="exact", classes="3,5"),
        "wrong_sigmas": dict(sampler="euler_ancestral", renoise_steps=2, sampling_sigmas_steps=6),
        "edit_friendly_ddpm_cfg3": dict(sampler="ddpm", renoise_steps=0, skip=3, steps=10, cfg=3.0),
        "edit_friendly_lcm_patched": dict(sampler="lcm", renoise_steps=0, skip=0, steps=4, patch="lcm"),
    }
    results = {}
    for name, kwargs in cases.items():
        CAPTURED.clear()
        result = run_prompt(analytic_graph(**kwargs))
        result["psnr"] = reconstruction_db(result)
        results[name] = result
    results["edit_3_to_9"] = edit_3_to_9(dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="optimize", edit_loss=True))
    return results


def edit_3_to_9(graph: dict, edit_cfg: float | None = None) -> dict:
    """Editing: invert class 3 with ``graph`` (analytic_graph's settings), sample it back with class 3 and with
    class 9 (at ``edit_cfg``, default the graph's cfg). The result carries the distances of both to class 9's and to
    class 3's mean (an edit moves toward the first and away from the second)."""
    CAPTURED.clear()
    result = run_prompt(analytic_graph(**graph))
    reconstruction = CAPTURED.get("reconstruction")
    result.update(run_prompt(analytic_graph(**graph, edit_class=9, sample_cfg=edit_cfg)))
    if result.get("success") and reconstruction is not None:
        edited = CAPTURED["reconstruction"].double()
        means = MIXTURES[graph.get("mixture", "isotropic")].means
        result["reconstruction_to_target"] = (reconstruction.double() - means[9]).norm().item()
        result["edit_to_target"] = (edited - means[9]).norm().item()
        result["reconstruction_to_source"] = (reconstruction.double() - means[3]).norm().item()
        result["edit_to_source"] = (edited - means[3]).norm().item()
    return result


# --- tiny checkpoints -----------------------------------------------------------------------------------------

def write_tiny_sd15_checkpoint(path: Path) -> None:
    """A random-weight SD1.5-architecture checkpoint (tiny UNet, real-size CLIP-L and VAE) that
    CheckpointLoaderSimple detects as SD1.5."""
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    from safetensors.torch import save_file

    config = comfy.supported_models.SD15(tiny_unet_config())
    unet = config.get_model({}, device="cpu").diffusion_model
    fill_random(unet, 1)
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(
        ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
        embed_dim=4)
    fill_random(vae, 2)
    clip = comfy.sd1_clip.SDClipModel(device="cpu")
    fill_random(clip, 3)
    state = {}
    for prefix, module in (("model.diffusion_model.", unet), ("first_stage_model.", vae), ("cond_stage_model.", clip)):
        for key, value in module.state_dict().items():
            state[prefix + key] = value.detach().to(torch.float16).contiguous()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    save_file(state, str(path))


def scenario_checkpoint(workdir: Path) -> dict:
    from PIL import Image

    write_tiny_sd15_checkpoint(workdir / "checkpoints" / "tiny_sd15.safetensors")
    gradient = torch.linspace(0, 255, 128).view(1, -1, 1).expand(128, 128, 3).clone()
    gradient[..., 1] = gradient[..., 1].t()
    Image.fromarray(gradient.byte().numpy()).save(workdir / "input" / "photo.png")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a cat"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "ReNoiseInvert", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0],
            "sampler_name": "euler_ancestral", "scheduler": "simple", "steps": 4, "denoise": 1.0, "cfg": 1.0,
            "renoise_steps": 2, "seed": 7865, "noise_correction": ["12", 0], "edit_loss": ["13", 0]}},
        "7": {"class_type": "ReNoiseSampler", "inputs": {"inversion": ["6", 1]}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["2", 0], "negative": ["3", 0],
            "sampler": ["7", 0], "sigmas": ["6", 2], "latent_image": ["6", 0]}},
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "renoise_test"}},
        "12": {"class_type": "NoiseCorrection", "inputs": {"mode": "optimize", "steps": 10, "step_size": 1.8}},
        "13": {"class_type": "EditLossConfig", "inputs": {"lambda_ac": 20.0, "lambda_kl": 0.065, "reg_steps": 4,
                                                           "ac_rolls": 5, "patch_size": 4}},
    }
    result = run_prompt(prompt)
    saved = sorted(p.name for p in (workdir / "output").glob("renoise_test*.png"))
    result["saved"] = saved
    if saved:
        image = Image.open(workdir / "output" / saved[0])
        result["image_size"] = list(image.size)
    return {"sd15_checkpoint": result}


def tiny_sdxl_unet_config() -> dict:
    """SDXL's detected config (transformer depths [0, 0, 2, 2, 10, 10], adm 2816) with 320 channels at every level."""
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "channel_mult": [1, 1, 1], "transformer_depth_middle": 10,
        "use_linear_in_transformer": True, "context_dim": 2048, "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def write_checkpoint_with_comfyui(path: Path, model_config) -> None:
    """Random weights for UNet, text encoders and VAE, converted to checkpoint format by ComfyUI's own saving code
    (``state_dict_for_saving``, as the CheckpointSave node does) and stored in fp16."""
    import comfy.ldm.models.autoencoder
    import comfy.sd
    from safetensors.torch import save_file

    model = model_config.get_model({}, device="cpu")
    fill_random(model.diffusion_model, 1)
    clip = comfy.sd.CLIP(target=model_config.clip_target(), embedding_directory=None)
    fill_random(clip.cond_stage_model, 2)
    vae_model = comfy.ldm.models.autoencoder.AutoencoderKL(
        ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
        embed_dim=4)
    fill_random(vae_model, 3)
    state = model.state_dict_for_saving(clip.get_sd(), vae_model.state_dict(), None)
    save_file({k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}, str(path))


def core_spec_mismatches() -> list[str]:
    """The workflow generator's socket layout of ComfyUI's own nodes against their real INPUT_TYPES."""
    sys.path.insert(0, str(PACK_DIR / "scripts"))
    import make_workflows

    problems = []
    for type_, (inputs, outputs) in make_workflows.NODE_SPECS.items():
        cls = nodes.NODE_CLASS_MAPPINGS.get(type_)
        if cls is None:
            problems.append(f"{type_}: not a node type in this ComfyUI")
            continue
        spec = cls.INPUT_TYPES()
        real = []
        for section in ("required", "optional"):
            for name, (kind, *_) in spec.get(section, {}).items():
                if isinstance(kind, list) or str(kind) == "COMBO":
                    real.append((name, "WIDGET"))
                    continue
                kind = str(getattr(kind, "value", kind))
                real.append((name, "WIDGET" if kind in ("INT", "FLOAT", "STRING", "BOOLEAN") else kind))
        ours = [(name, "WIDGET" if kind in make_workflows.WIDGET_KINDS else kind) for name, kind in inputs]
        if ours != real:
            problems.append(f"{type_}: inputs {ours} != {real}")
        if [t for _, t in outputs] != [str(getattr(t, "value", t)) for t in cls.RETURN_TYPES]:
            problems.append(f"{type_}: outputs {outputs} != {cls.RETURN_TYPES}")
    return problems


def scenario_workflows(workdir: Path) -> dict:
    """Every API workflow: ComfyUI's validate_prompt, then a full run on tiny random checkpoints written under the
    workflows' file names. Images are scaled to 128 px instead of 512/1024 to keep CPU time low; the graphs are
    otherwise run as shipped."""
    import shutil

    import comfy.supported_models as sm

    sys.path.insert(0, str(PACK_DIR / "scripts"))
    import make_workflows

    results = {"core_spec_mismatches": core_spec_mismatches()}
    checkpoints = workdir / "checkpoints"
    write_checkpoint_with_comfyui(checkpoints / make_workflows.CHECKPOINTS["sd15"], sm.SD15(tiny_unet_config()))
    sdxl = checkpoints / make_workflows.CHECKPOINTS["sdxl_base"]
    write_checkpoint_with_comfyui(sdxl, sm.SDXL(tiny_sdxl_unet_config()))
    shutil.copy(sdxl, checkpoints / make_workflows.CHECKPOINTS["sdxl_turbo"])
    loras = workdir / "loras"
    loras.mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(loras), is_default=True)
    from safetensors.torch import save_file

    save_file({"lora_unet_input_blocks_4_1_proj_in.alpha": torch.tensor(1.0)}, str(loras / make_workflows.CHECKPOINTS["lcm_lora_sdxl"]))
    shutil.copy(COMFYUI_PATH / "input" / "example.png", workdir / "input" / "example.png")
    # Flux needs a T5-XXL text encoder whose size ComfyUI fixes (4.7B parameters): no tiny checkpoint is possible,
    # so that workflow is validated against a placeholder file and not run (its nodes run in scenario_flow).
    save_file({"placeholder": torch.zeros(1)}, str(checkpoints / make_workflows.CHECKPOINTS["flux_schnell"]))
    validate_only = {"flux_schnell_edit"}

    for name in make_workflows.WORKFLOWS:
        prompt = json.loads((PACK_DIR / "workflows" / "api" / f"{name}.json").read_text())
        for entry in prompt.values():
            if entry["class_type"] == "ImageScale":
                entry["inputs"].update(width=128, height=128)
        if name in validate_only:
            valid = asyncio.run(execution.validate_prompt("1", prompt, None))
            results[name] = {"valid": valid[0], "validated_only": True, "error": None if valid[0] else str(valid[1])}
            continue
        before = set((workdir / "output").rglob("*.png"))
        result = run_prompt(prompt)
        result["saved"] = sorted(str(p.relative_to(workdir / "output")) for p in set((workdir / "output").rglob("*.png")) - before)
        results[name] = result
    return results


def scenario_files(workdir: Path) -> dict:
    """Save an inversion with ReNoiseSaveInversion, load it with ReNoiseLoadInversion in a second prompt, and
    reconstruct from the loaded copy: the result must equal the direct reconstruction."""
    results = {}
    CAPTURED.clear()
    graph = analytic_graph("euler_ancestral", 9, noise_correction="exact")
    graph["20"] = {"class_type": "ReNoiseSaveInversion", "inputs": {"latent": ["6", 0], "inversion": ["6", 1],
                                                                     "filename_prefix": "renoise/test"}}
    results["save"] = run_prompt(graph)
    direct = CAPTURED.get("reconstruction")
    results["files"] = sorted(str(p.relative_to(workdir / "output")) for p in (workdir / "output").rglob("*.safetensors"))
    choices = nodes.NODE_CLASS_MAPPINGS["ReNoiseLoadInversion"].INPUT_TYPES()["required"]["inversion_file"][0]
    results["choices"] = choices
    CAPTURED.clear()
    load = {
        "1": {"class_type": "AnalyticModel", "inputs": {"prediction": "eps"}},
        "2": {"class_type": "ClassConditioning", "inputs": {"class_index": 3, "context_dim": 768}},
        "3": {"class_type": "ClassConditioning", "inputs": {"class_index": -1, "context_dim": 768}},
        "4": {"class_type": "AnalyticLatent", "inputs": {"classes": "3", "seed": 1}},  # only to capture x0
        "5": {"class_type": "ReNoiseLoadInversion", "inputs": {"inversion_file": "renoise/test_00001_.safetensors [output]"}},
        "7": {"class_type": "ReNoiseSampler", "inputs": {"inversion": ["5", 1]}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["2", 0], "negative": ["3", 0],
            "sampler": ["7", 0], "sigmas": ["5", 2], "latent_image": ["5", 0]}},
        "9": {"class_type": "CaptureLatent", "inputs": {"samples": ["8", 0], "name": "reconstruction"}},
        "10": {"class_type": "CaptureLatent", "inputs": {"samples": ["4", 0], "name": "unused"}},
    }
    results["load"] = run_prompt(load)
    if direct is not None and "reconstruction" in CAPTURED:
        results["load"]["identical_to_direct"] = bool(torch.equal(direct, CAPTURED["reconstruction"]))
        results["load"]["psnr"] = reconstruction_db(results["load"])
    missing = dict(load, **{"5": {"class_type": "ReNoiseLoadInversion", "inputs": {"inversion_file": "../../escape.safetensors"}}})
    results["escape"] = run_prompt(missing)
    return results


# --- flow models (Flux architecture, CONST sampling) -----------------------------------------------------------

FLOW_MIXTURE = GaussianMixture.random(components=NUM_CLASSES, shape=(16, 16, 16), std=1.0, seed=0, parameterization="flow")
FLOW_MIXTURES = {
    "isotropic": FLOW_MIXTURE,
    "spectral": SpectralMixture.random(components=NUM_CLASSES, shape=(16, 16, 16), within=1.0, seed=0, parameterization="flow"),
}
FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159


class AnalyticFlowNet(torch.nn.Module):
    """Replaces Flux's ``diffusion_model``: receives ``x`` and the timestep (sigma for ModelSamplingFlux, 1000 sigma
    for ModelSamplingSD3's discrete flow), returns ``(x - E[x0 | x]) / sigma``, which CONST turns back into
    ``E[x0 | x]``."""

    def __init__(self, timestep_scale: float, mixture=FLOW_MIXTURE):
        super().__init__()
        self.timestep_scale = timestep_scale
        self.mixture = mixture
        self.dtype = torch.float32

    def forward(self, x, timestep, context=None, y=None, guidance=None, **kwargs):
        NETWORK_CALLS["count"] += 1
        sigma = timestep.double() / self.timestep_scale
        prior = context[:, 0, :NUM_CLASSES].double()
        prior = prior / prior.sum(1, keepdim=True)
        x0 = self.mixture.posterior_mean(x.double(), sigma, prior).double()
        return ((x.double() - x0) / sigma.view(-1, 1, 1, 1)).float()


def analytic_flux(timestep_scale: float, mixture: str = "isotropic"):
    config = comfy.supported_models.FluxSchnell({
        "image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
        "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 4, "depth": 1, "depth_single_blocks": 1,
        "axes_dim": [4, 6, 6], "theta": 10000, "patch_size": 2, "qkv_bias": True})
    return with_network(config, lambda m: AnalyticFlowNet(timestep_scale, FLOW_MIXTURES[mixture]))


class AnalyticFluxModel:
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"timestep_scale": ("FLOAT", {"default": 1.0})}, "optional": {"mixture": (list(FLOW_MIXTURES),)}}

    def load(self, timestep_scale, mixture="isotropic"):
        return (analytic_flux(timestep_scale, mixture),)


class FlowConditioning:
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"class_index": ("INT", {"default": -1, "min": -1, "max": NUM_CLASSES - 1})}}

    def encode(self, class_index):
        context = torch.zeros((1, 8, 4096))
        context[0, 0, :NUM_CLASSES] = FLOW_MIXTURE.prior(None if class_index < 0 else [class_index])[0].float()
        return ([[context, {"pooled_output": torch.zeros((1, 768))}]],)


class FlowLatent:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"classes": ("STRING", {"default": "3"})}, "optional": {"mixture": (list(FLOW_MIXTURES),)}}

    def make(self, classes, mixture="isotropic"):
        x0 = FLOW_MIXTURES[mixture].sample([int(c) for c in classes.split(",")], seed=1)
        CAPTURED["x0"] = x0
        return ({"samples": x0 / FLUX_SCALE + FLUX_SHIFT},)  # LATENT space of Flux


class CaptureFlowLatent:
    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "name": ("STRING", {"default": "out"})}}

    def capture(self, samples, name):
        CAPTURED[name] = (samples["samples"].clone() - FLUX_SHIFT) * FLUX_SCALE
        return {}


TEST_NODES.update({"AnalyticFluxModel": AnalyticFluxModel, "FlowConditioning": FlowConditioning, "FlowLatent": FlowLatent,
                   "CaptureFlowLatent": CaptureFlowLatent})


def flow_graph(patch: str, sampler: str, renoise_steps: int, *, noise_correction=None, denoise=1.0, edit_friendly=False,
               mixture: str = "isotropic", solver: str | None = None) -> dict:
    """Flux (schnell architecture) with ModelSamplingFlux or ModelSamplingSD3, ReNoiseInvert (or
    EditFriendlyInvert) -> ReNoiseSampler -> SamplerCustom."""
    scale = 1.0 if patch == "flux" else 1000.0
    prompt = {
        "1": {"class_type": "AnalyticFluxModel", "inputs": {"timestep_scale": scale, "mixture": mixture}},
        "2": {"class_type": "FlowConditioning", "inputs": {"class_index": 3}},
        "3": {"class_type": "FlowConditioning", "inputs": {"class_index": -1}},
        "4": {"class_type": "FlowLatent", "inputs": {"classes": "3,5", "mixture": mixture}},
        "6": {"class_type": "ReNoiseInvert", "inputs": {
            "model": ["11", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "sampler_name": sampler,
            "scheduler": "simple", "steps": 4, "denoise": denoise, "cfg": 1.0, "renoise_steps": renoise_steps, "seed": 7865}},
        "7": {"class_type": "ReNoiseSampler", "inputs": {"inversion": ["6", 1]}},
        "8": {"class_type": "SamplerCustom", "inputs": {
            "model": ["11", 0], "add_noise": False, "noise_seed": 0, "cfg": 1.0, "positive": ["2", 0], "negative": ["3", 0],
            "sampler": ["7", 0], "sigmas": ["6", 2], "latent_image": ["6", 0]}},
        "9": {"class_type": "CaptureFlowLatent", "inputs": {"samples": ["8", 0], "name": "reconstruction"}},
    }
    if patch == "flux":
        prompt["11"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5,
                                                                      "width": 128, "height": 128}}
    else:
        prompt["11"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    if noise_correction:
        prompt["5"] = {"class_type": "NoiseCorrection", "inputs": {"mode": noise_correction, "steps": 10, "step_size": 1.8}}
        prompt["6"]["inputs"]["noise_correction"] = ["5", 0]
    if solver is not None:
        prompt["15"] = {"class_type": "ReNoiseSolver", "inputs": solver_inputs(solver)}
        prompt["6"]["inputs"]["solver"] = ["15", 0]
    if edit_friendly:
        inputs = prompt["6"]["inputs"]
        del inputs["renoise_steps"]
        prompt["6"] = {"class_type": "EditFriendlyInvert", "inputs": dict(inputs, skip=0)}
    return prompt


def scenario_flow(workdir: Path) -> dict:
    cases = {
        "flux_euler_k0": dict(patch="flux", sampler="euler", renoise_steps=0),
        "flux_euler_k9": dict(patch="flux", sampler="euler", renoise_steps=9),
        "flux_ea_k9_exact": dict(patch="flux", sampler="euler_ancestral", renoise_steps=9, noise_correction="exact"),
        "flux_ea_k9_none": dict(patch="flux", sampler="euler_ancestral", renoise_steps=9),
        "sd3shift_euler_k0": dict(patch="sd3", sampler="euler", renoise_steps=0),
        "sd3shift_euler_k9": dict(patch="sd3", sampler="euler", renoise_steps=9),
        "sd3shift_lcm_exact": dict(patch="sd3", sampler="lcm", renoise_steps=9, noise_correction="exact"),
        "flux_partial_ea_exact": dict(patch="flux", sampler="euler_ancestral", renoise_steps=9, noise_correction="exact", denoise=0.6),
        "flux_edit_friendly": dict(patch="flux", sampler="euler_ancestral", renoise_steps=0, edit_friendly=True),
    }
    results = {}
    for name, kwargs in cases.items():
        CAPTURED.clear()
        result = run_prompt(flow_graph(**kwargs))
        result["psnr"] = reconstruction_db(result)
        results[name] = result
    return results


def scenario_solvers(workdir: Path) -> dict:
    """The paper's loop against the accelerated solver through the real host, on exact models whose components
    share a natural-image spectrum (eps: SD1.5 architecture, 4 steps, simple; flow: Flux architecture with
    ModelSamplingSD3 shift 3). Each case reports its PSNR and the denoiser calls ReNoiseInvert made."""
    cases = {
        "euler_paper_k9": dict(sampler="euler", renoise_steps=9, solver="fixed_point"),
        "euler_anderson_k2": dict(sampler="euler", renoise_steps=2, solver="anderson"),
        "euler_anderson_k9": dict(sampler="euler", renoise_steps=9, solver="anderson"),
        "euler_default_k9": dict(sampler="euler", renoise_steps=9),  # solver unconnected
        "ea_optimize_paper_k9": dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="optimize", solver="fixed_point"),
        "ea_optimize_anderson_k9": dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="optimize", solver="anderson"),
        "lcm_optimize_anderson_k9": dict(sampler="lcm", renoise_steps=9, noise_correction="optimize", solver="anderson", patch="lcm"),
        # the Turbo defaults, solver unconnected (fixed_point for euler_ancestral)
        "turbo_defaults": dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="optimize", edit_loss=True),
    }
    results = {}
    for name, kwargs in cases.items():
        CAPTURED.clear()
        result = run_prompt(analytic_graph(classes="0,3,6,9", mixture="spectral", **kwargs))
        result["psnr"] = reconstruction_db(result)
        results[name] = result
    for name, solver in (("flow_euler_paper_k9", "fixed_point"), ("flow_euler_anderson_k9", "anderson")):
        CAPTURED.clear()
        result = run_prompt(flow_graph("sd3", "euler", 9, mixture="spectral", solver=solver))
        result["psnr"] = reconstruction_db(result)
        results[name] = result
    return results


# --- the learned test denoiser (renoise_core/learned.py) as an SD1.5-architecture model -------------------------

LEARNED_SHAPE = (4, 32, 32)  # what the shipped network was trained on (scripts/train_learned_denoiser.py)
_LEARNED = {}


def learned_data():
    """The spectral mixture the learned denoiser was trained on (its held-out samples are the test latents)."""
    from renoise_core.analytic import SpectralMixture

    if "data" not in _LEARNED:
        _LEARNED["data"] = SpectralMixture.random(components=NUM_CLASSES, shape=LEARNED_SHAPE, within=1.0, alpha=2.0, seed=0)
    return _LEARNED["data"]


class LearnedUNet(torch.nn.Module):
    """Replaces ``diffusion_model`` with the shipped learned denoiser: receives ``x / sqrt(1 + sigma^2)`` and the
    integer timestep, returns eps, conditioned on the class prior in ``context[:, 0, :K]`` (as AnalyticUNet)."""

    def __init__(self, training_sigmas: torch.Tensor):
        super().__init__()
        from renoise_core.learned import load_learned_denoiser

        self.register_buffer("training_sigmas", training_sigmas.float().clone())
        self.learned = load_learned_denoiser()
        self.dtype = torch.float32

    def forward(self, x, timesteps=None, context=None, **kwargs):
        sigma = self.training_sigmas[timesteps.round().long()].to(x.device)
        x_k = x * torch.sqrt(1 + sigma**2).view(-1, 1, 1, 1)
        prior = context[:, 0, :NUM_CLASSES].float()
        prior = prior / prior.sum(1, keepdim=True)
        x0 = self.learned.denoise(x_k, sigma, prior)
        return (x_k - x0) / sigma.view(-1, 1, 1, 1)


class LearnedModel:
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return (with_network(comfy.supported_models.SD15(tiny_unet_config()), lambda m: LearnedUNet(m.model_sampling.sigmas)),)


class LearnedLatent:
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"classes": ("STRING", {"default": "3"}), "seed": ("INT", {"default": 1})}}

    def make(self, classes, seed):
        x0 = learned_data().sample([int(c) for c in classes.split(",")], seed=seed)
        CAPTURED["x0"] = x0
        return ({"samples": x0 / SD15_SCALE},)


TEST_NODES.update({"LearnedModel": LearnedModel, "LearnedLatent": LearnedLatent})


def learned_graph(sampler: str, renoise_steps: int, **kwargs) -> dict:
    """``analytic_graph`` with the learned model and a latent of its training distribution."""
    prompt = analytic_graph(sampler, renoise_steps, **kwargs)
    prompt["1"] = {"class_type": "LearnedModel", "inputs": {}}
    prompt["4"] = {"class_type": "LearnedLatent", "inputs": {"classes": kwargs.get("classes", "3"), "seed": 1}}
    return prompt


def scenario_learned(workdir: Path) -> dict:
    cases = {
        "euler_k0": dict(sampler="euler", renoise_steps=0, continue_with="ksampleradvanced"),
        "euler_k9": dict(sampler="euler", renoise_steps=9, continue_with="ksampleradvanced"),
        "ea_k9_exact": dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="exact", classes="3,5"),
    }
    results = {}
    for name, kwargs in cases.items():
        CAPTURED.clear()
        result = run_prompt(learned_graph(**kwargs))
        result["psnr"] = reconstruction_db(result)
        results[name] = result
    return results


# --- local edits ----------------------------------------------------------------------------------------------

def local_edit_graph(sampler: str, *, mask: tuple[float, int] | None = (1.0, 128), edit_friendly_skip: int | None = None,
                     noise_correction: str | None = "optimize", classes: str = "3,3") -> dict:
    """Invert class 3 on the boxed mixture, sample class 9 through ReNoiseSampler with BoxMask ``(value, size)``."""
    prompt = analytic_graph(sampler, 9, classes=classes, edit_class=9, noise_correction=noise_correction, skip=edit_friendly_skip)
    prompt["1"]["inputs"]["mixture"] = "boxed"
    prompt["4"]["inputs"]["mixture"] = "boxed"
    if mask is not None:
        prompt["15"] = {"class_type": "BoxMask", "inputs": {"value": mask[0], "size": mask[1]}}
        prompt["7"]["inputs"]["mask"] = ["15", 0]
    return prompt


def box_region(batch: int) -> torch.Tensor:
    region = torch.zeros((batch,) + LATENT_SHAPE, dtype=torch.bool)
    region[:, :, BOX[0], BOX[1]] = True
    return region


def scenario_local_edit(workdir: Path) -> dict:
    """Masked sampling and ReNoiseEditMask on the boxed analytic model through real ComfyUI."""
    results = {}
    cases = {
        "ea_optimize": dict(sampler="euler_ancestral"),
        "euler": dict(sampler="euler", noise_correction=None),
        "ddpm_optimize": dict(sampler="ddpm"),
        "edit_friendly_ddpm_skip1": dict(sampler="ddpm", edit_friendly_skip=1, noise_correction=None),
    }
    region = box_region(2)
    for name, kwargs in cases.items():
        CAPTURED.clear()
        result = run_prompt(local_edit_graph(**kwargs))
        if result.get("success"):
            out, x0 = CAPTURED["reconstruction"].double(), CAPTURED["x0"].double()
            outside = psnr(out[~region].view(2, -1), x0[~region].view(2, -1))
            result["outside_psnr"] = outside.min().item()
            result["inside_change"] = (out - x0)[region].abs().mean().item()
        results[name] = result
    # a flow model (Flux architecture) inverted from sigma 1: the sampler starts from the inversion's start latent
    CAPTURED.clear()
    prompt = flow_graph("flux", "euler_ancestral", 9, noise_correction="optimize")
    prompt["13"] = {"class_type": "FlowConditioning", "inputs": {"class_index": 9}}
    prompt["8"]["inputs"]["positive"] = ["13", 0]
    prompt["15"] = {"class_type": "BoxMask", "inputs": {"value": 1.0, "size": 128}}
    prompt["7"]["inputs"]["mask"] = ["15", 0]
    result = run_prompt(prompt)
    if result.get("success"):
        out, x0 = CAPTURED["reconstruction"].double(), CAPTURED["x0"].double()
        flow_region = torch.zeros(out.shape, dtype=torch.bool)
        flow_region[:, :, BOX[0], BOX[1]] = True
        result["outside_psnr"] = psnr(out[~flow_region].view(2, -1), x0[~flow_region].view(2, -1)).min().item()
        result["inside_change"] = (out - x0)[flow_region].abs().mean().item()
    results["flux_ea_optimize"] = result

    # an all-one mask is the unmasked edit, bit for bit
    CAPTURED.clear()
    result = run_prompt(local_edit_graph("euler_ancestral", mask=None))
    unmasked = CAPTURED.get("reconstruction")
    result.update(run_prompt(local_edit_graph("euler_ancestral", mask=(1.0, 0))))
    if result.get("success") and unmasked is not None:
        result["identical"] = bool(torch.equal(unmasked, CAPTURED["reconstruction"]))
    results["all_one"] = result
    results["wrong_size"] = run_prompt(local_edit_graph("euler_ancestral", mask=(1.0, 64)))

    # ReNoiseEditMask at its defaults finds the box
    CAPTURED.clear()
    prompt = {
        "1": {"class_type": "AnalyticModel", "inputs": {"prediction": "eps", "mixture": "boxed"}},
        "2": {"class_type": "ClassConditioning", "inputs": {"class_index": 3, "context_dim": 768}},
        "3": {"class_type": "ClassConditioning", "inputs": {"class_index": 9, "context_dim": 768}},
        "4": {"class_type": "AnalyticLatent", "inputs": {"classes": "3,3", "seed": 1, "mixture": "boxed"}},
        "5": {"class_type": "ReNoiseEditMask", "inputs": {"model": ["1", 0], "latent_image": ["4", 0], "source": ["2", 0],
                                                          "target": ["3", 0], "seed": 0, "noise_level": 0.5, "samples": 5,
                                                          "threshold": 0.5, "blur": 4}},
        "6": {"class_type": "CaptureMask", "inputs": {"mask": ["5", 0], "name": "mask"}},
    }
    result = run_prompt(prompt)
    if result.get("success"):
        mask = CAPTURED["mask"]
        truth = torch.zeros(mask.shape, dtype=torch.bool)
        truth[:, BOX[0].start * 8 : BOX[0].stop * 8, BOX[1].start * 8 : BOX[1].stop * 8] = True
        found = mask > 0.5
        result["shape"] = list(mask.shape)
        result["iou"] = ((found & truth).flatten(1).sum(1) / (found | truth).flatten(1).sum(1)).tolist()
    results["edit_mask"] = result
    return results


# --- soak and cancel -------------------------------------------------------------------------------------------
# One ComfyUI executor (as the server keeps one) runs many inversions and edits; between them a fixed probe prompt
# is run and the process's live tensors and resident memory are counted, which must not grow.

SOAK_RUNS = int(os.environ.get("RENOISE_SOAK_RUNS", "200"))
SOAK_SAMPLERS = ("euler", "euler_ancestral", "ddim", "lcm", "ddpm")
SOAK_SIZES = ((8, 8), (16, 16), (12, 20))  # latent height, width
PROBE = dict(sampler="euler_ancestral", renoise_steps=2, noise_correction="optimize", edit_class=9)
#: the cancelled inversion: the Turbo defaults (38 model calls), cancelled after 17
CANCELLED = dict(sampler="euler_ancestral", renoise_steps=9, noise_correction="optimize", edit_loss=True, edit_class=9)
CANCEL_AFTER_CALLS = 17


def soak_prompt(i: int) -> dict:
    """Run i of the soak: sampler, latent size, batch size, steps, renoising, noise correction, edit losses and
    method vary with i; every run inverts with one class and samples (edits) with another."""
    sampler = SOAK_SAMPLERS[i % len(SOAK_SAMPLERS)]
    height, width = SOAK_SIZES[(i // len(SOAK_SAMPLERS)) % len(SOAK_SIZES)]
    batch = 1 + (i // 15) % 3
    stochastic = sampler in ("euler_ancestral", "lcm", "ddpm")
    classes = ",".join(str((i + b) % NUM_CLASSES) for b in range(batch))
    kwargs = dict(sampler=sampler, renoise_steps=1 + i % 3, steps=2 + i % 3, classes=classes,
                  edit_class=(i + 7) % NUM_CLASSES, noise_correction="optimize" if stochastic and i % 2 else None, edit_loss=i % 20 == 0)
    if stochastic and i % 7 == 0:
        kwargs.update(renoise_steps=0, skip=1, noise_correction=None, edit_loss=False)
    prompt = analytic_graph(**kwargs)
    prompt["4"]["inputs"].update(height=height, width=width, seed=i)
    return prompt


def execute(executor, prompt: dict) -> dict:
    """Validate and execute ``prompt`` with a kept executor (its caches persist, as in the server)."""
    valid = asyncio.run(execution.validate_prompt("1", prompt, None))
    if not valid[0]:
        return {"valid": False, "error": json.dumps(valid[1])[:2000]}
    executor.execute(prompt, "1", {}, valid[2])
    events = [event for event, _ in executor.status_messages]
    errors = [data.get("exception_message") for event, data in executor.status_messages if event == "execution_error"]
    return {"valid": True, "success": executor.success, "interrupted": "execution_interrupted" in events,
            "error": errors[0] if errors else None}


def process_state() -> dict:
    """Live torch tensors (after a full collection), resident memory, models ComfyUI holds loaded."""
    import gc

    gc.collect()
    tensors = sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))
    with open("/proc/self/statm") as statm:
        rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return {"tensors": tensors, "rss_mb": rss / 2**20, "loaded_models": len(comfy.model_management.current_loaded_models)}


def digests(names=("inverted", "reconstruction")) -> dict[str, str]:
    """SHA-256 of the bytes of captured outputs (bit-identity across processes)."""
    import hashlib

    return {name: hashlib.sha256(CAPTURED[name].contiguous().cpu().numpy().tobytes()).hexdigest() for name in names if name in CAPTURED}


class QuietServer(FakeServer):
    """Drops the messages (a server sends them to its clients and keeps none)."""

    def send_sync(self, event, data, sid=None):
        pass


def scenario_soak(workdir: Path) -> dict:
    import time

    executor = execution.PromptExecutor(QuietServer(), cache_type=False)
    checkpoints, failures, seconds = [], [], []
    for i in range(SOAK_RUNS):
        CAPTURED.clear()
        start = time.perf_counter()
        result = execute(executor, soak_prompt(i))
        seconds.append(round(time.perf_counter() - start, 3))
        if not result.get("success"):
            failures.append({"run": i, **result})
        if (i + 1) % 20 == 0:
            CAPTURED.clear()
            probe = execute(executor, analytic_graph(**PROBE))
            checkpoints.append({"run": i + 1, "probe_ok": bool(probe.get("success")), **process_state()})
    # cancel an inversion mid-way, then run it again in the same process
    CAPTURED.clear()
    INTERRUPT.after_calls = CANCEL_AFTER_CALLS
    cancelled = execute(executor, analytic_graph(**CANCELLED))
    INTERRUPT.after_calls = None
    CAPTURED.clear()
    again = execute(executor, analytic_graph(**CANCELLED))
    after_cancel = digests()
    CAPTURED.clear()
    probe = execute(executor, analytic_graph(**PROBE))
    checkpoints.append({"run": "after cancel", "probe_ok": bool(probe.get("success")), **process_state()})
    return {"runs": SOAK_RUNS, "failures": failures[:5], "failure_count": len(failures), "checkpoints": checkpoints,
            "cancelled": cancelled, "again": again, "after_cancel": after_cancel, "seconds": seconds}


def scenario_cancel_reference(workdir: Path) -> dict:
    """The cancelled inversion's prompt, run once in a fresh process."""
    result = execute(execution.PromptExecutor(FakeServer(), cache_type=False), analytic_graph(**CANCELLED))
    return {"result": result, "digests": digests()}


def forward_mismatches() -> dict:
    """ComfyUI's own k-diffusion functions (heun, dpm_2(_ancestral), dpmpp_2m, dpmpp_2m_sde(_heun),
    res_multistep(_ancestral)) against the core's forward
    pass on the analytic model, eps (karras) and flow (CONST): the largest difference relative to the output's scale."""
    import types

    import comfy.k_diffusion.sampling as k_sampling
    import comfy.model_sampling

    from renoise_core.multistep import sample_multistep
    from renoise_core.schedules import karras_schedule

    mismatches = {}
    for parameterization, kind in (("eps", comfy.model_sampling.EPS), ("flow", comfy.model_sampling.CONST)):
        model = GaussianMixture(MIXTURE.means, MIXTURE.stds, parameterization)
        denoiser = model.denoiser([3, 5])
        sigmas = karras_schedule(10) if parameterization == "eps" else torch.linspace(0.95, 0.0, 11)
        sampling = kind.__new__(kind)  # only its class is read (sigma_to_half_log_snr)
        patcher = types.SimpleNamespace(get_model_object=lambda name, sampling=sampling: sampling)

        class Model:  # what a k-diffusion sampler function receives: model(x, sigma), model.inner_model.model_patcher
            # and model.inner_model.inner_model.model_sampling (whose class picks the _RF variants)
            inner_model = types.SimpleNamespace(model_patcher=patcher, inner_model=types.SimpleNamespace(model_sampling=sampling))

            def __call__(self, x, sigma, denoiser=denoiser, **extra):
                return denoiser(x, sigma)

        generator = torch.Generator().manual_seed(3)
        x = torch.randn((2,) + tuple(MIXTURE.means.shape[1:]), generator=generator) * float(sigmas[0])
        noises = torch.randn((len(sigmas) - 1,) + tuple(x.shape), generator=generator)
        stored = [float(s) for s in sigmas[:-1]]

        def noise_sampler(sigma, sigma_next, stored=stored, noises=noises):
            return noises[min(range(len(stored)), key=lambda i: abs(stored[i] - float(sigma)))]

        for name in ("heun", "dpm_2", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "res_multistep",
                     "res_multistep_ancestral"):
            extra = {"noise_sampler": noise_sampler} if "sde" in name or "ancestral" in name or name == "res_multistep" else {}
            stock = getattr(k_sampling, "sample_" + name)(Model(), x.clone(), sigmas, disable=True, **extra)
            ours = sample_multistep(denoiser, x, sigmas, name, noises=noises, parameterization=parameterization)
            mismatches[f"{parameterization}_{name}"] = ((stock - ours).abs().max() / stock.abs().max()).item()
    return mismatches


#: the samplers scenario's edits, on the boxed model (classes 3 and 9 differ inside a box only, close enough for a prompt
#: to move between them): the sampler people use, inverted at cfg 1, then sampled with a new prompt at cfg 4 (the
#: README's 2 to 5 for editing). The stochastic samplers need the edit losses: noise-corrected without them, their
#: inversion stays class 3 whatever the prompt.
MULTISTEP_EDITS = {
    "heun_k0": dict(sampler="heun", renoise_steps=0),
    "dpm_2_k0": dict(sampler="dpm_2", renoise_steps=0),
    "dpmpp_2m_k0": dict(sampler="dpmpp_2m", renoise_steps=0),
    "dpmpp_2m_k0_ksampleradvanced": dict(sampler="dpmpp_2m", renoise_steps=0, continue_with="ksampleradvanced"),
    "res_multistep_k0": dict(sampler="res_multistep", renoise_steps=0),
    "dpmpp_2m_sde_optimize_edit_loss": dict(sampler="dpmpp_2m_sde", renoise_steps=1, noise_correction="optimize", edit_loss=True),
    "res_multistep_ancestral_optimize_edit_loss": dict(sampler="res_multistep_ancestral", renoise_steps=1, noise_correction="optimize",
                                                       edit_loss=True),
    "dpm_2_ancestral_optimize_edit_loss": dict(sampler="dpm_2_ancestral", renoise_steps=0, noise_correction="optimize", edit_loss=True),
}


def scenario_samplers(workdir: Path) -> dict:
    """The second-order and multistep samplers: forward arithmetic against ComfyUI's functions, and end to end
    (ReNoiseInvert on a karras schedule, then the stock sampler through ReNoiseSampler + SamplerCustom, and
    KSamplerAdvanced for the deterministic ones)."""
    results = {"forward_mismatch": forward_mismatches()}
    cases = {
        "euler_k1": dict(sampler="euler", renoise_steps=1, solver="fixed_point"),  # the paper's loop, like the others' solves
        "euler_k1_anderson": dict(sampler="euler", renoise_steps=1, solver="anderson"),
        "heun_k1": dict(sampler="heun", renoise_steps=1),
        "dpm_2_k1": dict(sampler="dpm_2", renoise_steps=1),
        "dpmpp_2m_k1": dict(sampler="dpmpp_2m", renoise_steps=1),
        "dpmpp_2m_sde_exact": dict(sampler="dpmpp_2m_sde", renoise_steps=1, noise_correction="exact"),
        "dpmpp_2m_sde_optimize": dict(sampler="dpmpp_2m_sde", renoise_steps=1, noise_correction="optimize"),
        "dpmpp_2m_sde_none": dict(sampler="dpmpp_2m_sde", renoise_steps=1),
        "dpm_2_ancestral_exact": dict(sampler="dpm_2_ancestral", renoise_steps=0, noise_correction="exact"),
        "dpm_2_ancestral_optimize": dict(sampler="dpm_2_ancestral", renoise_steps=0, noise_correction="optimize"),
        "dpm_2_ancestral_none": dict(sampler="dpm_2_ancestral", renoise_steps=0),
        "heun_k1_ksampleradvanced": dict(sampler="heun", renoise_steps=1, continue_with="ksampleradvanced"),
        "dpmpp_2m_k1_ksampleradvanced": dict(sampler="dpmpp_2m", renoise_steps=1, continue_with="ksampleradvanced"),
        "res_multistep_k1": dict(sampler="res_multistep", renoise_steps=1),
        "res_multistep_k1_ksampleradvanced": dict(sampler="res_multistep", renoise_steps=1, continue_with="ksampleradvanced"),
        "res_multistep_ancestral_exact": dict(sampler="res_multistep_ancestral", renoise_steps=1, noise_correction="exact"),
        "res_multistep_ancestral_optimize": dict(sampler="res_multistep_ancestral", renoise_steps=1, noise_correction="optimize"),
        "res_multistep_ancestral_none": dict(sampler="res_multistep_ancestral", renoise_steps=1),
        # on the spectral model: equal calls against euler's default, and anderson against plain iteration
        "spectral_euler_k0": dict(sampler="euler", renoise_steps=0, mixture="spectral"),
        "spectral_dpmpp_2m_k0": dict(sampler="dpmpp_2m", renoise_steps=0, mixture="spectral"),
        "spectral_euler_k1": dict(sampler="euler", renoise_steps=1, mixture="spectral"),  # 40 calls
        "spectral_heun_k0": dict(sampler="heun", renoise_steps=0, mixture="spectral"),  # 39 calls
        "spectral_heun_k3": dict(sampler="heun", renoise_steps=3, mixture="spectral"),
        "spectral_heun_k3_fixed_point": dict(sampler="heun", renoise_steps=3, mixture="spectral", solver="fixed_point"),
        "spectral_dpmpp_2m_k4": dict(sampler="dpmpp_2m", renoise_steps=4, mixture="spectral"),
        "spectral_dpmpp_2m_k4_fixed_point": dict(sampler="dpmpp_2m", renoise_steps=4, mixture="spectral", solver="fixed_point"),
    }
    for name, kwargs in cases.items():
        CAPTURED.clear()
        result = run_prompt(analytic_graph(**kwargs, steps=20, scheduler="karras"))
        result["psnr"] = reconstruction_db(result)
        results[name] = result
    for name, graph in MULTISTEP_EDITS.items():
        results[f"{name}_edit"] = edit_3_to_9(dict(graph, steps=20, scheduler="karras", mixture="boxed"), edit_cfg=4.0)
    return results


SCENARIOS = {"samplers": scenario_samplers, "solvers": scenario_solvers,
             "learned": scenario_learned, "local_edit": scenario_local_edit, "flow": scenario_flow,
             "analytic": scenario_analytic, "checkpoint": scenario_checkpoint, "workflows": scenario_workflows, "files": scenario_files,
             "soak": scenario_soak, "cancel_reference": scenario_cancel_reference}


def main() -> None:
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    try:
        setup(workdir)
        results = SCENARIOS[scenario](workdir)
    except Exception:
        results = {"harness_error": traceback.format_exc()}
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
