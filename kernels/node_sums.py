"""Triton kernel for per-node sums of per-edge rows in a fixed order: forces from the edge-vector gradient.

Why: ``index_add_`` on CUDA adds with float atomics, so the order of a node's terms, and with it the last bits of
every force, changes from run to run; a restarted MD run could then never repeat the uninterrupted one bit for bit.
Here each lane owns one node and walks that node's edges through CSR offsets (the receiver-sorted lists that the
convolution kernels already use), adding one edge at a time: the order is the edges' order, as a sequential
``index_add_`` on a CPU takes them, and an edge whose row is zero (a masked Verlet candidate) changes nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl

NODES = 64  # nodes per program, one per lane row


@triton.jit
def _edge_row(values, perm, position, end, columns, WIDTH: tl.constexpr):
    """values[perm[position]] per node (zeros past the node's last edge)."""
    on = position < end
    edge = tl.load(perm + position, mask=on, other=0).to(tl.int64)
    return tl.load(values + edge[:, None] * WIDTH + columns[None, :], mask=on[:, None] & (columns[None, :] < WIDTH),
                   other=0.0)


@triton.jit
def _walk(acc, values, perm, ptr, node, live, columns, WIDTH: tl.constexpr, SIGN: tl.constexpr):
    """acc[n] += SIGN * values[perm[k]] for k from ptr[n] to ptr[n + 1], one edge at a time in that order.

    Four edges per loop step, all four loaded before the first is added: their loads overlap, so the walk waits
    for memory once per four edges (at 216 atoms a few programs walk ~60 edges each: a chain of latencies, not
    a shortage of bandwidth), while the additions keep the edges' order.
    """
    start = tl.load(ptr + node, mask=live, other=0).to(tl.int64)
    end = tl.load(ptr + node + 1, mask=live, other=0).to(tl.int64)
    for step in range(0, tl.max(end - start, axis=0), 4):
        row0 = _edge_row(values, perm, start + step, end, columns, WIDTH)
        row1 = _edge_row(values, perm, start + step + 1, end, columns, WIDTH)
        row2 = _edge_row(values, perm, start + step + 2, end, columns, WIDTH)
        row3 = _edge_row(values, perm, start + step + 3, end, columns, WIDTH)
        acc += SIGN * row0
        acc += SIGN * row1
        acc += SIGN * row2
        acc += SIGN * row3
    return acc


@triton.jit(do_not_specialize=["num_nodes"])
def node_difference(values, plus_perm, plus_ptr, minus_perm, minus_ptr, out, num_nodes, WIDTH: tl.constexpr,
                    PAD: tl.constexpr, NODES: tl.constexpr):
    """out[n] = sum of values over n's "plus" edges, then minus the sum over its "minus" edges."""
    node = tl.program_id(0).to(tl.int64) * NODES + tl.arange(0, NODES)
    live = node < num_nodes
    columns = tl.arange(0, PAD)
    acc = tl.zeros([NODES, PAD], values.dtype.element_ty)
    acc = _walk(acc, values, plus_perm, plus_ptr, node, live, columns, WIDTH, 1.0)
    acc = _walk(acc, values, minus_perm, minus_ptr, node, live, columns, WIDTH, -1.0)
    tl.store(out + node[:, None] * WIDTH + columns[None, :], acc, mask=live[:, None] & (columns[None, :] < WIDTH))


def difference(values, plus: tuple, minus: tuple):
    """[N, W] per-node sums of ``values`` [E, W] over the ``plus`` edges minus those over the ``minus`` edges;
    each side is ``(perm, ptr)``: node n's edges are ``perm[ptr[n]:ptr[n + 1]]``."""
    from .launch import new_output  # here: compile workers import this module for its kernel, without torch

    values = values.contiguous()
    num_nodes, width = plus[1].numel() - 1, values.shape[1]
    out = new_output((num_nodes, width), values)
    if num_nodes:
        node_difference[(triton.cdiv(num_nodes, NODES),)](
            values, *plus, *minus, out, num_nodes, WIDTH=width, PAD=triton.next_power_of_2(width), NODES=NODES)
    return out
