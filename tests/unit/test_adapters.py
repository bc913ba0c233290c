"""Issue 15's adapter kinds: LoRA, DoRA, LoHa and LoKr train through peft, are saved under the names ComfyUI and
LyCORIS read, read back to the same tensors, load into a model exactly and resume exactly."""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_recipes import _stopped_and_resumed
from tests.unit.toy import ToyDenoiser, ToyNet, toy_data
from training.config import TrainConfig
from training.formats import build_metadata, load_lora, save_lora, to_state_dict
from training.loop import train
from training.lora import KINDS, LoraAttachment, LoraTensors, adapter_settings

BASE = dict(objective="ddpm-eps", targets=("to_q", "to_k"), rank=4, batch_size=2, log_every=5, seed=3,
            learning_rate=3e-2, grad_accum=2, lr_schedule="constant", warmup_steps=4)
# The names after the layer's in a file, per kind (LyCORIS's for the last three), for the toy's 16x16 and 16x8
# layers at rank 4. LoKr splits 16 = 4 x 4 and 8 = 2 x 4: both factors are full (rank >= half their sizes).
FILE_NAMES = {"lora": {"lora_down.weight", "lora_up.weight"},
              "dora": {"lora_down.weight", "lora_up.weight", "dora_scale"},
              "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
              "lokr": {"lokr_w1", "lokr_w2"}}


def _max_diff(a: dict[str, LoraTensors], b: dict[str, LoraTensors]) -> float:
    assert a.keys() == b.keys()
    assert all(a[k].tensors.keys() == b[k].tensors.keys() for k in a)
    return max((a[k].tensors[n] - b[k].tensors[n]).abs().max().item() for k in a for n in a[k].tensors)


def _net() -> ToyNet:
    torch.manual_seed(0)  # the same base weights every time
    return ToyNet()


def _trained(kind: str, seed: int = 0, rank: int = 4, alpha: float = 2.0):
    """A toy net with a ``kind`` adapter on to_q and to_k whose weights were moved off their (zero-delta) start."""
    net = _net()
    attachment = LoraAttachment(net, ["to_q", "to_k"], rank=rank, alpha=alpha, kind=kind)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in attachment.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return net, attachment


def _inputs():
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 500]),
            torch.randn(2, 3, 8, generator=generator))


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_learns_and_resumes_exactly(tmp_path, kind):
    whole = train(TrainConfig(**BASE, adapter=kind, steps=60), ToyDenoiser(), toy_data(5))
    assert whole.probe_drop > 0.05, whole.probe
    assert {layer.kind for layer in whole.lora.values()} == {kind}
    config = TrainConfig(**BASE, adapter=kind, steps=60, checkpoint_every=20, checkpoint_dir=str(tmp_path))
    first, resumed = _stopped_and_resumed(config, 40)
    assert _max_diff(resumed.lora, whole.lora) <= 1e-6
    assert _max_diff(first.lora, whole.lora) > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_step_zero_is_the_base_model_and_removal_restores_it(kind):
    net = _net()
    before = net(*_inputs())
    with LoraAttachment(net, ["to_q", "to_k"], rank=4, alpha=4.0, kind=kind) as attachment:
        assert torch.equal(net(*_inputs()), before)
        assert attachment.parameters() and all(p.requires_grad for p in attachment.parameters())
    assert torch.equal(net(*_inputs()), before) and isinstance(net.to_q, torch.nn.Linear)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("format", ["comfy", "kohya"])
def test_a_saved_adapter_reads_back_and_loads_into_a_model_exactly(tmp_path, kind, format):
    net, attachment = _trained(kind)
    wanted = net(*_inputs())
    layers = attachment.tensors()
    assert all(set(layer.tensors) == FILE_NAMES[kind] for layer in layers.values())
    path = save_lora(tmp_path / "a.safetensors", layers, format=format)
    read, _ = load_lora(path, sorted(layers))
    assert _max_diff(read, layers) == 0 and {layer.alpha for layer in read.values()} == {2.0}
    fresh = _net()
    with LoraAttachment(fresh, ["to_q", "to_k"], rank=4, alpha=2.0, kind=kind) as again:
        again.load(read)
        assert torch.allclose(fresh(*_inputs()), wanted, atol=1e-6)


def test_dora_scale_is_one_magnitude_per_output_row_shaped_for_comfyui():
    """A 1-D dora_scale meets a ComfyUI bug (it broadcasts over the whole matrix): LyCORIS's [out, 1] it is. At the
    start it is the norm of each of the base weight's rows."""
    net = _net()
    with LoraAttachment(net, ["to_q", "to_k"], rank=4, alpha=4.0, kind="dora") as attachment:
        layers = attachment.tensors()
    for name in ("to_q", "to_k"):
        weight = getattr(net, name).weight
        assert layers[name].tensors["dora_scale"].shape == (weight.shape[0], 1)
        assert torch.allclose(layers[name].tensors["dora_scale"][:, 0], weight.norm(dim=1))


def test_lokr_factors_are_low_rank_where_the_rank_is_small_and_full_ones_are_not_scaled():
    """LyCORIS's rule, which ComfyUI and A1111 follow: a LoKr layer whose factors are both full has scale 1."""
    _, full = _trained("lokr", rank=4, alpha=2.0)
    assert {layer.rank for layer in full.tensors().values()} == {None}
    assert {layer.scale for layer in full.tensors().values()} == {1.0}
    assert {full.module.get_submodule(name).scaling["default"] for name in full.layers} == {1.0}
    net = torch.nn.Sequential(torch.nn.Linear(64, 48))
    with LoraAttachment(net, ["0"], rank=2, alpha=1.0, kind="lokr") as low:
        layer = low.tensors()["0"]
        assert set(layer.tensors) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"} and layer.rank == 2
        assert layer.scale == 0.5 and net[0].scaling["default"] == 0.5


