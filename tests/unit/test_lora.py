"""LoRA attachment: exact no-op at step 0, clean removal, Linear subclasses and Conv2d, reloading."""

import pytest
import torch

from training.lora import LoraAttachment, LoraTensors


class CustomLinear(torch.nn.Linear):
    """Stands for ComfyUI's ops classes: a Linear subclass with its own forward."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = CustomLinear(8, 8)
        self.to_k = torch.nn.Linear(8, 8)
        self.proj = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, x, y):
        return self.to_q(self.norm(x)) + self.to_k(x), self.proj(y)


def _model_and_inputs():
    torch.manual_seed(0)
    return Block(), torch.randn(2, 8), torch.randn(1, 2, 6, 6)


def test_step_zero_and_removal_are_exact_and_restore_the_tree():
    model, x, y = _model_and_inputs()
    base = model(x, y)
    modules_before = {name: type(m) for name, m in model.named_modules()}
    flags_before = {name: p.requires_grad for name, p in model.named_parameters()}
    attributes_before = dict(vars(model))
    attachment = LoraAttachment(model, ["to_q", "to_k", "proj"], rank=4, alpha=8)
    assert sorted(attachment.layers) == ["proj", "to_k", "to_q"]
    with torch.no_grad():
        adapted = model(x, y)
    assert all(torch.equal(a, b) for a, b in zip(adapted, base))
    with torch.no_grad():
        for p in attachment.parameters():
            p.add_(0.1)
    assert not torch.equal(model(x, y)[0], base[0])
    attachment.remove()
    assert {name: type(m) for name, m in model.named_modules()} == modules_before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags_before
    assert vars(model).keys() == attributes_before.keys()  # nothing peft noted on the module is left
    assert all(torch.equal(a, b) for a, b in zip(model(x, y), base))


def test_only_adapter_parameters_train_and_they_are_fp32_on_a_bf16_model():
    model, _, _ = _model_and_inputs()
    model.to(torch.bfloat16)
    with LoraAttachment(model, ["to_q"], rank=2, alpha=2) as attachment:
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert {id(p) for p in trainable} == {id(p) for p in attachment.parameters()}
        assert all(p.dtype == torch.float32 for p in trainable)
        out = model(torch.randn(2, 8, dtype=torch.bfloat16), torch.randn(1, 2, 4, 4, dtype=torch.bfloat16))
        out[0].float().sum().backward()
        assert all(p.grad is not None for p in attachment.parameters())


def test_tensors_give_shapes_alpha_and_the_delta():
    model, x, y = _model_and_inputs()
    with LoraAttachment(model, ["to_k", "proj"], rank=2, alpha=6) as attachment:
        with torch.no_grad():
            for p in attachment.parameters():
                p.normal_()
        tensors = attachment.tensors()
        k = tensors["to_k"]
        assert (k.down.shape, k.up.shape, k.alpha, k.scale) == ((2, 8), (8, 2), 6.0, 3.0)
        assert tensors["proj"].down.shape == (2, 2, 3, 3) and tensors["proj"].up.shape == (4, 2, 1, 1)
        expected = x @ (model.to_k.base_layer.weight + k.scale * k.up @ k.down).T + model.to_k.base_layer.bias
        torch.testing.assert_close(model.to_k(x), expected)


def test_initial_weights_continue_an_existing_lora():
    model, x, y = _model_and_inputs()
    with LoraAttachment(model, ["to_q"], rank=3, alpha=3) as first:
        with torch.no_grad():
            for p in first.parameters():
                p.normal_()
        saved = first.tensors()
        trained_out = model(x, y)[0].detach()
    with LoraAttachment(model, ["ignored"], rank=1, alpha=1, initial=saved) as second:
        assert second.tensors()["to_q"].rank == 3
        torch.testing.assert_close(model(x, y)[0], trained_out)


def test_bad_targets_and_bad_weights_say_what_is_wrong():
    model, _, _ = _model_and_inputs()
    with pytest.raises(ValueError, match="nonexistent"):
        LoraAttachment(model, ["nonexistent"], rank=2, alpha=2)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoraAttachment(model, ["to_q"], rank=0, alpha=1)
    with LoraAttachment(model, ["to_q"], rank=2, alpha=2) as attachment:
        wrong = {"to_q": LoraTensors.lora(torch.zeros(3, 8), torch.zeros(8, 3), 3.0)}
        with pytest.raises(ValueError, match=r"to_q.lora_down.weight: the adapter's shape is \(2, 8\)"):
            attachment.load(wrong)
        with pytest.raises(ValueError, match="not adapted"):
            attachment.load({"to_k": wrong["to_q"]})
    mixed = {"to_q": LoraTensors.lora(torch.zeros(2, 8), torch.zeros(8, 2), 2.0),
             "to_k": LoraTensors.lora(torch.zeros(4, 8), torch.zeros(8, 4), 4.0)}
    with LoraAttachment(model, [], rank=8, alpha=1, initial=mixed) as continued:  # other trainers vary them
        assert {n: (t.rank, t.alpha) for n, t in continued.tensors().items()} == {"to_q": (2, 2.0), "to_k": (4, 4.0)}
    with pytest.raises(ValueError, match="The LoRA to continue is made of lora layers; set adapter to lora "
                                         r"\(it is loha\)"):
        LoraAttachment(model, [], rank=2, alpha=2, kind="loha", initial=mixed)


def test_all_linear_targets_every_linear_and_nothing_else():
    model, _, _ = _model_and_inputs()
    with LoraAttachment(model, "all-linear", rank=2, alpha=2) as attachment:
        assert sorted(attachment.layers) == ["to_k", "to_q"]


class ModuleLinear(torch.nn.Module):
    """Stands for ComfyUI's mixed-precision Linear (quantised weights): a Linear that is no torch Linear."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features) / in_features**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("targets", ["all-linear", ["to_v"]])
def test_a_linear_layer_of_another_class_is_adapted_like_torchs(targets):
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("to_v", ModuleLinear(8, 4))
    x = torch.randn(3, 8)
    before = model(x)
    with LoraAttachment(model, targets, rank=2, alpha=2) as attachment:
        assert attachment.layers == ["to_v"]
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)  # B starts at zero
        with torch.no_grad():
            attachment.parameters()[1].fill_(0.1)  # up
        delta = attachment.tensors()["to_v"]
        torch.testing.assert_close(model(x), before + x @ (delta.up @ delta.down).T * delta.scale)
    assert type(model.to_v) is ModuleLinear
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
