"""A convolution whose per-edge weights come from a radial MLP, without keeping those weights for the backward.

Why: the per-edge weights ``w = mlp(radial) * row_scale`` are the largest tensors of a step (E x hundreds of
floats per layer, ~90% of what autograd keeps; docs/memory.md), and the convolution saves them for its backward.
:func:`radial_conv` saves only the MLP's small input and recomputes ``w`` inside the backward (one more MLP
forward per layer), and can go through the receivers in chunks of at most ``chunk_edges`` edges, so that no
E-sized weight tensor exists at all, only chunk-sized ones: how a system too large for one pass fits.

Results equal ``fused_conv(problem, x, edge_attr, mlp(radial) * row_scale, ...)`` to rounding, and gradients of
any order exist: the backward is written in differentiable ops (``fastmlip::conv_bwd`` and autograd through the
recomputed MLP).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..descriptors import TensorProductProblem
from ..graph import SortedEdges
from ..memo import derived
from . import registry
from .conv import check_conv_problem, conv_bwd, conv_fwd, fused_conv


@dataclass(frozen=True)
class ReceiverChunk:
    """Receivers ``[first, last)`` and their edges ``[edge_start, edge_end)`` in receiver-sorted order."""

    first: int
    last: int
    edge_start: int
    edge_end: int


def receiver_chunks(dst_ptr: Tensor, chunk_edges: int) -> tuple:
    """Consecutive receivers grouped so that each group has at most ``chunk_edges`` edges (a receiver with more
    forms a group alone). Reads the CSR offsets on the host once per edge list (kept on ``dst_ptr``)."""
    if chunk_edges < 1:
        raise ValueError(f"chunk_edges must be positive, got {chunk_edges}")
    return derived(dst_ptr, ("receiver_chunks", chunk_edges), lambda: _receiver_chunks(dst_ptr, chunk_edges))


def _receiver_chunks(dst_ptr: Tensor, chunk_edges: int) -> tuple:
    ptr = dst_ptr.tolist()
    chunks, first = [], 0
    num_nodes = len(ptr) - 1
    while first < num_nodes:
        # a binary search per chunk, not a step per receiver (a new edge list every step, millions of receivers):
        # the last boundary whose edges still fit, but always at least one receiver
        last = max(first + 1, bisect.bisect_right(ptr, ptr[first] + chunk_edges, lo=first + 1) - 1)
        chunks.append(ReceiverChunk(first, last, ptr[first], ptr[last]))
        first = last
    return tuple(chunks)


@dataclass(frozen=True)
class _Spec:
    """What the autograd function needs besides its tensor inputs."""

    key: str
    weights_fn: Callable
    edges: SortedEdges
    chunks: tuple
    num_params: int


def _chunk_graph(spec: _Spec, chunk: ReceiverChunk):
    """(src, dst, dst_ptr, src_perm, src_ptr) of one chunk's edges, dst local to the chunk."""
    e = spec.edges
    if len(spec.chunks) == 1:  # the whole graph: the deterministic x-gradient stays available
        return e.src, e.dst, e.dst_ptr, e.src_perm, e.src_ptr
    edges = slice(chunk.edge_start, chunk.edge_end)
    return (e.src[edges], e.dst[edges] - chunk.first, e.dst_ptr[chunk.first:chunk.last + 1] - chunk.edge_start,
            None, None)


def _rows(t: Optional[Tensor], chunk: ReceiverChunk) -> Optional[Tensor]:
    return None if t is None else t[chunk.edge_start:chunk.edge_end]


