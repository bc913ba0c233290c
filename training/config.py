"""The training run's settings: one frozen dataclass, validated up front with the option's name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch

from .denoiser import NoiseSchedule
from .objectives import FLOW_SAMPLINGS, FLOW_WEIGHTINGS, OBJECTIVES, resolve_objective
from .optim import LR_SCHEDULES, OPTIMIZERS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision name -> dtype
PRECISIONS = tuple(DTYPES)


def precision_of(dtype: torch.dtype) -> str:
    """The precision name of a model dtype (fp32 for anything else, e.g. fp8 storage computed in fp32)."""
    return next((name for name, value in DTYPES.items() if value == dtype), "fp32")
# Settings that may change between a checkpoint and its resumption without breaking exactness of the
# steps already taken (e.g. "train 500 more steps").
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every", "checkpoint_dir", "keep_checkpoints", "log_every",
                               "gradient_checkpointing"})
CHECKPOINTING = ("off", "on", "auto")  # auto: off until a step runs out of memory, then on


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 0
    # LoRA
    rank: int = 16
    alpha: float = 0.0  # 0: alpha = rank (scale 1)
    lora_dropout: float = 0.0
    lora_init: str = "kaiming"
    targets: tuple[str, ...] | str = ("to_q", "to_k", "to_v", "to_out.0")  # name suffixes, or one regex
    # objective
    objective: str = "auto"  # auto: the model's own; or one of OBJECTIVES (it must fit the model)
    min_snr_gamma: float = 5.0  # DDPM: 0 = off, 5 is the paper's choice
    noise_offset: float = 0.0  # DDPM
    timestep_sampling: str = "logit_normal"  # flow
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | None = None  # flow: fixed timestep shift; None: the model's own
    dynamic_shift: bool = False  # flow: FLUX's resolution-dependent shift instead
    loss_weighting: str = "none"  # flow
    # optimisation
    optimizer: str = "adamw"
    weight_decay: float = 1e-2
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    lr_cycles: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "auto"  # autocast dtype for the forward pass (auto: the model's); adapters always fp32
    gradient_checkpointing: str = "auto"  # one of CHECKPOINTING (True/False are read as on/off)
    # reporting and safety
    log_every: int = 10  # one host-device sync per interval: loss, NaN check
    checkpoint_every: int = 0  # 0: no periodic checkpoints
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):
            object.__setattr__(self, "gradient_checkpointing", "on" if self.gradient_checkpointing else "off")
        _positive(self, "steps", "batch_size", "grad_accum", "rank", "log_every", "keep_checkpoints", "lr_cycles")
        _non_negative(self, "min_snr_gamma", "noise_offset", "weight_decay", "warmup_steps", "max_grad_norm",
                      "checkpoint_every", "lora_dropout")
        _choice(self, "objective", ("auto", *OBJECTIVES))
        _choice(self, "timestep_sampling", FLOW_SAMPLINGS)
        _choice(self, "loss_weighting", FLOW_WEIGHTINGS)
        _choice(self, "optimizer", tuple(OPTIMIZERS))
        _choice(self, "lr_schedule", LR_SCHEDULES)
        _choice(self, "precision", ("auto", *PRECISIONS))
        _choice(self, "lora_init", ("kaiming", "gaussian"))
        _choice(self, "gradient_checkpointing", CHECKPOINTING)
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0 (0: alpha = rank), got {self.alpha}")
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0 (or None for the model's own), got {self.shift}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every > 0 needs checkpoint_dir: where should checkpoints go?")
        if not self.targets:
            raise ValueError("targets is empty: name at least one module (e.g. 'to_q') or give a regex")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha or self.rank)

    def for_model(self, prediction: str, schedule: NoiseSchedule, dtype: torch.dtype) -> TrainConfig:
        """These settings made concrete for a model that predicts ``prediction`` with ``schedule`` and computes in
        ``dtype``: ``auto`` objective and precision, and a flow shift of None, become the model's own; the other
        objective's options are turned off. The one place those are decided."""
        objective = resolve_objective(self.objective, prediction)
        flow = objective == "flow"
        return dataclasses.replace(
            self, objective=objective, shift=(self.shift or schedule.shift) if flow else None,
            min_snr_gamma=0.0 if flow else self.min_snr_gamma, noise_offset=0.0 if flow else self.noise_offset,
            precision=precision_of(dtype) if self.precision == "auto" else self.precision)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def trajectory_hash(self) -> str:
        """Hash of every setting that shapes the trajectory (all but RESUMABLE_CHANGES)."""
        kept = {k: v for k, v in self.to_dict().items() if k not in RESUMABLE_CHANGES}
        return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown training settings {unknown}; valid ones are {sorted(known)}")
        if isinstance(values.get("targets"), list):
            values = {**values, "targets": tuple(values["targets"])}
        return cls(**values)


def _positive(config: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")


def _non_negative(config: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(config, name)}")


def _choice(config: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    if getattr(config, name) not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {getattr(config, name)!r}")
