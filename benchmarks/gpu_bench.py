"""Speed of ReNoiseInvert inside a real ComfyUI: does an inversion cost its denoiser calls and nothing more?

    COMFYUI_PATH=../comfyui python benchmarks/gpu_bench.py --out benchmarks/out            # CUDA: full-size models, fp16
    COMFYUI_PATH=../comfyui python benchmarks/gpu_bench.py --smoke --out /tmp/bench       # CPU: tiny models (tested)

Runs the pack's nodes in-process on random-weight SDXL- and SD1.5-architecture UNets (fp16 on CUDA) at 512 and
1024 px, batch 1 and 4, and measures, as medians over repeats after a warm-up, with CUDA synchronisation:

- floor: the same number of denoiser calls made by a bare sampler function through the same CFGGuider;
- ReNoiseInvert with the SDXL-Turbo defaults (euler_ancestral, 4 steps, renoise 9, edit losses, noise correction);
- plain inversion (renoise 0) and a stock 4-step KSampler (euler_ancestral) for scale;
- denoiser calls made, wall time, time outside the denoiser (wall - calls x floor time per call), peak memory.

Writes ``gpu_bench.json`` and ``gpu_bench.md`` to ``--out``. Targets (issue 7): ReNoiseInvert at most 1.05 x the
floor, 38 calls, peak VRAM at most KSampler's + 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PACK_DIR / "benchmarks" / "out")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (what the tests run)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    comfy_path = Path(os.environ["COMFYUI_PATH"]).resolve()
    sys.path.insert(0, str(comfy_path))
    os.chdir(comfy_path)
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = args.smoke or not torch.cuda.is_available()
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import comfy.samplers
    import comfy.supported_models

    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    if not asyncio.run(nodes.load_custom_node(str(PACK_DIR), module_parent="custom_nodes")):
        raise SystemExit("ComfyUI could not load the pack")
    invert_node = nodes.NODE_CLASS_MAPPINGS["ReNoiseInvert"]()
    edit_loss = nodes.NODE_CLASS_MAPPINGS["EditLossConfig"]().build(20.0, 0.065, 4, 5, 4)[0]
    noise_correction = nodes.NODE_CLASS_MAPPINGS["NoiseCorrection"]().build("optimize", 10, 1.8)[0]

    cuda = not comfy_args.cpu
    device = comfy.model_management.get_torch_device()
    dtype = torch.float16 if cuda else torch.float32

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def unet_config(kind: str, tiny: bool) -> dict:
        common = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
                  "in_channels": 4, "out_channels": 4, "model_channels": 320, "use_temporal_resblock": False,
                  "use_temporal_attention": False}
        if kind == "sd15":
            levels = [1] if tiny else [1, 2, 4, 4]
            return {**common, "adm_in_channels": None, "num_res_blocks": [1 if tiny else 2] * len(levels),
                    "transformer_depth": [1] * (len(levels) - (0 if tiny else 1)) + ([] if tiny else [0]),
                    "transformer_depth_output": ([1, 1] if tiny else [1, 1, 1] * 3 + [0, 0, 0]),
                    "channel_mult": levels, "transformer_depth_middle": 1, "use_linear_in_transformer": False,
                    "context_dim": 768, "num_heads": 8, "num_head_channels": -1}
        return {**common, "num_classes": "sequential", "adm_in_channels": 2816, "num_res_blocks": [2, 2, 2],
                "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                "channel_mult": [1, 1, 1] if tiny else [1, 2, 4], "transformer_depth_middle": 10,
                "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64}

    def build(kind: str):
        tiny = args.smoke
        config = (comfy.supported_models.SD15 if kind == "sd15" else comfy.supported_models.SDXL)(unet_config(kind, tiny))
        config.set_inference_dtype(dtype, None)
        model = config.get_model({}, device="cpu")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.diffusion_model.named_parameters():
                if p.ndim <= 1:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p[0].numel()))
        model.diffusion_model.to(dtype)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
        context = 2048 if kind == "sdxl" else 768
        extra = {"pooled_output": torch.zeros((1, 1280))} if kind == "sdxl" else {}
        positive = [[torch.randn((1, 77, context), generator=generator), dict(extra)]]
        negative = [[torch.zeros((1, 77, context)), dict(extra)]]
        return patcher, positive, negative

    def timed(fn):
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            return _timed(fn)

    def _timed(fn):
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        sync()
        return time.perf_counter() - start, (torch.cuda.max_memory_allocated() if cuda else 0), result

    def median_run(fn):
        timed(fn)  # warm-up (loads the model, compiles kernels)
        runs = [timed(fn) for _ in range(args.repeats)]
        return statistics.median(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2]

    def floor(patcher, positive, negative, latent, sigmas, calls):
        """``calls`` denoiser calls from a bare sampler function through the same guider."""
        def function(model_k, x, sigmas_in, extra_args=None, callback=None, disable=None):
            s_in = x.new_ones([x.shape[0]])
            for i in range(calls):
                model_k(x, sigmas_in[i % (len(sigmas_in) - 1)] * s_in, **extra_args)
            return x

        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(positive, negative)
        guider.set_cfg(1.0)
        return guider.sample(torch.zeros_like(latent), latent, comfy.samplers.KSAMPLER(function), sigmas, disable_pbar=True, seed=0)

    def measure(kind, patcher, positive, negative, size, batch) -> dict:
        latent = {"samples": torch.randn((batch, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(1))}

        def renoise(k=9, turbo=True):
            return invert_node.invert(patcher, positive, negative, latent, "euler_ancestral", "simple", 4, 1.0, 1.0, k, 7865,
                                      edit_loss=edit_loss if turbo else None, noise_correction=noise_correction if turbo else None)

        renoise_time, renoise_peak, result = median_run(renoise)
        calls = result[1].denoiser_calls
        sigmas = result[2].to(device)
        floor_time, floor_peak, _ = median_run(lambda: floor(patcher, positive, negative, latent["samples"], sigmas, calls))
        plain_time, _, plain = median_run(lambda: renoise(0, False))
        ksampler_time, ksampler_peak, _ = median_run(lambda: comfy.sample.sample(
            patcher, torch.randn_like(latent["samples"]), 4, 1.0, "euler_ancestral", "simple", positive, negative,
            latent["samples"], seed=0, disable_pbar=True))
        per_call = floor_time / calls
        return {
            "model": kind, "size": size, "batch": batch, "denoiser_calls": calls,
            "floor_s": floor_time, "renoise_s": renoise_time, "renoise_over_floor": renoise_time / floor_time,
            "outside_denoiser_s": renoise_time - calls * per_call, "plain_inversion_s": plain_time,
            "plain_calls": plain[1].denoiser_calls, "ksampler_4_steps_s": ksampler_time,
            "peak_mib_renoise": renoise_peak / 2**20, "peak_mib_floor": floor_peak / 2**20,
            "peak_mib_ksampler": ksampler_peak / 2**20,
            "peak_over_ksampler": (renoise_peak / ksampler_peak) if ksampler_peak else None,
        }

    sizes = [64] if args.smoke else [512, 1024]
    batches = [1] if args.smoke else [1, 4]
    kinds = ["sd15"] if args.smoke else ["sdxl", "sd15"]
    rows = []
    for kind in kinds:
        patcher, positive, negative = build(kind)
        for size in sizes:
            for batch in batches:
                rows.append(measure(kind, patcher, positive, negative, size, batch))
                print(json.dumps(rows[-1]), flush=True)
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()

    device_name = torch.cuda.get_device_name() if cuda else "CPU"
    report = {"device": device_name, "torch": torch.__version__, "dtype": str(dtype), "smoke": args.smoke,
              "comfyui_commit": _git_commit(comfy_path), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=1))
    lines = [f"Device: {device_name}, torch {torch.__version__}, {dtype}, ComfyUI {report['comfyui_commit']}", "",
             "| model | px | batch | calls | floor s | ReNoise s | ReNoise/floor | outside denoiser s | plain inversion s | "
             "KSampler 4 steps s | peak MiB ReNoise | peak MiB KSampler |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['denoiser_calls']} | {r['floor_s']:.3f} | {r['renoise_s']:.3f} | "
                     f"{r['renoise_over_floor']:.3f} | {r['outside_denoiser_s']:.3f} | {r['plain_inversion_s']:.3f} | "
                     f"{r['ksampler_4_steps_s']:.3f} | {r['peak_mib_renoise']:.0f} | {r['peak_mib_ksampler']:.0f} |")
    (args.out / "gpu_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _git_commit(path: Path) -> str:
    head = path / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (path / ".git" / ref[5:]).read_text().strip()[:12]
        return ref[:12]
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
