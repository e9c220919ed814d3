"""A convolution whose per-edge weights are read from a radial table: ``fastmlip::table_conv`` and its backward.

Why: with the weights w = scale * f(r) read from a table (:mod:`fastmlip.ops.radial_table`), the two ops in a
row, ``radial_table`` then ``conv_fwd``, make the backward store the weight gradient (as large as the weights,
E x hundreds of floats a layer) only for the table's backward to read it back and dot it with f'(r). As one op,
the backward's sender walk makes d/dr (and d/d scale) where it makes the weight gradient
(:mod:`fastmlip.kernels.conv_edge_grads`): two passes over E x W floats a layer fewer, and one launch.

The forward is the two ops' forward; it returns the weights too, for its backward (they are not differentiable:
use :func:`fastmlip.ops.radial_table.radial_table` for weights that take gradients). Or it keeps no weights at all
(``keep_weights=False``, ``FASTMLIP_RADIAL_TABLE=conv``): the convolution's kernels interpolate each weight from
the table where they use it, forward and backward, so the largest tensors of a step never exist. A backward that
will itself be differentiated (``create_graph``) runs the two ops' own backwards, which have autograd to any order.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..descriptors import TensorProductProblem
from ..reference import radial_table as ref_table
from ..reference import tensor_product as ref_conv
from . import dispatch, library, registry
from .conv import check_conv_problem, check_conv_inputs, conv_bwd, conv_fwd
from .radial_table import RadialTable, check_table_inputs, radial_table_bwd, radial_table_fwd


@library.custom_op("fastmlip::table_conv")
def table_conv_fwd(x: Tensor, edge_attr: Tensor, lengths: Tensor, values: Tensor, segments: Tensor,
                   row_scale: Optional[Tensor], order: Optional[Tensor], src: Tensor, dst: Tensor,
                   dst_ptr: Optional[Tensor], src_perm: Optional[Tensor], src_ptr: Optional[Tensor], num_nodes: int,
                   key: str, keep_weights: bool) -> tuple[Tensor, Tensor]:
    """(the convolution of x with weights w = radial_table(lengths) * row_scale, w if ``keep_weights`` else an
    empty tensor). Without ``keep_weights`` the kernels read the weights from the table where they use them, in
    the forward and again in the backward, so no E x W tensor exists."""
    if not keep_weights and dispatch.backend_for(x) == "triton":
        from ..kernels import conv_table

        out = conv_table.table_forward(registry.lookup(key), x, edge_attr, src, dst_ptr, num_nodes,
                                       (lengths, values, segments, row_scale))
        if out is not None:
            return out, x.new_empty(0)
    w = radial_table_fwd(lengths, values, segments, row_scale, order)
    out = conv_fwd(x, edge_attr, w, src, dst, dst_ptr, src_perm, src_ptr, num_nodes, key)
    return out, (w if keep_weights else x.new_empty(0))


@table_conv_fwd.register_fake
def _(x, edge_attr, lengths, values, segments, row_scale, order, src, dst, dst_ptr, src_perm, src_ptr, num_nodes,
      key, keep_weights):
    weights = (lengths.shape[0], values.shape[2]) if keep_weights else (0,)
    return x.new_empty(num_nodes, registry.lookup(key).dim_out), lengths.new_empty(weights)


@library.custom_op("fastmlip::table_conv_bwd")
def table_conv_bwd(grad_out: Tensor, x: Tensor, edge_attr: Tensor, w: Tensor, lengths: Tensor, values: Tensor,
                   segments: Tensor, row_scale: Optional[Tensor], order: Optional[Tensor], src: Tensor, dst: Tensor,
                   dst_ptr: Optional[Tensor], src_perm: Optional[Tensor], src_ptr: Optional[Tensor], key: str,
                   want: str) -> tuple[Tensor, Tensor]:
    """(grad x, per-edge gradients [E, columns]) of <grad_out, table_conv(...)[0]>, ``want`` a subset of 'xyrs'
    (x, edge_attr, lengths, row_scale); the columns hold edge_attr's gradient, then d/d lengths, then d/d row_scale,
    those wanted. An empty ``w``: the weights were not kept, and are read from the table again. No autograd:
    :func:`_backward` calls it only where no second derivative follows."""
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        from ..kernels import conv_table

        return conv_table.table_backward(problem, grad_out, x, edge_attr, w, src, dst, dst_ptr, src_perm, src_ptr,
                                         (lengths, values, segments, row_scale, order), want)
    if not w.numel():
        w = ref_table.interpolate(values, segments, lengths, row_scale)
    wants_w = "r" in want or "s" in want
    gx, gy, gw = ref_conv.fused_conv_backward(problem, grad_out, x, edge_attr, w, src, dst,
                                              ("x" in want, "y" in want, wants_w))
    columns = [gy] if "y" in want else []
    if wants_w:
        grad_r, grad_s = ref_table.interpolate_backward(gw, values, segments, lengths, row_scale)
        columns += [grad_r.unsqueeze(1)] if "r" in want else []
        columns += [grad_s.unsqueeze(1)] if "s" in want else []
    return (gx if "x" in want else x.new_empty(0)), (torch.cat(columns, 1) if columns else x.new_empty(0))


@table_conv_bwd.register_fake
def _(grad_out, x, edge_attr, w, lengths, values, segments, row_scale, order, src, dst, dst_ptr, src_perm, src_ptr,
      key, want):
    per_edge_scalars = sum(name in want for name in "rs")  # an int: a bool added to a symbolic size fails (torch 2.11)
    width = (edge_attr.shape[1] if "y" in want else 0) + per_edge_scalars
    return (x.new_empty(x.shape if "x" in want else (0,)),
            x.new_empty((edge_attr.shape[0], width) if width else (0,)))


def _setup(ctx, inputs, output):
    x, edge_attr, lengths, values, segments, row_scale, order, src, dst, dst_ptr, src_perm, src_ptr, _, key, _ = inputs
    ctx.save_for_backward(x, edge_attr, lengths, values, segments, row_scale, order, output[1])
    ctx.graph = (src, dst, dst_ptr, src_perm, src_ptr)
    ctx.key = key
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _):
    x, edge_attr, lengths, values, segments, row_scale, order, w = ctx.saved_tensors
    want_x, want_attr, want_r, _, _, want_s = ctx.needs_input_grad[:6]
    want_s = want_s and row_scale is not None
    grads = [None] * 15
    if torch.is_grad_enabled():  # create_graph: the two ops' backwards, whose own derivatives exist
        w = radial_table_fwd(lengths, values, segments, row_scale, order)
        gx, gy, gw = conv_bwd(grad_out, x, edge_attr, w, *ctx.graph, ctx.key, want_x, want_attr, want_r or want_s)
        if want_r or want_s:
            grad_r, grad_s = radial_table_bwd(gw, lengths, values, segments, row_scale, order, want_s)
            grads[2], grads[5] = (grad_r if want_r else None), (grad_s if want_s else None)
        grads[0], grads[1] = (gx if want_x else None), (gy if want_attr else None)
        return tuple(grads)
    want = "".join(name for name, flag in zip("xyrs", (want_x, want_attr, want_r, want_s)) if flag)
    gx, per_edge = table_conv_bwd(grad_out.contiguous(), x, edge_attr, w, lengths, values, segments, row_scale,
                                  order, *ctx.graph, ctx.key, want)
    column = 0
    if want_attr:
        grads[1] = per_edge[:, :edge_attr.shape[1]]
        column = edge_attr.shape[1]
    for index, flag in ((2, want_r), (5, want_s)):
        if flag:
            grads[index] = per_edge[:, column]
            column += 1
    grads[0] = gx if want_x else None
    return tuple(grads)


table_conv_fwd.register_autograd(_backward, setup_context=_setup)


def table_conv(problem: TensorProductProblem, table: RadialTable, x: Tensor, edge_attr: Tensor, lengths: Tensor,
               row_scale: Optional[Tensor], edges, order: Optional[Tensor] = None, *,
               keep_weights: bool = True) -> Tensor:
    """``fused_conv(problem, x, edge_attr, radial_table(table, lengths, row_scale, order), ...)`` over
    receiver-sorted ``edges`` (:func:`fastmlip.graph.sort_edges`; per-edge tensors in that order), with a backward
    that never stores the weights' gradient; without ``keep_weights`` the weights are not stored either (the
    kernels read them from the table where they use them)."""
    check_conv_problem(problem)
    check_table_inputs(table, lengths, row_scale, order)
    if table.dim_out != problem.weight_numel:
        raise ValueError(f"{table} has {table.dim_out} columns, {problem} takes {problem.weight_numel} weights")
    check_conv_inputs(problem, x, edge_attr, None, edges.src, edges.dst, x.shape[0], edges.dst_ptr)
    key = registry.register(problem)
    out, _ = table_conv_fwd(x, edge_attr, lengths, table.values, table.segments, row_scale, order, edges.src,
                            edges.dst, edges.dst_ptr, edges.src_perm, edges.src_ptr, x.shape[0], key, keep_weights)
    return out
