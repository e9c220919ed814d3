"""Per-node sums of per-edge rows, ``fastmlip::node_difference``: forces (and the like) from edge gradients.

    out[n] = sum over edges e with plus(e) = n of values[e]  -  sum over edges e with minus(e) = n of values[e]

Forces from the energy's gradient g by the edge vectors are this with one side the edges' senders and the other
their receivers. The reference is two ``index_add_`` (sequential on a CPU); the Triton kernel
(:mod:`fastmlip.kernels.node_sums`) walks each node's edges through the receiver- and sender-sorted lists of
:func:`fastmlip.graph.sort_edges` in the same order instead of adding with atomics, so a GPU gives the same bits
every run. The derivative is a gather, ``d values[e] = d out[plus(e)] - d out[minus(e)]``, in plain torch (any
order).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..graph import SortedEdges
from . import dispatch, library


def _reference(values: Tensor, plus_index: Tensor, minus_index: Tensor, num_nodes: int) -> Tensor:
    out = values.new_zeros(num_nodes, values.shape[1])
    return out.index_add_(0, plus_index, values).index_add_(0, minus_index, values, alpha=-1)


@library.custom_op("fastmlip::node_difference")
def _node_difference(values: Tensor, plus_index: Tensor, minus_index: Tensor, plus_perm: Tensor, plus_ptr: Tensor,
                     minus_perm: Tensor, minus_ptr: Tensor) -> Tensor:
    if dispatch.backend_for(values) == "triton":
        from ..kernels import node_sums

        return node_sums.difference(values, (plus_perm, plus_ptr), (minus_perm, minus_ptr))
    return _reference(values, plus_index, minus_index, plus_ptr.numel() - 1)


@_node_difference.register_fake
def _(values, plus_index, minus_index, plus_perm, plus_ptr, minus_perm, minus_ptr):
    return values.new_empty(plus_ptr.shape[0] - 1, values.shape[1])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _backward(ctx, grad):
    plus_index, minus_index = ctx.saved_tensors
    return grad.index_select(0, plus_index) - grad.index_select(0, minus_index), None, None, None, None, None, None


_node_difference.register_autograd(_backward, setup_context=_setup)


def node_difference(values: Tensor, edges: SortedEdges, src: Tensor, dst: Tensor, plus: str) -> Tensor:
    """[N, W]: per node, the sum of ``values`` [E, W] over its edges on the ``plus`` side ("src" or "dst") minus
    the sum over its edges on the other. ``src``/``dst`` are the edges' nodes in ``values``' order, ``edges`` their
    :func:`fastmlip.graph.sort_edges` (the caller's order: ``edges.order`` maps back to it)."""
    by_dst = (edges.order, edges.dst_ptr)
    by_src = (edges.order.index_select(0, edges.src_perm), edges.src_ptr)
    sides = {"src": (src, by_src), "dst": (dst, by_dst)}
    if plus not in sides:
        raise ValueError(f"plus={plus!r}: expected 'src' or 'dst'")
    (plus_index, plus_list), (minus_index, minus_list) = sides[plus], sides["dst" if plus == "src" else "src"]
    return _node_difference(values, plus_index, minus_index, *plus_list, *minus_list)
