"""Tensor product and fused convolution in plain torch, exact to e3nn (same blocks, same normalisation)."""
from __future__ import annotations

import torch

from ..descriptors import TensorProductProblem, iter_paths
from . import device_constant


def _cg(path, like: torch.Tensor) -> torch.Tensor:
    return device_constant(("cg", path.cg), lambda dt, dev: torch.as_tensor(path.cg.dense(), dtype=dt, device=dev),
                           like.dtype, like.device)


def _couple(a, b, cg):
    """sum_ij C[i,j,k] a[z,u,i] b[z,u,j] for a [Z, U, d1], b [Z, U, d2] -> [Z, U, d3]."""
    (z, u, d1), d2, d3 = a.shape, b.shape[-1], cg.shape[-1]
    outer = (a.unsqueeze(-1) * b.unsqueeze(-2)).reshape(z * u, d1 * d2)
    return (outer @ cg.reshape(d1 * d2, d3)).reshape(z, u, d3)


def _edge_coupling(cg, y):
    """T[z, i, k] = sum_j C[i, j, k] y[z, j] for a single second-input irrep y [Z, d2] (an edge's harmonics).

    With the second input of multiplicity 1 a "uvu" path is x [Z, U, d1] @ T times the weights: no [Z*U, d1*d2]
    outer product (the CPU reference spent most of a SevenNet-0 step building those)."""
    d1, d2, d3 = cg.shape
    return (y @ cg.transpose(0, 1).reshape(d2, d1 * d3)).reshape(-1, d1, d3)


def _path_output(path, x1b, x2b, w, cg):
    """One instruction, its path weight applied: x1b [Z, m1, d1], x2b [Z, m2, d2], w [Z, *weight_shape] or
    None -> [Z, m_out, d3]."""
    if path.mode == "uvu" and w is not None and x2b.shape[1] == 1:  # the conv's case: x @ T, scaled per channel
        return torch.bmm(x1b, _edge_coupling(cg, x2b[:, 0])) * (w * path.path_weight)
    return path.path_weight * _unweighted_output(path.mode, x1b, x2b, w, cg)


def _unweighted_output(mode, x1b, x2b, w, cg):
    if mode in ("uuw", "uuu"):
        xx = torch.einsum("zui,zuj,ijk->zuk", x1b, x2b, cg)
        if mode == "uuu":
            return xx * w.unsqueeze(-1) if w is not None else xx
        return torch.einsum("zuw,zuk->zwk", w, xx) if w is not None else xx.sum(1, keepdim=True)
    if mode == "uvu" and w is not None:  # one outer product and one GEMM with the CG block
        return _couple(x1b, torch.bmm(w, x2b), cg)
    t = torch.einsum("zui,ijk->zujk", x1b, cg)
    if mode == "uvw":
        return torch.einsum("zuvw,zujk,zvj->zwk", w, t, x2b)
    if mode == "uvu":
        if w is None:
            return torch.einsum("zujk,zvj->zuk", t, x2b)
        return torch.einsum("zuv,zujk,zvj->zuk", w, t, x2b)
    if mode == "uvv":
        if w is None:
            return torch.einsum("zujk,zvj->zvk", t, x2b)
        return torch.einsum("zuv,zujk,zvj->zvk", w, t, x2b)
    raise ValueError(f"unsupported connection mode {mode!r}")


def tensor_product(problem: TensorProductProblem, x1: torch.Tensor, x2: torch.Tensor,
                   weight: torch.Tensor | None) -> torch.Tensor:
    """e3nn's ``TensorProduct.forward(x1, x2, weight)`` for a batch [Z, dim]; shared weights are [numel]."""
    z = x1.shape[0]
    if weight is not None and weight.dim() == 1:
        weight = weight.unsqueeze(0).expand(z, -1)
    blocks = [None] * len(problem.irreps_out)
    for path, o1, o2, _, (a, b, c) in iter_paths(problem):
        x1b = x1[:, o1:o1 + a.dim].reshape(z, a.mul, a.ir_dim)
        x2b = x2[:, o2:o2 + b.dim].reshape(z, b.mul, b.ir_dim)
        w = None
        if path.has_weight:
            w = weight[:, path.weight_offset:path.weight_offset + path.weight_numel].reshape(z, *path.weight_shape)
        out = _path_output(path, x1b, x2b, w, _cg(path, x1))
        blocks[path.i_out] = out if blocks[path.i_out] is None else blocks[path.i_out] + out
    if not blocks:
        return x1.new_zeros(z, 0)
    return torch.cat([(x1.new_zeros(z, m.dim) if block is None else block.reshape(z, m.dim))
                      for block, m in zip(blocks, problem.irreps_out)], dim=1)


