"""One definition of the training options: the Train LoRA node's inputs take their default, range, choices and
help from TrainConfig, the shipped workflows take the node's defaults unless their description sets a value, and
a node left at its defaults trains with TrainConfig's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts.make_workflows import WORKFLOWS
from tests.comfy.conftest import run_node

SHIPPED = Path(__file__).resolve().parents[2] / "workflows"


def _node_inputs(comfy) -> dict:
    types = comfy.NODE_CLASS_MAPPINGS["LoraTrainerTrain"].INPUT_TYPES()
    return {**types["required"], **types["optional"]}


def test_the_train_node_inputs_are_train_config_settings(comfy, pack):
    options = pack.training.config.TrainConfig.options()
    inputs = _node_inputs(comfy)
    shared = [name for name in inputs if name in options and name != "alpha"]
    assert len(shared) == 26, shared  # all but model, encoded, targets, name, alpha, guidance, budget, resume, clip
    for name in shared:
        default, option = options[name]
        kind, spec = inputs[name]
        assert spec["default"] == default and spec["tooltip"] == option.help, name
        if option.choices:  # a v3 combo: ("COMBO", {"options": [...]})
            assert (kind, spec["options"]) == ("COMBO", list(option.choices)), name
        else:
            assert (spec.get("min"), spec.get("max")) == (option.min, option.max), name


def test_one_sets_the_required_inputs_and_the_optional_widgets_are_advanced(comfy, pack):
    types = comfy.NODE_CLASS_MAPPINGS["LoraTrainerTrain"].INPUT_TYPES()
    assert not any(spec.get("advanced") for _, spec in types["required"].values())
    advanced = [name for name, (_, spec) in types["optional"].items() if spec.get("advanced")]
    assert advanced == [name for name in types["optional"] if name not in ("samples", "initial_lora", "clip")]  # links
    assert len(types["required"]) <= 11, list(types["required"])
    # alpha is explicit: the rank's default, so scale 1 (alpha / rank) as the node comes
    rank, alpha = types["required"]["rank"][1]["default"], types["required"]["alpha"][1]["default"]
    assert alpha == rank == pack.training.config.TrainConfig.options()["rank"][0]


@pytest.mark.parametrize("workflow", sorted(WORKFLOWS))
def test_a_workflow_trains_with_the_defaults_unless_its_description_sets_a_value(comfy, pack, workflow):
    defaults = {name: default for name, (default, _) in pack.training.config.TrainConfig.options().items()}
    node_id, set_here = next((node[0], node[2]) for node in WORKFLOWS[workflow] if node[1] == "LoraTrainerTrain")
    shipped = json.loads((SHIPPED / f"{workflow}_api.json").read_text())[str(node_id)]["inputs"]
    for name in _node_inputs(comfy):
        if name in defaults:
            assert shipped[name] == set_here.get(name, defaults[name]), f"{workflow}: {name}"


def test_settings_left_out_of_a_prompt_are_train_configs_defaults(comfy, pack, sd15, demo_folder):
    """An API prompt may leave out the optional inputs: training then runs with TrainConfig's defaults."""
    model, clip, vae = sd15
    dataset, _ = run_node(comfy, "LoraTrainerLoadDataset", folder="rings", resolution=64, bucket_multiple=64,
                          strict=True, edit_pairs=False, random_crop=False, flip=False)
    encoded, _ = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                          cache_dir="cache_defaults")
    required = dict(steps=2, learning_rate=1e-3, rank=4, alpha=0.0, targets="attention", objective="auto",
                    batch_size=1, seed=0, name="tests/defaults")
    lora, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, **required)
    config = pack.training.config.TrainConfig
    for name in ("lr_schedule", "warmup_steps", "grad_accum", "min_snr_gamma", "noise_offset", "checkpoint_every"):
        assert lora.config[name] == getattr(config, name), name
    assert lora.config["precision"] == "fp32"  # auto: the tiny model's own


def test_a_bad_setting_names_the_node_and_the_input(comfy, sd15, demo_folder):
    model, clip, vae = sd15
    dataset, _ = run_node(comfy, "LoraTrainerLoadDataset", folder="rings", resolution=64, bucket_multiple=64,
                          strict=True, edit_pairs=False, random_crop=False, flip=False)
    encoded, _ = run_node(comfy, "LoraTrainerEncodeLatentsCache", dataset=dataset, vae=vae, clip=clip,
                          cache_dir="cache_defaults")
    with pytest.raises(ValueError, match=r"Train LoRA: warmup_steps must be >= 0, got -3"):
        run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, steps=2, learning_rate=1e-3, rank=4,
                 alpha=0.0, targets="attention", objective="auto", batch_size=1, seed=0, name="tests/bad",
                 warmup_steps=-3)
