"""Hostile but ordinary use through a real server: names that try to leave ComfyUI's folders, Cancel at every
moment of a run, kill -9 in the middle of writes, files changed between prompts.

The server runs with the test-only fault points of tests/tiny_family_node/faults.py: the test arms a point,
the server stops there and says so, and the test then cancels (POST /interrupt) or kills the process. Each test
prints its figures (names tried / files outside; moments cancelled / LoRAs kept; kills / corrupt files).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest
import requests
from safetensors import safe_open

from scripts import comfy_host
from scripts.make_demo_assets import make_demo_dataset
from tests.conftest import TINY_CKPT_NAME
from tests.e2e.test_interrupt import _generation_graph, _training_graph

TIMEOUT_S = 180.0


class Rig:
    """A ComfyUI server with fault points, its folders, and the calls the tests make."""

    def __init__(self, root: Path, base: Path, faults: Path):
        self.root, self.base, self.faults = root, base, faults
        self.loras, self.output = base / "models" / "loras", base / "output"
        self.server: comfy_host.Server | None = None
        self.log_seen = 0

    def start(self) -> None:
        log = self.base / f"comfyui-{time.monotonic_ns()}.log"
        self.server = comfy_host.start_server(self.root, base_dir=self.base, log_path=log,
                                              env={"LORA_TRAINER_FAULTS": str(self.faults)})
        self.log_seen = 0

    def kill(self) -> None:
        """kill -9: no clean-up of any kind runs in the server."""
        self.server.process.kill()
        self.server.process.wait(timeout=30)

    def queue(self, graph: dict) -> str:
        body = requests.post(f"{self.server.url}/prompt", json={"prompt": graph, "client_id": "reliability"},
                             timeout=30).json()
        assert not body.get("node_errors") and "prompt_id" in body, body
        return body["prompt_id"]

    def finish(self, prompt_id: str) -> tuple[str, str]:
        """(status, error message) of a finished prompt: status "success" or "error"."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.server.alive(), self.server.log_tail()
            entry = requests.get(f"{self.server.url}/history/{prompt_id}", timeout=30).json().get(prompt_id)
            if entry is not None:
                messages = entry["status"].get("messages", [])
                errors = [data.get("exception_message", "") for kind, data in messages if kind == "execution_error"]
                interrupted = any(kind == "execution_interrupted" for kind, _ in messages)
                return ("interrupted" if interrupted else entry["status"]["status_str"]), "\n".join(errors)
            time.sleep(0.1)
        raise AssertionError(f"prompt {prompt_id} not done in {TIMEOUT_S} s\n{self.server.log_tail()}")

    def run(self, graph: dict) -> tuple[str, str]:
        return self.finish(self.queue(graph))

    def arm(self, point: str, text: str = "") -> None:
        (self.faults / f"{point}.armed").write_text(text)

    def wait_reached(self, point: str) -> None:
        reached = self.faults / f"{point}.reached"
        deadline = time.monotonic() + TIMEOUT_S
        while not reached.exists():
            assert time.monotonic() < deadline and self.server.alive(), self.server.log_tail()
            time.sleep(0.02)
        reached.unlink()

    def interrupt(self) -> None:
        requests.post(f"{self.server.url}/interrupt", timeout=30).raise_for_status()

    def new_log(self) -> str:
        """What the server logged since the last call."""
        text = self.server.log_path.read_text(errors="replace")
        new, self.log_seen = text[self.log_seen:], len(text)
        return new

    def loads_every_key(self, lora_name: str) -> bool:
        """Whether the stock LoraLoader applies every tensor of ``lora_name`` (a prompt that must succeed)."""
        self.new_log()
        status, error = self.run(_generation_graph(lora_name, "reliability/check"))
        assert status == "success", error
        return "lora key not loaded" not in self.new_log()


