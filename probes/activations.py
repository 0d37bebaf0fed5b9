"""Activation functions in use and their ANALYTIC derivatives (for gradient sparsity, METRICS.md section 3).

Each ``Activation`` holds the function and its derivative written out by hand. At kinks the
derivative takes the value PyTorch's autograd uses, so ``act'(h)`` here equals what a backward
pass computes (ReLU'(0) = 0; ReLU6'(0) = ReLU6'(6) = 0; Hardswish'(-3) = 0, Hardswish'(3) = 1;
LeakyReLU'(0) = slope; J-SquaredReLU'(0) = 1 as in cdgyp/sparsity's ``jsrelu_derivative``; a clamp
passes the gradient on its bounds).

``exact_zero_region``: the derivative is exactly 0 on a whole region (ReLU family), so
``deriv_sparsity`` counts act'(h) == 0; for smooth activations it counts |act'(h)| <= eps_d.

``resolve_activation`` finds the activation from the act module (torch, transformers, timm,
ours) or from a config name (``hidden_act``, ``activation_function``, ...). An elementwise module
it does not know gets an autograd derivative (``analytic=False``), recorded in every row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from probes.errors import ModelError, did_you_mean

_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_K_TANH = math.sqrt(2.0 / math.pi)  # GELU tanh approximation, Hendrycks & Gimpel
_C_TANH = 0.044715
_QUICK = 1.702


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[Any], Any] = field(repr=False, compare=False)
    deriv: Callable[[Any], Any] = field(repr=False, compare=False)
    exact_zero_region: bool  # act'(h) == 0 exactly on a region (ReLU family)
    analytic: bool = True  # False: derivative by autograd through the module (unknown elementwise act)
    params: tuple = ()
    # For derivatives that only take the values 0 and 1 (ReLU, ReLU6): act'(h) as a bool mask, which
    # the gradient probe keeps until the backward pass at one byte per entry.
    mask: Callable[[Any], Any] | None = field(default=None, repr=False, compare=False)

    @property
    def label(self) -> str:
        return self.name + (f"({', '.join(f'{p:g}' for p in self.params)})" if self.params else "")


# ----------------------------------------------------------------------------- functions

def _relu(h):
    import torch

    return torch.relu(h)


def _relu_d(h):
    return (h > 0).to(h.dtype)


def _relu6(h):
    import torch

    return torch.nn.functional.relu6(h)


def _relu6_d(h):
    # hardtanh_backward: the gradient passes only strictly inside (0, 6).
    return ((h > 0) & (h < 6)).to(h.dtype)


def _gelu(h):
    import torch

    return 0.5 * h * (1.0 + torch.erf(h / _SQRT2))


def _gelu_d(h):
    import torch

    # d/dh [h Phi(h)] = Phi(h) + h phi(h)
    return 0.5 * (1.0 + torch.erf(h / _SQRT2)) + h * torch.exp(-0.5 * h * h) * _INV_SQRT_2PI


def _gelu_tanh(h):
    import torch

    return 0.5 * h * (1.0 + torch.tanh(_K_TANH * (h + _C_TANH * h * h * h)))


def _gelu_tanh_d(h):
    import torch

    t = torch.tanh(_K_TANH * (h + _C_TANH * h * h * h))
    return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _K_TANH * (1.0 + 3.0 * _C_TANH * h * h)


def _silu(h):
    import torch

    return h * torch.sigmoid(h)


def _silu_d(h):
    import torch

    s = torch.sigmoid(h)
    return s * (1.0 + h * (1.0 - s))


def _quick_gelu(h):
    import torch

    return h * torch.sigmoid(_QUICK * h)


def _quick_gelu_d(h):
    import torch

    s = torch.sigmoid(_QUICK * h)
    return s + _QUICK * h * s * (1.0 - s)


def _relu2(h):
    import torch

    return torch.square(torch.relu(h))


def _relu2_d(h):
    import torch

    return 2.0 * torch.relu(h)


def _gelu2(h):
    return _gelu(h) ** 2


def _gelu2_d(h):
    return 2.0 * _gelu(h) * _gelu_d(h)


def _jsrelu(h):
    import torch

    # J-SquaredReLU (arXiv 2309.03004; cdgyp/sparsity jsrelu.cpp): ((h+1)^2 - 1)/2 for h >= 0, else 0.
    return torch.where(h >= 0, ((h + 1.0) ** 2 - 1.0) / 2.0, torch.zeros_like(h))


def _jsrelu_d(h):
    return (h + 1.0) * (h >= 0).to(h.dtype)


def _sigmoid(h):
    import torch

    return torch.sigmoid(h)


def _sigmoid_d(h):
    import torch

    s = torch.sigmoid(h)
    return s * (1.0 - s)


def _tanh(h):
    import torch

    return torch.tanh(h)


def _tanh_d(h):
    import torch

    t = torch.tanh(h)
    return 1.0 - t * t


def _softplus(h):
    import torch

    return torch.nn.functional.softplus(h)


def _mish(h):
    import torch

    return h * torch.tanh(torch.nn.functional.softplus(h))


def _mish_d(h):
    import torch

    sp = torch.nn.functional.softplus(h)
    t = torch.tanh(sp)
    return t + h * (1.0 - t * t) * torch.sigmoid(h)


def _hardswish(h):
    import torch

    return torch.nn.functional.hardswish(h)


def _hardswish_d(h):
    import torch

    # aten hardswish_backward: 0 for h <= -3, h/3 + 1/2 on (-3, 3), 1 for h >= 3.
    mid = h / 3.0 + 0.5
    return torch.where(h <= -3.0, torch.zeros_like(h), torch.where(h < 3.0, mid, torch.ones_like(h)))


def _identity(h):
    return h


def _ones(h):
    import torch

    return torch.ones_like(h)


def _laplace(h, mu=0.707107, sigma=0.282095):
    import torch

    return 0.5 * (1.0 + torch.erf((h - mu) / (sigma * _SQRT2)))


def _laplace_d(h, mu=0.707107, sigma=0.282095):
    import torch

    z = (h - mu) / sigma
    return torch.exp(-0.5 * z * z) * _INV_SQRT_2PI / sigma


def _leaky(slope: float) -> tuple[Callable, Callable]:
    def fn(h):
        import torch

        return torch.nn.functional.leaky_relu(h, slope)

    def d(h):
        import torch

        # leaky_relu_backward: 1 where h > 0, else slope (including h == 0).
        return torch.where(h > 0, torch.ones_like(h), torch.full_like(h, slope))

    return fn, d


def _clipped_gelu(lo: float, hi: float) -> tuple[Callable, Callable]:
    def fn(h):
        import torch

        return torch.clamp(_gelu(h), lo, hi)

    def d(h):
        # clamp_backward passes the gradient where lo <= gelu(h) <= hi (bounds included).
        y = _gelu(h)
        return _gelu_d(h) * ((y >= lo) & (y <= hi)).to(h.dtype)

    return fn, d


RELU = Activation("relu", _relu, _relu_d, True, mask=lambda h: h > 0)
RELU6 = Activation("relu6", _relu6, _relu6_d, True, mask=lambda h: (h > 0) & (h < 6))
GELU = Activation("gelu", _gelu, _gelu_d, False)
GELU_TANH = Activation("gelu_tanh", _gelu_tanh, _gelu_tanh_d, False)
SILU = Activation("silu", _silu, _silu_d, False)
QUICK_GELU = Activation("quick_gelu", _quick_gelu, _quick_gelu_d, False)
RELU2 = Activation("relu2", _relu2, _relu2_d, True)
GELU2 = Activation("gelu2", _gelu2, _gelu2_d, False)
JSRELU = Activation("jsrelu", _jsrelu, _jsrelu_d, True)
SIGMOID = Activation("sigmoid", _sigmoid, _sigmoid_d, False)
TANH = Activation("tanh", _tanh, _tanh_d, False)
SOFTPLUS = Activation("softplus", _softplus, _sigmoid, False)
MISH = Activation("mish", _mish, _mish_d, False)
HARDSWISH = Activation("hardswish", _hardswish, _hardswish_d, True)
IDENTITY = Activation("identity", _identity, _ones, False)
LAPLACE = Activation("laplace", _laplace, _laplace_d, False)


def leaky_relu(slope: float = 0.01) -> Activation:
    fn, d = _leaky(float(slope))
    return Activation("leaky_relu", fn, d, float(slope) == 0.0, params=(float(slope),))


def clipped_gelu(lo: float = -10.0, hi: float = 10.0) -> Activation:
    fn, d = _clipped_gelu(float(lo), float(hi))
    return Activation("gelu_clipped", fn, d, True, params=(float(lo), float(hi)))


# Every analytic activation (the unit test checks each against autograd).
ALL = (RELU, RELU6, GELU, GELU_TANH, SILU, QUICK_GELU, RELU2, GELU2, JSRELU, SIGMOID, TANH, SOFTPLUS, MISH, HARDSWISH,
       IDENTITY, LAPLACE, leaky_relu(0.01), leaky_relu(0.2), clipped_gelu(-10.0, 10.0), clipped_gelu(-0.1, 1.0))

# Config names (transformers' ACT2FN keys and common aliases) -> activation.
BY_NAME: dict[str, Activation] = {
    "relu": RELU, "relu6": RELU6, "gelu": GELU, "gelu_python": GELU, "gelu_new": GELU_TANH,
    "gelu_fast": GELU_TANH, "gelu_pytorch_tanh": GELU_TANH, "gelu_python_tanh": GELU_TANH,
    "gelu_accurate": GELU_TANH, "gelu_tanh": GELU_TANH, "silu": SILU, "swish": SILU, "swiglu": SILU,
    "quick_gelu": QUICK_GELU, "relu2": RELU2, "squared_relu": RELU2, "relu_squared": RELU2, "gelu2": GELU2,
    "squared_gelu": GELU2, "jsrelu": JSRELU, "j_squared_relu": JSRELU, "sigmoid": SIGMOID, "tanh": TANH,
    "softplus": SOFTPLUS, "mish": MISH, "hardswish": HARDSWISH, "linear": IDENTITY, "identity": IDENTITY,
    "laplace": LAPLACE, "leaky_relu": leaky_relu(0.01), "gelu_10": clipped_gelu(-10.0, 10.0),
    "geglu": GELU, "reglu": RELU,
}

_CONFIG_ACT_ATTRS = ("hidden_act", "activation_function", "hidden_activation", "hidden_act_fn", "act_fn",
                     "feed_forward_proj", "dense_act_fn", "activation", "afn")


# ----------------------------------------------------------------------------- our own modules

def make_module(act: Activation):
    """An ``nn.Module`` computing ``act`` (for squared GELU, J-SquaredReLU, ... in hand-built models)."""
    import torch

    class _Act(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.activation = act

        def forward(self, x):
            return act.fn(x)

        def extra_repr(self) -> str:
            return act.label

    _Act.__name__ = _Act.__qualname__ = "".join(p.capitalize() for p in act.name.split("_")) + "Activation"
    return _Act()


# ----------------------------------------------------------------------------- resolver

def from_name(name: str) -> Activation:
    key = str(name).lower().strip()
    if key.startswith("gated-"):  # T5 v1.1: feed_forward_proj "gated-gelu"
        key = key[len("gated-"):]
    if key in BY_NAME:
        return BY_NAME[key]
    raise ModelError(f"unknown activation {name!r}{did_you_mean(key, BY_NAME, n=3)}",
                     f"use one of {', '.join(sorted(BY_NAME))}")


def from_config(config: Any) -> Activation | None:
    """The MLP activation a Hugging Face config names, or None if it names none."""
    if config is None:
        return None
    for attr in _CONFIG_ACT_ATTRS:
        v = getattr(config, attr, None)
        if isinstance(v, str) and v:
            if attr == "feed_forward_proj" and v in ("relu", "gated-gelu", "gated-silu", "gelu", "gated-relu"):
                return from_name(v)
            if attr != "feed_forward_proj":
                try:
                    return from_name(v)
                except ModelError:
                    continue
    return None


def from_module(module: Any) -> Activation | None:
    """The activation an ``nn.Module`` computes, by class (torch, transformers, timm, ours); None if unknown."""
    import torch.nn as nn

    act = getattr(module, "activation", None)
    if isinstance(act, Activation):
        return act
    if isinstance(module, nn.ReLU):
        return RELU
    if isinstance(module, nn.ReLU6):
        return RELU6
    if isinstance(module, nn.LeakyReLU):
        return leaky_relu(module.negative_slope)
    if isinstance(module, nn.GELU):
        return GELU_TANH if getattr(module, "approximate", "none") == "tanh" else GELU
    if isinstance(module, nn.SiLU):
        return SILU
    if isinstance(module, nn.Sigmoid):
        return SIGMOID
    if isinstance(module, nn.Tanh):
        return TANH
    if isinstance(module, nn.Mish):
        return MISH
    if isinstance(module, nn.Hardswish):
        return HARDSWISH
    if isinstance(module, nn.Identity):
        return IDENTITY
    if isinstance(module, nn.Softplus) and module.beta == 1 and module.threshold >= 20:
        return SOFTPLUS
    cls = type(module).__name__
    modname = type(module).__module__
    if modname.startswith("transformers."):
        if cls == "GELUActivation":
            return GELU
        if cls in ("NewGELUActivation", "FastGELUActivation", "GELUTanh", "AccurateGELUActivation",
                   "PytorchGELUTanh"):
            return GELU_TANH
        if cls == "QuickGELUActivation":
            return QUICK_GELU
        if cls == "ReLUSquaredActivation":
            return RELU2
        if cls == "SiLUActivation":
            return SILU
        if cls == "ClippedGELUActivation":
            return clipped_gelu(module.min, module.max)
        if cls == "LinearActivation":
            return IDENTITY
        if cls == "MishActivation":
            return MISH
        if cls == "LaplaceActivation":
            return LAPLACE
    if modname.startswith("timm."):
        if cls == "GELU":
            return GELU_TANH if getattr(module, "approximate", "none") == "tanh" else GELU
        if cls == "GELUTanh":
            return GELU_TANH
        if cls == "QuickGELU":
            return QUICK_GELU
        if cls in ("Swish", "SiLU"):
            return SILU
        if cls == "Sigmoid":
            return SIGMOID
        if cls == "Tanh":
            return TANH
        if cls == "Mish":
            return MISH
        if cls in ("HardSwish", "HardSwishMe"):
            return HARDSWISH
    return None


def autograd_activation(module: Any, name: str | None = None) -> Activation:
    """Derivative of an unknown elementwise module by autograd (one extra small forward/backward)."""

    def d(h):
        import torch

        with torch.enable_grad():
            x = h.detach().clone().requires_grad_(True)
            y = module(x)
            (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
        return g

    return Activation(name or type(module).__name__, lambda h: module(h), d, False, analytic=False)


def is_activation_module(m: Any) -> bool:
    """A leaf module that is an activation function (by class or name), not a linear/norm/dropout."""
    import torch.nn as nn

    if any(True for _ in m.children()):
        return False
    if isinstance(m, (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Embedding, nn.Identity)) \
            or isinstance(m, nn.modules.conv._ConvNd) or isinstance(m, nn.modules.batchnorm._BatchNorm) \
            or type(m).__name__ == "Conv1D":
        return False
    if from_module(m) is not None:
        return True
    n = type(m).__name__.lower()
    return type(m).__module__.startswith("torch.nn.modules.activation") or any(
        a in n for a in ("relu", "gelu", "silu", "swish", "sigmoid", "tanh", "mish", "activation"))


def resolve_activation(module: Any = None, config: Any = None, name: str | None = None,
                       allow_autograd: bool = True) -> Activation:
    """Activation of a site: ``name`` if given, else by the act module's class, else (an unknown
    elementwise module) an autograd derivative, else the config's ``hidden_act``-like field."""
    if name:
        return from_name(name)
    if module is not None:
        a = from_module(module)
        if a is not None:
            return a
        if allow_autograd:  # exact for any elementwise module, whatever the config says
            return autograd_activation(module)
    a = from_config(config)
    if a is not None:
        return a
    raise ModelError("cannot tell which activation function this model uses",
                     "pass --act NAME (relu, gelu, gelu_tanh, silu, relu2, ...)")
