"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

import torch
from diffusers.optimization import SchedulerType, get_scheduler

LR_SCHEDULES = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)


def _adamw(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # fused is one kernel for all tensors on CUDA; foreach batches them elsewhere.
    on_cuda = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=on_cuda or None,
                             foreach=None if on_cuda else True)


def _adamw8bit(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("optimizer 'adamw8bit' needs bitsandbytes: pip install bitsandbytes (or use 'adamw')")
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def _prodigy(params: Sequence[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if importlib.util.find_spec("prodigyopt") is None:
        raise ValueError("optimizer 'prodigy' needs prodigyopt: pip install prodigyopt (or use 'adamw')")
    import prodigyopt

    return prodigyopt.Prodigy(params, lr=lr, weight_decay=weight_decay)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "adamw8bit": _adamw8bit,
    "prodigy": _prodigy,
}


def make_optimizer(name: str, params: Sequence[torch.nn.Parameter], lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](list(params), lr, weight_decay)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                  cycles: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedules, stepped once per optimizer step."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"Unknown LR schedule {name!r}; choose one of {list(LR_SCHEDULES)}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=cycles)