def _graph(name: str, *, steps: int = 6, save: str | None = None, cache: str = "rel_cache", folder: str = "rel_rings",
           checkpoint_every: int = 0, resume: bool = False, pause_node: bool = False, seed: int = 0) -> dict:
    """test_interrupt's training graph, smaller (rank 2, 3 images), on this rig's folders."""
    graph = _training_graph()
    graph["2"]["inputs"]["folder"] = folder
    graph["3"]["inputs"]["cache_dir"] = cache
    graph["4"]["inputs"].update(steps=steps, rank=2, seed=seed, name=name, checkpoint_every=checkpoint_every,
                                resume=resume)
    graph["5"]["inputs"]["name"] = save or name
    if pause_node:
        graph["6"] = {"class_type": "PauseHere", "inputs": {"lora": ["4", 0]}}
        graph["5"]["inputs"]["lora"] = ["6", 0]
    return graph


def _steps_of(path: Path) -> int:
    with safe_open(path, "pt") as f:
        return int(f.metadata()["ss_steps"])


def _tags(path: Path) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()["ss_tag_frequency"])


def _corrupt(folder: Path) -> list[Path]:
    """Every .safetensors at a final (not temporary) name under ``folder`` that cannot be read in full."""
    bad = []
    for path in folder.rglob("*.safetensors"):
        if path.is_symlink() or any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # not ours: the hostile-name test's links; temporary names
        try:
            with safe_open(path, "pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        except Exception:  # noqa: BLE001 - any failure to read is corruption here
            bad.append(path)
    return bad


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*.tmp")]


@pytest.fixture(scope="module")
def rig(comfy_root: Path, tiny_sd15_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    top = tmp_path_factory.mktemp("reliability")
    base = comfy_host.prepare_base_dir(comfy_root, top / "base")
    (base / "models" / "checkpoints" / TINY_CKPT_NAME).symlink_to(tiny_sd15_checkpoint)
    (base / "custom_nodes" / "lora_trainer_tiny_families").symlink_to(Path(__file__).parents[1] / "tiny_family_node")
    make_demo_dataset(base / "input" / "rel_rings", count=3, size=128)
    rig = Rig(comfy_root, base, top / "faults")
    rig.start()
    yield rig
    rig.server.stop()


def test_hostile_names_write_nothing_outside_the_base_directory(rig: Rig, tmp_path_factory):
    token = f"escape{uuid.uuid4().hex[:8]}"
    outside = tmp_path_factory.mktemp("outside")
    (rig.loras / "link_out").symlink_to(outside, target_is_directory=True)
    (rig.output / "link_out").symlink_to(outside, target_is_directory=True)
    (rig.loras / "final_link.safetensors").symlink_to(outside / "final_target.safetensors")
    escapes = [f"../{token}", f"a/../../{token}", f" ../{token}", f"..\\..\\{token}", f"/tmp/{token}", "/",
               f"~/{token}", "~", f"x\x00{token}", f"x\n{token}", f"x\t{token}", "a" * 300, "b" * 240, "CON",
               "lpt1.backup", f"nul/{token}", "x.", f"dir /{token}", f"C:\\{token}", f"\\\\server\\share\\{token}",
               f"link_out/{token}", "final_link", "🙂" * 70, f"\u202e{token}", "a:b", "a|b", "*",
               f"file:///{token}", "", ".", f"{'../' * 12}{token}"]
    fine = ["ünïcødé/名前", f"%2e%2e/{token}", str(rig.loras / "absolute_inside")]
    cases = [("5", "name", "Save LoRA: name", name) for name in escapes]
    cases += [("4", "name", "Train LoRA: name", name) for name in
              (f"../../{token}", f"link_out/{token}", "c" * 240, f"x\x00{token}", f"/tmp/{token}", "AUX")]
    cases += [("3", "cache_dir", "Encode Latents Cache: cache_dir", name) for name in
              (f"../../{token}", "/", f"/tmp/{token}", f"link_out/{token}", "~", f"{token}/\x01", "x" * 250)]
    cases += [("2", "folder", "Load LoRA Dataset: folder", name) for name in
              (f"x\x00{token}", f"no/such/{token}", f"rel_rings\n{token}")]

    status, error = rig.run(_graph("hostile/base", steps=1))
    assert status == "success", error
    refused = []
    for node, field, what, name in cases:
        graph = _graph("hostile/base", steps=1)
        graph[node]["inputs"][field] = name
        status, error = rig.run(graph)
        assert status == "error" and error.startswith(what), (name, status, error)
        refused.append(name)
    for name in fine:
        graph = _graph("hostile/base", steps=1)
        graph["5"]["inputs"]["name"] = name
        status, error = rig.run(graph)
        assert status == "success", (name, error)
    assert (rig.loras / "ünïcødé" / "名前.safetensors").is_file()
    assert (rig.loras / "absolute_inside.safetensors").is_file()

    # where the escapes would have landed: the symlinks' target, the file system's root, /tmp, the home folder,
    # and everything pytest made around the base directory
    outside_files = list(outside.rglob("*"))
    for place in (Path("/"), Path("/tmp"), Path.home()):
        outside_files += place.glob(f"*{token}*")
    outside_files += [p for p in tmp_path_factory.getbasetemp().rglob(f"*{token}*")
                      if not p.is_relative_to(rig.base)]
    print(f"\nhostile names: {len(cases) + len(fine)} tried ({len(refused)} refused, each naming the node and "  # noqa: T201 - the figures
          f"input; {len(fine)} legal, written inside); files outside the base directory: {len(outside_files)}")
    assert outside_files == []


def test_cancel_at_any_moment_keeps_a_loadable_lora_and_the_next_prompt_runs(rig: Rig):
    moments = [  # (moment, point, armed text, graph options, the file that must hold the LoRA, its steps)
        # Cancel inside a step drops that step (ComfyUI's layers raise mid-step): what the steps before it learned
        # is kept; before the first completed step there is nothing to keep
        ("encoding captions", "text", "", dict(cache="rel_cache_cancel"), None, 0),
        ("inside the first step", "train", "1", {}, None, 0),
        ("inside the second step", "train", "2", {}, "partial", 1),
        ("mid-run", "train", "4", {}, "partial", 3),
        ("inside the last step", "train", "6", {}, "partial", 5),
        ("writing a checkpoint", "replace", "checkpoints/step_000004", dict(checkpoint_every=2), "partial", 4),
        ("keeping the trained LoRA, as Train returns", "replace", "_partial.safetensors", {}, "partial", 6),
        ("between Train and Save", "node", "", dict(pause_node=True), "partial", 6),
        ("writing the saved file", "replace", "final.safetensors", {}, "final", 6),
    ]
    kept = 0
    for number, (moment, point, text, options, holder, steps) in enumerate(moments):
        name = f"cancel/m{number}"
        rig.arm(point, text)
        prompt = rig.queue(_graph(name, save=f"{name}_final", seed=number, **options))
        rig.wait_reached(point)
        rig.interrupt()
        status, error = rig.finish(prompt)
        partial, final = rig.loras / f"{name}_partial.safetensors", rig.loras / f"{name}_final.safetensors"
        if holder is None:
            assert status == "interrupted" and not partial.exists() and not final.exists(), (moment, status, error)
        else:
            path = final if holder == "final" else partial
            assert path.is_file() and _steps_of(path) == steps, (moment, status, error)
            if holder == "final":  # the save was under way: it completes, and the kept copy is gone
                assert not partial.exists()
            else:
                assert status == "interrupted" and not final.exists(), (moment, status, error)
            assert rig.loads_every_key(path.relative_to(rig.loras).as_posix()), moment
            kept += 1
        status, error = rig.run(_graph(f"cancel/after{number}", steps=1, seed=number))  # the next prompt runs
        assert status == "success", (moment, error)
    print(f"\ncancelled at {len(moments)} moments; LoRAs kept: {kept} of the {sum(1 for m in moments if m[4])} after a "  # noqa: T201 - the figures
          "completed step, each loaded by LoraLoader with every key")


def test_kill_9_during_writes_leaves_no_corrupt_file_and_restart_cleans_up(rig: Rig):
    kills = [  # (write under way, armed text for the rename, graph)
        ("saving the LoRA", "kill/save_final.safetensors", _graph("kill/save", save="kill/save_final")),
        ("writing a checkpoint", "kill/ckpt/checkpoints/step_000004", _graph("kill/ckpt", checkpoint_every=2)),
        ("writing a cache entry", "latents/", _graph("kill/cache", cache="rel_cache_kill")),
    ]
    for write, text, graph in kills:
        rig.arm("replace", text)
        rig.queue(graph)
        rig.wait_reached("replace")
        rig.kill()
        assert _temp_files(rig.base), f"the kill during {write} came before its temporary file existed"
        rig.start()
        assert _temp_files(rig.loras) == [] and _temp_files(rig.output / "lora_trainer") == [], write
    assert not (rig.loras / "kill" / "save_final.safetensors").exists()
    # the kept copy Train wrote before the killed save is whole
    assert _steps_of(rig.loras / "kill" / "save_partial.safetensors") == 6
    assert (rig.output / "lora_trainer" / "kill" / "ckpt" / "checkpoints" / "step_000002").is_dir()

    # after the restart: the killed checkpoint run resumes from its last whole checkpoint; the cache is re-used
    # (the killed cache write is swept when the node opens the folder), and a damaged entry is rebuilt
    entry = next((rig.output / "rel_cache" / "latents").rglob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[:100])
    rig.new_log()
    status, error = rig.run(_graph("kill/ckpt", checkpoint_every=2, resume=True))
    assert status == "success", error
    log = rig.new_log()
    assert "is damaged; encoding it again" in log and "resumed from step 2" in log, log[-3000:]
    assert re.search(r"encoded_images=1, encoded_texts=0, reused=[1-9]\d*, rebuilt_corrupt=1", log), log[-3000:]
    status, error = rig.run(_graph("kill/cache", cache="rel_cache_kill"))
    assert status == "success", error
    assert _temp_files(rig.output / "rel_cache_kill") == []
    corrupt = _corrupt(rig.loras) + _corrupt(rig.output)
    print(f"\nkill -9: {len(kills)} kills (save, checkpoint, cache entry); corrupt files at final paths: "  # noqa: T201 - the figures
          f"{len(corrupt)}; temporary files left after restart: 0")
    assert corrupt == []


def test_results_follow_the_files_between_prompts(rig: Rig):
    folder = rig.base / "input" / "rel_changing"
    make_demo_dataset(folder, count=2, size=128)
    graph = _graph("follow/run", steps=2, folder="rel_changing", cache="rel_cache_follow")
    assert rig.run(graph)[0] == "success"
    tags = _tags(rig.loras / "follow" / "run.safetensors")
    assert not any("newtag" in counts for counts in tags.values())

    # a new image and caption: the same prompt scans again
    shutil.copy(folder / "zkx_000.png", folder / "added.png")
    (folder / "added.txt").write_text("newtag, a ring")
    assert rig.run(graph)[0] == "success"
    tags = _tags(rig.loras / "follow" / "run.safetensors")
    assert any(counts.get("newtag") == 1 for counts in tags.values()), tags

    # a cache entry damaged while Encode Latents Cache's result is cached: found and rebuilt before training
    for entry in (rig.output / "rel_cache_follow" / "text").rglob("*.safetensors"):
        entry.write_bytes(b"damaged")
    rig.new_log()
    graph["4"]["inputs"]["steps"] = 3  # only Train's input changes
    status, error = rig.run(graph)
    assert status == "success", error
    assert "is damaged; encoding it again" in rig.new_log()
    assert _steps_of(rig.loras / "follow" / "run.safetensors") == 3
