"""LoRA files: write and read the key layouts ComfyUI, kohya/A1111 and diffusers load.

Keys per format (``<m>`` is the module path the caller already renamed for the target loader):

- ``comfy``:     ``diffusion_model.<m>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
- ``kohya``:     ``lora_unet_<m with . -> _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
- ``diffusers``: ``transformer.<m>.lora_A.weight`` / ``.lora_B.weight``, alpha/rank baked into B,
  no ``.alpha`` key (diffusers drops it for A/B files while ComfyUI applies it; baking agrees with both).

DoRA, LoHa and LoKr layers (comfy and kohya only) keep LyCORIS's names after ``<m>.``, which ComfyUI, A1111 and
Forge read: ``dora_scale`` beside the LoRA pair, ``hada_w1_a`` ... ``hada_w2_b``, ``lokr_w1(_a/_b)`` and
``lokr_w2(_a/_b)``, each with ``.alpha``.

Files are written atomically: a crash or kill mid-write never leaves a partial file at the final path.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .captions import CaptionPolicy
from .files import atomic_path
from .lora import LoraTensors, kind_of
from .optim import OPTIMIZERS

FORMATS = ("comfy", "kohya", "diffusers")
DEFAULT_PREFIX = {"comfy": "diffusion_model", "kohya": "lora_unet", "diffusers": "transformer"}
# Prefixes load_lora recognises (module names with dots, and kohya's underscore names).
DOTTED_PREFIXES = ("diffusion_model", "transformer", "unet")
KOHYA_PREFIXES = ("lora_unet", "lora_transformer")
IMPL_COMFYUI = "https://github.com/comfyanonymous/ComfyUI"

# A key's ending -> the name LoraTensors gives that tensor (a diffusers file's A/B are LoRA's down/up)
_PARTS = {f".{name}": name for name in (
    "lora_down.weight", "lora_up.weight", "dora_scale", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha")}
_PARTS |= {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight"}
_DIFFUSERS_PARTS = (".lora_A.weight", ".lora_B.weight")


def file_module_name(path: str, *, format: str, prefix: str | None = None) -> str:
    """The name module ``path`` has in a ``format`` file (the key without its ``.lora_*`` suffix)."""
    _check_format(format)
    prefix = prefix or DEFAULT_PREFIX[format]
    return f"{prefix}_{path.replace('.', '_')}" if format == "kohya" else f"{prefix}.{path}"


def to_state_dict(
    layers: Mapping[str, LoraTensors],
    *,
    format: str,
    prefix: str | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors ``save_lora`` writes: contiguous CPU tensors in ``dtype`` (None keeps each one's)."""
    _check_format(format)
    if not layers:
        raise ValueError("No LoRA layers to save: the adapter is empty (were any target modules matched?)")
    out: dict[str, torch.Tensor] = {}
    for path, lora in sorted(layers.items()):
        kind = lora.kind
        if kind in ("lora", "dora") and lora.up.shape[1] != lora.rank:
            raise ValueError(
                f"LoRA {path}: down has rank {lora.rank} but up has {lora.up.shape[1]} columns "
                f"(shapes {tuple(lora.down.shape)} / {tuple(lora.up.shape)})"
            )
        name = file_module_name(path, format=format, prefix=prefix)
        if format == "diffusers":
            if kind != "lora":
                raise ValueError(f"A {kind} adapter has no diffusers layout; save it in the kohya or comfy format")
            up = lora.up.detach().float() * lora.scale  # alpha/rank baked in, in fp32 so rounding happens once
            out[name + ".lora_A.weight"] = _cpu(lora.down.detach(), dtype or lora.down.dtype)
            out[name + ".lora_B.weight"] = _cpu(up, dtype or lora.up.dtype)
            continue
        for part, tensor in lora.tensors.items():
            out[f"{name}.{part}"] = _cpu(tensor.detach(), dtype or tensor.dtype)
        # kohya writes alpha in the weights' dtype; every loader reads it with .item(), so fp32 is
        # exact everywhere (a bf16 alpha would round values such as 0.3).
        out[name + ".alpha"] = torch.tensor(float(lora.alpha), dtype=torch.float32)
    return out


