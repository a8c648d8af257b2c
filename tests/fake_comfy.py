"""A faithful stand-in for ``nodes/comfy_bridge.py`` without ComfyUI, built on the analytic model.

Same functions, same contracts: LATENT samples are scaled by the latent format (``process_in`` / ``process_out``),
CONDITIONING is ``[[tensor, {}]]`` (here the tensor is a component prior ``[1, K]``), CFG combines conditional and
unconditional predictions on the same latents, the stock sampler loop asks its ``noise_sampler`` by sigma.
"""

from __future__ import annotations

from pathlib import Path

import torch

from renoise_core.multistep import is_multistep_sampler, make_multistep_steps, sample_multistep
from renoise_core.samplers import make_steps
from renoise_core.schedules import denoise_schedule, karras_schedule, sd_discrete_sigmas, simple_schedule
from renoise_core.schedules import sigma_at_timestep as table_sigma

LATENT_SCALE = 0.18215
TRAINING_SIGMAS = sd_discrete_sigmas()


class FakeModel:
    """MODEL: the analytic mixture behind a ModelPatcher-like object."""

    def __init__(self, mixture, kind: str = "EPS", family: str = "SD15"):
        self.mixture = mixture
        self.kind = kind
        self.family = family


def conditioning(mixture, class_index: int | None):
    return [[mixture.prior(None if class_index is None else [class_index]).float(), {}]]


def scheduler_names() -> list[str]:
    """ComfyUI 0.3.64's scheduler list."""
    return ["simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal", "linear_quadratic", "kl_optimal"]


