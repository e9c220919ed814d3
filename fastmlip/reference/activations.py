"""Derivatives of the named activations (:mod:`fastmlip.descriptors.activations`) in plain torch.

Plain differentiable torch, so second derivatives come from autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..descriptors import Activation

_DERIVATIVES = {
    "identity": lambda v: torch.ones_like(v),
    "silu": lambda v: torch.sigmoid(v) * (1 + v * (1 - torch.sigmoid(v))),
    "sigmoid": lambda v: torch.sigmoid(v) * (1 - torch.sigmoid(v)),
    "tanh": lambda v: 1 - torch.tanh(v) ** 2,
    "abs": torch.sign,
}


def activation_derivative(act: Activation, v: Tensor) -> Tensor:
    """d act / d v for a known activation (plain differentiable torch: second derivatives come from autograd)."""
    if act.name not in _DERIVATIVES:
        raise ValueError(f"no derivative formula for activation {act.name!r}")
    return _DERIVATIVES[act.name](v) * act.scale
