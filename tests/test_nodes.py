"""Node classes through the bridge, with the fake bridge (no ComfyUI): types, validation, no mutation, errors."""

import copy
import dataclasses

import fake_comfy
import pytest
import torch
from fake_comfy import FakeModel, conditioning
from renoise_pack import nodes as pack_nodes
from renoise_pack.nodes import host
from renoise_pack.nodes.inversion_data import InversionData, SolverSettings
from renoise_pack.renoise_core import EditLossConfig as EditLossSettings
from renoise_pack.renoise_core import NoiseCorrectionConfig as NoiseCorrectionSettings

from renoise_core.analytic import psnr

NODES = pack_nodes.NODE_CLASS_MAPPINGS


@pytest.fixture(autouse=True)
def fake_host(monkeypatch):
    monkeypatch.setattr(host, "bridge", lambda: fake_comfy)
    fake_comfy.Progress.cancel_at = None
    fake_comfy.Progress.log = []


@pytest.fixture
def graph(mixture):
    x0 = mixture.sample([3, 5], seed=1)
    return {
        "model": FakeModel(mixture),
        "positive": conditioning(mixture, 3),
        "negative": conditioning(mixture, None),
        "latent_image": {"samples": x0 / fake_comfy.LATENT_SCALE},
        "x0": x0,
    }


def invert(graph, **widgets):
    inputs = dict(sampler_name="euler_ancestral", scheduler="simple", steps=4, denoise=1.0, cfg=1.0, renoise_steps=9, seed=7865)
    inputs.update(widgets)
    return NODES["ReNoiseInvert"]().invert(graph["model"], graph["positive"], graph["negative"], graph["latent_image"], **inputs)


def replay(graph, latent, inversion, sigmas, positive=None):
    (sampler,) = NODES["ReNoiseSampler"]().get_sampler(inversion)
    return sampler.sample_custom(graph["model"], positive or graph["positive"], graph["negative"], 1.0, latent, sigmas)


