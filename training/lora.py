"""LoRA adapters on any nn.Module, through peft.

An adapter is described engine-wide as ``dict[str, LoraTensors]``: module path (relative to the
denoiser's root module, dots as in ``named_modules``) -> its down/up matrices and alpha.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.functional import (
    cast_adapter_dtype,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners import lora as peft_lora

ADAPTER = "default"
# B = 0 in every case, so step 0 is the base model exactly.
LORA_INITS = {"kaiming": True, "gaussian": "gaussian"}
ALL_LINEAR = "all-linear"  # targets value: every Linear layer in the module (is_linear)


@dataclass
class LoraTensors:
    """One adapted layer: delta W = up @ down * (alpha / rank)."""

    down: torch.Tensor  # [rank, in] for Linear, [rank, in, kh, kw] for Conv2d
    up: torch.Tensor  # [out, rank] for Linear, [out, rank, 1, 1] for Conv2d
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoraAttachment:
    """LoRA layers injected by peft into ``module`` in place; ``remove()`` restores the module tree.

    peft's public functional API does the work: ``inject_adapter_in_model`` wraps the targets (Linear and its
    subclasses such as ComfyUI's ops, Conv2d), ``get/set_peft_model_state_dict`` read and write the adapter,
    ``cast_adapter_dtype`` keeps it in fp32 whatever the model's dtype. Removal puts each wrapper's
    ``get_base_layer()`` back in its place, and what peft changes besides (every other parameter's
    ``requires_grad``) is put back too, so the caller's model leaves exactly as it came.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        targets: Sequence[str] | str,  # name suffixes, one regex, or ALL_LINEAR
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        initial: Mapping[str, LoraTensors] | None = None,
        device: torch.device | None = None,
    ) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if init not in LORA_INITS:
            raise ValueError(f"Unknown LoRA init {init!r}; choose one of {sorted(LORA_INITS)}")
        if initial:
            rank, alpha = _uniform_rank_alpha(initial)
            targets = sorted(initial)
        elif targets == ALL_LINEAR:
            targets = [name for name, m in module.named_modules() if is_linear(m)]
        self.module, self.alpha = module, float(alpha)
        self._requires_grad = {name: p.requires_grad for name, p in module.named_parameters()}
        self._attributes = set(vars(module))  # peft notes its config on the module (peft_config)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(targets) if not isinstance(targets, str) else targets,
            init_lora_weights=LORA_INITS[init],
        )
        # peft wraps torch's Linear and its subclasses by itself; a Linear of another class by its Linear wrapper
        other_linears = {type(m) for m in module.modules() if is_linear(m) and not isinstance(m, torch.nn.Linear)}
        if other_linears:
            config._register_custom_module(dict.fromkeys(other_linears, peft_lora.Linear))
        try:
            with _adapters_in_fp32(module), warnings.catch_warnings():
                # peft warns of each such layer ("proceed at your own risk"); tests/unit/test_lora checks them
                warnings.filterwarnings("ignore", "Unsupported layer type", UserWarning)
                inject_adapter_in_model(config, module, adapter_name=ADAPTER)
        except ValueError as error:
            raise ValueError(f"Could not attach LoRA to targets {targets!r}: {error}") from error
        cast_adapter_dtype(module, ADAPTER)
        self.layers = sorted({key.rsplit(".lora_", 1)[0] for key in self._state_dict()})
        if device is not None:  # layers whose weights stay in CPU memory still train on the compute device
            for param in self.parameters():
                param.data = param.data.to(device)
        if initial:
            self.load(initial)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable adapter parameters (fp32), in a stable order: per layer, down then up."""
        params = dict(self.module.named_parameters())
        return [params[f"{name}.lora_{part}.{ADAPTER}.weight"] for name in self.layers for part in ("A", "B")]

    def tensors(self) -> dict[str, LoraTensors]:
        """A detached fp32 CPU copy of the adapter, keyed by module path."""
        state = self._state_dict()
        return {name: LoraTensors(state[f"{name}.lora_A.weight"].detach().float().cpu().clone(),
                                  state[f"{name}.lora_B.weight"].detach().float().cpu().clone(), self.alpha)
                for name in self.layers}

    @torch.no_grad()
    def load(self, layers: Mapping[str, LoraTensors]) -> None:
        """Copy adapter weights in (to continue training an existing LoRA)."""
        unknown = sorted(set(layers) - set(self.layers))
        if unknown:
            raise ValueError(f"LoRA weights for modules that are not adapted: {unknown[:10]}")
        state = self._state_dict()
        for name, tensors in layers.items():
            down, up = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
            if down.shape != tensors.down.shape or up.shape != tensors.up.shape:
                raise ValueError(
                    f"LoRA shapes for {name} differ: model {tuple(down.shape)}/{tuple(up.shape)}, "
                    f"given {tuple(tensors.down.shape)}/{tuple(tensors.up.shape)}"
                )
        weights = {f"{name}.lora_{part}.weight": getattr(tensors, side).to(state[f"{name}.lora_{part}.weight"])
                   for name, tensors in layers.items() for part, side in (("A", "down"), ("B", "up"))}
        set_peft_model_state_dict(self.module, weights, adapter_name=ADAPTER)

    def remove(self) -> None:
        """Take every LoRA layer out; the module tree and its outputs are the original ones again."""
        for name in self.layers:
            parent, _, child = name.rpartition(".")
            owner = self.module.get_submodule(parent) if parent else self.module
            setattr(owner, child, getattr(owner, child).get_base_layer())
        self.layers = []
        for name in set(vars(self.module)) - self._attributes:
            delattr(self.module, name)
        for name, param in self.module.named_parameters():
            wanted = self._requires_grad.get(name, param.requires_grad)
            if param.requires_grad != wanted:
                # weights made under torch.inference_mode (as ComfyUI loads them) only take the flag there
                with torch.inference_mode(param.is_inference()):
                    param.requires_grad_(wanted)

    def __enter__(self) -> LoraAttachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter as peft names it: ``<module path>.lora_A.weight`` / ``.lora_B.weight`` (live tensors)."""
        return get_peft_model_state_dict(self.module, adapter_name=ADAPTER)


def is_linear(layer: torch.nn.Module) -> bool:
    """torch's Linear, or a layer of another class that computes one (its in and out features and a weight):
    ComfyUI's mixed-precision Linear, which holds quantised weights (scaled fp8 and others), is a plain
    Module."""
    return isinstance(layer, torch.nn.Linear) or all(hasattr(layer, name) for name in ("in_features", "out_features",
                                                                                          "weight"))


@contextlib.contextmanager
def _adapters_in_fp32(module: torch.nn.Module) -> Iterator[None]:
    """peft makes each adapter in its base weight's dtype unless the layer states a ``compute_dtype`` (as
    bitsandbytes' quantised layers do); stating fp32 while injecting keeps adapters on fp8-stored layers from
    being rounded to fp8 (their initialisation too). Other dtypes end in fp32 as well (``cast_adapter_dtype``)."""
    stated = [layer for layer in module.modules() if hasattr(layer, "weight") and not hasattr(layer, "compute_dtype")]
    for layer in stated:
        layer.compute_dtype = torch.float32
    try:
        yield
    finally:
        for layer in stated:
            del layer.compute_dtype


def _uniform_rank_alpha(layers: Mapping[str, LoraTensors]) -> tuple[int, float]:
    pairs = {(t.rank, float(t.alpha)) for t in layers.values()}
    if len(pairs) != 1:
        raise ValueError(f"Continuing a LoRA needs one rank and alpha for all layers; found {sorted(pairs)}")
    return pairs.pop()
