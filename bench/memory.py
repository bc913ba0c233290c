"""Memory and speed of Train LoRA on big models at their real widths, side by side in one run: SDXL, FLUX.1 and
Qwen-Image built from ComfyUI's own classes with random weights (scripts/tiny_families.py at full width), trained
by the engine's loop through ComfyUI's MODEL (glue/bridge.py), batch 1, rank 16, attention targets.

Modes, each in its own subprocess (so a peak is that run's own):

- bf16:          weights stored and computed in bf16, fully loaded (on the CPU, Linear backward in the layout
                 the CPU computes fast: _fast_cpu_backward)
- fp8:           weights stored as fp8 e4m3fn, ComfyUI's manual cast to bf16 (as its loaders give an fp8 file)
- fp8+ckpt:      the same with gradient checkpointing
- fp8+offload:   (GPU) the same under a memory budget: ComfyUI keeps what does not fit in CPU memory

Memory: on the CPU, the process's peak RSS while training minus its RSS before the model was built ("model
memory in training"); on a GPU, max allocated and reserved. On the CPU each architecture runs at two small
depths; the difference is the per-block slope, printed beside what one block stores (weights) and saves for
the backward pass (activations, measured by training.memory.saved_bytes), and extrapolated to the full depth.
A GPU runs the full depth. FLOPs of one step come from torch's FlopCounterMode; on a GPU, the achieved share of
the device's dense bf16 peak.

    python bench/memory.py [--px 256] [--steps 1] [--models flux qwen sdxl] [--budgets-gb 10 16]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.workers import run_worker  # noqa: E402

MIB = 2**20
# name -> (family record, full depth in units, what a unit is); spec() builds it at any depth
MODELS = {
    "flux": ("FLUX.1-dev", 19, "1 double + 2 single blocks"),
    "qwen": ("Qwen-Image", 60, "1 block"),
    "sdxl": ("SDXL", 70 / 11, "11 transformer layers (1 per attention level)"),
}
CPU_DEPTHS = (1, 2)  # units, for the slope
DENSE_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "4090": 165, "3090": 71}


def spec(model: str, depth: int):
    """The family's [tiny] spec at real width and ``depth`` units (None: the real depth)."""
    from scripts.tiny_families import TINY

    tiny = TINY[MODELS[model][0]]
    if model == "flux":
        d, s = (19, 38) if depth is None else (depth, 2 * depth)
        keys = {"img_in.weight": (3072, 64), "txt_in.weight": (3072, 4096), "vector_in.in_layer.weight": (3072, 768),
                "guidance_in.in_layer.weight": (3072, 256)}
        keys |= {f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(d)}
        keys |= {f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(s)}
        return replace(tiny, keys=keys, widths={"num_heads": 24})
    if model == "qwen":
        n = 60 if depth is None else depth
        keys = {"txt_norm.weight": (3584,), "img_in.weight": (3072, 64)}
        keys |= {f"transformer_blocks.{i}.attn.to_q.weight": (3072, 3072) for i in range(n)}
        return replace(tiny, keys=keys, widths={})
    # SDXL's real UNet has 2 and 10 transformer layers per block at its two attention levels (70 in all);
    # depth d puts d in every one of its 11 attention blocks
    d1, d2 = (2, 10) if depth is None else (depth, depth)
    unet = dict(model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], context_dim=2048,
                adm_in_channels=2816, num_head_channels=64, use_linear_in_transformer=True, num_classes="sequential",
                transformer_depth=[0, 0, d1, d1, d2, d2], transformer_depth_output=[0, 0, 0, d1, d1, d1, d2, d2, d2],
                transformer_depth_middle=d2)
    return replace(tiny, unet={**tiny.unet, **unet})


def _rss() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) * 1024


def _peak_rss() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": the peak RSS starts again from the current RSS
        f.write("5")


