"""The unfused tensor product op (any e3nn connection mode), e.g. for gates and small node-side products.

No kernel of its own yet: the backward is the vector-Jacobian product of the reference, which autograd can
differentiate again, so gradients of any order exist.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..descriptors import TensorProductProblem
from ..reference import tensor_product as ref
from . import dispatch, library, registry


@library.custom_op("fastmlip::tensor_product")
def tensor_product_op(x1: Tensor, x2: Tensor, weight: Optional[Tensor], key: str) -> Tensor:
    dispatch.backend_for(x1, has_kernel=False)
    return ref.tensor_product(registry.lookup(key), x1, x2, weight)


@tensor_product_op.register_fake
def _(x1, x2, weight, key):
    return x1.new_empty(x1.shape[0], registry.lookup(key).dim_out)


def _setup(ctx, inputs, output):
    x1, x2, weight, key = inputs
    ctx.save_for_backward(x1, x2, weight)
    ctx.key = key


def _backward(ctx, grad):
    x1, x2, weight = ctx.saved_tensors
    problem = registry.lookup(ctx.key)
    if weight is None:
        _, vjp = torch.func.vjp(lambda a, b: ref.tensor_product(problem, a, b, None), x1, x2)
        return (*vjp(grad), None, None)
    _, vjp = torch.func.vjp(lambda a, b, c: ref.tensor_product(problem, a, b, c), x1, x2, weight)
    return (*vjp(grad), None)


tensor_product_op.register_autograd(_backward, setup_context=_setup)


def tensor_product(problem: TensorProductProblem, x1: Tensor, x2: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """e3nn ``TensorProduct.forward(x1, x2, weight)`` for batches [Z, dim]; shared weights may be 1-D."""
    if x1.dim() != 2 or x1.shape[1] != problem.dim_in1:
        raise ValueError(f"tensor_product({problem}): x1 must be [batch, {problem.dim_in1}], got {tuple(x1.shape)}")
    if x2.dim() != 2 or x2.shape != (x1.shape[0], problem.dim_in2):
        raise ValueError(f"tensor_product({problem}): x2 must be [{x1.shape[0]}, {problem.dim_in2}], "
                         f"got {tuple(x2.shape)}")
    tensors = [x2] + ([weight] if weight is not None else [])
    for t in tensors:
        if t.dtype != x1.dtype or t.device != x1.device:
            raise ValueError(f"tensor_product({problem}): dtypes/devices differ ({x1.dtype}/{x1.device} vs "
                             f"{t.dtype}/{t.device})")
    if problem.weight_numel and weight is None:
        raise ValueError(f"tensor_product({problem}): needs {problem.weight_numel} weights")
    if weight is not None:
        expected = (problem.weight_numel,) if problem.shared_weights else (x1.shape[0], problem.weight_numel)
        if tuple(weight.shape) != expected and not (weight.dim() == 1 and weight.shape[0] == problem.weight_numel):
            raise ValueError(f"tensor_product({problem}): weight must have shape {expected}, got "
                             f"{tuple(weight.shape)}")
        if weight.dim() == 1:
            weight = weight.unsqueeze(0).expand(x1.shape[0], -1).contiguous()
    return tensor_product_op(x1, x2, weight, registry.register(problem))
