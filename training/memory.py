"""Device memory in training: frozen layers whose weights are made on every call (cast from fp8, dequantised,
fetched from CPU memory) keep nothing for the backward pass, and a step's saved activations can be measured
before it runs.

Autograd keeps every tensor an op needs for its gradient. For ``F.linear(x, cast(W8))`` that is the cast
weight: a full-precision copy of each frozen layer, alive until the backward pass, which puts the whole
upcast model back in memory (an fp8 model then needs more than a bf16 one). ``RemadeWeight`` computes the
layer in no-grad mode and, in the backward pass, asks for the weight again (``weight_of``) for the one
product the gradient needs, ∂L/∂x = ∂L/∂y · W: one layer's weight at a time. Frozen layers need no gradient
of their own, and nothing about the input is kept.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from .lora import is_linear

# weight_of(like) -> a context manager that yields the layer's weight in like's dtype and device, and frees it after
WeightOf = Callable[[torch.Tensor], contextlib.AbstractContextManager[torch.Tensor]]


class RemadeWeight(torch.autograd.Function):
    """``layer_forward(x)`` of a frozen Linear or Conv2d whose backward pass remakes its weight."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer_forward: Callable[[torch.Tensor], torch.Tensor],
                layer: torch.nn.Module, weight_of: WeightOf) -> torch.Tensor:
        ctx.layer, ctx.weight_of, ctx.input_shape, ctx.input_dtype = layer, weight_of, x.shape, x.dtype
        return layer_forward(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        layer = ctx.layer
        with ctx.weight_of(grad) as weight:
            if isinstance(layer, torch.nn.Conv2d):
                grad_x = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad, layer.stride, layer.padding,
                                                    layer.dilation, layer.groups)
            elif weight.device.type == "cpu":
                grad_x = _input_gradient_on_cpu(grad, weight)
            else:
                grad_x = grad @ weight
        return grad_x.to(ctx.input_dtype), None, None, None


def _input_gradient_on_cpu(grad: torch.Tensor, weight: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """grad @ W in the layout CPU bf16 kernels compute fast, x @ Wᵀ (grad @ W itself runs ~40x slower there),
    with Wᵀ made a block of rows at a time: a whole copy would double the layer's weight in memory."""
    return sum(torch.nn.functional.linear(grad[..., i:i + rows], weight[i:i + rows].t().contiguous())
               for i in range(0, weight.shape[0], rows))


def remade_forward(layer: torch.nn.Module, weight_of: WeightOf, needs_cast: Callable[[], bool]):
    """A forward for ``layer`` that goes through RemadeWeight while ``needs_cast()`` says its weight is made per
    call, and is the layer's own otherwise (no cost for weights used as stored)."""
    own = type(layer).forward.__get__(layer)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs or not (torch.is_grad_enabled() and x.requires_grad and needs_cast()):
            return own(x, *args, **kwargs)
        return RemadeWeight.apply(x, own, layer, weight_of)

    return forward


@contextlib.contextmanager
def remade_weights(layers: Iterable[tuple[torch.nn.Module, WeightOf, Callable[[], bool]]]):
    """While inside, each (layer, weight_of, needs_cast) computes through ``remade_forward``; the layers' own
    forwards come back after, however the block ends."""
    patched = []
    try:
        for layer, weight_of, needs_cast in layers:
            if not remakeable(layer):
                continue
            layer.forward = remade_forward(layer, weight_of, needs_cast)
            patched.append(layer)
        yield patched
    finally:
        for layer in patched:
            vars(layer).pop("forward", None)


def remakeable(layer: torch.nn.Module) -> bool:
    """A Linear (``is_linear``) or a Conv2d whose input gradient ``conv2d_input`` computes (zeros padding given
    as numbers): the layers RemadeWeight can take."""
    if isinstance(layer, torch.nn.Conv2d):
        return layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
    return is_linear(layer)


def saved_bytes(run: Callable[[], object], resident: Iterable[torch.Tensor] = ()) -> int:
    """Bytes autograd would keep for the backward pass of ``run()``, measured without keeping them: every
    tensor it saves is counted once per storage and dropped, so the probe needs only the forward pass's
    transient memory. Storages of ``resident`` tensors (the weights) are not counted. Call ``run`` with grad
    enabled; its graph cannot be back-propagated."""
    skip = {t.untyped_storage().data_ptr() for t in resident}
    alive: dict[tuple[int, int], weakref.ref] = {}  # a freed storage's address may be reused: count it again then
    total = 0

    def pack(tensor: torch.Tensor) -> None:
        nonlocal total
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] in skip or tensor.device.type == "meta":
            return
        seen = alive.get(key)
        if seen is None or seen() is None:
            alive[key] = weakref.ref(tensor)
            total += key[1]

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        run()
    return total