def test_node_contract():
    assert list(NODES)[:4] == ["ReNoiseInvert", "ReNoiseSampler", "NoiseCorrection", "EditLossConfig"]
    assert set(pack_nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    assert NODES["ReNoiseInvert"].RETURN_TYPES == ("LATENT", "RENOISE_INVERSION", "SIGMAS")
    assert NODES["ReNoiseInvert"].RETURN_NAMES == ("latent", "inversion", "sigmas")
    assert NODES["ReNoiseSampler"].RETURN_TYPES == ("SAMPLER",)
    assert NODES["NoiseCorrection"].RETURN_TYPES == ("NOISE_CORRECTION",)
    assert NODES["EditLossConfig"].RETURN_TYPES == ("EDIT_LOSS_CONFIG",)
    for cls in NODES.values():
        if cls.__name__ == "ReNoiseLoadInversion":
            continue  # lists files: tested in test_inversion_file.py
        assert cls.CATEGORY == "sampling/renoise"
        assert callable(getattr(cls, cls.FUNCTION))
        for section in cls.INPUT_TYPES().values():
            for name, spec in section.items():
                assert "tooltip" in spec[1], (cls.__name__, name)


def test_edit_friendly_tooltips_name_only_what_it_has():
    """EditFriendlyInvert borrows ReNoiseInvert's widgets; its tooltips must not mention the edit losses, which it does not have."""
    spec = NODES["EditFriendlyInvert"].INPUT_TYPES()
    for section in spec.values():
        for name, (_, options) in section.items():
            assert "edit-loss" not in options["tooltip"] and "edit loss" not in options["tooltip"].lower(), name
    assert "seed + b" in spec["required"]["seed"][1]["tooltip"]
    assert spec["required"]["seed"][1]["control_after_generate"]


def test_invert_input_names_are_the_public_contract():
    spec = NODES["ReNoiseInvert"].INPUT_TYPES()
    assert list(spec["required"]) == ["model", "positive", "negative", "latent_image", "sampler_name", "scheduler", "steps",
                                      "denoise", "cfg", "renoise_steps", "seed"]
    assert spec["required"]["sampler_name"][0] == ["euler_ancestral", "euler", "ddim", "lcm", "ddpm", "heun", "dpm_2",
                                                   "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
                                                   "res_multistep", "res_multistep_ancestral"]
    assert spec["required"]["steps"][1]["default"] == 4 and spec["required"]["renoise_steps"][1]["default"] == 9
    assert spec["required"]["denoise"][1]["default"] == 1.0 and spec["required"]["cfg"][1]["default"] == 1.0
    assert list(spec["optional"]) == ["solver", "edit_loss", "noise_correction", "sigmas", "eta", "s_noise"]


def test_outputs_and_reconstruction(graph):
    (nc,) = NODES["NoiseCorrection"]().build("exact", 10, 1.8)
    latent, inversion, sigmas = invert(graph, noise_correction=nc)
    assert isinstance(inversion, InversionData) and inversion.latent_shape == (2, 4, 16, 16)
    assert inversion.noises.shape == (4, 2, 4, 16, 16) and inversion.denoiser_calls == 38
    assert sigmas.dtype == torch.float32 and sigmas.shape == (5,)
    out = replay(graph, latent, inversion, sigmas)
    assert psnr(out["samples"] * fake_comfy.LATENT_SCALE, graph["x0"]).min() > 45


def test_inputs_are_not_mutated_and_outputs_do_not_alias(graph):
    before = copy.deepcopy({k: graph[k] for k in ("positive", "negative", "latent_image")})
    latent, inversion, sigmas = invert(graph, edit_loss=EditLossSettings(), noise_correction=NoiseCorrectionSettings())
    noises_before = inversion.noises.clone()
    replay(graph, latent, inversion, sigmas)
    replay(graph, latent, inversion, sigmas)
    for key, value in before.items():
        assert torch.equal(graph[key][0][0] if key != "latent_image" else graph[key]["samples"],
                           value[0][0] if key != "latent_image" else value["samples"])
    assert torch.equal(inversion.noises, noises_before)
    assert latent["samples"].data_ptr() != graph["latent_image"]["samples"].data_ptr()


def test_batch_index_gives_the_seed_of_that_item(graph):
    _, full, _ = invert(graph)
    single = {"samples": graph["latent_image"]["samples"][1:], "batch_index": [1]}
    _, one, _ = invert(dict(graph, latent_image=single, positive=conditioning(graph["model"].mixture, 5)))
    assert torch.allclose(one.noises[:, 0], full.noises[:, 1], atol=1e-5)


def test_partial_inversion_with_denoise(graph):
    _, inversion, sigmas = invert(graph, steps=4, denoise=0.5, sampler_name="euler")
    assert sigmas.shape == (5,) and float(sigmas[0]) < 14.0  # KSampler's tail of an 8-step schedule


def test_progress_counts_every_denoiser_call(graph):
    invert(graph, renoise_steps=3)
    done = [d for d, _ in fake_comfy.Progress.log]
    assert done == list(range(1, len(done) + 1)) and done[-1] == fake_comfy.Progress.log[-1][1]


def test_cancel_then_run_again_is_clean(graph):
    _, reference, _ = invert(graph)
    fake_comfy.Progress.cancel_at = 5
    with pytest.raises(InterruptedError):
        invert(graph)
    fake_comfy.Progress.cancel_at = None
    _, again, _ = invert(graph)
    assert torch.equal(again.noises, reference.noises)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(denoise=0.0), "denoise must be in"),
        (dict(steps=0), "steps must be between 1 and 1000"),
        (dict(steps=100000), "steps must be between 1 and 1000"),
        (dict(sampler_name="dpmpp_sde"), "sampler_name must be one of.*dpmpp_sde cannot be inverted: its noise enters"),
        (dict(sigmas=torch.tensor([0.5, 1.0, 0.0])), "bad schedule.*strictly descending"),
        (dict(sigmas=torch.tensor([1.0])), "bad schedule.*at least 2"),
        (dict(renoise_steps=-1), "renoise_steps"),
    ],
)
def test_bad_widgets_raise_clear_errors(graph, change, message):
    with pytest.raises(ValueError, match=message):
        invert(graph, **change)


