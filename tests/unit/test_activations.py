"""Analytic activation derivatives against autograd, on a grid that includes every kink and clip point."""

from __future__ import annotations

import pytest
import torch

from probes import activations as A
from probes.errors import ModelError

# A dense grid plus the edge points where a derivative changes definition (0, +-3, 6, clip bounds).
EDGES = [0.0, -0.0, 1e-12, -1e-12, 3.0, -3.0, 6.0, 10.0, -10.0, 1.0, -1.0, 0.5, 0.707107, 20.0, -20.0, 40.0, -40.0]


def grid(dtype=torch.float64):
    return torch.cat([torch.linspace(-12, 12, 2401, dtype=dtype), torch.tensor(EDGES, dtype=dtype)])


def autograd_deriv(fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


@pytest.mark.parametrize("act", A.ALL, ids=lambda a: a.label)
def test_analytic_derivative_matches_autograd(act):
    x = grid()
    d = act.deriv(x)
    ref = autograd_deriv(act.fn, x)
    assert torch.allclose(d, ref, rtol=1e-9, atol=1e-12), (act.label, (d - ref).abs().max())
    # The edge points agree exactly in the ReLU family (0/1 masks, kink conventions).
    if act.exact_zero_region:
        e = torch.tensor(EDGES, dtype=torch.float64)
        assert torch.allclose(act.deriv(e), autograd_deriv(act.fn, e), rtol=1e-12, atol=0)


@pytest.mark.parametrize("module, act", [
    (torch.nn.ReLU(), A.RELU), (torch.nn.ReLU(inplace=True), A.RELU), (torch.nn.ReLU6(), A.RELU6),
    (torch.nn.GELU(), A.GELU), (torch.nn.GELU(approximate="tanh"), A.GELU_TANH), (torch.nn.SiLU(), A.SILU),
    (torch.nn.Sigmoid(), A.SIGMOID), (torch.nn.Tanh(), A.TANH), (torch.nn.Mish(), A.MISH),
    (torch.nn.Hardswish(), A.HARDSWISH),
])
def test_torch_modules_resolve_and_match_their_own_autograd(module, act):
    got = A.resolve_activation(module)
    assert got.name == act.name and got.analytic
    # float64: PyTorch's float32 tanh-GELU backward rounds tails to 0 where the true value is ~1e-6.
    x = grid(torch.float64)
    ref = autograd_deriv(lambda t: module(t.clone()), x)  # clone: in-place ReLU on a leaf is not allowed
    assert torch.allclose(got.deriv(x), ref, rtol=1e-9, atol=1e-12)


def test_leaky_relu_keeps_its_slope():
    got = A.resolve_activation(torch.nn.LeakyReLU(0.2))
    assert got.label == "leaky_relu(0.2)"
    x = grid()
    assert torch.equal(got.deriv(x), autograd_deriv(lambda t: torch.nn.functional.leaky_relu(t, 0.2), x))


def test_every_transformers_activation_is_resolved_and_matches():
    from transformers.activations import ACT2FN

    names = ["gelu", "gelu_10", "gelu_fast", "gelu_new", "gelu_python", "gelu_pytorch_tanh", "gelu_python_tanh",
             "gelu_accurate", "quick_gelu", "relu", "relu2", "relu6", "silu", "swish", "sigmoid", "tanh",
             "linear", "mish", "laplace", "leaky_relu", "hardswish"]
    x = grid(torch.float64)
    for name in names:
        module = ACT2FN[name]
        act = A.resolve_activation(module)
        assert act.analytic, name
        assert A.from_name(name).name == act.name, name  # the config name and the module agree
        ref = autograd_deriv(module, x)
        # FastGELU's constant 0.7978845608 is sqrt(2/pi) rounded at 1e-11.
        assert torch.allclose(act.deriv(x), ref, rtol=1e-8, atol=1e-10), (name, (act.deriv(x) - ref).abs().max())


def test_config_names_and_unknowns():
    class Cfg:
        hidden_act = "gelu_new"

    assert A.from_config(Cfg()).name == "gelu_tanh"

    class T5Cfg:
        feed_forward_proj = "gated-gelu"

    assert A.from_config(T5Cfg()).name == "gelu"
    assert A.from_config(None) is None
    with pytest.raises(ModelError, match="did you mean"):
        A.from_name("gelu_neww")


def test_our_modules_for_squared_gelu_and_jsrelu():
    for act in (A.GELU2, A.JSRELU, A.RELU2):
        m = A.make_module(act)
        assert A.resolve_activation(m) is act
        assert A.is_activation_module(m)
        x = grid()
        assert torch.allclose(act.deriv(x), autograd_deriv(m, x), rtol=1e-9, atol=1e-12)
    # J-SquaredReLU jumps at 0: derivative 1 there (cdgyp/sparsity's (x+1)*(x>=0)), 0 just below.
    assert A.JSRELU.deriv(torch.tensor([0.0, -1e-7, 2.0])).tolist() == [1.0, 0.0, 3.0]


def test_unknown_elementwise_module_gets_an_autograd_derivative():
    class Softsign2(torch.nn.Module):
        def forward(self, x):
            return x / (1 + x.abs()) ** 2

    m = Softsign2()
    act = A.resolve_activation(m)
    assert not act.analytic and act.name == "Softsign2"
    x = torch.linspace(-3, 3, 61)
    assert torch.allclose(act.deriv(x), autograd_deriv(m, x))
    with pytest.raises(ModelError):
        A.resolve_activation(None, None)


def test_exact_zero_region_flags():
    assert A.RELU.exact_zero_region and A.RELU2.exact_zero_region and A.JSRELU.exact_zero_region
    assert not A.GELU.exact_zero_region and not A.SILU.exact_zero_region
    assert not A.leaky_relu(0.01).exact_zero_region and A.leaky_relu(0.0).exact_zero_region
