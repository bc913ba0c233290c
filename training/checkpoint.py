"""Periodic checkpoints and exact resume.

A checkpoint is a folder ``step_000250/`` holding the adapter (``adapter.safetensors``, the generic
format) and ``state.pt`` (optimizer, LR schedule, grad scaler, RNG, data position, the EMA, the config and
its trajectory hash). It is written to a temporary folder and renamed, so a crash never leaves half of one.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RESUMABLE_CHANGES, TrainConfig
from .files import atomic_path
from .formats import load_lora, save_lora
from .lora import LoraTensors

log = logging.getLogger(__name__)
ADAPTER_FILE, STATE_FILE = "adapter.safetensors", "state.pt"


@dataclass
class TrainState:
    step: int  # optimizer steps done
    position: int  # micro-batches consumed
    optimizer: dict
    schedule: dict
    scaler: dict | None
    rng: dict[str, torch.Tensor]
    smoothed_loss: float | None
    config: dict
    trajectory_hash: str
    ema: dict | None = None  # the adapter's EMA (diffusers' EMAModel state), when on


def save_checkpoint(folder: str | Path, lora: dict[str, LoraTensors], state: TrainState, keep: int) -> Path:
    """Write ``folder/step_NNNNNN`` atomically and prune all but the newest ``keep`` checkpoints."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{state.step:06d}"
    with atomic_path(final, folder=True) as staging:
        save_lora(staging / ADAPTER_FILE, lora, format="comfy")
        torch.save(state.__dict__, staging / STATE_FILE)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("checkpoint saved: %s", final)
    return final


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob("step_*") if (p / STATE_FILE).is_file() and (p / ADAPTER_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a folder of checkpoints (then its newest)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"No checkpoint in {path}: expected step_NNNNNN folders with {STATE_FILE}")
    return found[-1]


def load_checkpoint(path: str | Path, config: TrainConfig,
                    module_paths: list[str]) -> tuple[dict[str, LoraTensors], TrainState]:
    """Read a checkpoint for ``config``; settings that would change the trajectory must not differ."""
    folder = resolve_checkpoint(path)
    try:
        raw = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        state = TrainState(**raw)
    except Exception as error:  # a damaged file, whatever torch raises for it
        raise ValueError(f"Checkpoint state {folder / STATE_FILE} is unreadable ({error}); "
                         "resume from an earlier checkpoint") from error
    # A setting the checkpoint does not know came with a later version of the pack: it had its default then.
    defaults = TrainConfig().to_dict()
    changed = sorted(k for k, v in config.to_dict().items()
                     if k not in RESUMABLE_CHANGES and _jsonish(state.config.get(k, defaults[k])) != _jsonish(v))
    if changed:
        raise ValueError(f"Checkpoint {folder} was made with different settings: {changed}. "
                         "Resume with the same settings (only steps and checkpoint options may change).")
    lora, _ = load_lora(folder / ADAPTER_FILE, module_paths)
    return lora, state


def _jsonish(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value
