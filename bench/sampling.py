"""What sampling while training costs, side by side in one run: Train LoRA with and without Training Samples.

The real node chain on the tiny SD1.5 checkpoint (CheckpointLoaderSimple -> Load LoRA Dataset -> Encode Latents
Cache -> Train LoRA), one mode per fresh subprocess (bench/workers.py), the modes interleaved over the rounds in
ABBA order so that drifting machine load hits both alike:

- without: Train LoRA alone
- with:    the same run with Training Samples connected (every N steps, 2 prompts, a few sampler steps); it also
           samples before the first step and after the last

Each worker encodes the dataset, runs an untimed 2-step Train LoRA (the same warm-up in both modes), then the
timed Train LoRA. Its wall time is the whole node call (setup, training, sampling, writing the partial LoRA, loss
curve and progression). Training time and sampling time are the engine's own (TrainResult.train_s, sampling_s,
the figures Train LoRA's report prints to 0.1 s), read at full precision from the TrainResult the node got: the
worker wraps the ``train`` the node module calls, returning its result unchanged. The wrapper also stamps every
step (through the node's own on_step and sample callbacks) for two more per-step figures: the median step, and
the steps right after a sample point (5 -> 6, ...; the same steps in the run without samples), each with the
sampling inside it taken out.

Ratios (median over the rounds): training s/step with ÷ without (≈1.0: sampling does not slow training), and
(wall with − wall without) ÷ sampling s (≈1.0: sampling costs the run no more than the sampling itself).

    python bench/sampling.py [--steps 20] [--every 5] [--rounds 2] [--px 64] [--images 4] [--sampler-steps 4]

Run it with a ComfyUI host's python, e.g. ``.comfyui/0.33.0/venv/bin/python bench/sampling.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.workers import run_worker  # noqa: E402

MODES = ("without", "with")
PROMPTS = "zkx pattern\na red square"
WARMUP_STEPS = 2


def worker(mode: str, steps: int, every: int, px: int, images: int, sampler_steps: int) -> dict:
    import torch

    from scripts.comfy_host import comfy_root
    from scripts.comfy_inproc import load_comfy, loaded_pack, run_node
    from scripts.make_demo_assets import cached_tiny_sd15, make_demo_dataset

    ckpt = cached_tiny_sd15()
    base = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    nodes = load_comfy(comfy_root(), base, cpu=not torch.cuda.is_available())
    (base / "checkpoints" / ckpt.name).symlink_to(ckpt)
    make_demo_dataset(base / "input" / "rings", count=images, size=px)
    model, clip, vae = run_node(nodes, "CheckpointLoaderSimple", ckpt_name=ckpt.name)[:3]
    dataset, _ = run_node(nodes, "LoraTrainerLoadDataset", folder="rings", resolution=px, bucket_multiple=64,
                          strict=True, edit_pairs=False, random_crop=False, flip=False)
    encoded, _ = run_node(nodes, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                          cache_dir="cache")

    node_module = loaded_pack(nodes).glue.train_node
    engine_train = node_module.train
    runs = []  # per Train LoRA call: its TrainResult, the end of every step, (start, end) of every sample call

    def recorded_train(*args, on_step, sample=None, **kwargs):
        stamps, sampled = [], []

        def stamped_step(info):
            stamps.append(time.perf_counter())
            on_step(info)

        def timed_sample(step):
            started = time.perf_counter()
            sample(step)
            sampled.append((started, time.perf_counter()))

        result = engine_train(*args, on_step=stamped_step, sample=sample and timed_sample, **kwargs)
        runs.append((result, stamps, sampled))
        return result

    node_module.train = recorded_train
    train = dict(model=model, encoded=encoded, learning_rate=1e-4, rank=16, alpha=0.0, targets="attention",
                 objective="auto", batch_size=1, seed=0)
    run_node(nodes, "LoraTrainerTrain", **train, steps=WARMUP_STEPS, name="bench/warmup")
    extra, samples_node_s = {}, 0.0
    if mode == "with":
        started = time.perf_counter()
        (extra["samples"],) = run_node(nodes, "LoraTrainerSamples", clip=clip, vae=vae, prompts=PROMPTS,
                                       negative_prompt="", every_n_steps=every, seed=5, steps=sampler_steps, cfg=3.0,
                                       sampler_name="euler", scheduler="auto", width=0, height=0)
        samples_node_s = time.perf_counter() - started
    started = time.perf_counter()
    report = run_node(nodes, "LoraTrainerTrain", **train, **extra, steps=steps, name=f"bench/{mode}")[2]
    wall_s = time.perf_counter() - started
    result, stamps, sampled = runs[-1]
    trained = result.steps_done - result.first_step
    if trained != steps:
        raise RuntimeError(f"{mode}: Train LoRA trained {trained} steps, expected {steps}; report: {report}")
    # steps 2.. (step 1 has no stamp before it), each less the sampling inside it: a sample step samples before
    # its on_step; "after": the steps right after where the run with samples samples (the same steps in both modes)
    steps_s = [b - a - sum(end - start for start, end in sampled if a < start < b)
               for a, b in zip(stamps, stamps[1:])]
    after = [t for step, t in enumerate(steps_s, start=2) if every and (step - 1) % every == 0]
    return {"mode": mode, "step_s": result.train_s / trained, "median_step_s": statistics.median(steps_s),
            "after_s": statistics.mean(after) if after else float("nan"), "train_s": result.train_s,
            "wall_s": wall_s, "sampling_s": result.sampling_s, "sample_calls": len(result.sample_steps),
            "images": len(result.sample_steps) * len(PROMPTS.splitlines()) if mode == "with" else 0,
            "samples_node_s": samples_node_s, "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    parser.add_argument("--every", type=int, default=5, help="Training Samples' every_n_steps")
    parser.add_argument("--rounds", type=int, default=2, help="run both modes this many times, interleaved")
    parser.add_argument("--px", type=int, default=64, help="training (and sample) resolution")
    parser.add_argument("--images", type=int, default=4, help="images in the dataset")
    parser.add_argument("--sampler-steps", type=int, default=4, help="Training Samples' sampler steps")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = ("--steps", str(args.steps), "--every", str(args.every), "--px", str(args.px), "--images",
             str(args.images), "--sampler-steps", str(args.sampler_steps))
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.every, args.px, args.images, args.sampler_steps)))
        return
    import torch

    print(f"tiny SD1.5 through ComfyUI, {'GPU' if torch.cuda.is_available() else 'CPU'}, "
          f"{torch.get_num_threads()} threads; {args.images} images at {args.px} px, batch 1, rank 16, attention; "
          f"{args.steps} steps; samples every {args.every} steps, {len(PROMPTS.splitlines())} prompts, "
          f"{args.sampler_steps} sampler steps, cfg 3; a fresh process per run")
    print("train s/step: TrainResult.train_s / steps (what the report prints); median step, step after sample: "
          "seconds of one step from its on_step times, sampling taken out; other: wall - train - sampling")
    print(f"{'round':>5} {'mode':>7} | {'train s/step':>12} {'median step':>11} {'step after sample':>17} | "
          f"{'wall s':>7} {'train s':>7} {'sampling s':>10} {'other s':>7} | {'images':>6} {'s/image':>7}")
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for index in range(args.rounds):
        for mode in MODES if index % 2 == 0 else reversed(MODES):  # ABBA
            run = run_worker(__file__, f"round {index + 1} {mode}", "--worker", mode, *shape)
            runs[mode].append(run)
            per_image = f"{run['sampling_s'] / run['images']:>7.3f}" if run["images"] else f"{'-':>7}"
            print(f"{index + 1:>5} {mode:>7} | {run['step_s']:>12.4f} {run['median_step_s']:>11.4f} "
                  f"{run['after_s']:>17.4f} | {run['wall_s']:>7.2f} {run['train_s']:>7.2f} "
                  f"{run['sampling_s']:>10.2f} {run['wall_s'] - run['train_s'] - run['sampling_s']:>7.2f} | "
                  f"{run['images']:>6} {per_image}",
                  flush=True)

    def median(mode: str, key: str) -> float:
        return statistics.median(run[key] for run in runs[mode])

    keys = ("step_s", "median_step_s", "after_s", "wall_s", "sampling_s", "images")
    without, with_ = ({key: median(mode, key) for key in keys} for mode in MODES)
    print(f"\nmedian over {args.rounds} rounds")
    for mode, m in zip(MODES, (without, with_)):
        print(f"  {mode:>7}: training {m['step_s']:.4f} s/step (median step {m['median_step_s']:.4f} s, after a "
              f"sample {m['after_s']:.4f} s), Train LoRA wall {m['wall_s']:.2f} s, sampling {m['sampling_s']:.2f} s "
              f"({m['images']:.0f} images)")
    print(f"  training s/step, with ÷ without:          {with_['step_s'] / without['step_s']:.3f}  (≈1.0: sampling "
          f"does not slow training; median step {with_['median_step_s'] / without['median_step_s']:.3f}, step "
          f"after a sample {with_['after_s'] / without['after_s']:.3f})")
    print(f"  (wall with − wall without) ÷ sampling s:  "
          f"{(with_['wall_s'] - without['wall_s']) / with_['sampling_s']:.3f}  (≈1.0: sampling costs no more than "
          "the sampling itself)")
    print("  Training Samples node (encodes the prompts; outside Train LoRA): "
          f"{median('with', 'samples_node_s'):.2f} s")
    print(f"  report of the last run with samples: {runs['with'][-1]['report']}")


if __name__ == "__main__":
    main()
