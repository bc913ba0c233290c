"""Training step time ÷ the bare model's forward + backward, measured side by side in one run.

The model is the tiny SD1.5 architecture (one 320-channel cross-attention level, CLIP-width context,
random weights) as a diffusers UNet. The floor is a forward + backward of the frozen model with
gradients for the input only, no adapters: a LoRA step cannot be cheaper. Ours is a full
``training.train`` step (data, noise, LoRA on attention, AdamW, clipping) at the same shapes.

    python bench/step_overhead.py [--sizes 256 512] [--batch 1] [--steps 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.batching import InMemoryData  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.diffusers_denoisers import UNetDenoiser  # noqa: E402
from training.loop import train  # noqa: E402

TINY_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320,), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
    cross_attention_dim=768, attention_head_dim=8,
)


def bare_step_seconds(unet: UNet2DConditionModel, latents: torch.Tensor, context: torch.Tensor,
                      steps: int) -> float:
    unet.requires_grad_(False)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        x = latents.clone().requires_grad_(True)
        t = torch.full((latents.shape[0],), 500.0)
        out = unet(x, t, encoder_hidden_states=context).sample
        torch.nn.functional.mse_loss(out, latents).backward()
        times.append(time.perf_counter() - started)
    unet.requires_grad_(True)
    return statistics.median(times[1:])


def train_step_seconds(unet: UNet2DConditionModel, latents: torch.Tensor, context: torch.Tensor,
                       steps: int) -> tuple[float, float]:
    data = InMemoryData(list(latents), [{"context": c} for c in context])
    stamps: list[float] = []
    config = TrainConfig(steps=steps + 1, objective="ddpm-eps", rank=16, batch_size=latents.shape[0],
                         log_every=steps + 1)
    started = time.perf_counter()
    train(config, UNetDenoiser(unet), data, on_step=lambda info: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - started
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:])), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2, help="alternate floor and ours this many times")
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_SD15)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    print(f"tiny SD1.5 UNet ({params:.1f} M params), {torch.get_num_threads()} threads, fp32, "
          f"batch {args.batch}, device cpu")
    print(f"{'px':>5} {'floor s':>9} {'ours s':>9} {'ratio':>7}")
    for size in args.sizes:
        latents = torch.randn(args.batch, 4, size // 8, size // 8)
        context = torch.randn(args.batch, 77, 768)
        floors, ours = [], []
        for _ in range(args.rounds):  # interleaved, so drifting machine load hits both alike
            floors.append(bare_step_seconds(unet, latents, context, args.steps))
            ours.append(train_step_seconds(unet, latents, context, args.steps)[0])
        floor, step = min(floors), min(ours)
        print(f"{size:>5} {floor:>9.3f} {step:>9.3f} {step / floor:>7.3f}")


if __name__ == "__main__":
    main()
