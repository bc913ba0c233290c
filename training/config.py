"""The training run's settings: one frozen dataclass, validated up front with the option's name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

import torch

from .denoiser import NoiseSchedule
from .lora import KINDS, LORA_INITS
from .objectives import (
    FLOW_SAMPLINGS,
    FLOW_WEIGHTINGS,
    HUBER_SCHEDULES,
    LOSSES,
    OBJECTIVES,
    resolve_objective,
)
from .optim import LR_SCHEDULES, OPTIMIZERS, optimizer_help

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision name -> dtype
PRECISIONS = tuple(DTYPES)


def precision_of(dtype: torch.dtype) -> str:
    """The precision name of a model dtype (fp32 for anything else, e.g. fp8 storage computed in fp32)."""
    return next((name for name, value in DTYPES.items() if value == dtype), "fp32")
# Settings that may change between a checkpoint and its resumption without breaking exactness of the
# steps already taken (e.g. "train 500 more steps").
RESUMABLE_CHANGES = frozenset({"steps", "checkpoint_every", "checkpoint_dir", "keep_checkpoints", "log_every",
                               "gradient_checkpointing"})
CHECKPOINTING = ("auto", "off", "on")  # auto: on when the step would not fit, or after running out of memory


@dataclass(frozen=True)
class Option:
    """What a setting means and which values it takes. TrainConfig checks its values against these; the Train
    LoRA node builds its inputs (tooltip, default, range, choices) from them, and the workflows take the node's
    defaults: one definition of every training option."""

    help: str
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] = ()

    def check(self, name: str, value: object) -> None:
        if self.choices and value not in self.choices:
            raise ValueError(f"{name} must be one of {list(self.choices)}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        if self.min is not None and value < self.min:
            raise ValueError(f"{name} must be >= {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise ValueError(f"{name} must be <= {self.max}, got {value}")


def _option(default: object, help: str, **spec: object):
    return field(default=default, metadata={"option": Option(help, **spec)})


@dataclass(frozen=True)
class TrainConfig:
    steps: int = _option(500, "Optimizer steps.", min=1, max=1_000_000)
    learning_rate: float = _option(1e-4, "Learning rate (1e-4 is a common start for AdamW).", min=1e-7, max=1.0,
                                   step=1e-5)
    batch_size: int = _option(1, "Images per step (all of one bucket shape).", min=1, max=64)
    grad_accum: int = _option(1, "Batches per optimizer step.", min=1, max=256)
    seed: int = _option(0, "Seeds LoRA init, batch order, noise and timesteps.", min=0, max=2**31 - 1)
    # LoRA
    rank: int = _option(16, "LoRA rank: capacity and file size.", min=1, max=256)
    alpha: float = _option(0.0, "LoRA alpha; 0 means alpha = rank (scale 1).", min=0.0, max=1024.0, step=0.5)
    lora_dropout: float = _option(0.0, "Dropout on the LoRA path while training.", min=0.0, max=0.99, step=0.01)
    lora_init: str = _option("kaiming", "LoRA A initialisation (B starts at zero).", choices=tuple(LORA_INITS))
    adapter: str = _option("lora", "The adapter kind. lora: the usual, every loader reads it. dora: LoRA plus a "
                           "learned magnitude per output row (ComfyUI and Forge load it, A1111 does not). loha: the "
                           "elementwise product of two LoRAs, rank r^2 from two rank-r pairs (styles, many concepts). "
                           "lokr: a Kronecker product, the fewest parameters (styles). loha and lokr want a higher "
                           "learning rate than lora.", choices=KINDS)
    targets: tuple[str, ...] | str = ("to_q", "to_k", "to_v", "to_out.0")  # name suffixes, or one regex
    te_learning_rate: float = _option(0.0, "SD1.x, SD2.x, SDXL: also train a LoRA on the text encoder (CLIP-L, "
                                      "CLIP-H, CLIP-L + CLIP-G) at this learning rate; connect the CLIP. Captions are "
                                      "then encoded every step (latents stay cached). Helps a trigger word or a "
                                      "style bind to the prompt; half the learning rate or less is usual. 0: the "
                                      "diffusion model only.", min=0.0, max=1.0, step=1e-5)
    te_stop_step: int = _option(0, "Text-encoder LoRA: freeze it after this many steps while the diffusion model "
                                "trains on (kohya's stop_text_encoder_training; it keeps the text encoder from "
                                "overfitting); 0: train it to the end.", min=0, max=1_000_000)
    # objective
    objective: str = _option("auto", "auto reads the model: eps/v-prediction models get DDPM targets, flow models "
                             "rectified flow. An explicit choice must fit the model.", choices=("auto", *OBJECTIVES))
    min_snr_gamma: float = _option(5.0, "DDPM models: min-SNR-γ loss weighting; 0 turns it off.", min=0.0,
                                   max=100.0, step=0.5)
    noise_offset: float = _option(0.0, "DDPM models: noise offset (0.05 helps dark/bright images).", min=0.0,
                                  max=1.0, step=0.01)
    timestep_sampling: str = _option("logit_normal", "Flow models: how σ is drawn.", choices=FLOW_SAMPLINGS)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float | None = None  # flow: fixed timestep shift; None: the model's own
    dynamic_shift: bool = False  # flow: FLUX's resolution-dependent shift instead
    loss_weighting: str = _option("none", "Flow models: loss weight by σ.", choices=FLOW_WEIGHTINGS)
    loss: str = _option("mse", "The loss between prediction and target, after the objective's weighting. mse: the "
                        "usual; l1: less pulled by outliers; huber / smooth_l1: kohya's pseudo-Huber, mse for small "
                        "errors and l1 for large ones (robust to odd images).", choices=LOSSES)
    huber_c: float = _option(0.1, "huber / smooth_l1: the error at which the loss turns from mse to l1 (kohya's "
                             "huber_c; smaller is more robust).", min=1e-4, max=1.0, step=0.01)
    huber_schedule: str = _option("snr", "huber / smooth_l1: the threshold by noise level: snr and exponential (kohya's) "
                                  "run from 1 without noise to huber_c at full noise; constant keeps huber_c.",
                                  choices=HUBER_SCHEDULES)
    unmasked_weight: float = _option(0.0, "Masked loss (images with masks): the loss weight outside the mask; 0 "
                                     "learns only the masked subject, 1 ignores the masks.", min=0.0, max=1.0,
                                     step=0.05)
    # optimisation
    optimizer: str = _option("adamw", f"Optimizer. {optimizer_help()}.", choices=tuple(OPTIMIZERS))
    weight_decay: float = _option(1e-2, "Optimizer weight decay (decoupled for adamw, adamw8bit, prodigy, lion).",
                                  min=0.0, max=10.0, step=0.001)
    lr_schedule: str = _option("constant", "Learning-rate schedule.", choices=LR_SCHEDULES)
    warmup_steps: int = _option(0, "Linear warm-up steps.", min=0, max=100_000)
    lr_cycles: int = _option(1, "Cycles of the cosine_with_restarts schedule.", min=1)
    max_grad_norm: float = _option(1.0, "Gradient clipping norm; 0: no clipping.", min=0.0)
    ema_decay: float = _option(0.0, "Keep an exponential moving average of the adapter weights and output it instead "
                               "of the last step's: smoother, often better LoRAs from noisy runs. 0: off; 0.999 for "
                               "runs of a few thousand steps (the average spans ~1/(1-decay) steps).", min=0.0,
                               max=0.99999, step=0.001)
    ema_start: int = _option(0, "EMA: the step from which the average starts (until then it follows the weights).",
                             min=0, max=1_000_000)
    precision: str = _option("auto", "Forward-pass precision; auto = the model's. Adapters are always fp32.",
                             choices=("auto", *PRECISIONS))
    gradient_checkpointing: str = _option(  # True/False are read as on/off
        "auto", "Trade compute for memory by recomputing activations in the backward pass. auto: on when a step "
        "would not fit the GPU memory (measured before the first step), or if a step runs out of memory.",
        choices=CHECKPOINTING)
    # reporting and safety
    log_every: int = _option(10, "Steps between loss reports (one host-device sync each) and NaN checks.", min=1)
    checkpoint_every: int = _option(0, "Save a resumable checkpoint every N steps (0: never).", min=0,
                                    max=1_000_000)
    checkpoint_dir: str | None = None
    keep_checkpoints: int = _option(3, "Newest checkpoints kept.", min=1)

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):
            object.__setattr__(self, "gradient_checkpointing", "on" if self.gradient_checkpointing else "off")
        for name, (_, option) in self.options().items():
            option.check(name, getattr(self, name))
        if self.shift is not None and not self.shift > 0:
            raise ValueError(f"shift must be > 0 (or None for the model's own), got {self.shift}")
        if self.optimizer == "prodigy" and self.te_learning_rate not in (0.0, self.learning_rate):
            raise ValueError("prodigy finds its own step size and takes one learning rate for the text encoder and the "
                             "model: set te_learning_rate to learning_rate (1.0 for prodigy) or 0")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every > 0 needs checkpoint_dir: where should checkpoints go?")
        if not self.targets:
            raise ValueError("targets is empty: name at least one module (e.g. 'to_q') or give a regex")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    @classmethod
    def options(cls) -> dict[str, tuple[object, Option]]:
        """Every setting that has an Option: name -> (default, option)."""
        return {f.name: (f.default, f.metadata["option"]) for f in dataclasses.fields(cls) if "option" in f.metadata}

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

