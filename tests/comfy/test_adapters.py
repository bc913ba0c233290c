"""Issue 15's adapter kinds through the nodes: DoRA, LoHa and LoKr learn on the tiny model of every family, ComfyUI's
own key map consumes every tensor of their files as the kind they are, the stock LoraLoader's model equals Apply
LoRA's, and the weights ComfyUI patches in are the ones that trained (LoHa and LoKr exactly; DoRA as ComfyUI
applies it, which normalises by the base weight's row norms where peft and LyCORIS take the updated weight's)."""

from __future__ import annotations

import random
import re

import pytest
import torch

from scripts.tiny_families import TINY, tiny_model
from tests.comfy.conftest import run_node
from tests.comfy.test_families import _encoded, _encoders, _probe_loss, loaded_entirely

KINDS = ("dora", "loha", "lokr")


@pytest.fixture(scope="module", autouse=True)
def _free_encoders():
    yield
    _encoders.cache_clear()  # the families' CLIPs and VAEs, before interpreter exit (as test_families does)


# ComfyUI's adapter class per kind (a DoRA file is a LoRA with dora_scale)
COMFY_ADAPTERS = {"dora": "lora", "loha": "loha", "lokr": "lokr"}
# LoHa and LoKr start from a zero factor in a product and take a higher rate, as LyCORIS advises
LEARNING_RATES = {"dora": 1e-2, "loha": 3e-2, "lokr": 3e-2}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", list(TINY))
def test_each_kind_learns_on_every_family_and_comfyui_loads_all_of_it(comfy, pack, family, kind):
    import folder_paths
    from comfy import model_management as mm
    from comfy import utils as comfy_utils

    model = tiny_model(family)
    encoded = _encoded(comfy, family)
    lora, _, report, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, steps=16,
                                  learning_rate=LEARNING_RATES[kind], rank=4, alpha=0.0, targets="attention", objective="auto",
                                  batch_size=2, seed=0, name=f"tests/{family}_{kind}", adapter=kind)
    probe = re.search(r"probe loss ([\d.]+) -> ([\d.]+)", report)
    assert probe and float(probe[2]) < 0.97 * float(probe[1]), report
    assert report.startswith(f"{lora.family.name} {pack.training.lora.KIND_NAMES[kind]}, "), report

    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name=f"tests/{family}_{kind}", format="auto",
                       precision="fp32")
    sd, metadata = comfy_utils.load_torch_file(path, safe_load=True, return_metadata=True)
    assert metadata["ss_network_module"] == "lycoris.kohya", metadata["ss_network_module"]
    patches = loaded_entirely(model, sd)
    assert len(patches) == len(lora.layers)
    assert {patch.name for patch in patches.values()} == {COMFY_ADAPTERS[kind]}
    if kind == "dora":
        assert all(patch.weights[4] is not None for patch in patches.values())  # dora_scale read

    config = pack.training.config.TrainConfig.from_dict(lora.config)
    batch = encoded.data.collate(list(range(4)), random.Random(0))
    applied, _ = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=1.0)
    after = _probe_loss(pack, applied, batch, config, lora.family.guidance)
    name = f"tests/{family}_{kind}.safetensors"
    assert name in folder_paths.get_filename_list("loras")
    (stock,) = run_node(comfy, "LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)
    assert _probe_loss(pack, stock, batch, config, lora.family.guidance) == after
    mm.unload_all_models()


@pytest.mark.parametrize("kind", KINDS)
def test_comfyui_patches_in_the_weights_that_trained(comfy, pack, kind):
    """The trained module's effective weight (peft's base + delta) against what Apply LoRA gives ComfyUI's model."""
    from comfy import model_management as mm

    model = tiny_model("SD15")
    denoiser = model.model.diffusion_model
    generator = torch.Generator().manual_seed(0)
    with pack.training.lora.LoraAttachment(denoiser, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=2.0,
                                           kind=kind) as attachment:
        with torch.no_grad():
            for param in attachment.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        trained = {name: _effective_weight(denoiser.get_submodule(name), kind) for name in attachment.layers}
        as_comfyui = {name: _effective_weight(denoiser.get_submodule(name), kind, comfyui=True)
                      for name in attachment.layers}
        layers = attachment.tensors()
    lora = pack.glue.lora_nodes.TrainedLora(layers, pack.glue.families.family_of(model), 1,
                                            {"rank": 4, "alpha": 2.0, "adapter": kind}, 64)
    patched, _ = pack.glue.lora_nodes.with_lora(model, lora, 1.0)
    mm.load_models_gpu([patched], force_full_load=True)
    errors, from_trained = [], []
    for name, wanted in as_comfyui.items():
        got = patched.model.diffusion_model.get_submodule(name).weight.float()
        errors.append(((got - wanted).abs().max() / wanted.abs().max()).item())
        from_trained.append(((got - trained[name]).abs().max() / trained[name].abs().max()).item())
    if kind == "dora":  # the difference is ComfyUI's: the test notices when ComfyUI changes its DoRA
        assert max(from_trained) > 1e-4, from_trained
    mm.unload_all_models()
    assert max(errors) <= 1e-6, max(errors)


def _effective_weight(layer, kind: str, comfyui: bool = False) -> torch.Tensor:
    """The weight a peft layer computes with: W + delta; for DoRA m * (W + delta) / ||W + delta|| per output row,
    or, ``comfyui``, as ComfyUI 0.3.75 and 0.33 apply a DoRA file: m * (W + delta) / ||W||."""
    base = layer.get_base_layer().weight.float()
    combined = base + layer.get_delta_weight("default").float()
    if kind != "dora":
        return combined
    magnitude = layer.lora_magnitude_vector["default"].weight.float()
    return combined * (magnitude / (base if comfyui else combined).norm(dim=1)).view(-1, 1)


def _probe(report: str) -> tuple[float, float]:
    found = re.search(r"probe loss ([\d.]+) -> ([\d.]+)", report)
    assert found, report
    return float(found[1]), float(found[2])


@pytest.mark.parametrize("family,kind,layout", [
    ("SD15", "lora", r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)"),
    ("SD15", "loha", r"lora_unet_\w+\.(hada_w[12]_[ab]|alpha)"),
    ("Qwen-Image", "lora", r"diffusion_model\.[\w.]+\.lora_[AB]\.weight")])
def test_training_continues_from_a_file_where_the_file_left_it(comfy, pack, family, kind, layout):
    """Ours in kohya's layout (SD1.5, LoRA and LoHa) and one in diffusers/peft keys (Qwen-Image's): the continued
    run's loss at the fixed probes starts at the file's (the first run's last), not at the base model's, and falls
    on from there; the kind, rank and alpha are the file's."""
    from comfy import utils as comfy_utils

    model, encoded = tiny_model(family), _encoded(comfy, family)
    common = dict(model=model, encoded=encoded, learning_rate=LEARNING_RATES.get(kind, 1e-2), alpha=0.0,
                  targets="attention", objective="auto", batch_size=2, seed=0)
    first, _, report, _ = run_node(comfy, "LoraTrainerTrain", **common, steps=12, rank=4, name=f"tests/{family}_src",
                                   adapter=kind)
    base, trained = _probe(report)
    (path,) = run_node(comfy, "LoraTrainerSave", lora=first, name=f"tests/{family}_src", format="auto",
                       precision="fp32")
    assert all(re.fullmatch(layout, key) for key in comfy_utils.load_torch_file(path)), "the layout under test"
    sources = {"continue_from": f"tests/{family}_src.safetensors", "initial_lora": first}
    for source, value in sources.items():
        # the node's rank and adapter give way to the file's
        lora, _, report, _ = run_node(comfy, "LoraTrainerTrain", **common, steps=6, rank=16, adapter="lora",
                                      name=f"tests/{family}_on", **{source: value})
        start, end = _probe(report)
        assert start == pytest.approx(trained, abs=1e-4) and abs(start - base) > 1e-3, (source, base, trained, start)
        assert end < start, report
        assert (lora.kind, lora.rank) == (kind, 4) and sorted(lora.layers) == sorted(first.layers)


def test_a_file_that_cannot_continue_says_which_layers(comfy, pack):
    import safetensors.torch

    model, encoded = tiny_model("SD15"), _encoded(comfy, "SD15")
    first, _, _, _ = run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, learning_rate=1e-2, alpha=0.0,
                              targets="attention", objective="auto", batch_size=2, seed=0, steps=1, rank=2,
                              name="tests/cannot")
    tensors = pack.glue.lora_nodes.file_tensors(first)
    folder = comfy.base / "loras" / "tests"
    folder.mkdir(exist_ok=True)
    with_te = dict(tensors, **{"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
                               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)})
    safetensors.torch.save_file(with_te, str(folder / "with_te.safetensors"))
    common = dict(model=model, encoded=encoded, learning_rate=1e-2, alpha=0.0, targets="attention",
                  objective="auto", batch_size=2, seed=0, steps=1, rank=2, name="tests/cannot")
    with pytest.raises(ValueError, match=r"Train LoRA: with_te.safetensors: 2 of its tensors are not for .*"
                                         r"lora_te_text_model_encoder_layers_0_mlp_fc1"):
        run_node(comfy, "LoraTrainerTrain", **common, continue_from="tests/with_te.safetensors")
    prefix = sorted(tensors)[0].rsplit(".", 2)[0]  # a LoCon layer in Tucker form: lora_mid between down and up
    safetensors.torch.save_file(dict(tensors, **{f"{prefix}.lora_mid.weight": torch.zeros(2, 2, 1, 1)}),
                                str(folder / "tucker.safetensors"))
    with pytest.raises(ValueError, match=r"tucker.safetensors: diffusion_model\..* has lora_mid \(LoCon's Tucker "
                                         r"form\), which Train LoRA cannot continue"):
        run_node(comfy, "LoraTrainerTrain", **common, continue_from="tests/tucker.safetensors")
    layer = sorted(first.layers)[0]
    weight = model.model.diffusion_model.get_submodule(layer).weight
    safetensors.torch.save_file({f"diffusion_model.{layer}.diff": torch.zeros_like(weight)},
                                str(folder / "diff.safetensors"))
    with pytest.raises(ValueError, match=rf"diff.safetensors: layer 'diffusion_model.{re.escape(layer)}.weight' is "
                                         "a diff patch, which Train LoRA cannot continue"):
        run_node(comfy, "LoraTrainerTrain", **common, continue_from="tests/diff.safetensors")
    # a file saved again under the same name trains again: ComfyUI's cache key follows the file
    train = comfy.NODE_CLASS_MAPPINGS["LoraTrainerTrain"]
    before = train.fingerprint_inputs(continue_from="tests/diff.safetensors")
    safetensors.torch.save_file({f"diffusion_model.{layer}.diff": torch.ones_like(weight),
                                 f"diffusion_model.{layer}.diff_b": torch.ones(weight.shape[0])},  # size changes too
                                str(folder / "diff.safetensors"))
    assert train.fingerprint_inputs(continue_from="tests/diff.safetensors") != before
    assert train.fingerprint_inputs(continue_from="none") == "none"
    with pytest.raises(ValueError, match="continue_from and initial_lora are both set"):
        run_node(comfy, "LoraTrainerTrain", **common, continue_from="tests/with_te.safetensors", initial_lora=first)
