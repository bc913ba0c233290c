"""LoRA files: exact round trips, the keys each loader expects, metadata, atomic writes, diffusers' reader."""

import datetime
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from training import formats
from training.captions import CaptionPolicy
from training.config import TrainConfig
from training.denoiser import NoiseSchedule
from training.formats import FORMATS, RunInfo, build_metadata, file_module_name, load_lora, save_lora
from training.lora import LoraTensors
from training.optim import OPTIMIZERS, make_optimizer

ROOT = Path(__file__).resolve().parents[2]
LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"


def _layers(alpha: float = 2.5) -> dict[str, LoraTensors]:
    torch.manual_seed(0)
    return {
        LINEAR: LoraTensors.lora(torch.randn(4, 8), torch.randn(6, 4), alpha),
        CONV: LoraTensors.lora(torch.randn(4, 3, 3, 3), torch.randn(5, 4, 1, 1), alpha),
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
        tmp_path / "t.safetensors", {"a.b": LoraTensors.lora(down, torch.randn(3, 4), 4.0)}, format="comfy"
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
        {"a.b_c": LoraTensors.lora(torch.ones(1, 2), torch.ones(2, 1), 1.0)},
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


def test_missing_partner_names_the_layer(tmp_path):
    import safetensors.torch

    path = tmp_path / "half.safetensors"
    safetensors.torch.save_file(
        {
            "diffusion_model.a.b.lora_down.weight": torch.ones(2, 3),
            "diffusion_model.a.b.alpha": torch.tensor(2.0),
        },
        str(path),
    )
    with pytest.raises(ValueError, match=r"diffusion_model\.a\.b is a lora layer without lora_up\.weight"):
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
        run=RunInfo(started_at=1700000000.5),
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
    assert metadata["ss_training_comment"] == "trigger: sks cat"
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
    assert square["ss_training_comment"] == "None" and square["ss_learning_rate"] == "None"  # kohya's unset values


# What a run of 3 images (one wide) in a kohya "3_cat" folder and 2 in the dataset's own folder looks like.
RUN = RunInfo(
    base_model="sd15.safetensors",
    dataset="cats",
    dataset_dirs={"3_cat": (3, 3), "cats": (1, 2)},
    buckets={(512, 512): 8, (768, 320): 3},
    mean_ar_error=0.05,
    flip=True,
    caption=CaptionPolicy(dropout=0.1, trigger="sks cat", shuffle=True, keep_tokens=1),
    caption_variants=4,
    started_at=1700000000.5,
    finished_at=1700000600.25,
    session_id=1234,
)


def _full_metadata(**settings) -> dict[str, str]:
    config = TrainConfig(steps=100, learning_rate=5e-5, batch_size=2, grad_accum=2, seed=42, warmup_steps=10,
                         lr_schedule="cosine", lora_dropout=0.1, noise_offset=0.05, **settings)
    config = config.for_model("eps", NoiseSchedule(), torch.float16)
    return build_metadata(base_model_version="sd_v1", architecture="stable-diffusion-v1/lora", rank=8, alpha=4.0,
                          steps=60, resolution=512, title="cat", config=config.to_dict(),
                          tag_frequency={"3_cat": {"cat": 3}}, run=RUN)


def test_metadata_tells_the_text_encoder_rate_and_stop_step_as_kohya_does():
    metadata = _full_metadata(te_learning_rate=2e-5, te_stop_step=40)
    assert {k: metadata[k] for k in ("ss_unet_lr", "ss_text_encoder_lr", "ss_network_train_unet_only",
                                     "ss_stop_text_encoder_training")} == {
        "ss_unet_lr": "5e-05", "ss_text_encoder_lr": "2e-05", "ss_network_train_unet_only": "False",
        "ss_stop_text_encoder_training": "40"}


def test_metadata_has_every_key_a1111_civitai_and_kohya_read_in_their_formats():
    metadata = _full_metadata()
    assert all(isinstance(v, str) for v in metadata.values())
    expected = {
        "ss_session_id": "1234", "ss_training_started_at": "1700000000.5", "ss_training_finished_at": "1700000600.25",
        "ss_sd_model_name": "sd15.safetensors", "ss_clip_skip": "None", "ss_learning_rate": "5e-05",
        "ss_unet_lr": "5e-05", "ss_text_encoder_lr": "None", "ss_network_train_unet_only": "True",
        "ss_stop_text_encoder_training": "None", "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01)", "ss_seed": "42",
        "ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": "10", "ss_gradient_accumulation_steps": "2",
        "ss_max_train_steps": "100", "ss_steps": "60", "ss_batch_size_per_device": "2", "ss_total_batch_size": "4",
        "ss_min_snr_gamma": "5.0", "ss_noise_offset": "0.05", "ss_max_grad_norm": "1.0", "ss_mixed_precision": "fp16",
        "ss_network_dropout": "0.1", "ss_caption_dropout_rate": "0.1", "ss_shuffle_caption": "True",
        "ss_keep_tokens": "2",  # kohya counts the trigger (one comma-separated tag) too
        "ss_flip_aug": "True", "ss_random_crop": "False", "ss_num_train_images": "11", "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": "6",  # 8 square images in 4 batches, 3 wide ones in 2
        "ss_num_epochs": "34", "ss_epoch": "20",  # 4 batches a step: 100 steps = 400 batches = 33.3 epochs
        "ss_training_comment": "trigger: sks cat", "ss_cache_latents": "True", "ss_enable_bucket": "True",
        "modelspec.prediction_type": "epsilon", "modelspec.trigger_phrase": "sks cat",
    }
    assert {key: metadata.get(key) for key in expected} == expected
    assert json.loads(metadata["ss_dataset_dirs"]) == {"3_cat": {"n_repeats": 3, "img_count": 3},
                                                       "cats": {"n_repeats": 1, "img_count": 2}}
    assert json.loads(metadata["ss_bucket_info"]) == {
        "buckets": {"0": {"resolution": [512, 512], "count": 8}, "1": {"resolution": [768, 320], "count": 3}},
        "mean_img_ar_error": 0.05,
    }
    assert json.loads(metadata["lora_trainer.run"]) == {
        "base_model": "sd15.safetensors", "dataset": "cats", "bucket_multiple": 64, "flip": True,
        "random_crop": False, "guidance": None,
        "caption": {"trigger": "sks cat", "dropout": 0.1, "shuffle": True, "keep_tokens": 1, "variants": 4},
    }
    assert json.loads(metadata["lora_trainer.config"])["learning_rate"] == 5e-5
    # numbers parse as numbers; A1111 shows the training date from the start time
    for key in ("ss_learning_rate", "ss_training_started_at", "ss_training_finished_at", "ss_max_grad_norm"):
        float(metadata[key])
    assert datetime.datetime.fromtimestamp(float(metadata["ss_training_started_at"])).year == 2023


def test_metadata_of_a_flow_model_and_kohyas_names_for_our_options():
    flow = TrainConfig(optimizer="sgd", precision="fp32", min_snr_gamma=5.0).for_model("flow", NoiseSchedule(),
                                                                                      torch.bfloat16)
    metadata = build_metadata(base_model_version="flux1", architecture="flux-1-dev/lora", rank=4, alpha=4.0,
                              steps=1, resolution=1024, title="t", config=flow.to_dict())
    assert metadata["modelspec.prediction_type"] == "flow"
    assert metadata["ss_min_snr_gamma"] == "None"  # off: kohya's None (0 would weight every loss by 0)
    assert metadata["ss_mixed_precision"] == "no"
    assert metadata["ss_optimizer"] == "torch.optim.sgd.SGD(momentum=0.9,weight_decay=0.01)"
    assert metadata["ss_sd_model_name"] == "None" and metadata["ss_num_train_images"] == "0"
    assert "modelspec.trigger_phrase" not in metadata and metadata["ss_training_comment"] == "None"
    huber = build_metadata(base_model_version="sd_v1", architecture="stable-diffusion-v1/lora", rank=4, alpha=4.0,
                           steps=1, resolution=512, title="t", config={"loss": "mse", "huber_c": 0.1,
                                                                       "huber_schedule": "snr"})
    assert (huber["ss_loss_type"], huber["ss_huber_c"], huber["ss_huber_schedule"]) == ("l2", "0.1", "snr")


def test_kohya_optimizer_names_are_the_classes_the_optimizers_are():
    """ss_optimizer names the class make_optimizer builds (kohya's module.Class form)."""
    for name, spec in OPTIMIZERS.items():
        if spec.missing():
            continue
        built = type(make_optimizer(name, [torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.0))
        assert spec.kohya_name(0.0).startswith(f"{built.__module__}.{built.__name__}("), name


def _addnet_hash_safetensors(data: bytes) -> str:
    """A1111 modules/hashes.py and kohya train_util.addnet_hash_safetensors: SHA-256 of what follows the header."""
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length:]).hexdigest()


