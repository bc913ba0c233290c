"""LoRA files: exact round trips, the keys each loader expects, metadata, atomic writes, diffusers' reader."""

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from training import formats
from training.formats import FORMATS, build_metadata, file_module_name, load_lora, save_lora
from training.lora import LoraTensors

ROOT = Path(__file__).resolve().parents[2]
LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


def _layers(alpha: float = 2.5) -> dict[str, LoraTensors]:
    torch.manual_seed(0)
    return {
        LINEAR: LoraTensors(torch.randn(4, 8), torch.randn(6, 4), alpha),
        CONV: LoraTensors(torch.randn(4, 3, 3, 3), torch.randn(5, 4, 1, 1), alpha),
    }


def _delta(lora: LoraTensors) -> torch.Tensor:
    """Effective weight change, as every loader computes it (Conv2d: 1x1 up after a kxk down)."""
    flat = lora.up.flatten(1).float() @ lora.down.flatten(1).float()
    return (flat * lora.scale).reshape(lora.up.shape[0], *lora.down.shape[1:])


def _keys(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_keeps_every_layer(tmp_path, fmt):
    layers = _layers()
    path = save_lora(tmp_path / f"{fmt}.safetensors", layers, format=fmt)
    loaded, metadata = load_lora(path, module_paths=[LINEAR, CONV, "unused.module"])
    assert metadata == {}
    assert sorted(loaded) == sorted(layers)
    for name, lora in layers.items():
        if fmt == "diffusers":  # alpha/rank baked into up: same delta, alpha comes back as rank
            assert loaded[name].alpha == lora.rank
            torch.testing.assert_close(_delta(loaded[name]), _delta(lora))
            torch.testing.assert_close(loaded[name].down, lora.down, rtol=0, atol=0)
        else:
            assert loaded[name].alpha == lora.alpha
            torch.testing.assert_close(loaded[name].down, lora.down, rtol=0, atol=0)
            torch.testing.assert_close(loaded[name].up, lora.up, rtol=0, atol=0)


def test_keys_match_what_the_loaders_read(tmp_path):
    layers = _layers()
    comfy = _keys(save_lora(tmp_path / "c.safetensors", layers, format="comfy"))
    kohya = _keys(save_lora(tmp_path / "k.safetensors", layers, format="kohya"))
    diffusers = _keys(save_lora(tmp_path / "d.safetensors", layers, format="diffusers"))
    assert sorted(comfy) == sorted(
        f"diffusion_model.{m}.{s}"
        for m in (LINEAR, CONV)
        for s in ("lora_down.weight", "lora_up.weight", "alpha")
    )
    kohya_names = (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_resnets_0_conv1",
    )
    assert sorted(kohya) == sorted(
        f"{m}.{s}" for m in kohya_names for s in ("lora_down.weight", "lora_up.weight", "alpha")
    )
    assert sorted(diffusers) == sorted(
        f"transformer.{m}.{s}" for m in (LINEAR, CONV) for s in ("lora_A.weight", "lora_B.weight")
    )
    alpha = kohya[f"{kohya_names[0]}.alpha"]
    assert alpha.shape == () and alpha.dtype == torch.float32 and alpha.item() == 2.5
    assert all(t.is_contiguous() for t in comfy.values())
    assert file_module_name(LINEAR, format="comfy", prefix="transformer") == f"transformer.{LINEAR}"


def test_custom_prefix_and_dtype(tmp_path):
    layers = _layers(alpha=3.0)
    path = save_lora(
        tmp_path / "deep" / "dir" / "x.safetensors",
        layers,
        format="kohya",
        prefix="lora_transformer",
        dtype=torch.bfloat16,
    )
    tensors = _keys(path)
    assert all(key.startswith("lora_transformer_down_blocks_0_") for key in tensors)
    assert {t.dtype for k, t in tensors.items() if k.endswith("weight")} == {torch.bfloat16}
    assert {t.dtype for k, t in tensors.items() if k.endswith("alpha")} == {torch.float32}
    loaded, _ = load_lora(path, [LINEAR, CONV])
    torch.testing.assert_close(loaded[CONV].up, layers[CONV].up.bfloat16(), rtol=0, atol=0)
    assert loaded[CONV].alpha == 3.0


def test_transposed_view_is_saved_contiguous(tmp_path):
    down = torch.randn(8, 4).t()  # a non-contiguous view
    path = save_lora(
        tmp_path / "t.safetensors", {"a.b": LoraTensors(down, torch.randn(3, 4), 4.0)}, format="comfy"
    )
    loaded, _ = load_lora(path)
    torch.testing.assert_close(loaded["a.b"].down, down, rtol=0, atol=0)


def test_without_module_paths_kohya_gives_file_names_and_others_invert(tmp_path):
    layers = _layers()
    kohya, _ = load_lora(save_lora(tmp_path / "k.safetensors", layers, format="kohya"))
    assert sorted(kohya) == [
        "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "down_blocks_0_resnets_0_conv1",
    ]
    comfy, _ = load_lora(save_lora(tmp_path / "c.safetensors", layers, format="comfy", prefix="unet"))
    assert sorted(comfy) == sorted(layers)


def test_unmatched_layer_names_the_key(tmp_path):
    path = save_lora(tmp_path / "k.safetensors", _layers(), format="kohya")
    with pytest.raises(ValueError, match="lora_unet_down_blocks_0_resnets_0_conv1") as error:
        load_lora(path, module_paths=[LINEAR])
    assert "module_paths=None" in str(error.value)


def test_kohya_names_that_collide_are_refused(tmp_path):
    path = save_lora(
        tmp_path / "k.safetensors",
        {"a.b_c": LoraTensors(torch.ones(1, 2), torch.ones(2, 1), 1.0)},
        format="kohya",
    )
    with pytest.raises(ValueError, match="cannot tell them apart"):
        load_lora(path, module_paths=["a.b_c", "a_b.c"])


def test_bad_inputs_say_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="comfy, kohya, diffusers"):
        save_lora(tmp_path / "x.safetensors", _layers(), format="peft")
    with pytest.raises(ValueError, match="empty"):
        save_lora(tmp_path / "x.safetensors", {}, format="comfy")
    with pytest.raises(TypeError, match="ss_steps"):
        save_lora(tmp_path / "x.safetensors", _layers(), format="comfy", metadata={"ss_steps": 10})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_lora(junk)
    assert not (tmp_path / "x.safetensors").exists()


