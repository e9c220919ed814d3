"""Scalar activations as e3nn applies them (``normalize2mom``-scaled), named so kernels can emit them.

A Gate's activations and a radial MLP's hidden activations are e3nn ``normalize2mom`` objects around a torch
function; each object carries its own constant ``cst`` (skipped when within 1e-4 of 1, as e3nn does). Only the
name and the constant reach the kernels; the reference calls the module's own object, so its values are e3nn's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

# Activations the kernels and the derivative formulas know; anything else is "other" (plain torch autograd only).
KNOWN_ACTIVATIONS = ("identity", "silu", "sigmoid", "tanh", "abs")


@dataclass(frozen=True)
class Activation:
    """``scale * f(v)``, ``f`` named by ``name``; ``function`` is the module's own object (None: identity)."""

    name: str
    scale: float
    function: Optional[Callable] = field(default=None, compare=False, repr=False)

    def __call__(self, v):
        return v if self.function is None else self.function(v)

    @property
    def known(self) -> bool:
        return self.name in KNOWN_ACTIVATIONS


def _function_name(f) -> str:
    import torch
    import torch.nn.functional as F

    by_function = {F.silu: "silu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh",
                   F.tanh: "tanh", torch.abs: "abs"}
    by_module = {torch.nn.SiLU: "silu", torch.nn.Sigmoid: "sigmoid", torch.nn.Tanh: "tanh"}
    if type(f) in by_module and not getattr(f, "inplace", False):
        return by_module[type(f)]
    return by_function.get(f, "other")


def activation_of(act) -> Activation:
    """A module's activation object, named; e3nn's normalize2mom skips its constant when it is within 1e-4 of 1."""
    from e3nn.math import normalize2mom

    if act is None:
        return Activation("identity", 1.0, None)
    if type(act) is not normalize2mom:
        return Activation("other", 1.0, act)
    return Activation(_function_name(act.f), 1.0 if act._is_id else float(act.cst), act)
