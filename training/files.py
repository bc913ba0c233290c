"""Writing files so that a crash or a kill never leaves a partial one at the final path."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path


def temp_name(name: str, token: str = "0" * 8) -> str:
    """The hidden name a file called ``name`` is written under before it is renamed into place."""
    return f".{name}.{token}.tmp"


def file_state(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """(size, modification time in ns) of ``path``, which change when the file is rewritten; None if it is gone
    (or a broken link). Cheap: the file is not read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def changed(states: Mapping[Path, tuple[int, int] | None]) -> list[Path]:
    """The paths whose ``file_state`` differs now from the one recorded in ``states``."""
    return [path for path, state in states.items() if file_state(path) != state]


TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")


def remove_temp_files(folder: str | os.PathLike[str]) -> int:
    """Remove what killed writes left under ``folder`` (temporary files and folders, see ``atomic_path``);
    returns how many. Only for folders no other process is writing into."""
    removed = 0
    for parent, folders, files in os.walk(folder):
        for name in [*files, *folders]:
            if TEMP_NAME.fullmatch(name):
                path = os.path.join(parent, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                removed += 1
        folders[:] = [f for f in folders if not TEMP_NAME.fullmatch(f)]
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, folder: bool = False, durable: bool = True) -> Iterator[Path]:
    """A hidden temporary path beside ``target`` (a file, or with ``folder`` a directory) to write into. When the
    block succeeds it is renamed over ``target`` in one step; when it fails it is removed. ``durable`` flushes
    the file and the rename to disk (``fsync``); a cache whose entries are checked when read can skip that.
    The ``.tmp`` suffix keeps a partial file out of ComfyUI's model lists, which filter by extension."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(temp_name(target.name, secrets.token_hex(4)))
    if folder:
        temp.mkdir()
    try:
        yield temp
        if durable and not folder:
            with open(temp, "rb+") as handle:
                os.fsync(handle.fileno())
        if folder and target.exists():
            shutil.rmtree(target)
        os.replace(temp, target)
    except BaseException:  # also on KeyboardInterrupt: remove the partial file, then re-raise
        if folder:
            shutil.rmtree(temp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        raise
    if durable:
        with contextlib.suppress(OSError):  # persist the rename itself; directories can't be opened on Windows
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
