"""training.memory: frozen layers whose weight is made per call keep no copy of it for the backward pass, with
the gradients autograd gives; the probe of what a step saves."""

from __future__ import annotations

import contextlib

import pytest
import torch

from training.memory import _input_gradient_on_cpu, remade_weights, saved_bytes


class CastLinear(torch.nn.Linear):
    """A Linear that stores its weight in bf16 and computes in the input's dtype, casting per call (as ComfyUI's
    manual-cast layers do for fp8)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class CastConv(torch.nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


@contextlib.contextmanager
def cast_weight(layer, like):
    yield layer.weight.to(like.dtype)


def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(CastConv(4, 8, 3, padding=1, stride=2), torch.nn.Flatten(2), torch.nn.GELU(),
                                CastLinear(64, 256), torch.nn.GELU(), CastLinear(256, 64))
    model.to(torch.bfloat16).requires_grad_(False)
    return model


def _layers(model):
    return [(layer, lambda like, layer=layer: cast_weight(layer, like), lambda: True)
            for layer in model if isinstance(layer, CastLinear | CastConv)]


def test_the_input_gradient_through_remade_weights_is_autograds():
    model, x = _model(), torch.randn(2, 4, 16, 16)
    expected = torch.autograd.grad(model(x.requires_grad_()).square().sum(), x)[0]
    with remade_weights(_layers(model)) as patched:
        assert len(patched) == 3
        got = torch.autograd.grad(model(x).square().sum(), x)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert all("forward" not in vars(layer) for layer in model)  # the layers' own forwards are back


def test_no_cast_weight_is_kept_for_the_backward_pass():
    """Plain autograd keeps each layer's fp32 cast of its weight; with remade weights only activations remain."""
    model, x = _model(), torch.randn(2, 4, 16, 16, requires_grad=True)
    weights = list(model.parameters())
    cast_bytes = sum(layer.weight.numel() * 4 for layer, _, _ in _layers(model))
    plain = saved_bytes(lambda: model(x).sum(), weights)
    with remade_weights(_layers(model)):
        remade = saved_bytes(lambda: model(x).sum(), weights)
    assert plain - remade >= cast_bytes
    assert remade > 0  # the GELUs' inputs: activations are still counted


def test_saved_bytes_counts_a_tensor_once_and_leaves_weights_out():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(8, 64, requires_grad=True)
    assert saved_bytes(lambda: (x * x).sum(), [w]) == x.nbytes  # x saved twice by one op: counted once
    assert saved_bytes(lambda: (x @ w).sum(), [w]) == x.nbytes  # w is a weight


@pytest.mark.parametrize("padding_mode", ["reflect"])
def test_convolutions_padded_other_than_with_zeros_keep_their_own_forward(padding_mode):
    conv = CastConv(4, 4, 3, padding=1, padding_mode=padding_mode)
    with remade_weights([(conv, lambda like: cast_weight(conv, like), lambda: True)]) as patched:
        assert patched == []


def test_the_cpu_input_gradient_in_blocks_of_rows_is_grad_times_weight():
    torch.manual_seed(0)
    grad, weight = torch.randn(2, 5, 30), torch.randn(30, 12)
    torch.testing.assert_close(_input_gradient_on_cpu(grad, weight, rows=7), grad @ weight)