@pytest.mark.parametrize(
    "samples,message",
    [
        (torch.full((1, 4, 16, 16), float("nan")), "NaN or Inf"),
        (torch.zeros((0, 4, 16, 16)), "empty"),
        (torch.zeros((4, 16, 16)), r"image latent \[batch, channels, height, width\]"),
    ],
)
def test_bad_latents(graph, samples, message):
    with pytest.raises(ValueError, match=message):
        invert(dict(graph, latent_image={"samples": samples}))


def test_conditioning_batch_must_fit_the_latent_batch(graph, mixture):
    three = [[torch.cat([mixture.prior([1]), mixture.prior([2]), mixture.prior([3])]).float(), {}]]
    with pytest.raises(ValueError, match="`positive` holds 3 prompts but the latent has 2 images"):
        invert(dict(graph, positive=three))
    two = [[torch.cat([mixture.prior([3]), mixture.prior([5])]).float(), {}]]
    invert(dict(graph, positive=two), renoise_steps=0)  # one prompt per image is fine


def test_odd_latent_sizes_work(mixture):
    x0 = torch.randn(1, 4, 13, 11)
    g = {"model": FakeModel(GaussianMixtureOfShape(mixture, (4, 13, 11))), "positive": conditioning(mixture, 1),
         "negative": conditioning(mixture, None), "latent_image": {"samples": x0}}
    latent, inversion, _ = invert(g, edit_loss=EditLossSettings(), noise_correction=NoiseCorrectionSettings())
    assert latent["samples"].shape == (1, 4, 13, 11) and torch.isfinite(inversion.noises).all()


def GaussianMixtureOfShape(mixture, shape):
    from renoise_core.analytic import GaussianMixture

    return GaussianMixture.random(components=mixture.num_components, shape=shape, seed=0)


def test_sampling_with_another_model_family_is_refused(graph):
    latent, inversion, sigmas = invert(graph, renoise_steps=1)
    other = dict(graph, model=FakeModel(graph["model"].mixture, family="SDXL"))
    with pytest.raises(ValueError, match="made with a SD15 model but is being sampled with a SDXL model"):
        replay(other, latent, inversion, sigmas)


@pytest.fixture
def flow_graph():
    from renoise_core.analytic import GaussianMixture

    mixture = GaussianMixture.random(components=16, shape=(16, 8, 8), std=1.0, seed=0, parameterization="flow")
    x0 = mixture.sample([3, 5], seed=1)
    return {"model": FakeModel(mixture, kind="CONST", family="FluxSchnell"), "positive": conditioning(mixture, 3),
            "negative": conditioning(mixture, None), "latent_image": {"samples": x0 / fake_comfy.LATENT_SCALE}, "x0": x0}


@pytest.mark.parametrize("denoise", [1.0, 0.6])
def test_flow_models_invert_and_replay(flow_graph, denoise):
    """At sigma 1 no LATENT can carry the inverted latent (ComfyUI's noise scaling multiplies it by 0): the
    inversion carries it for ReNoiseSampler. Below 1 the LATENT is pre-divided by 1 - sigma."""
    schedule = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    if denoise < 1:
        schedule = torch.tensor([0.6, 0.4, 0.2, 0.0])
    (nc,) = NODES["NoiseCorrection"]().build("exact", 10, 1.8)
    latent, inversion, sigmas = invert(flow_graph, sigmas=schedule, noise_correction=nc)
    assert inversion.parameterization == "flow"
    assert (inversion.start_latent is not None) == (denoise == 1.0)
    out = replay(flow_graph, latent, inversion, sigmas)
    from renoise_core.analytic import psnr

    assert psnr(out["samples"] * fake_comfy.LATENT_SCALE, flow_graph["x0"]).min() > 40