def test_missing_partner_names_the_key(tmp_path):
    import safetensors.torch

    path = tmp_path / "half.safetensors"
    safetensors.torch.save_file(
        {
            "diffusion_model.a.b.lora_down.weight": torch.ones(2, 3),
            "diffusion_model.a.b.alpha": torch.tensor(2.0),
        },
        str(path),
    )
    with pytest.raises(ValueError, match=r"diffusion_model\.a\.b\.lora_down\.weight has no matching up"):
        load_lora(path)


def test_metadata_is_stored_with_kohya_hashes(tmp_path):
    metadata = {"ss_network_dim": "4", "modelspec.title": "x"}
    path = save_lora(tmp_path / "m.safetensors", _layers(), format="kohya", metadata=metadata)
    _, loaded = load_lora(path)
    assert {k: loaded[k] for k in metadata} == metadata
    assert all(isinstance(v, str) for v in loaded.values())
    # sshs_model_hash is A1111's addnet hash of the file: SHA-256 of everything after the header.
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert loaded["sshs_model_hash"] == hashlib.sha256(data[header_end:]).hexdigest()
    assert len(loaded["sshs_legacy_hash"]) == 8
    without, _ = load_lora(save_lora(tmp_path / "plain.safetensors", _layers(), format="kohya"))
    assert without.keys() == load_lora(path)[0].keys()
    with safe_open(str(tmp_path / "plain.safetensors"), framework="pt") as handle:
        assert handle.metadata() is None


