"""What ComfyUI-Manager, comfy-cli and the Comfy Registry read of the pack: the requirements they install, the
registry metadata (read by comfy-cli's own parser), the archive ``comfy node pack`` publishes, and the node IDs
that Manager's index reads from the source without importing it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from packaging.requirements import Requirement

from scripts.pyenvs import requirement_lines
from tests.our_nodes import OURS
from tests.packaging import (
    COMFYUI_MODULES,
    REPO_ROOT,
    archive_names,
    canonical,
    module_level_imports,
    pack_archive,
    pack_sources,
)

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _requirements() -> list[str]:
    return requirement_lines(REPO_ROOT / "requirements.txt")


def test_requirements_txt_and_pyproject_declare_the_same_dependencies_with_floors_and_no_torch():
    requirements = _requirements()
    assert PYPROJECT["project"]["dependencies"] == requirements
    parsed = {canonical(Requirement(line).name): Requirement(line) for line in requirements}
    assert not {"torch", "torchvision", "torchaudio"} & set(parsed), "never replace the torch of the user's ComfyUI"
    for name in ("diffusers", "peft"):
        assert any(spec.operator == ">=" for spec in parsed[name].specifier), f"{name} needs a floor"


def test_every_library_the_pack_imports_is_declared():
    providers = importlib.metadata.packages_distributions()
    declared = {canonical(Requirement(line).name) for line in _requirements()}
    for path in pack_sources():
        for module in sorted(module_level_imports(path) - set(sys.stdlib_module_names) - COMFYUI_MODULES):
            dists = {canonical(name) for name in providers.get(module, [])}
            assert dists & declared, f"{path.relative_to(REPO_ROOT)} imports {module} ({dists or 'not installed'}), " \
                                     f"which requirements.txt does not declare"


def test_comfy_cli_reads_the_registry_metadata():
    from comfy_cli.registry.config_parser import extract_node_configuration

    config = extract_node_configuration(str(REPO_ROOT / "pyproject.toml"))
    project, comfy = config.project, config.tool_comfy
    assert project.name == "lora-trainer" and "comfyui" not in project.name.lower()  # the registry's node id
    assert re.fullmatch(r"\d+\.\d+\.\d+", project.version)
    assert project.urls.repository.startswith("https://") and project.license.text
    assert project.dependencies == _requirements()
    assert project.supported_comfyui_version == ">=0.3.75"  # comfy-cli empties a malformed range
    assert comfy.publisher_id and comfy.display_name == "LoRA Trainer"


def test_the_published_archive_holds_the_pack_and_no_development_files(tmp_path):
    names = archive_names(pack_archive(tmp_path))
    pack = {str(path.relative_to(REPO_ROOT)) for path in pack_sources()}
    workflows = {f"workflows/{path.name}" for path in (REPO_ROOT / "workflows").glob("*.json")}
    assert pack | workflows | {"requirements.txt", "pyproject.toml", "README.md"} <= names
    development = {name for name in names if name.split("/")[0] in {"tests", "bench", "scripts", ".ci"}
                   or name in {"requirements-dev.txt", ".comfyignore", ".gitignore"}}
    assert not development, sorted(development)[:10]


def test_static_scanners_read_the_node_ids_without_importing_the_pack():
    """ComfyUI-Manager's node index reads a module-level ``NODE_CLASS_MAPPINGS = {...}`` with string keys."""
    literals = {}
    for path in pack_sources():
        for node in ast.parse(path.read_text()).body:
            targets = [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
            if "NODE_CLASS_MAPPINGS" in targets and isinstance(node.value, ast.Dict):
                literals[path] = [key.value for key in node.value.keys if isinstance(key, ast.Constant)]
    assert list(literals.values()) == [list(OURS)], literals