def test_flow_models_refuse_ddpm(flow_graph):
    with pytest.raises(ValueError, match="ddpm works in DDPM units"):
        invert(flow_graph, sampler_name="ddpm", sigmas=torch.tensor([1.0, 0.5, 0.0]))


def test_sampler_refuses_mismatched_runs(graph):
    latent, inversion, sigmas = invert(graph, renoise_steps=1)
    with pytest.raises(ValueError, match="latent being sampled has shape"):
        replay(graph, {"samples": latent["samples"][:1]}, inversion, sigmas)
    with pytest.raises(ValueError, match="Connect ReNoiseInvert's `sigmas` output"):
        replay(graph, latent, inversion, fake_comfy.schedule(None, "simple", 6, 1.0))
    with pytest.raises(ValueError, match="connect the `inversion` output"):
        NODES["ReNoiseSampler"]().get_sampler({"noises": 1})


def test_sampler_accepts_a_tail_of_the_schedule(graph):
    latent, inversion, sigmas = invert(graph, renoise_steps=1)
    replay(graph, latent, inversion, sigmas[1:])  # e.g. starting later: the noises are looked up by sigma


def test_solver_node_and_default(graph):
    spec = NODES["ReNoiseSolver"].INPUT_TYPES()["required"]
    assert list(spec) == ["method", "history", "average_start", "first_step_below_timestep", "first_step_renoise_steps",
                          "first_step_average_start", "convergence_tol"]
    assert spec["method"][0] == ["anderson", "fixed_point"] and spec["method"][1]["default"] == "anderson"
    assert NODES["ReNoiseSolver"].RETURN_TYPES == ("RENOISE_SOLVER",)
    for name in ("history",):
        assert "fixed_point ignores it" in spec[name][1]["tooltip"]
    for name in ("average_start", "first_step_average_start"):
        assert "anderson ignores it" in spec[name][1]["tooltip"]
    (paper,) = NODES["ReNoiseSolver"]().build("fixed_point", 3, 8, 250, 4, 0, 0.0)
    (accelerated,) = NODES["ReNoiseSolver"]().build("anderson", 3, 8, 250, 4, 0, 0.0)
    _, default_inversion, _ = invert(graph, sampler_name="euler", renoise_steps=2)
    _, accelerated_inversion, _ = invert(graph, sampler_name="euler", renoise_steps=2, solver=accelerated)
    _, paper_inversion, _ = invert(graph, sampler_name="euler", renoise_steps=2, solver=paper)
    assert default_inversion.settings["solver"]["method"] == "anderson"
    assert default_inversion.settings == accelerated_inversion.settings != paper_inversion.settings
    assert default_inversion.denoiser_calls == paper_inversion.denoiser_calls == 12  # K = 2: 3 calls on each of 4 steps
    # unconnected: the paper's loop
    for stochastic in ("euler_ancestral", "lcm", "ddpm", "dpm_2_ancestral", "dpmpp_2m_sde", "res_multistep_ancestral"):
        _, inversion, _ = invert(graph, sampler_name=stochastic, renoise_steps=1)
        assert inversion.settings["solver"] == dataclasses.asdict(SolverSettings(method="fixed_point")), stochastic
    for deterministic in ("heun", "dpmpp_2m", "res_multistep"):
        _, inversion, _ = invert(graph, sampler_name=deterministic, scheduler="karras", renoise_steps=0)
        assert inversion.settings["solver"]["method"] == "anderson", deterministic
    tooltip = NODES["ReNoiseInvert"].INPUT_TYPES()["optional"]["solver"][1]["tooltip"]
    assert "the paper's loop for euler_ancestral, lcm, ddpm, dpm_2_ancestral, dpmpp_2m_sde* and res_multistep_ancestral" in tooltip
    with pytest.raises(ValueError, match="method must be one of"):
        NODES["ReNoiseSolver"]().build("newton", 3, 8, 250, 4, 0, 0.0)
    with pytest.raises(ValueError, match="takes a ReNoiseSolver node"):
        invert(graph, solver={"method": "anderson"})


