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
    assert {"loop", "lora", "formats", "cache", "dataset", "denoisers"} <= set(modules)
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
