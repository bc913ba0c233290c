"""What the loop trains on: samples of one latent size per batch, conditioning padded with masks."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class Batch:
    latents: torch.Tensor  # [B, C, H, W]
    cond: dict[str, torch.Tensor]  # batched conditioning, see denoiser.Denoiser
    mask: torch.Tensor | None = None  # [B, 1, H, W] loss weight in [0, 1] at latent resolution (masked loss)
    weight: torch.Tensor | None = None  # [B] each sample's loss weight (regularisation images' own)
    captions: list[str] | None = None  # the caption each sample drew ("" where dropped), for a live text encoder

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Batch:
        def move(t: torch.Tensor) -> torch.Tensor:
            cast = dtype if dtype is not None and t.is_floating_point() else None
            return t.to(device=device, dtype=cast, non_blocking=True)

        return Batch(move(self.latents), {k: move(v) for k, v in self.cond.items()},
                     *(None if t is None else t.to(device, non_blocking=True) for t in (self.mask, self.weight)),
                     captions=self.captions)


class TrainData(Protocol):
    """A dataset the loop can batch: ``sizes[i]`` is sample i's latent (H, W), for bucketed batches."""

    sizes: Sequence[tuple[int, int]]

    def collate(self, indices: Sequence[int], rng: random.Random) -> Batch: ...


def stack_conditioning(conds: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Batch per-sample conditioning; sequences ([L, D]) of unequal length are right-padded with zeros
    and get a ``mask`` [B, L] (1 = token, 0 = padding), merged with any mask the encoder gave."""
    keys = set(conds[0])
    for cond in conds[1:]:
        if set(cond) != keys:
            raise ValueError(f"Conditioning keys differ within a batch: {sorted(keys)} vs {sorted(cond)}")
    lengths = [c["context"].shape[0] for c in conds] if "context" in keys else []
    longest = max(lengths, default=0)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys - {"mask"}):
        tensors = [c[key] for c in conds]
        if key == "context" and len(set(lengths)) > 1:
            tensors = [torch.nn.functional.pad(t, (0, 0, 0, longest - t.shape[0])) for t in tensors]
        out[key] = torch.stack(tensors)
    if "mask" in keys or len(set(lengths)) > 1:
        masks = [c.get("mask", torch.ones(n)) for c, n in zip(conds, lengths)]
        out["mask"] = torch.stack([torch.nn.functional.pad(m.float(), (0, longest - m.shape[0])) for m in masks])
    return out


class InMemoryData:
    """Latents and conditioning already in memory (tests, small runs): one fixed caption per sample."""

    def __init__(self, latents: Sequence[torch.Tensor], conds: Sequence[Mapping[str, torch.Tensor]]):
        if len(latents) != len(conds):
            raise ValueError(f"Number of latents ({len(latents)}) does not match conditionings ({len(conds)})")
        if not latents:
            raise ValueError("No training samples: give at least one latent")
        self.latents, self.conds = list(latents), list(conds)
        self.sizes = [tuple(x.shape[-2:]) for x in self.latents]

    def collate(self, indices: Sequence[int], rng: random.Random) -> Batch:
        return Batch(torch.stack([self.latents[i] for i in indices]),
                     stack_conditioning([self.conds[i] for i in indices]))
