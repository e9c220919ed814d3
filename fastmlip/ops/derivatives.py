"""Derivatives of backward ops that have no kernels of their own: the reference formula under plain autograd."""
from __future__ import annotations

import torch
from torch import Tensor


def vjp_of_reference(function, primals: list, cotangents) -> tuple:
    """Derivatives of a backward op: the vector-Jacobian product of its plain-torch reference formula.

    Plain autograd (not torch.func, whose wrapped tensors would leak into the references' constant caches).
    Second derivatives are exact; third and higher orders are not supported.
    """
    higher_order = torch.is_grad_enabled()  # true exactly when the caller asked for create_graph
    with torch.enable_grad():
        # connected to the caller's graph only when it will be differentiated again: a primal that is an output of
        # another backward op (a weight gradient read by the table's backward) would otherwise have that op's saved
        # tensors freed by this inner pass, before the outer one reaches it
        leaves = [t if higher_order and t.requires_grad else t.detach().requires_grad_(True) for t in primals]
        outputs = function(*leaves)
        if isinstance(outputs, Tensor):
            outputs, cotangents = (outputs,), (cotangents,)
        pairs = [(o, c) for o, c in zip(outputs, cotangents) if c is not None and o.requires_grad]
        if not pairs:
            return tuple(None for _ in primals)
        grads = torch.autograd.grad([o for o, _ in pairs], leaves, [c for _, c in pairs],
                                    create_graph=higher_order, allow_unused=True)
    return tuple(grads)


def gradient_or_zeros(output: Tensor, leaf: Tensor) -> Tensor:
    """d(output)/d(leaf), zeros where ``output`` does not depend on ``leaf`` (a structure without edges)."""
    gradient = None
    if output.requires_grad:
        (gradient,) = torch.autograd.grad([output], [leaf], allow_unused=True)
    return torch.zeros_like(leaf) if gradient is None else gradient
