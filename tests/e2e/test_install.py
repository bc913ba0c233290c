"""Installed the way ComfyUI-Manager and comfy-cli install a pack: the published archive (``comfy node pack``)
unpacked into custom_nodes, and its requirements.txt in a ComfyUI Python that holds ComfyUI's requirements and
nothing else. This suite's own Python is that one (scripts/pyenvs.py: the test tools are appended to this
process only, never to the servers it starts), and every server of the e2e suite runs in it."""

from __future__ import annotations

import sys
import sysconfig
import zipfile
from importlib.metadata import PackageNotFoundError, distribution, distributions
from pathlib import Path

import requests
from packaging.requirements import Requirement

from scripts import comfy_host
from scripts.pyenvs import requirement_lines
from tests.our_nodes import OURS
from tests.packaging import REPO_ROOT, canonical, pack_archive

VENV_TOOLING = {"pip", "setuptools", "wheel"}


def _closure(requirement_files: list[Path], extra_lines: tuple[str, ...]) -> set[str]:
    """Every distribution the requirement files (and lines) bring in, with their dependencies, as installed."""
    lines = [*extra_lines, *(line for path in requirement_files for line in requirement_lines(path))]
    pending = [r for r in map(Requirement, lines) if r.marker is None or r.marker.evaluate({"extra": ""})]
    seen: set[tuple[str, frozenset]] = set()
    while pending:
        requirement = pending.pop()
        key = (canonical(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = distribution(requirement.name).requires or []
        except PackageNotFoundError:
            continue  # not installed (for another platform, say): nothing to walk
        for child in map(Requirement, requires):
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in {"", *requirement.extras}):
                pending.append(child)
    return {name for name, _ in seen}


def test_the_host_python_holds_only_comfyuis_requirements_and_the_packs(comfy_root):
    site = sysconfig.get_path("purelib")
    installed = {canonical(d.metadata["Name"]) for d in distributions(path=[site])} - VENV_TOOLING
    allowed = _closure([comfy_root / "requirements.txt", REPO_ROOT / "requirements.txt"],
                       comfy_host.UNDECLARED_REQUIREMENTS)
    assert installed, f"no distributions found in {site}"
    assert installed <= allowed, f"{sys.prefix} holds more than ComfyUI's and the pack's requirements: " \
                                 f"{sorted(installed - allowed)}"


def test_the_published_archive_registers_the_nodes_in_a_requirements_only_comfyui(comfy_root, tmp_path):
    archive = pack_archive(tmp_path)
    base = comfy_host.prepare_base_dir(comfy_root, tmp_path / "base", link=False)
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(base / "custom_nodes" / comfy_host.pack_name())
    with comfy_host.start_server(comfy_root, base_dir=base, link=False) as server:
        info = requests.get(f"{server.url}/object_info", timeout=60).json()
        log = server.log_tail(400)
    assert {node: info[node]["display_name"] for node in OURS if node in info} == OURS, log
    assert "IMPORT FAILED" not in log and "Cannot import" not in log, log