def test_build_metadata_has_kohya_and_modelspec_keys():
    metadata = build_metadata(
        base_model_version="sd_v1",
        architecture="stable-diffusion-v1/lora",
        rank=16,
        alpha=8,
        steps=500,
        resolution=(768, 512),
        title="my_lora",
        config={"steps": 500, "lr": 1e-4, "path": Path("/d")},
        tag_frequency={"10_cat": {"cat": 3}},
        trigger="sks cat",
        started_at=1700000000.5,
    )
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "16" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_network_args"] == "{}" and metadata["ss_v2"] == "False"
    assert metadata["ss_base_model_version"] == "sd_v1"
    assert json.loads(metadata["ss_tag_frequency"]) == {"10_cat": {"cat": 3}}
    assert metadata["ss_resolution"] == "(768, 512)" and metadata["modelspec.resolution"] == "768x512"
    assert metadata["ss_steps"] == "500" and metadata["ss_training_started_at"] == "1700000000.5"
    assert metadata["ss_output_name"] == metadata["modelspec.title"] == "my_lora"
    assert metadata["modelspec.sai_model_spec"] == "1.0.1"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.trigger_phrase"] == "sks cat"
    assert metadata["modelspec.implementation"]
    assert time.strptime(metadata["modelspec.date"], "%Y-%m-%dT%H:%M:%S")
    assert metadata["lora_trainer.config"] == '{"lr": 0.0001, "path": "/d", "steps": 500}'
    square = build_metadata(
        base_model_version="flux1",
        architecture="flux-1-dev/lora",
        rank=4,
        alpha=4.0,
        steps=1,
        resolution=1024,
        title="t",
        config={},
    )
    assert square["modelspec.resolution"] == "1024x1024" and "modelspec.trigger_phrase" not in square


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch, failing):
    target = tmp_path / "lora.safetensors"
    target.write_bytes(b"previous version")

    def fail(*args, **kwargs):
        raise OSError(f"simulated {failing} failure")

    monkeypatch.setattr(formats.os, failing, fail)
    with pytest.raises(OSError, match="simulated"):
        save_lora(target, _layers(), format="comfy")
    monkeypatch.undo()
    assert target.read_bytes() == b"previous version"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
    save_lora(target, _layers(), format="comfy")
    assert sorted(load_lora(target)[0]) == sorted(_layers())


def test_killed_writer_never_leaves_a_file_at_the_final_path(tmp_path):
    target = tmp_path / "big.safetensors"
    code = (
        "import torch\n"
        "from training.formats import save_lora\n"
        "from training.lora import LoraTensors\n"
        "n = 1 << 17\n"  # 4 layers x 2 x 32 MiB = 256 MiB of fp32
        "layers = {f'blocks.{i}.proj': LoraTensors(torch.ones(64, n), torch.ones(n, 64), 8.0) for i in range(4)}\n"
        f"save_lora({str(target)!r}, layers, format='comfy')\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    deadline = time.monotonic() + 120
    try:
        while not list(tmp_path.glob(".big.safetensors.*.tmp")):
            assert process.poll() is None, (
                "the writer ended before its temp file was seen; make the file larger"
            )
            assert time.monotonic() < deadline, "the writer never created its temp file"
            time.sleep(0.001)
        process.kill()
    finally:
        process.kill()
        process.wait()
    assert process.returncode != 0
    assert not target.exists()
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_diffusers_reads_our_kohya_sd1_file(tmp_path):
    """diffusers' own kohya converter and UNet loader give the same weight deltas."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    proj_in = "down_blocks.0.attentions.0.proj_in"
    layers = {
        LINEAR: LoraTensors(torch.randn(4, 8), torch.randn(8, 4), 2.0),
        CONV: LoraTensors(torch.randn(4, 8, 3, 3), torch.randn(8, 4, 1, 1), 2.0),
        proj_in: LoraTensors(torch.randn(4, 8, 1, 1), torch.randn(8, 4, 1, 1), 2.0),
    }
    path = save_lora(tmp_path / "sd1.safetensors", layers, format="kohya")
    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    assert sorted(state_dict) == sorted(
        [
            f"unet.{LINEAR.rsplit('.', 1)[0]}.processor.to_q_lora.down.weight",
            f"unet.{LINEAR.rsplit('.', 1)[0]}.processor.to_q_lora.up.weight",
            f"unet.{CONV}.lora.down.weight",
            f"unet.{CONV}.lora.up.weight",
            f"unet.{proj_in}.lora.down.weight",
            f"unet.{proj_in}.lora.up.weight",
        ]
    )
    assert set(alphas.values()) == {2.0}
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state_dict, alphas, unet=unet, adapter_name="ours")
    for name, lora in layers.items():
        module = unet.get_submodule(name)
        delta = module.get_delta_weight("ours")
        torch.testing.assert_close(delta.reshape(_delta(lora).shape), _delta(lora))
