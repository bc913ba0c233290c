"""Writing files so that a crash or a kill never leaves a partial one at the final path."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str], *, folder: bool = False, durable: bool = True) -> Iterator[Path]:
    """A hidden temporary path beside ``target`` (a file, or with ``folder`` a directory) to write into. When the
    block succeeds it is renamed over ``target`` in one step; when it fails it is removed. ``durable`` flushes
    the file and the rename to disk (``fsync``); a cache whose entries are checked when read can skip that.
    The ``.tmp`` suffix keeps a partial file out of ComfyUI's model lists, which filter by extension."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
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
