"""The fused convolution op: out[n] = sum over edges e with dst[e] = n of TP(x[src[e]], edge_attr[e], w[e]).

Two custom ops, ``fastmlip::conv_fwd`` and ``fastmlip::conv_bwd``, each with autograd written in terms of the
two, so gradients of any order exist (forces need the first, training on forces the second). The op is
trilinear in (x, edge_attr, w), which is why every derivative is again a forward or a backward call.

Edge order: any. When the caller passes ``dst_ptr`` (CSR offsets of edges sorted by dst) the kernels take the
deterministic receiver-owned path; ``src_perm``/``src_ptr`` (edges ordered by src) make the x-gradient
deterministic too. :func:`fastmlip.graph.sort_edges` produces all three.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..descriptors import TensorProductProblem
from ..reference import tensor_product as ref
from . import dispatch, library, registry


def check_conv_problem(problem: TensorProductProblem) -> None:
    bad = sorted({p.mode for p in problem.paths if p.mode != "uvu" or not p.has_weight})
    if bad:
        raise ValueError(f"fused convolution supports weighted 'uvu' paths only; {problem} has modes {bad}")
    if problem.shared_weights:
        raise ValueError("fused convolution needs per-edge weights (shared_weights=False)")


def _kernels():
    from ..kernels import conv as conv_kernels

    return conv_kernels


def _use_triton(t: Tensor) -> bool:
    return dispatch.backend_for(t) == "triton"


@library.custom_op("fastmlip::conv_fwd")
def conv_fwd(x: Tensor, edge_attr: Tensor, w: Tensor, src: Tensor, dst: Tensor, dst_ptr: Optional[Tensor],
             src_perm: Optional[Tensor], src_ptr: Optional[Tensor], num_nodes: int, key: str) -> Tensor:
    """``src_perm``/``src_ptr`` are unused here and carried for the backward's x-gradient."""
    problem = registry.lookup(key)
    if _use_triton(x):
        return _kernels().forward(problem, x, edge_attr, w, src, dst, dst_ptr, num_nodes)
    return ref.fused_conv(problem, x, edge_attr, w, src, dst, num_nodes)


@conv_fwd.register_fake
def _(x, edge_attr, w, src, dst, dst_ptr, src_perm, src_ptr, num_nodes, key):
    return x.new_empty(num_nodes, registry.lookup(key).dim_out)


