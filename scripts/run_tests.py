"""Run the tests on every ComfyUI host: the engine and packaging tests (tests/unit, tests/pack: no ComfyUI) once
in the dev venv, the engine tests once more with requirements.txt at its floors, then the ComfyUI suites
(tests/comfy in-process, tests/e2e real server and browser) once per host, each in that host's own venv with
the test tools appended (scripts/pyenvs.py); print the counts per host.

    .venv/bin/python scripts/run_tests.py [pytest args]      (bash scripts/dev.sh test [pytest args] sets up first)

Hosts: ``$COMFY_HOSTS`` (versions or install folders), else ``$COMFYUI_DIR``, else every known version
(scripts/comfy_host.py). Given pytest args (a file, ``-k``, ...), those run on every host instead. A host that
cannot be set up is skipped with the reason, or fails the run where ``REQUIRE_COMFYUI=1`` (CI).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts import comfy_host, pyenvs  # noqa: E402

ENGINE_TESTS = ["tests/unit", "tests/pack"]  # need no ComfyUI
COMFY_TESTS = ["tests/comfy", "tests/e2e"]
REPORTS = REPO_ROOT / "artifacts"


def pytest_run(label: str, command: list[str], args: list[str], env: dict[str, str] | None = None) -> dict:
    """Run pytest; its counts from the JUnit report, with the wall time and exit code."""
    REPORTS.mkdir(exist_ok=True)
    report = REPORTS / f"junit-{label}.xml"
    report.unlink(missing_ok=True)
    print(f"\n=== {label}: pytest {' '.join(args)}", flush=True)
    started = time.monotonic()
    code = subprocess.run([*command, "-m", "pytest", *args, f"--junitxml={report}"], cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})}).returncode
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.is_file():
        for suite in ET.parse(report).getroot().iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    return {"label": label, "code": code, "seconds": time.monotonic() - started, **counts}


def main(argv: list[str]) -> int:
    runs, problems = [], []
    if not argv:
        runs.append(pytest_run("engine", [sys.executable], ["-q", *ENGINE_TESTS]))
        # the same engine with every requirement of requirements.txt at its floor
        runs.append(pytest_run("engine-lowest", pyenvs.with_tools(pyenvs.lowest_venv(), []), ["-q", "tests/unit"]))
    for host in comfy_host.selected_hosts():
        try:
            comfy_host.install(host)
        except (OSError, ValueError, subprocess.CalledProcessError) as error:
            problems.append(f"host {host.name} could not be set up: {error}")
            continue
        command = pyenvs.with_tools(host.python, [])
        runs.append(pytest_run(f"comfyui-{host.version}", command, ["-q", *(argv or COMFY_TESTS)],
                               env={"COMFYUI_DIR": str(host.root)}))

    print("\n=== summary")
    for run in runs:
        passed = run["tests"] - run["failures"] - run["errors"] - run["skipped"]
        print(f"{run['label']:>18}: {passed} passed, {run['failures']} failed, {run['errors']} errors, "
              f"{run['skipped']} skipped in {run['seconds']:.0f} s (exit {run['code']})")
    for problem in problems:
        print(problem)
    required = os.environ.get("REQUIRE_COMFYUI") == "1"
    failed = any(run["code"] != 0 for run in runs) or (required and problems) or not runs
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
