"""The one module that imports ComfyUI. Everything ComfyUI-specific the nodes need goes through here.

Kept thin on purpose: each function translates between ComfyUI objects (MODEL = ModelPatcher, CONDITIONING,
LATENT dicts, SAMPLER) and the plain-torch calls of ``renoise_core``. Tests without ComfyUI replace this module
with a fake of the same functions (``tests/fake_comfy.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from torch import Tensor

#: A function run as a ComfyUI sampler: ``(denoiser, x, sigmas_descending) -> latent``; ``denoiser(x, sigma)``
#: is the CFG-combined ComfyUI model (predicted x0), ``x`` is the clean latent in the model's latent space.
InversionFunction = Callable[[Callable[[Tensor, Tensor], Tensor], Tensor, Tensor], Tensor]


def scheduler_names() -> list[str]:
    return list(comfy.samplers.KSampler.SCHEDULERS)


def schedule(model, scheduler: str, steps: int, denoise: float) -> Tensor:
    """The sigmas KSampler would use for ``steps`` and ``denoise`` (``[steps + 1]``, float32, CPU)."""
    sampler = comfy.samplers.KSampler(model, steps=steps, device="cpu", scheduler=scheduler, denoise=denoise)
    return sampler.sigmas.float().cpu()


def sigma_min(model) -> float:
    """The model's smallest training sigma (0.0292 for SD1.5/SDXL)."""
    return float(model.get_model_object("model_sampling").sigma_min)


def model_sampling_kind(model) -> str:
    """``"EPS"``, ``"V_PREDICTION"``, ``"EDM"``, ``"X0"`` or ``"CONST"`` (flow), with ``"+LCM"`` for an
    LCM-patched model (ModelSamplingDiscrete ``lcm``)."""
    model_sampling = model.get_model_object("model_sampling")
    kind = "UNKNOWN"
    for name in ("CONST", "EDM", "V_PREDICTION", "X0", "EPS"):  # subclasses before their bases
        cls = getattr(comfy.model_sampling, name, None)
        if cls is not None and isinstance(model_sampling, cls):
            kind = name
            break
    if any(cls.__name__ == "LCM" for cls in type(model_sampling).__mro__):  # comfy_extras' LCM sampling mixin
        kind += "+LCM"
    return kind


def model_family(model) -> str:
    """ComfyUI's model config class name (``"SD15"``, ``"SDXL"``, ``"SDXLRefiner"``, ...)."""
    return type(model.model.model_config).__name__


def run_inversion(model, positive, negative, cfg: float, latent: dict, sigmas: Tensor, function: InversionFunction,
                  seed: int) -> tuple[Tensor, Tensor | None]:
    """Run ``function`` as a sampler through ComfyUI's own CFGGuider, so the model is loaded and patched the
    ComfyUI way and CFG, ControlNet, LoRA, hooks and model patches all apply.

    The guider is given zero noise and the schedule reversed (ascending from its lowest sigma), so
    ``noise_scaling`` hands the function the clean latent; the function sees the descending schedule and returns
    the inverted latent ``x`` at ``sigmas[0]`` (the sampler's space).

    Returns ``(samples, start_latent)`` on the intermediate device. ``samples`` is the LATENT from which ComfyUI's
    samplers, given zero noise, start exactly at ``x``: ``process_latent_out(x)``, divided first by ``1 - sigma``
    on flow models (whose ``noise_scaling`` multiplies the latent by it). At sigma 1 that factor is 0 and no
    LATENT can carry ``x``: then ``start_latent`` is ``x`` itself (else None), for ReNoiseSampler to start from.
    The guider's own result is not used: on flow models its ``inverse_noise_scaling`` divides by ``1 - sigma``.
    """
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    inverted = []

    def sampler_function(model_k, x, sigmas_ascending, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args

        def denoiser(x_in: Tensor, sigma: Tensor) -> Tensor:
            return model_k(x_in, sigma, **extra_args)

        inverted.append(function(denoiser, x, sigmas_ascending.flip(0)))
        return inverted[-1]

    noise = torch.zeros_like(latent_image)
    guider.sample(noise, latent_image, comfy.samplers.KSAMPLER(sampler_function), sigmas.flip(0), disable_pbar=True, seed=seed)
    x = inverted[-1].float()
    start_latent = None
    if isinstance(model.get_model_object("model_sampling"), comfy.model_sampling.CONST):
        keep = 1.0 - float(sigmas[0])
        if keep > 0:
            x = x / keep
        else:
            start_latent = x.to(comfy.model_management.intermediate_device())
    samples = model.model.process_latent_out(x)
    return samples.to(comfy.model_management.intermediate_device()), start_latent


def sigma_at_timestep(model, timestep: float) -> float:
    """The model's sigma at a timestep on the 0..1000 scale (the reference's 'timestep < 250' rule). Models whose
    timesteps run 0..1 (Flux) get ``timestep / 1000``."""
    model_sampling = model.get_model_object("model_sampling")
    top = float(model_sampling.timestep(torch.tensor([float(model_sampling.sigma_max)])).item())
    t = timestep / 1000.0 if top <= 1.0 + 1e-6 else timestep
    return float(model_sampling.sigma(torch.tensor([float(t)])).item())


def replaying_sampler(sampler_name: str, options: dict, prepare_run: Callable[[Tensor, Tensor, str], tuple[Tensor, Callable | None]],
                      adjust_prediction: Callable[[Tensor, Tensor], Callable[[Tensor, Tensor], Tensor] | None] | None = None):
    """A stock ComfyUI SAMPLER (``sampler_object(sampler_name)``) whose k-diffusion function starts, per run, from
    the latent and with the ``noise_sampler`` that ``prepare_run(x, sigmas, model_family)`` returns (it validates
    the run and may raise).

    ``adjust_prediction(x, sigmas)``, if given, is called per run after ``prepare_run`` and may return a function
    ``(x, denoised) -> denoised`` that every model evaluation of the stock loop goes through (masked sampling)."""
    stock = comfy.samplers.sampler_object(sampler_name)
    stock_function = stock.sampler_function

    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None, **extra_options):
        base_model = model_k.inner_model.inner_model  # KSamplerX0Inpaint -> CFGGuider -> BaseModel
        x, noise_sampler = prepare_run(x, sigmas, type(base_model.model_config).__name__)
        if noise_sampler is not None:
            extra_options["noise_sampler"] = noise_sampler
        adjust = adjust_prediction(x, sigmas) if adjust_prediction is not None else None
        if adjust is not None:
            model_k = _AdjustedModel(model_k, adjust)
        return stock_function(model_k, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **extra_options)

    return comfy.samplers.KSAMPLER(sampler_function, {**stock.extra_options, **options}, stock.inpaint_options)


