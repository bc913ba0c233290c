"""training/ is plain Python + torch: importing all of it loads no ComfyUI module."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import training

ROOT = Path(__file__).resolve().parents[2]
COMFY_MODULES = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "server", "node_helpers", "nodes")


def test_importing_every_training_module_loads_no_comfyui():
    modules = sorted(m.name for m in pkgutil.iter_modules(training.__path__))
    assert {"loop", "lora", "formats", "cache", "dataset", "denoiser", "diffusers_denoisers"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module('training.' + name)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {COMFY_MODULES!r})\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_no_training_source_mentions_a_comfyui_import():
    for path in (ROOT / "training").glob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith(("import ", "from ")):
                root = stripped.split()[1].split(".")[0]
                assert root not in COMFY_MODULES, f"{path.name}: {stripped}"


def test_the_engine_the_pack_runs_does_not_load_the_diffusers_adapters():
    """diffusers_denoisers is for tests and benchmarks: the modules the pack imports never load it."""
    product = sorted(m.name for m in pkgutil.iter_modules(training.__path__) if m.name != "diffusers_denoisers")
    code = (
        "import importlib, sys\n"
        f"for name in {product!r}: importlib.import_module('training.' + name)\n"
        "print('training.diffusers_denoisers' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
