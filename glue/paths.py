"""Where the nodes read and write. One policy for every place a user names:

- **reading** (a dataset folder) may point anywhere: an absolute path as given, a relative one inside ComfyUI's
  input folder;
- **writing** (LoRA files, checkpoints, the latent cache) happens only inside ComfyUI's output and models
  folders, judged after resolving symlinks (ComfyUI's own ``folder_paths.is_within_directory``; hosts without it,
  0.3.75, get the same check here), and every name is checked before any work starts: no control characters,
  no characters or names Windows refuses, and short enough that the file *and* its temporary twin
  (``training.files.temp_name``) fit the 255-byte limit of a file name — so a long run does not fail at its end.
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata

import folder_paths

from ..training.files import remove_temp_files, temp_name

log = logging.getLogger(__name__)
DEFAULT_CACHE = "lora_trainer_cache"  # Encode Latents Cache's folder inside output/ unless the node says otherwise
NAME_MAX = 255  # bytes in one file or folder name (ext4, APFS, NTFS in UTF-16 units: bytes is the stricter)
FORBIDDEN = re.compile(r'[<>:"|?*]')  # refused by Windows (':' is a drive or a stream there)
WINDOWS_RESERVED = re.compile(r"(con|prn|aux|nul|com[0-9¹²³]|lpt[0-9¹²³])(\..*)?", re.IGNORECASE)
BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def within(directory: str, target: str) -> bool:
    guard = getattr(folder_paths, "is_within_directory", None)
    if guard is not None:
        return guard(directory, target)
    try:
        directory, target = os.path.realpath(directory), os.path.realpath(target)
        return os.path.commonpath((directory, target)) == directory
    except ValueError:  # a null byte, or another drive on Windows
        return False


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (newline, tab, NUL, ...)."""
    return any(unicodedata.category(c) == "Cc" for c in text)


def problem_with(part: str) -> str | None:
    """Why ``part`` cannot be a file or folder name on the systems ComfyUI runs on (None: it can)."""
    if part == "..":
        return "'..' leads out of the folder"
    if has_control(part) or BIDI_CONTROLS & set(part):  # written names: also no text-reversing characters
        return "has a control character (newline, tab, NUL, ...)"
    if forbidden := FORBIDDEN.search(part):
        return f"has {forbidden.group()!r}, which Windows does not allow in names"
    if WINDOWS_RESERVED.fullmatch(part):
        return f"{part!r} is a reserved device name on Windows"
    if part.endswith((".", " ")):
        return "ends with a dot or a space, which Windows drops"
    if part.startswith("~"):
        return "'~' would not mean your home folder here"
    return None


def too_long(name: str) -> str | None:
    """Why ``name`` is too long for a file name once written under its temporary name (None: it is not)."""
    if len(temp_name(name).encode()) <= NAME_MAX:
        return None
    return f"is {len(name.encode())} bytes long; names are limited to {NAME_MAX - len(temp_name('').encode())} bytes"


def writable(root: str, name: str, *, what: str, suffix: str = "") -> str:
    """``name`` ('/' makes subfolders) plus ``suffix`` as a path to write inside ComfyUI's folder ``root``.
    ``what`` names the node and input ("Save LoRA: name"). Anything that would land outside ``root`` — also
    through a symlink — or that a file system would refuse is a ValueError naming the problem and the fix."""
    cleaned = name.strip().replace("\\", "/")  # Windows users may type project\v2
    fix = f"use a relative name such as 'my_lora' or 'project/v2' (inside {root})"
    if not cleaned:
        raise ValueError(f"{what} is empty; {fix}")
    if os.path.isabs(cleaned) or cleaned.startswith("/") or re.match(r"[A-Za-z]:", cleaned):
        absolute = os.path.normpath(cleaned)
        if "\x00" in cleaned or not within(root, absolute):
            raise ValueError(f"{what} {name!r} is outside {root}; {fix}")
        cleaned = os.path.relpath(os.path.realpath(absolute), os.path.realpath(root))
    parts = [part for part in cleaned.removesuffix(suffix).split("/") if part not in ("", ".")]
    if not parts:
        raise ValueError(f"{what} {name!r} names no file; {fix}")
    for number, part in enumerate(parts):
        problem = problem_with(part) or too_long(part + suffix if number == len(parts) - 1 else part)
        if problem is not None:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise ValueError(f"{what} {name!r}: {shown!r} {problem}; {fix}")
    parts[-1] += suffix
    path = os.path.join(os.path.abspath(root), *parts)
    if not within(root, path):
        raise ValueError(f"{what} {name!r} leads out of {root} through a symlink; {fix}")
    return path


def readable(root: str, name: str, *, what: str) -> str:
    """``name`` as a path to read: absolute (``~`` is the home folder) as given, relative inside ``root``."""
    cleaned = name.strip().strip('"')
    if not cleaned:
        raise ValueError(f"{what} is empty; give the path of a folder")
    if has_control(cleaned):
        raise ValueError(f"{what} {name!r} has a control character (newline, tab, NUL, ...); give the path of a "
                         "folder")
    cleaned = os.path.expanduser(cleaned)
    return cleaned if os.path.isabs(cleaned) else os.path.join(root, cleaned)


def remove_killed_writes() -> int:
    """At start-up: remove the temporary files and folders that writes killed mid-way (power loss, kill -9) left
    in the folders this pack writes (models/loras, output/lora_trainer and the default latent cache; a cache
    elsewhere is swept when Encode Latents Cache opens it). The final files were never touched by those writes."""
    output = folder_paths.get_output_directory()
    folders = [*folder_paths.get_folder_paths("loras"), os.path.join(output, "lora_trainer"),
               os.path.join(output, DEFAULT_CACHE)]
    removed = sum(remove_temp_files(folder) for folder in folders if os.path.isdir(folder))
    if removed:
        log.info("LoRA Trainer: removed %d temporary files left by interrupted writes", removed)
    return removed
