"""Rows of a per-edge array in another order (the edges' receiver order of a step), and columns of a node array
(MACE's reshape of its messages): ``fastmlip::permute``.

On the Triton backend narrow rows (at most ``NARROW_BYTES``) move through :mod:`fastmlip.kernels.permute_rows`,
many rows a program, where torch's ``index_select`` spends a thread block on each row; wider rows keep
``index_select``, which moves them at the bandwidth's pace. Columns always move through the kernels (torch's
column ``index_select`` and its ``index_add_`` backward are slow at any width). The order must be a permutation,
so the derivative is the same move the other way, exactly (any order).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import dispatch, library

NARROW_BYTES = 256  # rows up to this size take the kernel (a MACE or SevenNet step's are 4-64 bytes)


def _reference(values: Tensor, order: Tensor, dim: int, scatter: bool) -> Tensor:
    if scatter:
        return torch.empty_like(values).index_copy_(dim, order.long(), values)
    return values.index_select(dim, order)


@library.custom_op("fastmlip::permute")
def _permute(values: Tensor, order: Tensor, dim: int, scatter: bool) -> Tensor:
    """``values``' rows (dim 0, any trailing shape) or columns (dim 1 of [N, W]) gathered by ``order``, or with
    ``scatter`` moved back."""
    if dispatch.backend_for(values) == "triton":
        from ..kernels import permute_rows

        if dim == 1:
            return permute_rows.moved(values.contiguous(), order, scatter, columns=True)
        rows = values.reshape(values.shape[0], math.prod(values.shape[1:]))
        if rows.shape[1] * rows.element_size() <= NARROW_BYTES:
            return permute_rows.moved(rows.contiguous(), order, scatter).view(values.shape)
    return _reference(values, order, dim, scatter)


@_permute.register_fake
def _(values, order, dim, scatter):
    return torch.empty_like(values)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.dim, ctx.scatter = inputs[2], inputs[3]


def _backward(ctx, grad):
    (order,) = ctx.saved_tensors
    return _permute(grad, order, ctx.dim, not ctx.scatter), None, None, None


_permute.register_autograd(_backward, setup_context=_setup)


def permute_rows(values: Tensor, order: Tensor) -> Tensor:
    """``values.index_select(0, order)`` for a permutation ``order`` of ``values``' rows (any trailing shape)."""
    if order.dim() != 1 or order.shape[0] != values.shape[0] or order.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"permute_rows: order must be an integer permutation [{values.shape[0]}], got "
                         f"{order.dtype} {tuple(order.shape)}")
    return _permute(values, order, 0, False)


def permute_columns(values: Tensor, index: Tensor) -> Tensor:
    """``values.index_select(1, index)`` for [N, W] ``values`` and a permutation ``index`` of its W columns."""
    if values.dim() != 2 or index.dim() != 1 or index.shape[0] != values.shape[1] or \
            index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"permute_columns: values [N, W] and an integer permutation [W], got "
                         f"{tuple(values.shape)} and {index.dtype} {tuple(index.shape)}")
    return _permute(values, index, 1, False)
