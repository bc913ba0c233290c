"""Optimizers and learning-rate schedules by name."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import import_module

import torch
from diffusers.optimization import SchedulerType, get_scheduler

LR_SCHEDULES = tuple(s.value for s in SchedulerType if s is not SchedulerType.PIECEWISE_CONSTANT)


@dataclass(frozen=True)
class Optimizer:
    """An optimizer by name: its class, what it is given besides the learning rate and weight decay, the package
    to install where it is not torch's or transformers' (peft's dependency, always there), and when to use it."""

    path: str  # module.Class, as kohya's ss_optimizer names it
    use: str
    pip: str = ""
    options: tuple[tuple[str, object], ...] = ()

    def missing(self) -> str | None:
        """None when usable, else how to get it."""
        if importlib.util.find_spec(self.path.split(".")[0]) is not None:
            return None
        return f"pip install {self.pip} into ComfyUI's Python"

    def kohya_name(self, weight_decay: float) -> str:
        """kohya's ``ss_optimizer``: the class with the arguments it was given besides the learning rate."""
        arguments = [f"{key}={value}" for key, value in self.options] + [f"weight_decay={weight_decay}"]
        return f"{self.path}({','.join(arguments)})"


OPTIMIZERS: dict[str, Optimizer] = {
    "adamw": Optimizer("torch.optim.adamw.AdamW", "the usual choice (lr 1e-4)"),
    "adamw8bit": Optimizer("bitsandbytes.optim.adamw.AdamW8bit", "AdamW with 8-bit moments: a quarter of their memory",
                           "bitsandbytes"),
    "prodigy": Optimizer("prodigyopt.prodigy.Prodigy", "finds its own step size: set learning_rate 1.0", "prodigyopt"),
    # kohya's and ai-toolkit's Adafactor settings for a given learning rate (the schedule is ours)
    "adafactor": Optimizer("transformers.optimization.Adafactor", "factored moments, least optimizer memory (lr 1e-4)",
                           options=(("scale_parameter", False), ("relative_step", False), ("warmup_init", False))),
    "lion": Optimizer("lion_pytorch.lion_pytorch.Lion", "one moment, sign updates: lr 3-10x below AdamW's",
                      "lion-pytorch"),
    "adam": Optimizer("torch.optim.adam.Adam", "Adam (core ComfyUI's)"),
    "sgd": Optimizer("torch.optim.sgd.SGD", "SGD with momentum 0.9: needs a much higher lr", options=(("momentum", 0.9),)),
    "rmsprop": Optimizer("torch.optim.rmsprop.RMSprop", "RMSprop (core ComfyUI's)"),
}


def optimizer_help() -> str:
    """One line per optimizer, with what a missing one needs."""
    return "; ".join(f"{name}: {spec.use}" + (f" (not installed: {spec.missing()})" if spec.missing() else "")
                     for name, spec in OPTIMIZERS.items())


def make_optimizer(name: str, params: Sequence[torch.nn.Parameter] | Sequence[dict], lr: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """``params``: the parameters, or torch's parameter groups (``{"params": [...], "lr": its own}``)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    spec, params = OPTIMIZERS[name], list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    missing = spec.missing()
    if missing:
        raise ValueError(f"optimizer {name!r} needs {spec.pip}, which is not installed: {missing} and restart "
                         "ComfyUI, or choose adamw")
    options = dict(spec.options)
    if name == "adamw":  # fused is one kernel for all tensors on CUDA; foreach batches them elsewhere
        on_cuda = all(p.is_cuda for p in tensors)
        options.update(fused=on_cuda or None, foreach=None if on_cuda else True)
    module, cls = spec.path.rsplit(".", 1)
    return getattr(import_module(module), cls)(params, lr=lr, weight_decay=weight_decay, **options)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                  cycles: int = 1) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedules, stepped once per optimizer step."""
    if name not in LR_SCHEDULES:
        raise ValueError(f"Unknown LR schedule {name!r}; choose one of {list(LR_SCHEDULES)}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=cycles)
