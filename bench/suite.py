"""Speed and memory of Train LoRA, side by side in one run, on the tiny SD1.5 checkpoint through ComfyUI's
MODEL (CPU here; a GPU is used when ComfyUI finds one).

Each measurement runs in its own subprocess (so peak memory is that run's own), interleaved per shape:

- floor:   the bare diffusion model's forward + backward, gradients for the input only, no adapters
- ours:    Train LoRA's engine step (attention preset, rank 16, AdamW), data streamed from memory
- ours-all: the same with adapters on every Linear and Conv2d (TrainLoraNode's layer set, less norms/biases)
- native:  ComfyUI's own TrainLoraNode, rank 16, AdamW, same data, batch and dtype

Then the whole prompt (load checkpoint -> dataset -> caption dropout -> Encode Latents Cache -> Train LoRA) is
timed twice, each in a fresh process (as after a ComfyUI restart): with an empty cache folder, then with the
cache the first run wrote.

    python bench/suite.py [--sizes 256 512] [--batches 1 4] [--steps 4] [--prompt-images 8]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.workers import run_worker  # noqa: E402

KINDS = ("floor", "ours", "ours-all", "native")
IMAGES = 4


def worker(kind: str, px: int, batch: int, steps: int) -> dict:
    import torch

    from scripts.comfy_host import comfy_root
    from scripts.comfy_inproc import load_comfy, loaded_pack, run_node
    from scripts.make_demo_assets import cached_tiny_sd15

    ckpt = cached_tiny_sd15()
    base = Path(tempfile.mkdtemp(prefix="bench_"))
    nodes = load_comfy(comfy_root(), base, cpu=not torch.cuda.is_available())
    (base / "checkpoints" / ckpt.name).symlink_to(ckpt)
    model, clip, _ = run_node(nodes, "CheckpointLoaderSimple", ckpt_name=ckpt.name)[:3]
    (cond,) = run_node(nodes, "CLIPTextEncode", clip=clip, text="zkx pattern")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(IMAGES, 4, px // 8, px // 8, generator=g)
    pack = loaded_pack(nodes)
    stamps: list[float] = []
    extra = {}
    if kind == "native":
        import comfy.utils
        from comfy_extras.nodes_train import TrainLoraNode

        comfy.utils.set_progress_bar_global_hook(lambda *a, **k: stamps.append(time.perf_counter()))
        with torch.inference_mode():
            TrainLoraNode.execute(
                model=[model], latents=[{"samples": latents[i:i + 1]} for i in range(IMAGES)], positive=[cond],
                batch_size=[batch], steps=[steps + 1], grad_accumulation_steps=[1], learning_rate=[1e-4],
                rank=[16], optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=["fp32"],
                lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[False], existing_lora=["[None]"])
    else:
        from_bridge = pack.glue.bridge
        from_bridge.load_for_training(model)
        denoiser = from_bridge.ComfyDenoiser(model)
        x0 = model.model.process_latent_in(latents)
        with torch.inference_mode(False):
            context = cond[0][0][0].clone()  # CLIPTextEncode ran under inference_mode
        if kind == "floor":
            unet = denoiser.module
            with torch.inference_mode(False), torch.enable_grad():
                for _ in range(steps + 1):
                    x = x0[:batch].clone().requires_grad_(True)
                    out = unet(x, torch.full((batch,), 500.0), context=context.expand(batch, -1, -1))
                    torch.nn.functional.mse_loss(out, x0[:batch]).backward()
                    stamps.append(time.perf_counter())
        else:
            engine = pack.training
            data = engine.batching.InMemoryData(list(x0), [{"context": context}] * IMAGES)
            if kind == "ours":
                targets = pack.glue.families.ATTENTION
            else:
                targets = [n for n, m in denoiser.module.named_modules()
                           if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
            config = engine.config.TrainConfig(steps=steps + 1, objective="ddpm-eps", rank=16, batch_size=batch,
                                               targets=tuple(targets), log_every=steps + 1, learning_rate=1e-4)
            started = time.perf_counter()
            with torch.inference_mode(False), torch.enable_grad():
                result = engine.loop.train(config, denoiser, data,
                                           on_step=lambda info: stamps.append(time.perf_counter()))
            extra["data_wait_share"] = result.data_wait_s / (time.perf_counter() - started)
    step_s = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    return {"kind": kind, "px": px, "batch": batch, "step_s": step_s, "peak_mb": peak_mb, **extra}


def prompt_worker(cache_dir: str, images: int, px: int, steps: int) -> dict:
    """Wall time of the whole training prompt, in-process, with the given cache folder."""
    import torch

    from scripts.comfy_host import comfy_root
    from scripts.comfy_inproc import load_comfy, run_node
    from scripts.make_demo_assets import cached_tiny_sd15, make_demo_dataset

    ckpt = cached_tiny_sd15()
    base = Path(tempfile.mkdtemp(prefix="bench_prompt_"))
    nodes = load_comfy(comfy_root(), base, cpu=not torch.cuda.is_available())
    (base / "checkpoints" / ckpt.name).symlink_to(ckpt)
    make_demo_dataset(base / "input" / "rings", count=images, size=px)
    started = time.perf_counter()
    model, clip, vae = run_node(nodes, "CheckpointLoaderSimple", ckpt_name=ckpt.name)[:3]
    dataset, _ = run_node(nodes, "LoraTrainerLoadDataset", folder="rings", resolution=px, bucket_multiple=64,
                          strict=True, edit_pairs=False, random_crop=False, flip=False)
    (dataset,) = run_node(nodes, "LoraTrainerCaptionDropout", dataset=dataset, dropout=0.1, trigger_word="zkx",
                          shuffle_tags=False, keep_tokens=1, shuffle_variants=1)
    encoded, report = run_node(nodes, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                               cache_dir=cache_dir)
    encoded_s = time.perf_counter() - started
    run_node(nodes, "LoraTrainerTrain", model=model, encoded=encoded, steps=steps, learning_rate=1e-4, rank=16,
             alpha=0.0, targets="attention", objective="auto", batch_size=1, seed=0, name="bench/prompt")
    return {"wall_s": time.perf_counter() - started, "until_trained_s": encoded_s, "cache": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--prompt-images", type=int, default=8, help="images in the warm/cold prompt's dataset")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-worker", help=argparse.SUPPRESS)
    parser.add_argument("--px", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.px, args.batch, args.steps)))
        return
    if args.prompt_worker:
        print(json.dumps(prompt_worker(args.prompt_worker, args.prompt_images, args.px, args.steps)))
        return
    print("tiny SD1.5 through ComfyUI's MODEL, fp32; step = median seconds per optimizer step; peak = "
          "process peak RSS (CPU) or max allocated (GPU), MiB")
    print(f"{'px':>4} {'batch':>5} | {'floor':>7} {'ours':>7} {'all':>7} {'native':>7} | {'ours/floor':>10} "
          f"{'native/ours':>11} {'native/all':>10} | {'peak ours':>9} {'peak nat':>9} | {'data wait':>9}")
    for px in args.sizes:
        for batch in args.batches:
            runs = {kind: run_worker(__file__, f"{kind} at {px}px batch {batch}", "--worker", kind, "--px",
                                     str(px), "--batch", str(batch), "--steps", str(args.steps)) for kind in KINDS}
            f, o, a, n = (runs[k]["step_s"] for k in KINDS)
            print(f"{px:>4} {batch:>5} | {f:>7.3f} {o:>7.3f} {a:>7.3f} {n:>7.3f} | {o / f:>10.3f} {n / o:>11.2f} "
                  f"{n / a:>10.2f} | {runs['ours']['peak_mb']:>9.0f} {runs['native']['peak_mb']:>9.0f} | "
                  f"{runs['ours']['data_wait_share']:>8.1%}", flush=True)
    px = min(args.sizes)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as cache:
        cold, warm = (run_worker(__file__, f"{which} prompt", "--prompt-worker", cache, "--prompt-images",
                                 str(args.prompt_images), "--px", str(px), "--steps", str(args.steps))
                      for which in ("cold", "warm"))
    print(f"\nwhole prompt, {args.prompt_images} images at {px}px, {args.steps} steps, fresh process each: "
          f"cold cache {cold['wall_s']:.1f}s ({cold['until_trained_s']:.1f}s before training), warm cache "
          f"{warm['wall_s']:.1f}s ({warm['until_trained_s']:.1f}s before training); warm/cold = "
          f"{warm['wall_s'] / cold['wall_s']:.2f}\n  cold: {cold['cache']}\n  warm: {warm['cache']}")


if __name__ == "__main__":
    main()