def fused_conv(problem: TensorProductProblem, x: torch.Tensor, edge_attr: torch.Tensor, edge_weight: torch.Tensor,
               src: torch.Tensor, dst: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """sum over edges e into dst[e] of TP(x[src[e]], edge_attr[e], edge_weight[e])."""
    messages = tensor_product(problem, x[src], edge_attr, edge_weight)
    return messages.new_zeros(num_nodes, problem.dim_out).index_add_(0, dst, messages)


def fused_conv_backward(problem: TensorProductProblem, grad_out: torch.Tensor, x: torch.Tensor,
                        edge_attr: torch.Tensor, edge_weight: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                        want=(True, True, True)):
    """Gradients of <grad_out, fused_conv(...)> wrt (x, edge_attr, edge_weight), written out per "uvu" path.

    Explicit rather than autograd so it can run inside a custom op, below the autograd dispatch key. Per path,
    with s[e,u,j] = pw * sum_ik C[i,j,k] x[src,u,i] g[dst,u,k]: gw = s.y, gy = w.s, gx from (w.y) and C.g.
    """
    n_edges = edge_attr.shape[0]
    xs, go = x[src], grad_out[dst]
    gx = torch.zeros_like(xs) if want[0] else None
    gy = torch.zeros_like(edge_attr) if want[1] else None
    gw = torch.zeros_like(edge_weight) if want[2] else None
    for path, o1, o2, oo, (a, b, c) in iter_paths(problem):
        x1b = xs[:, o1:o1 + a.dim].reshape(n_edges, a.mul, a.ir_dim)
        x2b = edge_attr[:, o2:o2 + b.dim].reshape(n_edges, b.mul, b.ir_dim)
        gob = go[:, oo:oo + c.dim].reshape(n_edges, c.mul, c.ir_dim)
        w = edge_weight[:, path.weight_offset:path.weight_offset + path.weight_numel].reshape(n_edges, a.mul, b.mul)
        cg = _cg(path, x)
        if b.mul == 1:
            gxb, gyb, gwb = _single_irrep_grads(x1b, x2b[:, 0], w, gob, path.path_weight, cg, want)
        else:
            gxb, gyb, gwb = _path_grads(x1b, x2b, w, gob * path.path_weight, cg, want)
        if gx is not None:
            gx[:, o1:o1 + a.dim] += gxb.reshape(n_edges, a.dim)
        if gy is not None:
            gy[:, o2:o2 + b.dim] += gyb.reshape(n_edges, b.dim)
        if gw is not None:
            span = slice(path.weight_offset, path.weight_offset + path.weight_numel)
            gw[:, span] += gwb.reshape(n_edges, path.weight_numel)
    if gx is not None:
        gx = torch.zeros_like(x).index_add_(0, src, gx)
    return gx, gy, gw


def _path_grads(x1b, x2b, w, gob, cg, want):
    """One path's (gx, gy, gw) blocks, None where not ``want``-ed (``gob`` already scaled by the path weight)."""
    # gx[u,i] = sum_jk C[i,j,k] (w.y)[u,j] g[u,k]
    gx = _couple(torch.bmm(w, x2b), gob, cg.permute(1, 2, 0)) if want[0] else None
    gy = gw = None
    if want[1] or want[2]:  # s[u,j] = sum_ik C[i,j,k] x[u,i] g[u,k]
        s = _couple(x1b, gob, cg.permute(0, 2, 1))
        gy = torch.bmm(w.transpose(1, 2), s) if want[1] else None
        gw = torch.bmm(s, x2b.transpose(1, 2)) if want[2] else None
    return gx, gy, gw


def _single_irrep_grads(x1b, y, w, gob, path_weight, cg, want):
    """:func:`_path_grads` when the second input is a single irrep y [E, d2] (see :func:`_edge_coupling`):
    gx = w (g @ T^T), gw = sum_k (x @ T) g, gy = C : (sum_u w x g^T), the path weight applied to the narrow
    factors (w, and gw's [E, U]) instead of g."""
    n_edges, d1, d3 = x1b.shape[0], cg.shape[0], cg.shape[2]
    t = _edge_coupling(cg, y)
    weighted = w * path_weight
    gx = torch.bmm(gob, t.transpose(1, 2)) * weighted if want[0] else None
    gw = (torch.bmm(x1b, t) * gob).sum(-1) * path_weight if want[2] else None
    gy = None
    if want[1]:
        m = torch.bmm((x1b * weighted).transpose(1, 2), gob).reshape(n_edges, d1 * d3)
        gy = m @ cg.transpose(1, 2).reshape(d1 * d3, cg.shape[1])
    return gx, gy, gw