@library.custom_op("fastmlip::conv_bwd")
def conv_bwd(grad_out: Tensor, x: Tensor, edge_attr: Tensor, w: Tensor, src: Tensor, dst: Tensor,
             dst_ptr: Optional[Tensor], src_perm: Optional[Tensor], src_ptr: Optional[Tensor], key: str,
             want_x: bool, want_edge_attr: bool, want_w: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of <grad_out, conv(x, edge_attr, w)>; an unwanted one comes back empty."""
    problem = registry.lookup(key)
    want = (want_x, want_edge_attr, want_w)
    if _use_triton(x):
        return _kernels().backward(problem, grad_out.contiguous(), x, edge_attr, w, src, dst, dst_ptr, src_perm,
                                   src_ptr, want)
    grads = ref.fused_conv_backward(problem, grad_out, x, edge_attr, w, src, dst, want)
    return tuple(gr if flag else t.new_empty(0) for gr, t, flag in zip(grads, (x, edge_attr, w), want))


@conv_bwd.register_fake
def _(grad_out, x, edge_attr, w, src, dst, dst_ptr, src_perm, src_ptr, key, want_x, want_edge_attr, want_w):
    return tuple(t.new_empty(t.shape if flag else (0,))
                 for t, flag in zip((x, edge_attr, w), (want_x, want_edge_attr, want_w)))


def _graph(ctx):
    return ctx.src, ctx.dst, ctx.dst_ptr, ctx.src_perm, ctx.src_ptr


def _fwd_setup(ctx, inputs, output):
    x, edge_attr, w, src, dst, dst_ptr, src_perm, src_ptr, num_nodes, key = inputs
    ctx.save_for_backward(x, edge_attr, w)
    ctx.src, ctx.dst, ctx.dst_ptr, ctx.src_perm, ctx.src_ptr = src, dst, dst_ptr, src_perm, src_ptr
    ctx.key = key


def _fwd_backward(ctx, grad):
    x, edge_attr, w = ctx.saved_tensors
    want = ctx.needs_input_grad[:3]
    grads = conv_bwd(grad, x, edge_attr, w, *_graph(ctx), ctx.key, *want)
    return (*(g if flag else None for g, flag in zip(grads, want)),) + (None,) * 7


conv_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _bwd_setup(ctx, inputs, output):
    grad_out, x, edge_attr, w, src, dst, dst_ptr, src_perm, src_ptr, key, *want = inputs
    ctx.save_for_backward(grad_out, x, edge_attr, w)
    ctx.src, ctx.dst, ctx.dst_ptr, ctx.src_perm, ctx.src_ptr = src, dst, dst_ptr, src_perm, src_ptr
    ctx.key, ctx.want = key, want


def _present(t):
    return t is not None and t.numel() > 0


def _sum(terms):
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


def _bwd_backward(ctx, h_x, h_attr, h_w):
    """Differentiate (gx, gy, gw) = grads of T(g, x, y, w) = <g, F(x, y, w)>, T linear in each argument."""
    g, x, y, w = ctx.saved_tensors
    h_x, h_attr, h_w = (h if flag and _present(h) else None for h, flag in zip((h_x, h_attr, h_w), ctx.want))
    need_g, need_x, need_y, need_w = ctx.needs_input_grad[:4]
    graph = _graph(ctx)
    n = g.shape[0]

    def fwd(a, b, c):
        return conv_fwd(a, b, c, *graph, n, ctx.key)

    def bwd(a, b, c, which):
        flags = [k == which for k in range(3)]
        return conv_bwd(g, a, b, c, *graph, ctx.key, *flags)[which]

    d_g = d_x = d_y = d_w = None
    if need_g:
        d_g = _sum([fwd(h_x, y, w) if h_x is not None else None,
                    fwd(x, h_attr, w) if h_attr is not None else None,
                    fwd(x, y, h_w) if h_w is not None else None])
    if need_x:
        d_x = _sum([bwd(x, h_attr, w, 0) if h_attr is not None else None,
                    bwd(x, y, h_w, 0) if h_w is not None else None])
    if need_y:
        d_y = _sum([bwd(h_x, y, w, 1) if h_x is not None else None,
                    bwd(x, y, h_w, 1) if h_w is not None else None])
    if need_w:
        d_w = _sum([bwd(h_x, y, w, 2) if h_x is not None else None,
                    bwd(x, h_attr, w, 2) if h_attr is not None else None])
    return (d_g, d_x, d_y, d_w) + (None,) * 9


conv_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def check_conv_inputs(problem, x, edge_attr, w, src, dst, num_nodes, dst_ptr):
    """A clear error for inputs the convolution cannot take (``w`` None: the weights are made inside)."""
    def fail(msg):
        raise ValueError(f"fused_conv({problem}): {msg}")

    checked = (("x", x, problem.dim_in1), ("edge_attr", edge_attr, problem.dim_in2))
    for name, t, width in checked + ((("edge_weight", w, problem.weight_numel),) if w is not None else ()):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != width:
            fail(f"{name} must be a 2-D tensor with {width} columns, got "
                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if not t.is_floating_point():
            fail(f"{name} must be floating point, got {t.dtype}")
        if t.dtype != x.dtype:
            fail(f"dtypes differ: x is {x.dtype}, {name} is {t.dtype}")
        if t.device != x.device:
            fail(f"devices differ: x is on {x.device}, {name} on {t.device}")
    n_edges = edge_attr.shape[0]
    for name, t in (("src", src), ("dst", dst)):
        if not isinstance(t, Tensor) or t.dtype not in (torch.int32, torch.int64) or t.shape != (n_edges,):
            fail(f"{name} must be an int32/int64 tensor of shape ({n_edges},)")
        if t.device != x.device:
            fail(f"devices differ: x is on {x.device}, {name} on {t.device}")
    if w is not None and w.shape[0] != n_edges:
        fail(f"edge_weight has {w.shape[0]} rows but there are {n_edges} edges")
    if num_nodes < 0:
        fail(f"num_nodes must be non-negative, got {num_nodes}")
    if dst_ptr is not None and (dst_ptr.shape != (num_nodes + 1,) or dst_ptr.device != x.device):
        fail(f"dst_ptr must have shape ({num_nodes + 1},) on {x.device}")


def fused_conv(problem: TensorProductProblem, x: Tensor, edge_attr: Tensor, edge_weight: Tensor, src: Tensor,
               dst: Tensor, num_nodes: Optional[int] = None, *, dst_ptr: Optional[Tensor] = None,
               src_perm: Optional[Tensor] = None, src_ptr: Optional[Tensor] = None) -> Tensor:
    """Fused gather → "uvu" tensor product with per-edge weights → scatter-sum into ``dst``.

    ``dst_ptr`` (and for a deterministic x-gradient ``src_perm``/``src_ptr``) declare that edges are sorted by
    dst; see :func:`fastmlip.graph.sort_edges`.
    """
    check_conv_problem(problem)
    if num_nodes is None:
        num_nodes = x.shape[0]
    elif not isinstance(num_nodes, torch.SymInt):  # a symbolic count (an exported program) stays symbolic
        num_nodes = int(num_nodes)
    check_conv_inputs(problem, x, edge_attr, edge_weight, src, dst, num_nodes, dst_ptr)
    key = registry.register(problem)
    return conv_fwd(x, edge_attr, edge_weight, src, dst, dst_ptr, src_perm, src_ptr, num_nodes, key)
