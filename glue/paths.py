"""Where the nodes read and write: names users type, resolved under ComfyUI's folders with ComfyUI's own
containment guard (``folder_paths.is_within_directory``, which follows symlinks; hosts without it, 0.3.75, get
the same check here)."""

from __future__ import annotations

import os
import re

import folder_paths

UNSAFE = re.compile(r"[\x00-\x1f<>:\"|?*]")


def within(directory: str, target: str) -> bool:
    guard = getattr(folder_paths, "is_within_directory", None)
    if guard is not None:
        return guard(directory, target)
    try:
        directory, target = os.path.realpath(directory), os.path.realpath(target)
        return os.path.commonpath((directory, target)) == directory
    except ValueError:  # a null byte, or another drive on Windows
        return False


def under(root: str, name: str, *, what: str, absolute: bool = False, suffix: str = "") -> str:
    """``name`` (``/`` makes subfolders) as a path inside ComfyUI's folder ``root``, plus ``suffix``; with
    ``absolute``, an absolute ``name`` is taken as it is. ``what`` names the node and input for errors
    ("Save LoRA: name"). Anything that would land outside ``root`` is refused."""
    cleaned = name.strip().strip('"').replace("\\", "/")
    if absolute and os.path.isabs(cleaned):
        return cleaned
    parts = [part for part in cleaned.removesuffix(suffix).split("/") if part not in ("", ".")]
    if not parts or os.path.isabs(cleaned) or ".." in parts or UNSAFE.search(cleaned):
        raise ValueError(f"{what} {name!r} is not allowed; use letters, digits, '-', '_' and '/' for subfolders "
                         f"inside {root} (no '..'{'' if absolute else ', no absolute paths'})")
    path = os.path.join(os.path.abspath(root), *parts) + suffix
    if not within(root, path):
        raise ValueError(f"{what} {name!r} leaves {root}")
    return path
