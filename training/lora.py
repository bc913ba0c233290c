"""LoRA adapters on any nn.Module, through peft.

An adapter is described engine-wide as ``dict[str, LoraTensors]``: module path (relative to the
denoiser's root module, dots as in ``named_modules``) -> its down/up matrices and alpha.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer, LoraModel

ADAPTER = "default"
# B = 0 in every case, so step 0 is the base model exactly.
LORA_INITS = {"kaiming": True, "gaussian": "gaussian"}
ALL_LINEAR = "all-linear"  # targets value: every nn.Linear (and subclass) in the module


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

    peft's ``LoraModel`` does the injection (Linear and its subclasses such as ComfyUI's ops, Conv2d)
    and the unloading. What peft changes besides — every other parameter's ``requires_grad`` — is
    recorded here and put back on removal, so the caller's model leaves exactly as it came.
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
    ) -> None:
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if init not in LORA_INITS:
            raise ValueError(f"Unknown LoRA init {init!r}; choose one of {sorted(LORA_INITS)}")
        if initial:
            rank, alpha = _uniform_rank_alpha(initial)
            targets = sorted(initial)
        elif targets == ALL_LINEAR:
            targets = [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)]
        self.module = module
        self._requires_grad = {name: p.requires_grad for name, p in module.named_parameters()}
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=list(targets) if not isinstance(targets, str) else targets,
            init_lora_weights=LORA_INITS[init],
        )
        try:
            self._tuner = LoraModel(module, config, adapter_name=ADAPTER)
        except ValueError as error:
            raise ValueError(f"Could not attach LoRA to targets {targets!r}: {error}") from error
        self.layers: dict[str, LoraLayer] = {
            name: layer for name, layer in module.named_modules() if isinstance(layer, LoraLayer)
        }
        for layer in self.layers.values():
            layer.lora_A[ADAPTER].float()
            layer.lora_B[ADAPTER].float()
        if initial:
            self.load(initial)

    def parameters(self) -> list[torch.nn.Parameter]:
        """The trainable adapter parameters (fp32), in a stable order."""
        return [p for name in sorted(self.layers) for p in self._pair(name)]

    def tensors(self) -> dict[str, LoraTensors]:
        """A detached fp32 CPU copy of the adapter, keyed by module path."""
        out = {}
        for name, layer in sorted(self.layers.items()):
            down, up = self._pair(name)
            alpha = layer.scaling[ADAPTER] * layer.r[ADAPTER]
            out[name] = LoraTensors(down.detach().float().cpu().clone(), up.detach().float().cpu().clone(), alpha)
        return out

    @torch.no_grad()
    def load(self, layers: Mapping[str, LoraTensors]) -> None:
        """Copy adapter weights in (to continue training an existing LoRA)."""
        unknown = sorted(set(layers) - set(self.layers))
        if unknown:
            raise ValueError(f"LoRA weights for modules that are not adapted: {unknown[:10]}")
        for name, tensors in layers.items():
            down, up = self._pair(name)
            if down.shape != tensors.down.shape or up.shape != tensors.up.shape:
                raise ValueError(
                    f"LoRA shapes for {name} differ: model {tuple(down.shape)}/{tuple(up.shape)}, "
                    f"given {tuple(tensors.down.shape)}/{tuple(tensors.up.shape)}"
                )
            down.copy_(tensors.down)
            up.copy_(tensors.up)

    def remove(self) -> None:
        """Take every LoRA layer out; the module tree and its outputs are the original ones again."""
        if self._tuner is None:
            return
        self._tuner.unload()
        self._tuner = None
        self.layers = {}
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

    def _pair(self, name: str) -> tuple[torch.nn.Parameter, torch.nn.Parameter]:
        layer = self.layers[name]
        return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight


def _uniform_rank_alpha(layers: Mapping[str, LoraTensors]) -> tuple[int, float]:
    pairs = {(t.rank, float(t.alpha)) for t in layers.values()}
    if len(pairs) != 1:
        raise ValueError(f"Continuing a LoRA needs one rank and alpha for all layers; found {sorted(pairs)}")
    return pairs.pop()
