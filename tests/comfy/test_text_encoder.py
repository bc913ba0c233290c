"""Text-encoder LoRA (te_learning_rate) on SD1.5, SD2 and SDXL through the nodes, with their tiny ComfyUI CLIPs:
the CLIP trains beside the UNet, the file keeps its layers as lora_te_ / lora_te1_ / lora_te2_, ComfyUI's key maps
read every tensor of it, the stock LoraLoader (model + clip) gives exactly Apply LoRA's model and CLIP, that CLIP
equals the live adapter's encoding, diffusers places every key, and the LoRA continues."""

from __future__ import annotations

import re

import pytest
import torch

from scripts.tiny_families import tiny_model
from tests.comfy.conftest import run_node
from tests.comfy.test_families import _diffusers_model, _encoded, _encoders, _free_encoders  # noqa: F401 (fixture)

TE_LAYERS = 3 * 6  # per CLIP: 3 tiny layers × q/k/v/out + fc1/fc2
FILE_PREFIXES = {"SD15": {"lora_te_": TE_LAYERS}, "SD2-v": {"lora_te_": TE_LAYERS},
                 "SDXL": {"lora_te1_": TE_LAYERS, "lora_te2_": TE_LAYERS}}
CAPTION = "zkx pattern, (rings:1.2)"


def _train(comfy, family, **settings):
    model, encoded = tiny_model(family), _encoded(comfy, family)
    clip, _ = _encoders(family)
    options = dict(model=model, encoded=encoded, steps=30, learning_rate=1e-2, rank=4, alpha=2.0,
                   targets="attention+mlp", objective="auto", batch_size=2, seed=0, name=f"tests/te_{family}",
                   clip=clip, te_learning_rate=5e-3) | settings
    lora, _, report, _ = run_node(comfy, "LoraTrainerTrain", **options)
    return model, clip, lora, report


def _encode(clip, text=CAPTION) -> torch.Tensor:
    return clip.encode_from_tokens(clip.tokenize(text))


@pytest.mark.parametrize("family", list(FILE_PREFIXES))
def test_the_text_encoder_trains_and_the_stock_loader_gives_apply_loras_model_and_clip(comfy, pack, family):
    import folder_paths
    from comfy import lora as comfy_lora
    from comfy import model_management as mm
    from comfy import utils as comfy_utils

    text_encoder = pack.training.lora.TEXT_ENCODER
    model, clip, lora, report = _train(comfy, family)
    te_layers = {name: layer for name, layer in lora.layers.items() if name.startswith(text_encoder)}
    assert len(te_layers) == sum(FILE_PREFIXES[family].values()), sorted(te_layers)[:4]
    assert f"{len(te_layers)} of the layers in the text encoder at lr 0.005" in report, report
    probe = re.search(r"probe loss ([\d.]+) -> ([\d.]+)", report)
    assert float(probe[2]) < 0.9 * float(probe[1]), report

    # the live adapter's encoding (what training saw), before any patch reaches the CLIP's weights
    encoder = pack.glue.bridge.ComfyTextEncoder(clip, "attention+mlp")
    base = _encode(clip)
    with torch.inference_mode(False), torch.no_grad(), pack.training.lora.LoraAttachment(
            encoder.module, encoder.targets, rank=lora.rank, alpha=lora.alpha,
            initial=pack.training.lora.split_layers(lora.layers)[text_encoder]):
        live, _ = encoder.encode(CAPTION)
    assert (live - base).abs().max() > 1e-2  # the text encoder's output changed

    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name=f"tests/te_{family}", format="auto",
                       precision="fp32")
    sd, metadata = comfy_utils.load_torch_file(path, safe_load=True, return_metadata=True)
    for prefix, count in FILE_PREFIXES[family].items():
        assert len({k.split(".")[0] for k in sd if k.startswith(prefix)}) == count, (prefix, sorted(sd)[:4])
    assert (metadata["ss_text_encoder_lr"], metadata["ss_network_train_unet_only"]) == ("0.005", "False")
    key_map = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, comfy_lora.model_lora_keys_unet(model.model, {}))
    patches = comfy_lora.load_lora(sd, key_map)
    loaded = {k for k in sd for file_key, model_key in key_map.items()
              if model_key in patches and k.startswith(file_key + ".")}
    assert loaded == set(sd), f"not loaded: {sorted(set(sd) - loaded)[:5]}"
    assert len(patches) == len(lora.layers)

    name = f"tests/te_{family}.safetensors"
    assert name in folder_paths.get_filename_list("loras")
    stock_model, stock_clip = run_node(comfy, "LoraLoader", model=model, clip=clip, lora_name=name,
                                       strength_model=1.0, strength_clip=0.8)
    applied_model, applied_clip = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=1.0,
                                           clip=clip, strength_clip=0.8)
    assert torch.equal(_encode(stock_clip), _encode(applied_clip))
    _, full_clip = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=1.0, clip=clip,
                            strength_clip=1.0)
    torch.testing.assert_close(_encode(full_clip), live, atol=3e-3, rtol=1e-3)  # fp16 weights merged: rounding
    for patched in (stock_model, applied_model):
        mm.load_models_gpu([patched], force_full_load=True)
        weights = {k: v.clone() for k, v in patched.model.diffusion_model.state_dict().items()}
        if patched is stock_model:
            stock_weights = weights
    assert all(torch.equal(stock_weights[k], weights[k]) for k in weights)
    assert torch.equal(_encode(clip), base)  # the CLIP given is left as it was
    mm.unload_all_models()


