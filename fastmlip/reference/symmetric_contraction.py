"""MACE's symmetric contraction in plain torch, exact to ``mace.modules.symmetric_contraction``.

Per output irrep and channel c, with A_nu[n] = U_nu . W_nu[species[n]] (contracted over the parameter axis):
    out = (...((A_corr . x + A_{corr-1}) . x + ...) + A_1) . x
where ". x" contracts the last coupling axis with x[n, c, :]: MACE's recursion, with the one-hot product
``W . node_attrs`` replaced by a gather of the species' weights. The backward is explicit plain torch, so autograd
can differentiate it again (second derivatives for force training).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..descriptors import SymmetricContractionProblem
from . import device_constant


def u_matrices(problem: SymmetricContractionProblem, dtype: torch.dtype, device: torch.device) -> list:
    """Dense U tensors per contraction, per nu, shaped (M, L**(nu-1), L, P); None where U is zero.

    Cached per dtype and device, but built afresh while tracing (torch.compile), where real tensors must not leak in.
    """
    big_l = problem.coupling_dim

    def build(dtype, device):
        return [[None if not u.values else
                 torch.as_tensor(u.dense(), dtype=dtype, device=device).reshape(spec.ir_dim, big_l ** (nu - 1), big_l,
                                                                                -1)
                 for nu, u in enumerate(spec.u_matrices, start=1)]
                for spec in problem.contractions]

    return device_constant(("u_matrices", problem.key), build, dtype, device)


def _split_weights(problem: SymmetricContractionProblem, weights) -> list:
    """The flat weight list, regrouped per contraction and indexed by nu - 1."""
    out, i = [], 0
    for spec in problem.contractions:
        out.append(list(weights[i:i + spec.correlation]))
        i += spec.correlation
    return out


def _coupled(u: Tensor, w: Tensor, species: Tensor) -> Tensor:
    """A[n, c, m, z] = sum_k U[m, z, k] W[species[n], k, c], with z the flattened coupling axes."""
    return torch.einsum("mzk,nkc->ncmz", u.flatten(1, 2), w[species])


def _contract_one(m: int, u: list, ws: list, x: Tensor, species: Tensor) -> tuple:
    """Forward of one contraction; returns the output [N, C, M] and the partial sums out_{nu+1}, nu = 1..corr."""
    n, c, big_l = x.shape
    corr = len(ws)
    out = x.new_zeros(n, c, m, big_l ** (corr - 1))
    if u[-1] is not None:
        out = torch.einsum("mzik,nkc,nci->ncmz", u[-1], ws[-1][species], x)
    partials = [None] * corr
    for nu in range(corr - 1, 0, -1):
        partials[nu - 1] = out
        s = out if u[nu - 1] is None else out + _coupled(u[nu - 1], ws[nu - 1], species)
        out = torch.einsum("ncmzi,nci->ncmz", s.view(n, c, m, big_l ** (nu - 1), big_l), x)
    return out.squeeze(-1), partials


def symmetric_contraction(problem: SymmetricContractionProblem, x: Tensor, species: Tensor, weights) -> Tensor:
    """x [N, C, L], species [N] (int64), weights in ``problem.weight_names`` order -> [N, dim_out] (mul_ir)."""
    us = u_matrices(problem, x.dtype, x.device)
    outs = [_contract_one(spec.ir_dim, u, ws, x, species)[0].flatten(1)
            for spec, u, ws in zip(problem.contractions, us, _split_weights(problem, weights))]
    return torch.cat(outs, dim=-1)


def symmetric_contraction_backward(problem: SymmetricContractionProblem, grad_out: Tensor, x: Tensor,
                                   species: Tensor, weights) -> tuple:
    """Gradients (d x, [d w for w in weights]) of <grad_out, symmetric_contraction(x, species, weights)>."""
    n, c, big_l = x.shape
    us = u_matrices(problem, x.dtype, x.device)
    grad_x = torch.zeros_like(x)
    grad_ws = []
    offset = 0
    for spec, u, ws in zip(problem.contractions, us, _split_weights(problem, weights)):
        m, corr = spec.ir_dim, spec.correlation
        g = grad_out[:, offset:offset + c * m].reshape(n, c, m, 1)
        offset += c * m
        _, partials = _contract_one(m, u, ws, x, species)
        grads_here = [None] * corr
        for nu in range(1, corr + 1):
            u_nu = u[nu - 1]
            if nu < corr:
                s = partials[nu - 1] if u_nu is None else partials[nu - 1] + _coupled(u_nu, ws[nu - 1], species)
                grad_x = grad_x + torch.einsum("ncmz,ncmzi->nci", g, s.view(n, c, m, big_l ** (nu - 1), big_l))
            elif u_nu is not None:
                grad_x = grad_x + torch.einsum("ncmz,mzik,nkc->nci", g, u_nu, ws[nu - 1][species])
            if u_nu is None:
                grads_here[nu - 1] = torch.zeros_like(ws[nu - 1])
            else:
                per_node = torch.einsum("ncmz,nci,mzik->nkc", g, x, u_nu)
                grads_here[nu - 1] = torch.zeros_like(ws[nu - 1]).index_add(0, species, per_node)
            if nu < corr:
                g = torch.einsum("ncmz,nci->ncmzi", g, x).reshape(n, c, m, big_l ** nu)
        grad_ws.extend(grads_here)
    return grad_x, grad_ws
