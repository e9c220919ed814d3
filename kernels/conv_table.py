"""The fused convolution (:mod:`fastmlip.kernels.conv`) with weights read from a radial table: w = scale * f(r)
(:mod:`fastmlip.ops.radial_table`), for ``fastmlip::table_conv`` (:mod:`fastmlip.ops.table_conv`).

The row-owned kernels take the table instead of, or besides, the weights
(:mod:`fastmlip.kernels.conv_edge_grads`): the forward interpolates each weight where it uses it, so the weights
never go to memory (``FASTMLIP_RADIAL_TABLE=conv``), and the backward's sender walk makes d/dr (and d/d scale)
where it makes each weight's gradient, so that gradient never does. Where rows do not own their edges, the
table's own kernels make the weights and take the gradient, around the plain convolution's kernels.
"""
from __future__ import annotations

import torch

from . import radial_table
from .conv import (_check_supported, _few_rows, _fused_backward_fits, _launch_rows, _plan, _sender_backward,
                   _sender_walk, _split_parts, _split_sum, _table_arguments, backward)
from .launch import new_output, settings, tl_dtype


def table_forward(problem, x, edge_attr, src, dst_ptr, num_nodes, table):
    """:func:`fastmlip.kernels.conv.forward` with weights w = scale * f(lengths) interpolated from a radial table
    inside the kernel (``table`` = (lengths, values, segments, scale or None)): the weights never go to memory.
    None where rows do not own their edges (no ``dst_ptr``, or too few rows): the caller makes the weights and
    calls that."""
    _check_supported(problem)
    tl_dtype(x.dtype)
    if dst_ptr is None or _few_rows(num_nodes):
        return None
    x, edge_attr = x.contiguous(), edge_attr.contiguous()
    block, n_cb, covers = _plan(problem, "fwd", problem.dim_out)
    parts = _split_parts(num_nodes)
    out = new_output((max(parts, 1) * num_nodes, problem.dim_out), x, written_everywhere=covers)
    if num_nodes and n_cb:
        tail, constexprs = _table_arguments(table)
        _launch_rows(problem, "fwdt_csr", parts, num_nodes, n_cb,
                     (x, edge_attr, x, src, src, dst_ptr, src, out, edge_attr.shape[0]), x.dtype, block, tail,
                     constexprs)
    return _split_sum(out, parts)


def table_backward(problem, grad_out, x, edge_attr, w, src, dst, dst_ptr, src_perm, src_ptr, table, want: str):
    """(gx, per-edge sums [E, columns]) of <grad_out, forward(x, edge_attr, w)> where w = scale * f(lengths) is
    read from a table, ``table`` = (lengths, values, segments, scale or None, walking order or None): ``want`` a
    subset of 'xyrs' (x, edge_attr, lengths, scale), the sums' columns as
    :func:`fastmlip.kernels.conv_edge_grads.partial_columns` lays them out. On the sender walk
    (``FASTMLIP_TABLE_GRADIENT=walk``) d/dr and d/d scale are made where the weight gradient is; otherwise the
    weight gradient is stored and read back by the table's own backward. An empty ``w`` (weights not kept): the
    walk reads them from the table too, or, where there is no walk, the table's kernel makes them again."""
    _check_supported(problem)
    tl_dtype(x.dtype)
    grad_out, x, edge_attr, w = (t.contiguous() for t in (grad_out, x, edge_attr, w))
    lengths, values, segments, scale, order = table
    walk = _sender_walk(x, src_perm, src_ptr) and _fused_backward_fits(problem)
    if walk and (not w.numel() or settings().table_gradient == "walk"):
        return _sender_backward(problem, grad_out, x, edge_attr, w, dst, src_perm, src_ptr, want,
                                (lengths, values, segments, scale), table_weights=not w.numel())[:2]
    if not w.numel():
        w = radial_table.forward(lengths, values, segments, scale, order)
    wants_w = "r" in want or "s" in want
    gx, gy, gw = backward(problem, grad_out, x, edge_attr, w, src, dst, dst_ptr, src_perm, src_ptr,
                          ("x" in want, "y" in want, wants_w))
    sums = [gy] if "y" in want else []
    if wants_w:
        grad_r, grad_s = radial_table.backward(gw, lengths, values, segments, scale, order, "s" in want)
        sums += ([grad_r.unsqueeze(1)] if "r" in want else []) + ([grad_s.unsqueeze(1)] if "s" in want else [])
    return gx, torch.cat(sums, 1) if sums else edge_attr.new_empty(0)