def _addnet_hash_legacy(data: bytes) -> str:
    """kohya train_util.addnet_hash_legacy: SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex digits."""
    return hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_stored_hashes_are_the_ones_a1111_and_kohya_compute(tmp_path):
    """Read back from disk and recomputed the loaders' way: A1111's addnet hash of the file itself, and kohya's
    legacy hash of the file written with its ss_* metadata only (as precalculate_safetensors_hashes does)."""
    torch.manual_seed(0)
    big = {f"blocks.{i}.proj": LoraTensors.lora(torch.randn(8, 20_000), torch.randn(20_000, 8), 8.0) for i in range(2)}
    path = save_lora(tmp_path / "big.safetensors", big, format="kohya", metadata=_full_metadata())
    data = path.read_bytes()
    assert len(data) > 0x110000  # the legacy hash reads real bytes
    assert data[8:10] == b'{"'  # A1111's read_metadata_from_safetensors requires this start
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    stored = header["__metadata__"]
    assert stored["sshs_model_hash"] == _addnet_hash_safetensors(data)
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    training_only = safetensors.torch.save(tensors, {k: v for k, v in stored.items() if k.startswith("ss_")})
    assert stored["sshs_legacy_hash"] == _addnet_hash_legacy(training_only)
    assert _addnet_hash_safetensors(training_only) == stored["sshs_model_hash"]


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
        "layers = {f'blocks.{i}.proj': LoraTensors.lora(torch.ones(64, n), torch.ones(n, 64), 8.0) for i in range(4)}\n"
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
        LINEAR: LoraTensors.lora(torch.randn(4, 8), torch.randn(8, 4), 2.0),
        CONV: LoraTensors.lora(torch.randn(4, 8, 3, 3), torch.randn(8, 4, 1, 1), 2.0),
        proj_in: LoraTensors.lora(torch.randn(4, 8, 1, 1), torch.randn(8, 4, 1, 1), 2.0),
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
