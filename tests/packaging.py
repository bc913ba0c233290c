"""The pack as users get it: the archive ``comfy node pack`` (comfy-cli, the Comfy Registry's publisher) makes
from the git-tracked files minus .comfyignore, and what the pack imports at run time."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from scripts import pyenvs

REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_CODE = ("__init__.py", "glue", "training")
# what ComfyUI itself provides to every custom node: its own modules and its torch
COMFYUI_MODULES = {"comfy", "comfy_extras", "comfy_api", "comfy_execution", "folder_paths", "server", "node_helpers",
                   "nodes", "torch"}


def canonical(name: str) -> str:
    """A distribution name as the package index compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pack_archive(workdir: Path) -> Path:
    """Run ``comfy node pack`` on a copy of this checkout (its tracked files and new ones git does not ignore, as
    they would be once committed) and return the zip it wrote."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    copy = workdir / "checkout"
    for name in filter(None, files):
        if (REPO_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, copy / name)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    subprocess.run(["git", "add", "-A"], cwd=copy, check=True)
    argv = ["-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry", "node", "pack"]
    # on a host, comfy-cli is among the test tools, which reach a subprocess only through with_tools
    command = pyenvs.with_tools(sys.executable, argv) if str(pyenvs.TOOLS_LAYER) in sys.path else \
        [sys.executable, *argv]
    subprocess.run(command, cwd=copy, check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    return copy / "node.zip"


def archive_names(archive: Path) -> set[str]:
    with zipfile.ZipFile(archive) as zipped:
        return set(zipped.namelist())


def module_level_imports(path: Path) -> set[str]:
    """Top-level module names a file imports when it is imported (not those inside functions: optional extras)."""
    tree = ast.parse(path.read_text())
    names, pending = set(), list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, (ast.Try, ast.If)):
            pending += [*node.body, *node.orelse, *getattr(node, "handlers", [])]
        elif isinstance(node, ast.ExceptHandler):
            pending += node.body
    return names


def pack_sources() -> list[Path]:
    return sorted(p for name in PACK_CODE for p in ([REPO_ROOT / name] if name.endswith(".py")
                                                    else (REPO_ROOT / name).rglob("*.py")))