class _RadialConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: _Spec, x, edge_attr, radial, row_scale, *params):
        outs = []
        for chunk in spec.chunks:
            src, dst, dst_ptr, src_perm, src_ptr = _chunk_graph(spec, chunk)
            w = spec.weights_fn(_rows(radial, chunk), _rows(row_scale, chunk))
            outs.append(conv_fwd(x, _rows(edge_attr, chunk), w, src, dst, dst_ptr, src_perm, src_ptr,
                                 chunk.last - chunk.first, spec.key))
        ctx.spec = spec
        ctx.save_for_backward(x, edge_attr, radial, row_scale, *params)
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    @staticmethod
    def backward(ctx, grad):
        spec = ctx.spec
        x, edge_attr, radial, row_scale, *params = ctx.saved_tensors
        want_x, want_attr, *want_mlp = ctx.needs_input_grad[1:]
        # the MLP's inputs that want a gradient, in the order of ctx's inputs after edge_attr
        mlp_inputs = [(i, t) for i, (t, flag) in enumerate(zip((radial, row_scale, *params), want_mlp))
                      if flag and t is not None]
        create_graph = torch.is_grad_enabled()
        grad_x, grad_attr, grad_mlp = [], [], [[] for _ in mlp_inputs]
        for chunk in spec.chunks:
            src, dst, dst_ptr, src_perm, src_ptr = _chunk_graph(spec, chunk)
            with torch.enable_grad():
                w = spec.weights_fn(_rows(radial, chunk), _rows(row_scale, chunk))
            g = grad[chunk.first:chunk.last] if len(spec.chunks) > 1 else grad
            gx, ga, gw = conv_bwd(g, x, _rows(edge_attr, chunk), w if create_graph else w.detach(), src, dst,
                                  dst_ptr, src_perm, src_ptr, spec.key, want_x, want_attr, bool(mlp_inputs))
            if want_x:
                grad_x.append(gx)
            if want_attr:
                grad_attr.append(ga)
            if mlp_inputs:
                grads = torch.autograd.grad(w, [t for _, t in mlp_inputs], gw, create_graph=create_graph,
                                            allow_unused=True)
                for store, gr, (_, t) in zip(grad_mlp, grads, mlp_inputs):
                    store.append(torch.zeros_like(t) if gr is None else gr)
        out = [None] * (2 + spec.num_params)
        for (i, _), terms in zip(mlp_inputs, grad_mlp):
            out[i] = _sum(terms)
        return (None, _sum(grad_x), torch.cat(grad_attr) if want_attr else None, *out)


def _sum(terms):
    return None if not terms else sum(terms[1:], terms[0])


def radial_conv(problem: TensorProductProblem, weights_fn: Callable, params: Sequence[Tensor], x: Tensor,
                edge_attr: Tensor, radial: Tensor, row_scale: Optional[Tensor], edges: SortedEdges,
                chunk_edges: Optional[int] = None) -> Tensor:
    """``fused_conv(problem, x, edge_attr, weights_fn(radial, row_scale), ...)`` over receiver-sorted ``edges``
    (:func:`fastmlip.graph.sort_edges`; per-edge tensors already in that order).

    ``weights_fn(radial_rows, row_scale_rows)`` computes the weights of any run of edges from ``params`` (the
    tensors it reads, listed so that their gradients flow). ``chunk_edges=None``: the weights are computed once
    and kept for the backward (fastest). An integer: they are recomputed in the backward, receivers taken in
    chunks of at most that many edges (one host read of the CSR offsets per edge list).
    """
    if chunk_edges is None:
        w = weights_fn(radial, row_scale)
        return fused_conv(problem, x, edge_attr, w, edges.src, edges.dst, x.shape[0], dst_ptr=edges.dst_ptr,
                          src_perm=edges.src_perm, src_ptr=edges.src_ptr)
    check_conv_problem(problem)
    num_edges = edge_attr.shape[0]
    chunks = (receiver_chunks(edges.dst_ptr, chunk_edges) if num_edges > chunk_edges
              else (ReceiverChunk(0, x.shape[0], 0, num_edges),))
    spec = _Spec(registry.register(problem), weights_fn, edges, chunks, len(params))
    return _RadialConv.apply(spec, x, edge_attr, radial, row_scale, *params)