def worker(model: str, depth: int | None, mode: str, px: int, steps: int, budget_gb: float) -> dict:
    import torch

    from scripts.comfy_host import comfy_root
    from scripts.comfy_inproc import load_comfy, loaded_pack
    from scripts.tiny_families import tiny_model

    cuda = torch.cuda.is_available()
    nodes = load_comfy(comfy_root(), Path(tempfile.mkdtemp(prefix="bench_memory_")), cpu=not cuda)
    pack = loaded_pack(nodes)
    bridge, engine = pack.glue.bridge, pack.training
    before = _rss()
    storage = torch.bfloat16 if mode == "bf16" else torch.float8_e4m3fn
    comfy_model = tiny_model(spec(model, depth), dtype=storage, compute_dtype=torch.bfloat16)
    base = comfy_model.model
    stored = sum(t.numel() * t.element_size() for t in base.diffusion_model.state_dict().values())
    params = sum(t.numel() for t in base.diffusion_model.state_dict().values())
    budget = int(budget_gb * 2**30) if mode == "fp8+offload" else None
    bridge.load_for_training(comfy_model, budget)
    gc.collect()
    family = pack.glue.families.family_of(comfy_model)
    denoiser = bridge.ComfyDenoiser(comfy_model, guidance=family.guidance, family=family, budget=budget)
    data = _data(model, px, engine)
    config = engine.config.TrainConfig(steps=steps + 1, rank=16, batch_size=1, targets=family.targets("attention"),
                                       log_every=1, gradient_checkpointing="on" if mode == "fp8+ckpt" else "off")
    stamps: list[float] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    layers = bridge.frozen_layers(denoiser.module)
    if mode == "bf16" and not cuda:
        layers = _fast_cpu_backward(layers)
    with torch.inference_mode(False), torch.enable_grad(), bridge.training_mode(), \
            engine.memory.remade_weights(layers):
        engine.loop.train(config, denoiser, data, on_step=lambda info: stamps.append(time.perf_counter()))
        probe = _activations_and_flops(engine, denoiser, data, config)
    out = {"params": params, "stored_mib": stored / MIB,
           "step_s": sorted(b - a for a, b in zip(stamps, stamps[1:]))[(len(stamps) - 1) // 2]}
    if cuda:
        out |= {"allocated_mib": torch.cuda.max_memory_allocated() / MIB,
                "reserved_mib": torch.cuda.max_memory_reserved() / MIB}
    else:
        out["model_mib"] = (_peak_rss() - before) / MIB
    return out | probe


def _fast_cpu_backward(layers):
    """The bf16 run's frozen Linear layers with RemadeWeight's backward on the weight as stored. Autograd's own
    backward of a bf16 Linear computes grad @ W, which a CPU without AVX512-BF16 runs about 40x slower than the
    x @ Wᵀ layout RemadeWeight takes there (a FLUX.1 unit's step took over 15 minutes). Memory is unchanged:
    for a frozen Linear, autograd keeps only the weight, which is resident anyway (saved_bytes measures 0), and
    so does this. Conv2d layers keep autograd's backward, which also keeps their input."""
    import contextlib

    import torch

    for layer, weight_of, needs_cast in layers:
        if isinstance(layer, torch.nn.Linear):
            yield layer, lambda like, weight=layer.weight: contextlib.nullcontext(weight.to(like.dtype)), lambda: True
        else:
            yield layer, weight_of, needs_cast


# text tokens: short captions (the CPU computes bf16 slowly); the image tokens dominate at 1024 px anyway
CONTEXT = {"flux": ((32, 4096), (768,)), "qwen": ((32, 3584), None), "sdxl": ((77, 2048), (2816 - 1536,))}


def _data(model: str, px: int, engine):
    """One image's latents and text conditioning at the family's real widths (random values)."""
    import torch

    g = torch.Generator().manual_seed(0)
    channels = 4 if model == "sdxl" else 16
    latent = torch.randn(channels, *([1] if model == "qwen" else []), px // 8, px // 8, generator=g)
    context, pooled = CONTEXT[model]
    cond = {"context": torch.randn(*context, generator=g)}
    if pooled:
        cond["pooled"] = torch.randn(*pooled, generator=g)
    return engine.batching.InMemoryData([latent], [cond])


def _activations_and_flops(engine, denoiser, data, config) -> dict:
    """What one step saves for its backward pass and the FLOPs of its forward pass, with the run's adapters and
    checkpointing, from one forward pass that keeps nothing. A step is about twice the forward pass: frozen
    weights need only the input's gradient (three times with checkpointing, which repeats the forward)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = data.collate([0], None).to(denoiser.device, None)
    timestep = torch.full((1,), 0.5 if denoiser.prediction == "flow" else 500.0)
    with engine.lora.LoraAttachment(denoiser.module, config.targets, rank=config.rank, alpha=config.rank,
                                    device=denoiser.device):
        denoiser.set_gradient_checkpointing(config.gradient_checkpointing == "on")

        def loss():
            with torch.autocast(denoiser.device.type, dtype=torch.bfloat16):
                return denoiser(batch.latents, timestep, batch.cond).square().mean()

        counter = FlopCounterMode(display=False)
        with counter:
            saved = engine.memory.saved_bytes(loss, list(denoiser.module.parameters()))
        denoiser.set_gradient_checkpointing(False)
    return {"saved_mib": saved / MIB, "tflop": 2 * counter.get_total_flops() / 1e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1, help="timed steps, after one untimed")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--budgets-gb", type=float, nargs="+", default=[10.0, 16.0])
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # model depth mode
    parser.add_argument("--budget-gb", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, depth, mode = args.worker
        print(json.dumps(worker(model, None if depth == "full" else int(depth), mode, args.px, args.steps,
                                args.budget_gb)))
        return
    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "CPU"
    peak = next((tflops for key, tflops in DENSE_BF16_TFLOPS.items() if key in device), None)
    print(f"{device}; {args.px} px, batch 1, rank 16, attention targets; step = median seconds per optimizer step")
    unit = "allocated / reserved MiB" if cuda else "model memory in training, MiB (peak RSS - RSS before the model)"
    print(f"memory: {unit}\n")
    for model in args.models:
        family, full_depth, what = MODELS[model]
        depths = ["full"] if cuda else [str(d) for d in CPU_DEPTHS]
        modes = ["bf16", "fp8", "fp8+ckpt"] + (["fp8+offload"] * len(args.budgets_gb) if cuda else [])
        budgets = [0.0] * 3 + (args.budgets_gb if cuda else [])
        runs = {}
        for depth in depths:
            for mode, budget in zip(modes, budgets):
                label = mode if mode != "fp8+offload" else f"fp8+offload {budget:g} GB"
                runs[depth, label] = run = run_worker(__file__, f"{model} depth {depth} {label}", "--worker",
                                                      model, depth, mode, "--px", str(args.px), "--steps",
                                                      str(args.steps), "--budget-gb", str(budget))
                memory = (f"{run['allocated_mib']:>8.0f} / {run['reserved_mib']:>8.0f}" if cuda
                          else f"{run['model_mib']:>8.0f}")
                share = (f", {run['tflop'] / run['step_s'] / peak:.1%} of bf16 peak" if cuda and peak else "")
                print(f"{family:<11} depth {depth:>4} ({run['params'] / 1e9:5.2f} B params) {label:<20} "
                      f"memory {memory}  weights {run['stored_mib']:>7.0f}  saved for backward "
                      f"{run['saved_mib']:>7.0f}  step {run['step_s']:>7.2f} s  {run['tflop']:>7.2f} TFLOP{share}",
                      flush=True)
        if len(depths) == 2:
            _slopes(family, depths, runs, full_depth, what)
        bf16, fp8 = (runs[depths[-1], mode] for mode in ("bf16", "fp8"))
        memory = "allocated_mib" if cuda else "model_mib"
        print(f"  fp8 / bf16 memory without checkpointing: {fp8[memory] / bf16[memory]:.2f}; "
              f"step time fp8 / bf16: {fp8['step_s'] / bf16['step_s']:.2f}\n", flush=True)


def _slopes(family: str, depths: list[str], runs: dict, full_depth: int, what: str) -> None:
    """Per depth unit: the memory slope beside the stored weights and saved activations of one unit; the
    extrapolation to the full depth."""
    (a, b) = (int(d) for d in depths)
    for mode in ("bf16", "fp8", "fp8+ckpt"):
        lo, hi = runs[depths[0], mode], runs[depths[1], mode]
        per = {key: (hi[key] - lo[key]) / (b - a) for key in ("model_mib", "stored_mib", "saved_mib", "step_s")}
        full = {key: hi[key] + per[key] * (full_depth - b) for key in per}
        print(f"  {mode:<9} per {what}: memory {per['model_mib']:>6.0f} MiB = weights {per['stored_mib']:>6.0f} + "
              f"saved {per['saved_mib']:>6.0f} + {per['model_mib'] - per['stored_mib'] - per['saved_mib']:>5.0f}; "
              f"full depth ({full_depth:.3g} units): {full['model_mib'] / 1024:6.1f} GiB, {full['step_s']:6.1f} s/step")


if __name__ == "__main__":
    main()