def test_the_diffusers_layout_is_plain_lora_only(tmp_path):
    _, attachment = _trained("loha")
    with pytest.raises(ValueError, match="loha adapter has no diffusers layout; save it in the kohya or comfy"):
        to_state_dict(attachment.tensors(), format="diffusers")


def test_options_that_are_loras_only_are_refused_for_loha_and_lokr():
    with pytest.raises(ValueError, match="lora_dropout and lora_init are for lora and dora; loha takes neither"):
        LoraAttachment(ToyNet(), ["to_q"], rank=2, alpha=2.0, kind="loha", dropout=0.1)
    with pytest.raises(ValueError, match=r"Unknown adapter kind 'oft'; choose one of \['lora', 'dora', 'loha'"):
        LoraAttachment(ToyNet(), ["to_q"], rank=2, alpha=2.0, kind="oft")


def test_a_layer_of_the_wrong_kind_is_refused_by_name():
    _, loha = _trained("loha")
    with LoraAttachment(ToyNet(), ["to_q", "to_k"], rank=4, alpha=2.0) as lora:
        with pytest.raises(ValueError, match=r"to_k: the adapter has \['lora_down.weight', 'lora_up.weight'\] "
                                             r"\(lora\), the weights given \['hada_w1_a'.*\(loha\)"):
            lora.load(loha.tensors())


@pytest.mark.parametrize("kind,module,args", [
    ("lora", "networks.lora", "{}"),
    ("dora", "lycoris.kohya", '{"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}'),
    ("loha", "lycoris.kohya", '{"algo": "loha", "conv_alpha": "8.0", "conv_dim": "16", "use_tucker": "False"}'),
    ("lokr", "lycoris.kohya", '{"algo": "lokr", "decompose_both": "False", "factor": "-1"}')])
def test_metadata_names_the_kind_as_kohya_and_lycoris_do(kind, module, args):
    metadata = build_metadata(base_model_version="sd_v1", architecture="stable-diffusion-v1/lora", rank=16,
                              alpha=8.0, steps=10, resolution=512, title="t", config={"adapter": kind})
    assert (metadata["ss_network_module"], metadata["ss_network_args"]) == (module, args)


def _effective_weights(attachment: LoraAttachment) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight as it computes: W + delta, and for DoRA scaled to its magnitude per row."""
    weights = {}
    for name in attachment.layers:
        layer = attachment.module.get_submodule(name)
        combined = layer.get_base_layer().weight + layer.get_delta_weight("default")
        if attachment.kind == "dora":
            combined = combined * (layer.lora_magnitude_vector["default"].weight / combined.norm(dim=1)).view(-1, 1)
        weights[name] = combined.detach().clone()
    return weights


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_continues_from_its_tensors_with_their_ranks_and_alphas(kind):
    """What a file gives back continues on a fresh model: each layer computes what it computed when it was made, with
    its own rank and alpha (other trainers vary them per layer)."""
    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 64))  # LoKr: low-rank second factors
    wanted, layers = {}, {}
    for name, rank, alpha in (("0", 2, 1.0), ("1", 3, 3.0)):
        with LoraAttachment(net, [name], rank=rank, alpha=alpha, kind=kind) as made, torch.no_grad():
            for param in made.parameters():
                param.normal_(std=0.1)
            layers |= made.tensors()
            wanted |= _effective_weights(made)
    assert {name: layer.rank for name, layer in layers.items()} == {"0": 2, "1": 3}
    with LoraAttachment(net, [], rank=16, alpha=16.0, kind=kind, initial=layers) as continued:
        assert continued.layers == ["0", "1"] and _max_diff(continued.tensors(), layers) == 0
        assert {name: layer.alpha for name, layer in continued.tensors().items()} == {"0": 1.0, "1": 3.0}
        got = _effective_weights(continued)
    assert all(torch.allclose(got[name], wanted[name], atol=1e-6) for name in wanted)


def test_dora_refuses_fp8_weights_and_says_what_trains_on_them():
    net = torch.nn.Sequential(torch.nn.Linear(16, 16)).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"DoRA needs the model's weights in bf16, fp16 or fp32; 0.weight is stored in "
                                         r"float8_e4m3fn.*choose lora, loha or lokr"):
        LoraAttachment(net, ["0"], rank=2, alpha=2.0, kind="dora")
    assert isinstance(net[0], torch.nn.Linear)  # nothing was attached


def test_a_full_kronecker_layers_alpha_does_not_become_the_runs():
    """LyCORIS writes alpha = a huge dim for full-factor LoKr files (ComfyUI ignores it): the run's alpha, which
    the node's limits check, is then the rank."""
    full = LoraTensors({"lokr_w1": torch.zeros(4, 4), "lokr_w2": torch.zeros(4, 2)}, 10000.0)
    assert full.rank is None and full.scale == 1.0
    assert adapter_settings({"a": full, "b": full}) == ("lokr", 4, 4.0)


def test_a_lokr_of_another_factorisation_says_which_lokrs_continue():
    with LoraAttachment(torch.nn.Sequential(torch.nn.Linear(64, 48)), ["0"], rank=2, alpha=1.0, kind="lokr") as lokr:
        layer = lokr.tensors()["0"]
        other = LoraTensors({**layer.tensors, "lokr_w1": torch.zeros(3, 4)}, 1.0)  # LyCORIS with another factor
        with pytest.raises(ValueError, match=r"0.lokr_w1: the adapter's shape is \(6, 8\), the weights given are "
                                             r"\(3, 4\) \(a LoKr continues when it was made with LyCORIS's factor -1"):
            lokr.load({"0": other})