@pytest.mark.parametrize("family", ["SD15", "SDXL"])
def test_diffusers_places_every_key_of_the_file(comfy, family, caplog):
    """The same file through diffusers' own loaders: the UNet's and each text encoder's layers (transformers' CLIP
    of the tiny CLIP's sizes)."""
    import diffusers.utils.logging
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _, _, lora, _ = _train(comfy, family, steps=2)
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name=f"tests/te_diffusers_{family}", format="auto",
                       precision="fp32")
    unet, loader = _diffusers_model(family)
    width = 64 if family == "SD15" else 32
    config = CLIPTextConfig(hidden_size=width, intermediate_size=2 * width, num_attention_heads=2,
                            num_hidden_layers=3, projection_dim=width)
    encoders = {"text_encoder": CLIPTextModel(config)}
    if family == "SDXL":
        encoders["text_encoder_2"] = CLIPTextModelWithProjection(config)
    ids = torch.tensor([[49406, 320, 1125, 49407]])
    before = {name: encoder(ids).last_hidden_state for name, encoder in encoders.items()}
    diffusers.utils.logging.enable_propagation()
    with caplog.at_level("WARNING"):
        state_dict, alphas = loader.lora_state_dict(path, **({"unet_config": unet.config} if family == "SDXL" else {}))
        loader.load_lora_into_unet(state_dict, alphas, unet)
        for name, encoder in encoders.items():
            loader.load_lora_into_text_encoder(state_dict, alphas, encoder, prefix=name)
    problems = [r.getMessage() for r in caplog.records if "key" in r.getMessage().lower()]
    assert not problems, problems[:3]
    adapted = {name: sum(1 for m in encoder.modules() if hasattr(m, "lora_A") and m.lora_A)
               for name, encoder in {"unet": unet, **encoders}.items()}
    te = sum(name.startswith("text_encoders.") for name in lora.layers)
    assert adapted == {"unet": len(lora.layers) - te, **dict.fromkeys(encoders, te // len(encoders))}, adapted
    for name, encoder in encoders.items():
        assert not torch.allclose(encoder(ids).last_hidden_state, before[name])


def test_a_lora_with_text_encoder_layers_continues_from_its_file(comfy):
    model, clip, first, report = _train(comfy, "SD15", steps=10)
    run_node(comfy, "LoraTrainerSave", lora=first, name="tests/te_continue", format="auto", precision="fp32")
    trained = float(re.search(r"probe loss [\d.]+ -> ([\d.]+)", report)[1])
    encoded = _encoded(comfy, "SD15")
    common = dict(model=model, encoded=encoded, steps=4, learning_rate=1e-2, rank=16, alpha=0.0, targets="attention+mlp",
                  objective="auto", batch_size=2, seed=0, name="tests/te_continued",
                  continue_from="tests/te_continue.safetensors")
    with pytest.raises(ValueError, match=r"18 text-encoder layers; to train them on, set te_learning_rate \(with "
                                         r"Train LoRA's clip connected\)"):
        run_node(comfy, "LoraTrainerTrain", **common, clip=clip)
    with pytest.raises(ValueError, match=r"tensors are not for .*lora_te_.*connect the clip and set te_learning_rate"):
        run_node(comfy, "LoraTrainerTrain", **common)
    lora, _, report, _ = run_node(comfy, "LoraTrainerTrain", **common, clip=clip, te_learning_rate=5e-3)
    start = float(re.search(r"probe loss ([\d.]+) ->", report)[1])
    assert start == pytest.approx(trained, abs=1e-4), report  # where the file left it, text encoder included
    assert sorted(lora.layers) == sorted(first.layers) and lora.rank == 4


def test_text_encoder_training_is_refused_without_a_clip_or_for_other_families(comfy, pack):
    model, encoded = tiny_model("SD15"), _encoded(comfy, "SD15")
    with pytest.raises(ValueError, match="te_learning_rate is set but clip is not connected"):
        run_node(comfy, "LoraTrainerTrain", model=model, encoded=encoded, steps=1, learning_rate=1e-2, rank=2,
                 alpha=0.0, targets="attention", objective="auto", batch_size=2, seed=0, name="tests/te_refused",
                 te_learning_rate=1e-4)
    families = {family.name: family for family in pack.glue.families.FAMILIES}
    with pytest.raises(ValueError, match="FLUX.1's text encoder is not trained here. Set te_learning_rate to 0"):
        pack.glue.train_node._text_encoder(None, families["FLUX.1"], "attention", 1e-4)
    assert pack.glue.train_node._text_encoder(None, families["FLUX.1"], "attention", 0.0) is None


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_every_adapter_kind_trains_the_text_encoder_and_loads_in_the_stock_loader(comfy, pack, kind):
    from comfy import lora as comfy_lora
    from comfy import model_management as mm
    from comfy import utils as comfy_utils

    model, clip, lora, _ = _train(comfy, "SD15", steps=10, adapter=kind, learning_rate=3e-2, te_learning_rate=3e-2,
                                  alpha=4.0, name=f"tests/te_{kind}")
    assert {layer.kind for layer in lora.layers.values()} == {kind}
    (path,) = run_node(comfy, "LoraTrainerSave", lora=lora, name=f"tests/te_{kind}", format="auto", precision="fp32")
    sd = comfy_utils.load_torch_file(path, safe_load=True)
    key_map = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, {})
    te_keys = {k for k in sd if k.startswith("lora_te_")}
    patches = comfy_lora.load_lora({k: sd[k] for k in te_keys}, key_map)
    assert len(patches) == TE_LAYERS and {p.name for p in patches.values()} == {"lora" if kind == "dora" else kind}
    _, stock_clip = run_node(comfy, "LoraLoader", model=model, clip=clip, lora_name=f"tests/te_{kind}.safetensors",
                             strength_model=1.0, strength_clip=1.0)
    _, applied_clip = run_node(comfy, "LoraTrainerApply", model=model, lora=lora, strength=1.0, clip=clip,
                               strength_clip=1.0)
    assert torch.equal(_encode(stock_clip), _encode(applied_clip))
    assert (_encode(applied_clip) - _encode(clip)).abs().max() > 1e-3
    mm.unload_all_models()
