"""Checks of node inputs that ComfyUI's own validation lets through."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch


def finite(what: str, value: float) -> float:
    """``value`` if it is a finite number. ComfyUI's range check lets NaN through (every comparison with NaN is
    false), and JSON prompts may carry NaN; ``what`` names the node and input ("Apply LoRA: strength")."""
    if not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value}; type a number such as 1.0")
    return value


PLAIN_ERRORS = (FileNotFoundError, PermissionError, OSError, ValueError, TypeError, RuntimeError)


@contextlib.contextmanager
def errors_named(node: str) -> Iterator[None]:
    """Errors as users should see them: the message starts with the node's name, and the type is a plain builtin
    one (ComfyUI shows an error's module path, which for this pack's own classes is the folder it was installed
    in). Cancel and out-of-memory errors pass unchanged: ComfyUI handles them itself."""
    try:
        yield
    except PLAIN_ERRORS as error:
        if isinstance(error, torch.OutOfMemoryError):
            raise
        plain = next(kind for kind in PLAIN_ERRORS if isinstance(error, kind))
        if type(error) is plain and str(error).startswith(f"{node}:"):
            raise
        raise plain(f"{node}: {error}") from error