def save_lora(
    path: str | os.PathLike[str],
    layers: Mapping[str, LoraTensors],
    *,
    format: str,
    prefix: str | None = None,
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``layers`` as a ``format`` LoRA file at ``path``, atomically; returns the path.

    With ``metadata``, kohya's ``sshs_model_hash`` / ``sshs_legacy_hash`` are added, computed as
    kohya does (over the tensors serialised with only the ``ss_*`` metadata).
    """
    return save_tensors(path, to_state_dict(layers, format=format, prefix=prefix, dtype=dtype), metadata)


def save_tensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write a LoRA file's ``tensors`` (``to_state_dict``'s, merged where a file holds several parts) at ``path``,
    atomically, as ``save_lora`` does."""
    target = Path(path)
    header = _check_metadata(metadata)
    if metadata is not None:
        header.update(kohya_hashes(tensors, header))
    data = safetensors.torch.save(tensors, header or None)
    with atomic_path(target) as temp:
        temp.write_bytes(data)
    return target


def load_lora(
    path: str | os.PathLike[str], module_paths: Iterable[str] | None = None
) -> tuple[dict[str, LoraTensors], dict[str, str]]:
    """Read a comfy/kohya/diffusers LoRA file (LoRA, DoRA, LoHa or LoKr layers): (layers keyed by module path,
    metadata).

    ``module_paths`` (the names the layers should come back under) is needed to recover dotted names
    from kohya files; every layer in the file must then match one of them. Without it, kohya layers
    come back under the file's underscore names. Files without alpha load with alpha = rank.
    """
    source = Path(path)
    tensors, metadata = _read(source)
    groups, styles = _group(tensors, source)
    fmt, prefix = _detect(groups, styles, source)
    names = _resolve(groups, fmt, prefix, module_paths, source)
    layers: dict[str, LoraTensors] = {}
    for name, module_path in sorted(names.items(), key=lambda item: item[1]):
        parts = dict(groups[name])
        alpha = parts.pop("alpha", None)
        lora = LoraTensors.read(parts, None if alpha is None else alpha.item())
        if lora.kind in ("lora", "dora") and lora.up.shape[1] != lora.down.shape[0]:
            raise ValueError(
                f"{source}: {name} has down {tuple(lora.down.shape)} and up {tuple(lora.up.shape)}, whose ranks "
                "differ"
            )
        layers[module_path] = lora
    return layers, metadata


# modelspec.prediction_type: the model spec names "epsilon" and "v" for Stable Diffusion and leaves other model
# classes their own word; kohya writes none for FLUX. "flow" says rectified flow (velocity) rather than leave it out.
PREDICTION_TYPES = {"ddpm-eps": "epsilon", "ddpm-v": "v", "flow": "flow"}
_MIXED_PRECISION = {"fp32": "no", "fp16": "fp16", "bf16": "bf16"}  # accelerate's names, as kohya writes them
_LOSS_TYPES = {"mse": "l2"}  # kohya's name where it differs


@dataclass(frozen=True)
class RunInfo:
    """What made a LoRA besides its settings (the TrainConfig): the model, the dataset as trained (with repeats
    and buckets), the caption policy and when. kohya's ``ss_*`` keys describe these; ``lora_trainer.run`` keeps
    the rest of what reproducing the run needs."""

    base_model: str = ""  # the checkpoint's file name (ss_sd_model_name)
    dataset: str = ""  # the dataset folder as Load LoRA Dataset was given it (never a full path: files are shared)
    dataset_dirs: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # kohya folder -> (repeats, images)
    buckets: Mapping[tuple[int, int], int] = field(default_factory=dict)  # (width, height) px -> images with repeats
    mean_ar_error: float = 0.0  # kohya's: mean |bucket w/h - image w/h| over the images (without repeats)
    bucket_multiple: int = 64
    flip: bool = False
    random_crop: bool = False
    caption: CaptionPolicy = CaptionPolicy()
    caption_variants: int = 1  # shuffled captions cached per image
    clip_skip: int | None = None  # kohya's: 2 is the penultimate layer; None: the text encoder's own
    guidance: float | None = None  # FLUX.1-dev: the guidance embedding while training
    started_at: float | None = None  # time.time() when training began; None: now
    finished_at: float | None = None  # time.time() when it ended; None: now
    session_id: int | None = None  # kohya's: a random number per run, the same in each file it writes; None: new
    reg_images: int = 0  # regularisation (class) images per epoch, repeats counted; in ``buckets`` too

    @property
    def train_images(self) -> int:
        """Training images per epoch, repeats counted, class images left out (kohya's num_train_images)."""
        return sum(self.buckets.values()) - self.reg_images

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches of one epoch: each holds a single bucket, so a bucket's last batch may be short."""
        return sum(math.ceil(count / batch_size) for count in self.buckets.values())


def build_metadata(
    *,
    base_model_version: str,
    architecture: str,
    rank: int,
    alpha: float,
    steps: int,
    resolution: tuple[int, int] | int,
    title: str,
    config: Mapping[str, object],
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    trigger: str = "",
    v2: bool = False,
    implementation: str = IMPL_COMFYUI,
    run: RunInfo | None = None,
) -> dict[str, str]:
    """kohya's ``ss_*`` keys (those train_network.py writes that apply here), Stability's ``modelspec.*`` keys,
    and ``lora_trainer.config`` / ``lora_trainer.run`` (the settings and the rest of what made the file).

    ``base_model_version`` is kohya's (``sd_v1``, ``sdxl_base_v1-0``, ``flux1``, ...);
    ``architecture`` the model spec's (``stable-diffusion-v1/lora``, ``flux-1-dev/lora``, ...);
    ``config`` is ``TrainConfig.to_dict()`` (settings it lacks are written as kohya writes unset ones: "None");
    ``tag_frequency`` is ``{"<repeats>_<dir>": {tag: count}}``; ``trigger`` defaults to the caption policy's.
    The adapter kind (``config["adapter"]``) is told as kohya and LyCORIS do (``ss_network_module``/``_args``).
    Values are formatted as kohya's (``str()`` of the value; JSON for nested ones), which A1111 and Civitai read.
    """
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    if rank < 1 or steps < 0 or width < 1 or height < 1:
        raise ValueError(
            f"build_metadata needs rank >= 1, steps >= 0, resolution > 0; got {rank}, {steps}, {resolution}"
        )
    run = run or RunInfo()
    trigger = trigger or run.caption.trigger
    finished = time.time() if run.finished_at is None else run.finished_at
    metadata = {
        "ss_session_id": str(random.randint(0, 2**32) if run.session_id is None else run.session_id),
        "ss_training_started_at": str(finished if run.started_at is None else run.started_at),
        "ss_training_finished_at": str(finished),
        "ss_output_name": title,
        "ss_sd_model_name": run.base_model or "None",
        **_network_keys(str(config.get("adapter") or "lora"), rank, alpha),
        "ss_base_model_version": base_model_version,
        "ss_v2": str(bool(v2)),
        "ss_clip_skip": str(run.clip_skip),
        "ss_resolution": str((int(width), int(height))),
        "ss_steps": str(int(steps)),
        **_settings_keys(config, run, steps),
        **_dataset_keys(run, tag_frequency),
        "ss_training_comment": f"trigger: {trigger}" if trigger else "None",  # where kohya users put it
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.resolution": f"{width}x{height}",
        "lora_trainer.config": json.dumps(dict(config), sort_keys=True, default=str),
        "lora_trainer.run": json.dumps(_run_record(run), sort_keys=True),
    }
    prediction = PREDICTION_TYPES.get(str(config.get("objective")))
    if prediction:
        metadata["modelspec.prediction_type"] = prediction
    if trigger:
        metadata["modelspec.trigger_phrase"] = trigger
    if run.clip_skip is not None:
        metadata["modelspec.encoder_layer"] = str(run.clip_skip)
    return metadata


def _network_keys(kind: str, rank: int, alpha: float) -> dict[str, str]:
    """How kohya's sd-scripts (plain LoRA) and LyCORIS's kohya network (the rest) record the network; LyCORIS's
    arguments are strings, as parsed from its command line."""
    args = {"lora": {}, "dora": {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"},
            "loha": {"algo": "loha", "conv_dim": str(int(rank)), "conv_alpha": str(float(alpha)),
                     "use_tucker": "False"},
            "lokr": {"algo": "lokr", "factor": "-1", "decompose_both": "False"}}[kind]
    return {"ss_network_module": "networks.lora" if kind == "lora" else "lycoris.kohya",
            "ss_network_dim": str(int(rank)), "ss_network_alpha": str(float(alpha)),
            "ss_network_args": json.dumps(args, sort_keys=True)}


def _settings_keys(config: Mapping[str, object], run: RunInfo, steps: int) -> dict[str, str]:
    """kohya's keys for the training settings, from ``TrainConfig.to_dict()``."""
    get = config.get
    batch, accumulation = int(get("batch_size", 1)), int(get("grad_accum", 1))
    per_epoch = run.batches_per_epoch(batch)

    def epochs(done: int) -> int:  # the loop draws grad_accum batches per step, epoch after epoch
        return math.ceil(done * accumulation / per_epoch) if per_epoch else 0

    optimizer = get("optimizer")
    optimizer = OPTIMIZERS[optimizer].kohya_name(get("weight_decay")) if optimizer in OPTIMIZERS else str(optimizer)
    loss = get("loss")
    keys = {
        "ss_learning_rate": str(get("learning_rate")),
        "ss_unet_lr": str(get("learning_rate")),
        # kohya's: the text encoder's own rate, and whether only the UNet / transformer trains
        "ss_text_encoder_lr": str(get("te_learning_rate") or None),
        "ss_network_train_unet_only": str(not get("te_learning_rate")),
        "ss_stop_text_encoder_training": str(get("te_stop_step") or None),
        "ss_optimizer": optimizer,
        "ss_lr_scheduler": str(get("lr_schedule")),
        "ss_lr_warmup_steps": str(get("warmup_steps")),
        "ss_max_train_steps": str(get("steps")),
        "ss_gradient_accumulation_steps": str(accumulation),
        "ss_batch_size_per_device": str(batch),
        "ss_total_batch_size": str(batch * accumulation),
        "ss_num_batches_per_epoch": str(per_epoch),
        "ss_num_epochs": str(epochs(int(get("steps") or steps))),
        "ss_epoch": str(epochs(steps)),
        "ss_seed": str(get("seed")),
        "ss_mixed_precision": _MIXED_PRECISION.get(str(get("precision")), str(get("precision"))),
        "ss_max_grad_norm": str(get("max_grad_norm")),
        "ss_network_dropout": str(get("lora_dropout")),
        # kohya: None is off (0 would weight every loss by 0); flow models have neither option
        "ss_min_snr_gamma": str(get("min_snr_gamma") or None),
        "ss_noise_offset": str(get("noise_offset")),
        "ss_cache_latents": "True",  # Encode Latents Cache
    }
    if loss is not None:
        keys["ss_loss_type"] = _LOSS_TYPES.get(str(loss), str(loss))
        keys["ss_huber_c"] = str(get("huber_c"))
        keys["ss_huber_schedule"] = str(get("huber_schedule"))
    return keys


def _dataset_keys(run: RunInfo, tag_frequency: Mapping[str, Mapping[str, int]] | None) -> dict[str, str]:
    """kohya's keys for the dataset: what A1111's LoRA card shows (dataset size, resolutions, tags)."""
    policy = run.caption
    buckets = {
        str(index): {"resolution": [width, height], "count": count}
        for index, ((width, height), count) in enumerate(sorted(run.buckets.items()))
    }
    return {
        "ss_num_train_images": str(run.train_images),
        "ss_num_reg_images": str(run.reg_images),
        "ss_dataset_dirs": json.dumps(
            {name: {"n_repeats": repeats, "img_count": images} for name, (repeats, images) in run.dataset_dirs.items()}
        ),
        "ss_tag_frequency": json.dumps({d: dict(tags) for d, tags in (tag_frequency or {}).items()}),
        "ss_bucket_info": json.dumps({"buckets": buckets, "mean_img_ar_error": run.mean_ar_error}),
        "ss_enable_bucket": "True",
        "ss_flip_aug": str(run.flip),
        "ss_random_crop": str(run.random_crop),
        "ss_caption_dropout_rate": str(float(policy.dropout)),
        "ss_shuffle_caption": str(policy.shuffle),
        # kohya counts the leading tags that stay in place, trigger included; ours counts those after the trigger
        "ss_keep_tokens": str(policy.keep_tokens + len(policy.tags(policy.trigger))),
    }


def _run_record(run: RunInfo) -> dict[str, object]:
    """``lora_trainer.run``: what reproducing the run needs beyond ``lora_trainer.config``."""
    policy = run.caption
    return {
        "base_model": run.base_model,
        "dataset": run.dataset,
        "bucket_multiple": run.bucket_multiple,
        "flip": run.flip,
        "random_crop": run.random_crop,
        "caption": {"trigger": policy.trigger, "dropout": policy.dropout, "shuffle": policy.shuffle,
                    "keep_tokens": policy.keep_tokens, "variants": run.caption_variants},
        "guidance": run.guidance,
    }


def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``sshs_model_hash`` / ``sshs_legacy_hash`` as kohya's ``precalculate_safetensors_hashes``.

    The model hash is the SHA-256 of the tensor data (the file after its header), so it holds for the
    final file; the legacy hash reads 64 KiB at offset 1 MiB of the file serialised with only the
    ``ss_*`` metadata (A1111's additional-networks index uses both).
    """
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), training or None)
    header_end = 8 + int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(memoryview(data)[header_end:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"Unknown LoRA format {format!r}; choose one of {', '.join(FORMATS)}")


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"LoRA metadata {key!r} has a value of type {type(value).__name__}; safetensors metadata keys "
                "and values must be str: convert with str() or json.dumps()"
            )
    return dict(metadata or {})


def _cpu(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(device="cpu", dtype=dtype).contiguous()


def _read(source: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not source.is_file():
        raise FileNotFoundError(f"LoRA file not found: {source}")
    try:
        with safetensors.safe_open(str(source), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except safetensors.SafetensorError as error:
        raise ValueError(
            f"{source} is not a readable .safetensors file ({error}); pick a LoRA .safetensors"
        ) from error
    if not tensors:
        raise ValueError(f"{source} holds no tensors; it is not a LoRA file")
    return tensors, metadata


def _group(
    tensors: Mapping[str, torch.Tensor], source: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], set[str]]:
    """(module name -> {tensor name: tensor}, suffix styles seen); unknown keys and incomplete layers raise."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    styles, unknown = set(), []
    for key, tensor in tensors.items():
        suffix = next((s for s in _PARTS if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        groups.setdefault(key[: -len(suffix)], {})[_PARTS[suffix]] = tensor
        if suffix != ".alpha":
            styles.add("diffusers" if suffix in _DIFFUSERS_PARTS else "kohya")
    if unknown:
        raise ValueError(
            f"{source} has keys that are not LoRA, DoRA, LoHa or LoKr tensors (LoCon's lora_mid, Tucker "
            f"hada_t/lokr_t, OFT and .diff are not read): {sorted(unknown)[:10]}"
        )
    for name, parts in groups.items():
        try:
            kind_of({part: tensor for part, tensor in parts.items() if part != "alpha"})
        except ValueError as error:
            raise ValueError(f"{source}: {name} is {error}") from error
    return groups, styles


def _detect(names: Iterable[str], styles: set[str], source: Path) -> tuple[str, str]:
    """(format, prefix) from the keys; one of each per file."""
    dotted, prefixes = set(), set()
    for name in names:
        prefix = name.split(".", 1)[0]
        if prefix in DOTTED_PREFIXES and "." in name:
            dotted.add(True)
        else:
            prefix = next((p for p in KOHYA_PREFIXES if name.startswith(p + "_")), "")
            dotted.add(False)
        if not prefix:
            raise ValueError(
                f"{source}: layer {name!r} starts with no known prefix; expected '<p>.<module>' with p in "
                f"{DOTTED_PREFIXES} or '<p>_<module>' with p in {KOHYA_PREFIXES} (text-encoder LoRAs are not read)"
            )
        prefixes.add(prefix)
    if len(dotted) > 1 or len(prefixes) > 1 or len(styles) > 1:
        raise ValueError(
            f"{source} mixes key layouts (prefixes {sorted(prefixes)}, suffixes of {sorted(styles)} files); "
            "a LoRA file must use one layout"
        )
    if dotted == {False}:
        if styles == {"diffusers"}:
            raise ValueError(
                f"{source}: lora_A/lora_B keys need dotted module names, got {sorted(names)[:3]}"
            )
        return "kohya", prefixes.pop()
    return ("diffusers" if styles == {"diffusers"} else "comfy"), prefixes.pop()


def _resolve(
    groups: Mapping[str, object],
    fmt: str,
    prefix: str,
    module_paths: Iterable[str] | None,
    source: Path,
) -> dict[str, str]:
    """File module name -> the module path it is returned under."""
    if module_paths is None:
        return {name: name[len(prefix) + 1 :] for name in groups}
    expected: dict[str, str] = {}
    for module_path in module_paths:
        name = file_module_name(module_path, format=fmt, prefix=prefix)
        if expected.setdefault(name, module_path) != module_path:
            raise ValueError(
                f"Module paths {expected[name]!r} and {module_path!r} both become {name!r} in a {fmt} file; "
                "kohya names cannot tell them apart, save this adapter in the comfy or diffusers format"
            )
    unmatched = sorted(set(groups) - set(expected))
    if unmatched:
        raise ValueError(
            f"{source}: {len(unmatched)} LoRA layer(s) match none of the {len(expected)} module paths given: "
            f"{unmatched[:10]}; expected names such as {sorted(expected)[:10]}. Load it with the model it was "
            "trained for, or pass module_paths=None to read the file's own names"
        )
    return {name: expected[name] for name in groups}