def schedule(model, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    if scheduler == "karras":  # ComfyUI's karras with the model's sigma_min / sigma_max
        sigma_lo, sigma_hi = float(TRAINING_SIGMAS[0]), float(TRAINING_SIGMAS[-1])
        return denoise_schedule(lambda n: karras_schedule(n, sigma_lo, sigma_hi), steps, denoise)
    if scheduler != "simple":
        raise NotImplementedError(f"the fake host only has the 'simple' and 'karras' schedulers, not {scheduler!r}")
    return denoise_schedule(lambda n: simple_schedule(TRAINING_SIGMAS, n), steps, denoise)


def sigma_at_timestep(model, timestep: float) -> float:
    return table_sigma(TRAINING_SIGMAS, timestep)


def sigma_min(model) -> float:
    return float(TRAINING_SIGMAS[0])


def model_sampling_kind(model) -> str:
    return model.kind


def model_family(model) -> str:
    return model.family


def guided_denoiser(model, positive, negative, cfg: float):
    def denoise(x, sigma):
        cond = model.mixture.posterior_mean(x, sigma, positive[0][0].double())
        if cfg == 1.0:
            return cond
        uncond = model.mixture.posterior_mean(x, sigma, negative[0][0].double())
        return uncond + cfg * (cond - uncond)

    return denoise


CALLS = {"run_inversion": 0}


def run_inversion(model, positive, negative, cfg, latent, sigmas, function, seed):
    """Same contract as the bridge: LATENT samples from which zero-noise sampling starts at the inverted latent
    (flow: divided by 1 - sigma first), and the inverted latent itself where no LATENT can carry it."""
    CALLS["run_inversion"] += 1
    x = latent["samples"] * LATENT_SCALE  # process_latent_in (a new tensor, as ComfyUI's)
    out = function(guided_denoiser(model, positive, negative, cfg), x, sigmas).float()
    start_latent = None
    if model.kind.startswith("CONST"):
        keep = 1.0 - float(sigmas[0])
        if keep > 0:
            out = out / keep
        else:
            start_latent = out
    return (out / LATENT_SCALE).cpu(), start_latent  # process_latent_out, intermediate device


def run_prompt_pair(model, source, target, latent, function, seed):
    """Same contract as the bridge: ``function(pair_denoiser, x0)`` with the conditional predictions under both
    prompts, evaluated as one batch of 2B (as ComfyUI's calc_cond_batch does); returns what it returns."""
    CALLS["run_prompt_pair"] = CALLS.get("run_prompt_pair", 0) + 1
    x0 = latent["samples"] * LATENT_SCALE

    def pair_denoiser(x, sigma):
        batch = x.shape[0]
        both_x, both_sigma = torch.cat([x, x]), torch.cat([sigma, sigma])
        priors = torch.cat([_repeat(source[0][0], batch), _repeat(target[0][0], batch)]).double()
        both = model.mixture.posterior_mean(both_x, both_sigma, priors)
        return both[:batch], both[batch:]

    return function(pair_denoiser, x0)


def _repeat(prior, batch):
    return prior.repeat(batch // prior.shape[0], 1) if prior.shape[0] != batch else prior


class FakeSampler:
    """SAMPLER: the stock loop of a k-diffusion sampler, asking ``noise_sampler(sigma, sigma_next)`` per step; with
    ``adjust_prediction`` every prediction goes through the function it returns (as the bridge's wrapped model_k)."""

    def __init__(self, sampler_name, options, prepare_run, adjust_prediction=None):
        self.sampler_name, self.options, self.prepare_run = sampler_name, options, prepare_run
        self.adjust_prediction = adjust_prediction

    def sample_custom(self, model, positive, negative, cfg, latent, sigmas):
        """What SamplerCustom does with add_noise off."""
        x = latent["samples"] * LATENT_SCALE
        flow = model.kind.startswith("CONST")
        if flow:
            x = (1.0 - float(sigmas[0])) * x  # CONST.noise_scaling with zero noise
        x, noise_sampler = self.prepare_run(x, sigmas, model.family)
        denoiser = guided_denoiser(model, positive, negative, cfg)
        adjust = self.adjust_prediction(x, sigmas) if self.adjust_prediction is not None else None
        if adjust is not None:
            guided = denoiser

            def denoiser(x_in, sigma):
                return adjust(x_in, guided(x_in, sigma))
        if is_multistep_sampler(self.sampler_name):  # heun, dpm_2, dpmpp_2m*: one noise_sampler call per stochastic step
            parameterization = "flow" if flow else "eps"
            steps = make_multistep_steps(self.sampler_name, sigmas, parameterization, **self.options)
            stochastic = [s.is_stochastic for s in steps]
            noises = torch.stack([noise_sampler(torch.tensor(s.sigma), torch.tensor(s.sigma_next)) if asks else torch.zeros_like(x)
                                  for s, asks in zip(steps, stochastic)])
            x = sample_multistep(denoiser, x, sigmas, self.sampler_name, noises=noises, sampler_options=self.options,
                                 parameterization=parameterization)
            return {"samples": x / LATENT_SCALE}
        for step in make_steps(self.sampler_name, sigmas, "flow" if flow else "eps", **self.options):
            sigma = torch.full((x.shape[0],), step.sigma)
            eps = (x - denoiser(x, sigma)) / step.sigma
            noise = noise_sampler(torch.tensor(step.sigma), torch.tensor(step.sigma_next)) if step.is_stochastic else None
            x = step.forward(x, eps, noise)
        return {"samples": x / LATENT_SCALE}


def replaying_sampler(sampler_name, options, prepare_run, adjust_prediction=None):
    return FakeSampler(sampler_name, options, prepare_run, adjust_prediction)


def intermediate_device() -> torch.device:
    return torch.device("cpu")


DIRECTORIES = {"input": "/nonexistent/input", "output": "/nonexistent/output"}  # tests point these at tmp folders


def output_directory() -> str:
    return DIRECTORIES["output"]


def input_directory() -> str:
    return DIRECTORIES["input"]


def save_path(filename_prefix: str):
    """ComfyUI's get_save_image_path: refuses prefixes that leave the output folder; counter after existing files."""
    base = Path(DIRECTORIES["output"]).resolve()
    target = (base / filename_prefix).resolve()
    if base not in target.parents:
        raise Exception("**** ERROR: Saving image outside the output folder is not allowed.")
    folder, filename = target.parent, target.name
    folder.mkdir(parents=True, exist_ok=True)
    counter = 1 + len([p for p in folder.iterdir() if p.name.startswith(filename + "_")])
    return str(folder), filename, counter, str(folder.relative_to(base))


class Progress:
    """Records progress; ``cancel_at`` simulates the user pressing cancel after that many denoiser calls."""

    cancel_at: int | None = None
    log: list[tuple[int, int]] = []

    def __init__(self, total: int):
        self.total = total

    def update(self, done: int) -> None:
        Progress.log.append((done, self.total))
        if Progress.cancel_at is not None and done >= Progress.cancel_at:
            raise InterruptedError("Processing interrupted")
