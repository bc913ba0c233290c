"""Make small, deterministic demo assets: a random-weight SD1.5 checkpoint and a toy dataset.

    python scripts/make_demo_assets.py checkpoint OUT.safetensors [--seed 0] [--fp32] [--check]
    python scripts/make_demo_assets.py dataset OUT_DIR [--count 8] [--size 256] [--seed 0]
    python scripts/make_demo_assets.py all OUT_DIR      # OUT_DIR/tiny_sd15.safetensors + OUT_DIR/dataset/

The checkpoint is what ComfyUI's stock ``CheckpointLoaderSimple`` detects as SD1.5 (EPS): a
UNet with the SD1.5 widths (model_channels 320, context_dim 768, 8 heads, conv proj-in) but one
level and one block per level (25.8 M parameters), the full SD1 CLIP-L text model and the full
SD VAE. ComfyUI fixes the CLIP and VAE configs (12 layers, ch 128 x [1, 2, 4, 4]) whatever the
file holds, and leaves weights missing from the file uninitialised, so both are stored whole,
in fp16 to halve the file. Key names come from ComfyUI's own modules (built on the meta device),
so this dev script imports ComfyUI (``scripts/comfy_host.py`` finds or installs it); values come
from a per-tensor seeded generator, so the bytes depend only on the seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from scripts.comfy_host import comfy_root  # noqa: E402

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model."
VAE_PREFIX = "first_stage_model."

# What ComfyUI 0.3.75's detect_unet_config reads back from the weights; SD15 matches on
# context_dim, model_channels and use_linear_in_transformer only.
TINY_SD15_UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    num_res_blocks=[1],
    channel_mult=[1],
    transformer_depth=[1],
    transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
    context_dim=768,
    num_heads=8,
    use_spatial_transformer=True,
    use_linear_in_transformer=False,
)
# ComfyUI's VAE() uses this config for any SD-style VAE state dict (comfy/sd.py).
SD_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
# ComfyUI drops these when it saves an SD1.x checkpoint (SD15.process_clip_state_dict_for_saving),
# and on load it would move text_projection under text_model. and miss it: leave them out too.
CLIP_KEYS_NOT_SAVED = ("clip_l.transformer.text_projection.weight", "clip_l.logit_scale")
EMBEDDING_STD = 0.02  # CLIP's initializer_range


def _import_comfy() -> None:
    """Put ComfyUI on sys.path and make its device probe safe on a machine without CUDA."""
    root = str(comfy_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True


def tiny_sd15_shapes() -> dict[str, torch.Size]:
    """Checkpoint key -> shape for the tiny SD1.5, taken from ComfyUI's modules on the meta device."""
    _import_comfy()
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    shapes: dict[str, torch.Size] = {}
    unet = UNetModel(**TINY_SD15_UNET, device="meta", operations=comfy.ops.disable_weight_init)
    shapes.update({UNET_PREFIX + k: v.shape for k, v in unet.state_dict().items()})
    clip = comfy.sd1_clip.SD1ClipModel(device="meta")
    # SD1ClipModel names its inner model clip_l.; checkpoints call it cond_stage_model.
    for key, value in clip.state_dict().items():
        if key not in CLIP_KEYS_NOT_SAVED:
            shapes[CLIP_PREFIX + key.removeprefix("clip_l.")] = value.shape
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=SD_VAE_DDCONFIG["z_channels"])
    shapes.update({VAE_PREFIX + k: v.shape for k, v in vae.state_dict().items()})
    return shapes


