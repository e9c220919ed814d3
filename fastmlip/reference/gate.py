"""e3nn's ``nn.Gate`` (:class:`fastmlip.descriptors.GateProblem`) in plain torch, with an explicit backward.

The forward calls the module's own activation objects, so its values are e3nn's; the backward uses derivative
formulas of the activations it recognises (plain differentiable torch, so second derivatives come from autograd).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..descriptors import GateProblem
from .activations import activation_derivative


def _block(t: Tensor, offset: int, mul: int, ir_dim: int) -> Tensor:
    return t.narrow(1, offset, mul * ir_dim).reshape(t.shape[0], mul, ir_dim)


def _by_offset(parts: list, like: Tensor) -> Tensor:
    """Concatenate (column offset, [N, width]) pieces that tile the columns."""
    parts = sorted(parts, key=lambda p: p[0])
    return torch.cat([p for _, p in parts], dim=1) if parts else like.new_zeros(like.shape[0], 0)


def gate(problem: GateProblem, x: Tensor) -> Tensor:
    """e3nn ``Gate.forward(x)`` for x [N, dim_in]."""
    n = x.shape[0]
    parts = [(r.dst, r.act(x.narrow(1, r.src, r.width))) for r in problem.scalar_runs]
    for r in problem.gated_runs:
        gates = r.act(x.narrow(1, r.gate_src, r.mul)).unsqueeze(2)
        gated = _block(x, r.src, r.mul, r.ir_dim) * gates
        parts.append((r.dst, (gated if r.coefficient == 1.0 else gated * r.coefficient).reshape(n, -1)))
    return _by_offset(parts, x)


def gate_backward(problem: GateProblem, grad_out: Tensor, x: Tensor) -> Tensor:
    """d x of <grad_out, gate(x)>, for problems whose activations are all known."""
    n = x.shape[0]
    parts = []
    for r in problem.scalar_runs:
        parts.append((r.src, grad_out.narrow(1, r.dst, r.width) * activation_derivative(
            r.act, x.narrow(1, r.src, r.width))))
    for r in problem.gated_runs:
        v = x.narrow(1, r.gate_src, r.mul)
        g = _block(grad_out, r.dst, r.mul, r.ir_dim)
        if r.coefficient != 1.0:
            g = g * r.coefficient
        parts.append((r.src, (g * r.act(v).unsqueeze(2)).reshape(n, -1)))
        parts.append((r.gate_src, (g * _block(x, r.src, r.mul, r.ir_dim)).sum(2) * activation_derivative(r.act, v)))
    return _by_offset(parts, x)