def test_solver_node_changes_the_result_and_anderson_reconstructs_better(graph):
    latent_a, inversion_a, sigmas = invert(graph, sampler_name="euler", renoise_steps=3)
    (paper,) = NODES["ReNoiseSolver"]().build("fixed_point", 3, 8, 250, 4, 0, 0.0)
    latent_p, inversion_p, _ = invert(graph, sampler_name="euler", renoise_steps=3, solver=paper)
    db_a = psnr(replay(graph, latent_a, inversion_a, sigmas)["samples"] * fake_comfy.LATENT_SCALE, graph["x0"]).mean()
    db_p = psnr(replay(graph, latent_p, inversion_p, sigmas)["samples"] * fake_comfy.LATENT_SCALE, graph["x0"]).mean()
    assert db_a > db_p + 10.0, (db_a, db_p)


@pytest.mark.parametrize("sampler, renoise_steps", [("heun", 3), ("dpmpp_2m", 4)])
def test_solver_node_reaches_heun_and_dpmpp_2m(graph, sampler, renoise_steps):
    """heun: anderson on each step's fixed point; dpmpp_2m: over the sweeps. Identical calls; anderson differs from
    plain iteration (where it has three evaluations) and reconstructs at least as well."""
    (paper,) = NODES["ReNoiseSolver"]().build("fixed_point", 3, 8, 250, 4, 0, 0.0)
    db, calls, latents = {}, {}, {}
    for name, solver in (("anderson", None), ("fixed_point", paper)):
        latent, inversion, sigmas = invert(graph, sampler_name=sampler, scheduler="karras", steps=20,
                                           renoise_steps=renoise_steps, solver=solver)
        out = replay(graph, latent, inversion, sigmas)["samples"] * fake_comfy.LATENT_SCALE
        db[name], calls[name], latents[name] = psnr(out, graph["x0"]).mean().item(), inversion.denoiser_calls, latent["samples"]
    assert calls["anderson"] == calls["fixed_point"]
    assert not torch.equal(latents["anderson"], latents["fixed_point"])
    assert db["anderson"] >= db["fixed_point"] - 0.5, db


def test_workflows_saved_with_0_1_0_get_a_clear_message(graph):
    """0.1.0's ReNoiseInvert had five more widgets before eta and s_noise: positional widget values give them 8 and
    250. Validation names the cause before the prompt runs."""
    message = NODES["ReNoiseInvert"].VALIDATE_INPUTS(s_noise=250)
    assert "saved with ReNoise 0.1.0" in message and "ReNoiseSolver" in message
    assert NODES["ReNoiseInvert"].VALIDATE_INPUTS(s_noise=1.0) is True
    assert "must be >= 0" in NODES["ReNoiseInvert"].VALIDATE_INPUTS(s_noise=-1.0)
    with pytest.raises(ValueError, match="saved with ReNoise 0.1.0"):
        invert(graph, eta=8.0, s_noise=250.0)


def test_config_nodes():
    (nc,) = NODES["NoiseCorrection"]().build("optimize", 10, 1.8)
    assert nc == NoiseCorrectionSettings("optimize", 10, 1.8)
    (el,) = NODES["EditLossConfig"]().build(20.0, 0.065, 4, 5, 4)
    assert el == EditLossSettings()
    with pytest.raises(ValueError, match="mode"):
        NODES["NoiseCorrection"]().build("sometimes", 10, 1.8)


def invert_edit_friendly(graph, **widgets):
    inputs = dict(sampler_name="ddpm", scheduler="simple", steps=10, denoise=1.0, cfg=1.0, skip=0, seed=3)
    inputs.update(widgets)
    return NODES["EditFriendlyInvert"]().invert(graph["model"], graph["positive"], graph["negative"], graph["latent_image"], **inputs)