def init_tensor(key: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """A deterministic fp32 value for one checkpoint tensor.

    Norm scales are 1 and biases 0; embeddings ~ N(0, 0.02); conv/linear weights ~ U(-b, b) with
    b = 1/sqrt(fan_in), torch's default. Each tensor has its own generator (seed + crc32(key)),
    so adding or removing a key leaves every other value unchanged.
    """
    if len(shape) == 1:
        return torch.ones(shape) if key.endswith(".weight") else torch.zeros(shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    if "embedding" in key:
        return torch.randn(shape, generator=gen) * EMBEDDING_STD
    bound = 1.0 / math.sqrt(math.prod(shape[1:]))
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def make_tiny_sd15_checkpoint(path: Path | str, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the tiny random SD1.5 checkpoint to ``path`` (.safetensors) and return the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint path must end in .safetensors, got {path.name!r}")
    shapes = tiny_sd15_shapes()
    state = {key: init_tensor(key, shape, seed).to(dtype) for key, shape in sorted(shapes.items())}
    # One key: safetensors writes metadata from a hash map in no fixed order, and the file's
    # bytes must depend only on the seed (tests cache it by content).
    metadata = {
        "demo_assets": json.dumps(
            {"architecture": "stable-diffusion-v1", "seed": seed, "note": "random weights, a test asset"},
            sort_keys=True,
        )
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def cached_tiny_sd15(cache_dir: Path | str = REPO_ROOT / ".cache", timeout_s: float = 600,
                     python: Path | str = sys.executable) -> Path:
    """The tiny checkpoint, built once per version of this script (its content hash names the file) in a
    subprocess of ``python`` (one with ComfyUI's requirements), so the caller never imports ComfyUI; older
    versions are removed (~450 MB each)."""
    cache_dir = Path(cache_dir)
    digest = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    path = cache_dir / f"tiny_sd15-{digest}.safetensors"
    if not path.is_file():
        partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.safetensors")
        subprocess.run([str(python), __file__, "checkpoint", str(partial)], check=True, timeout=timeout_s,
                       cwd=REPO_ROOT)
        partial.replace(path)  # atomic: a concurrent run sees the whole file or none
        for stale in cache_dir.glob("tiny_sd15-*.safetensors"):
            if stale != path and ".partial" not in stale.name:
                stale.unlink(missing_ok=True)
    return path


def load_with_comfy(path: Path | str) -> dict:
    """Load the checkpoint the way CheckpointLoaderSimple does; report what ComfyUI saw."""
    _import_comfy()
    import comfy.sd

    started = time.monotonic()
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    seconds = time.monotonic() - started
    return {
        "model_config": type(model.model.model_config).__name__,
        "model_type": model.model.model_type.name,
        "clip": type(clip.cond_stage_model).__name__ if clip is not None else None,
        "vae": type(vae.first_stage_model).__name__ if vae is not None else None,
        "load_seconds": round(seconds, 2),
    }


# --- demo dataset -----------------------------------------------------------------------------

RING_COLOURS = {"red": (220, 40, 40), "blue": (40, 70, 220)}
BACKGROUNDS = {"light": (235, 232, 224), "dark": (40, 40, 46)}


def ring_image(size: int, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """Concentric red/blue rings with seeded centre, band width, colour order and background.
    Returns the image and the words that describe its variation."""
    side = int(rng.integers(0, 3))  # 0 left, 1 centre, 2 right
    cx = size * (0.36 + 0.14 * side + rng.uniform(-0.03, 0.03))
    cy = size * rng.uniform(0.4, 0.6)
    wide = bool(rng.integers(0, 2))
    band = size * (rng.uniform(0.06, 0.075) if wide else rng.uniform(0.03, 0.038))
    outer = size * rng.uniform(0.26, 0.33)
    first, second = ("red", "blue") if rng.integers(0, 2) else ("blue", "red")
    background = "dark" if rng.integers(0, 2) else "light"

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    radius = np.hypot(xx - cx, yy - cy)
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = BACKGROUNDS[background]
    inside = radius < outer
    even = (np.floor(radius / band).astype(np.int64) % 2) == 0
    pixels[inside & even] = RING_COLOURS[first]
    pixels[inside & ~even] = RING_COLOURS[second]

    place = ("left", "centred", "right")[side]
    words = f"{first} centre, {'wide' if wide else 'thin'} bands, {place}, {background} background"
    return Image.fromarray(pixels, "RGB"), words


def make_demo_dataset(folder: Path | str, count: int = 8, size: int = 256, seed: int = 0) -> list[Path]:
    """Write ``count`` ring images (``zkx_000.png`` ...) with sidecar captions
    ``"zkx pattern, <variation words>"`` (``zkx_000.txt`` ...) into ``folder``; return the images."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        image, words = ring_image(size, np.random.default_rng([seed, index]))
        image_path = folder / f"zkx_{index:03d}.png"
        image.save(image_path, format="PNG")
        image_path.with_suffix(".txt").write_text(f"zkx pattern, {words}\n")
        written.append(image_path)
    return written


def make_edit_pairs(folder: Path | str, count: int = 4, size: int = 64, seed: int = 1,
                    instruction: str = "zkx, invert the colours") -> list[Path]:
    """Edit pairs for Load LoRA Dataset's ``edit_pairs``: ring images as targets, their colour negatives in
    ``control/`` under the same names, and ``instruction`` as every caption."""
    folder = Path(folder)
    targets = make_demo_dataset(folder, count=count, size=size, seed=seed)
    (folder / "control").mkdir(exist_ok=True)
    for image in targets:
        ImageOps.invert(Image.open(image).convert("RGB")).save(folder / "control" / image.name)
        image.with_suffix(".txt").write_text(instruction)
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ckpt = sub.add_parser("checkpoint", help="write the tiny random SD1.5 checkpoint")
    ckpt.add_argument("path", type=Path)
    data = sub.add_parser("dataset", help="write the ring-pattern dataset")
    data.add_argument("folder", type=Path)
    both = sub.add_parser("all", help="write FOLDER/tiny_sd15.safetensors and FOLDER/dataset/")
    both.add_argument("folder", type=Path)
    for p in (ckpt, both):
        p.add_argument("--fp32", action="store_true", help="store fp32 weights (twice the size)")
        p.add_argument("--check", action="store_true", help="load it with ComfyUI afterwards and report")
    for p in (data, both):
        p.add_argument("--count", type=int, default=8)
        p.add_argument("--size", type=int, default=256)
    for p in (ckpt, data, both):
        p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command in ("checkpoint", "all"):
        path = args.path if args.command == "checkpoint" else args.folder / "tiny_sd15.safetensors"
        started = time.monotonic()
        make_tiny_sd15_checkpoint(path, seed=args.seed, dtype=torch.float32 if args.fp32 else torch.float16)
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB in {time.monotonic() - started:.1f} s")
        if args.check:
            print(load_with_comfy(path))
    if args.command in ("dataset", "all"):
        folder = args.folder if args.command == "dataset" else args.folder / "dataset"
        images = make_demo_dataset(folder, count=args.count, size=args.size, seed=args.seed)
        print(f"{folder}: {len(images)} images with captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