class _AdjustedModel:
    """``model_k`` (KSamplerX0Inpaint) whose prediction goes through ``adjust(x, denoised)``; every other attribute
    (``inner_model``, which samplers read for the model's sampling kind) is the wrapped one's."""

    def __init__(self, model_k, adjust: Callable[[Tensor, Tensor], Tensor]):
        self.model_k = model_k
        self.adjust = adjust

    def __call__(self, x, sigma, **kwargs):
        return self.adjust(x, self.model_k(x, sigma, **kwargs))

    def __getattr__(self, name):
        if name == "model_k":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.model_k, name)


class _PromptPairGuider(comfy.samplers.CFGGuider):
    """A guider whose prediction is the conditional predictions under ``positive`` and ``negative`` stacked on the
    batch (``[2B, ...]``), no CFG combination: one ``calc_cond_batch`` evaluates both, batched into one model
    forward when memory allows, as CFG does."""

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        first, second = comfy.samplers.calc_cond_batch(
            self.inner_model, [self.conds.get("positive"), self.conds.get("negative")], x, timestep, model_options)
        return torch.cat([first, second])


def run_prompt_pair(model, source, target, latent: dict, function: Callable, seed: int):
    """Run ``function(pair_denoiser, x0)`` inside ComfyUI's guider (model loaded and patched the ComfyUI way) and
    return what it returns. ``x0`` is the photo's latent in the model's (sampler's) space; ``pair_denoiser(x,
    sigma) -> (D_source, D_target)`` gives the conditional predictions under both prompts (predicted x0, k-diffusion
    units), one guider evaluation per call. The latent's ``noise_mask`` is ignored."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    guider = _PromptPairGuider(model)
    guider.set_conds(source, target)
    results = []

    def sampler_function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        batch = x.shape[0]

        def pair_denoiser(x_in: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
            both = model_k(x_in, sigma, **extra_args)
            return both[:batch], both[batch:]

        results.append(function(pair_denoiser, x))
        return x

    # zero noise at sigma 0: noise_scaling hands the function the clean latent (flow models too)
    sigmas = torch.tensor([0.0, float(model.get_model_object("model_sampling").sigma_max)])
    guider.sample(torch.zeros_like(latent_image), latent_image, comfy.samplers.KSAMPLER(sampler_function), sigmas,
                  disable_pbar=True, seed=seed)
    return results[-1]


def output_directory() -> str:
    return folder_paths.get_output_directory()


def input_directory() -> str:
    return folder_paths.get_input_directory()


def save_path(filename_prefix: str) -> tuple[str, str, int, str]:
    """SaveLatent's naming: ``(folder, filename, counter, subfolder)`` under the output directory; raises for a
    prefix that leaves it."""
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, folder_paths.get_output_directory())
    return folder, filename, counter, subfolder


def intermediate_device() -> torch.device:
    return comfy.model_management.intermediate_device()


class Progress:
    """ComfyUI's progress bar, advanced to an absolute count; every update is also a cancellation check."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, done: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(done)
