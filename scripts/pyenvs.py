"""The Python environments this pack is developed and tested in, built from the package registry only.

- **The torch layer** (``.comfyui/torch-<version>/``): torch, torchvision and torchaudio, installed once with
  ``pip --target`` and put on the path of every venv below by a ``.pth`` file: 5.5 GB once instead of once per
  venv. pip counts what a ``.pth`` file puts on the path as installed, and never uninstalls it.
- **The dev venv** (``.venv``): the pack's ``requirements.txt``, ``requirements-dev.txt`` and
  ``requirements-optimizers.txt`` (the optional optimizers, which the engine tests train with); lint, the engine
  tests (no ComfyUI) and the test runner.
- **One host venv per ComfyUI** (``.comfyui/<host>/venv``): that ComfyUI's ``requirements.txt`` plus the pack's
  ``requirements.txt``, nothing else: what a user's ComfyUI Python holds after ComfyUI-Manager installed the
  pack. The ComfyUI servers the tests start run in it.
- **The test-tools layer** (``.comfyui/test-tools/``): ``requirements-dev.txt`` (pytest, Playwright, ...),
  appended to ``sys.path`` only in the processes that run tests or scripts on a host (``with_tools``), never
  in the servers those start.

Every build is idempotent: a marker file holds a digest of what went in, and a changed requirements file
builds that environment again from scratch. Only the standard library is used here, so the system Python can
run it before any venv exists::

    python3 scripts/pyenvs.py dev      # make .venv and print its python
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock; builds are not run in parallel there
    fcntl = None

REPO_ROOT = Path(__file__).resolve().parents[1]
ENVS = REPO_ROOT / ".comfyui"
DEV_VENV = REPO_ROOT / ".venv"
PACK_REQUIREMENTS = REPO_ROOT / "requirements.txt"
DEV_REQUIREMENTS = REPO_ROOT / "requirements-dev.txt"
OPTIMIZER_REQUIREMENTS = REPO_ROOT / "requirements-optimizers.txt"

# The torch build ComfyUI's requirements take. These torch and torchvision files run on CPU and GPU; the
# registry's torchaudio declares no torch pin, so it goes in without its dependencies (it would replace torch).
TORCH = ("torch==2.14.1", "torchvision==0.29.1")
TORCH_NO_DEPS = ("torchaudio==2.11.0",)
TORCH_LAYER = ENVS / f"torch-{TORCH[0].split('==')[1]}"
TOOLS_LAYER = ENVS / "test-tools"
MARKER = ".pyenvs-installed"


def python_of(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def torch_layer() -> Path:
    """The folder holding torch, torchvision and torchaudio (and torch's own dependencies), built once."""
    inputs = "\n".join((*TORCH, *TORCH_NO_DEPS))
    with _building(TORCH_LAYER, inputs) as needed:
        if needed:
            shutil.rmtree(TORCH_LAYER, ignore_errors=True)  # pip --target never replaces what is there
            _pip(sys.executable, "install", "--target", str(TORCH_LAYER), *TORCH)
            _pip(sys.executable, "install", "--no-deps", "--target", str(TORCH_LAYER), *TORCH_NO_DEPS)
    return TORCH_LAYER


def tools_layer() -> Path:
    """The folder holding requirements-dev.txt, for ``with_tools``."""
    with _building(TOOLS_LAYER, DEV_REQUIREMENTS.read_text()) as needed:
        if needed:
            shutil.rmtree(TOOLS_LAYER, ignore_errors=True)  # pip --target never replaces what is there
            _pip(sys.executable, "install", "--target", str(TOOLS_LAYER), "-r", str(DEV_REQUIREMENTS))
    return TOOLS_LAYER


def venv(path: Path, requirements: Sequence[Path], extra: Sequence[str] = ()) -> Path:
    """A venv at ``path`` on the torch layer with ``requirements`` (files) and ``extra`` (lines) installed;
    returns its python. torch, torchvision and torchaudio lines are met by the layer, at its versions."""
    layer = torch_layer()
    inputs = "\n".join([str(layer), *(f.read_text() for f in requirements), *extra])
    with _building(path, inputs) as needed:
        if needed:  # from scratch: a requirement taken out must not linger
            shutil.rmtree(path, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
            site = subprocess.run([python_of(path), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  check=True, capture_output=True, text=True).stdout.strip()
            Path(site, "torch-layer.pth").write_text(f"{layer}\n")
            with tempfile.TemporaryDirectory(prefix="pyenvs-") as tmp:
                pins = Path(tmp, "torch-pins.txt")
                pins.write_text("\n".join((*TORCH, *TORCH_NO_DEPS)) + "\n")
                args = [arg for f in requirements for arg in ("-r", str(f))]
                if extra:
                    lines = Path(tmp, "extra.txt")
                    lines.write_text("\n".join(extra) + "\n")
                    args += ["-r", str(lines)]
                _pip(python_of(path), "install", "-c", str(pins), *args)
    return python_of(path)


def requirement_lines(path: Path) -> list[str]:
    """The requirements a requirements.txt lists, without comments and blank lines."""
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def lowest_venv() -> Path:
    """A venv (``.comfyui/lowest``) with every requirement of requirements.txt at its floor, the oldest versions
    the pack declares it works with; returns its python."""
    lines = requirement_lines(PACK_REQUIREMENTS)
    if any(line.count(">=") != 1 or any(op in line for op in ("<", "==", "!=", "~=", ",")) for line in lines):
        raise ValueError(f"{PACK_REQUIREMENTS}: every line must be 'name>=floor' to be tested at its floor: {lines}")
    return venv(ENVS / "lowest", [OPTIMIZER_REQUIREMENTS], extra=[line.replace(">=", "==") for line in lines])


def dev_venv() -> Path:
    """The dev venv's python (``.venv``)."""
    return venv(DEV_VENV, [PACK_REQUIREMENTS, DEV_REQUIREMENTS, OPTIMIZER_REQUIREMENTS])


def with_tools(python: Path | str, argv: Sequence[str]) -> list[str]:
    """The command line that runs ``python argv`` (``-m module ...`` or ``script.py ...``) with the test
    tools appended to its ``sys.path``, after its own packages, so the host's versions win."""
    boot = ("import runpy, site, sys; site.addsitedir(sys.argv.pop(1)); "
            "m = sys.argv[1] == '-m' and sys.argv.pop(1); sys.argv.pop(0); "
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True) if m else "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return [str(python), "-c", boot, str(tools_layer()), *argv]


@contextlib.contextmanager
def lock(target: Path) -> Iterator[None]:
    """Serialise builds of ``target`` across processes (parallel test sessions)."""
    locks = ENVS / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / (str(target.resolve().relative_to(REPO_ROOT)).replace(os.sep, "+") + ".lock"), "w") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _building(target: Path, inputs: str) -> Iterator[bool]:
    """Yield whether ``target`` must be (re)built for ``inputs``; mark it built if the block succeeds."""
    digest = hashlib.sha256(inputs.encode()).hexdigest()
    marker = target / MARKER
    with lock(target):
        needed = not (marker.is_file() and marker.read_text() == digest)
        yield needed
        if needed:
            target.mkdir(parents=True, exist_ok=True)
            marker.write_text(digest)


def _pip(python: Path | str, *args: str) -> None:
    # pip's own output goes to stderr: stdout carries this script's answer
    subprocess.run([str(python), "-m", "pip", *args, "--quiet", "--disable-pip-version-check", "--root-user-action=ignore"], check=True,
                   stdout=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["dev"]:
        sys.stderr.write("usage: python3 scripts/pyenvs.py dev\n")
        return 2
    sys.stdout.write(f"{dev_venv()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