@pytest.mark.parametrize("sampler", ["ddpm", "euler_ancestral", "lcm"])
def test_edit_friendly_node_reconstructs_through_renoise_sampler(graph, sampler):
    latent, inversion, sigmas = invert_edit_friendly(graph, sampler_name=sampler, skip=3)
    assert inversion.method == "edit_friendly" and inversion.steps == 7 and float(sigmas[-1]) > 0
    out = replay(graph, latent, inversion, sigmas)
    assert torch.allclose(out["samples"] * fake_comfy.LATENT_SCALE, graph["x0"], atol=1e-4)


def test_edit_friendly_node_offers_only_what_it_inverts(graph):
    """Every sampler in its list runs (the multistep stochastic samplers are ReNoiseInvert's only)."""
    for sampler in NODES["EditFriendlyInvert"].INPUT_TYPES()["required"]["sampler_name"][0]:
        latent, inversion, _ = invert_edit_friendly(graph, sampler_name=sampler, skip=0)
        assert inversion.sampler_name == sampler
    with pytest.raises(ValueError, match="sampler_name must be one of"):
        invert_edit_friendly(graph, sampler_name="dpmpp_2m_sde")


def test_edit_friendly_node_refusals(graph):
    with pytest.raises(ValueError, match="sampler_name must be one of"):
        invert_edit_friendly(graph, sampler_name="euler")
    with pytest.raises(ValueError, match="skip must be between 0 and steps - 1 = 9"):
        invert_edit_friendly(graph, skip=10)
    spec = NODES["EditFriendlyInvert"].INPUT_TYPES()
    assert list(spec["required"]) == ["model", "positive", "negative", "latent_image", "sampler_name", "scheduler", "steps",
                                      "denoise", "cfg", "skip", "seed"]


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "res_multistep",
                                     "res_multistep_ancestral"])
def test_second_order_and_multistep_samplers_reconstruct_through_the_nodes(graph, sampler):
    (nc,) = NODES["NoiseCorrection"]().build("exact", 10, 1.8)
    stochastic = sampler in ("dpm_2_ancestral", "dpmpp_2m_sde", "res_multistep_ancestral")
    latent, inversion, sigmas = invert(graph, sampler_name=sampler, scheduler="karras", steps=20, renoise_steps=1,
                                       noise_correction=nc if stochastic else None)
    assert inversion.sampler_name == sampler and fake_comfy.Progress.log[-1] == (inversion.denoiser_calls,) * 2
    out = replay(graph, latent, inversion, sigmas)
    assert psnr(out["samples"] * fake_comfy.LATENT_SCALE, graph["x0"]).min() > 35  # euler here: 39 dB


@pytest.mark.parametrize("sampler", ["dpmpp_2m_sde", "dpm_2_ancestral"])
def test_stochastic_multistep_inversion_takes_edit_losses(graph, sampler):
    """The reference prediction rides along in each step's first call: the calls are those planned without edit
    losses; the inversion is a different one."""
    (edit,) = NODES["EditLossConfig"]().build(20.0, 0.065, 4, 5, 4)
    (nc,) = NODES["NoiseCorrection"]().build("optimize", 10, 1.8)
    settings = dict(sampler_name=sampler, scheduler="karras", steps=10, renoise_steps=1, noise_correction=nc)
    latent, inversion, _ = invert(graph, edit_loss=edit, **settings)
    plain_latent, plain, _ = invert(graph, **settings)
    assert inversion.denoiser_calls == plain.denoiser_calls and fake_comfy.Progress.log[-1] == (plain.denoiser_calls,) * 2
    assert inversion.settings["edit_loss"]["lambda_ac"] == 20.0
    assert not torch.allclose(latent["samples"], plain_latent["samples"], atol=1e-3)
