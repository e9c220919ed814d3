"""Triton kernels for the species-indexed linear map (MACE ``skip_tp``, SevenNet self-connection).

Per path, out[n, j, i] += coefficient * sum_k x[n, k, i] W[k, species[n], j] in the mul_ir layout. Nodes are
sorted by species and cut into chunks of one species (:func:`.launch.species_chunks`), so each
program multiplies a [chunk, mul_in] tile by ONE [mul_in, mul_out] weight block per irrep component: a grouped
matmul, never the [N, mul_in, mul_out] gather nor the dense one-hot product e3nn computes. Paths run as
successive launches (the first into an irrep stores, later ones add), so no output needs atomics; the weight
gradient sums each chunk in registers and adds it atomically once.

float32 keeps exact float32 products (``input_precision="ieee"``, never TF32: forces must match to 1e-5);
float64 uses broadcast products, which every Triton build lowers.
"""
from __future__ import annotations

import torch
import triton

from ..descriptors import SpeciesLinearProblem, irreps_offsets
from .launch import new_output, product_mode, settings, species_chunks, tl_dtype
from .tiles import gathered_matmul, weight_gradient


def _tiles(k: int, j: int) -> tuple:
    """(BK, BJ): at least 16 (tl.dot's minimum), at most 32 x 64."""
    fit = lambda n, cap: max(16, min(cap, triton.next_power_of_2(n)))  # noqa: E731
    return fit(k, 32), fit(j, 64)


_COEFFICIENTS: dict = {}


def _coefficients(problem: SpeciesLinearProblem, like: torch.Tensor) -> torch.Tensor:
    key = (problem.key, like.dtype, str(like.device))
    if key not in _COEFFICIENTS:
        _COEFFICIENTS[key] = torch.tensor([p.coefficient for p in problem.paths], dtype=like.dtype,
                                          device=like.device)
    return _COEFFICIENTS[key]


def _apply(problem, inp, species, weight, transpose: bool):
    """forward (x -> out) or, with ``transpose``, the x-gradient (grad_out -> grad_x)."""
    irreps_from, irreps_to = ((problem.irreps_out, problem.irreps_in) if transpose
                              else (problem.irreps_in, problem.irreps_out))
    off_from, off_to = irreps_offsets(irreps_from), irreps_offsets(irreps_to)
    dim_from, dim_to = sum(m.dim for m in irreps_from), sum(m.dim for m in irreps_to)
    targets = {p.i_in if transpose else p.i_out for p in problem.paths}
    n = inp.shape[0]
    out = new_output((n, dim_to), inp, written_everywhere=len(targets) == len(irreps_to))
    if n == 0 or not problem.paths:
        return out
    chunk = settings().species_linear_nodes
    order, sorted_species, starts = species_chunks(species, problem.num_species, chunk)
    coefficients = _coefficients(problem, inp)
    written = set()
    for index, p in enumerate(problem.paths):
        src, dst = (p.i_out, p.i_in) if transpose else (p.i_in, p.i_out)
        k_dim, j_dim = (p.mul_out, p.mul_in) if transpose else (p.mul_in, p.mul_out)
        strides = ((1, p.mul_out, p.num_species * p.mul_out) if transpose
                   else (p.num_species * p.mul_out, p.mul_out, 1))
        bk, bj = _tiles(k_dim, j_dim)
        grid = (starts.shape[0] - 1, triton.cdiv(j_dim, bj))
        gathered_matmul[grid](inp, weight, coefficients, index, sorted_species, order, starts, out, n,
                              off_from[src], off_to[dst], p.weight_offset, p.species_start, p.num_species,
                              *strides, K=k_dim, J=j_dim, D=irreps_from[src].ir_dim, IN_STRIDE=dim_from,
                              OUT_STRIDE=dim_to, ACCUMULATE=dst in written, BN=chunk, BK=bk, BJ=bj,
                              PRODUCT=product_mode(inp.dtype), DT=tl_dtype(inp.dtype), num_warps=4)
        written.add(dst)
    return out


def forward(problem: SpeciesLinearProblem, x, species, weight):
    tl_dtype(x.dtype)
    return _apply(problem, x.contiguous(), species, weight.contiguous(), transpose=False)


def backward(problem: SpeciesLinearProblem, grad_out, x, species, weight, want_x: bool, want_w: bool):
    """(grad_x or empty, grad_weight or empty) of <grad_out, forward(x, species, weight)>."""
    tl_dtype(x.dtype)
    # x is read only for the weight gradient (without it, it may be a stand-in holding no memory)
    grad_out, weight = grad_out.contiguous(), weight.contiguous()
    x = x.contiguous() if want_w else x
    grad_x = _apply(problem, grad_out, species, weight, transpose=True) if want_x else x.new_empty(0)
    grad_w = weight.new_empty(0)
    if want_w:
        grad_w = torch.zeros_like(weight)
        n = x.shape[0]
        if n and problem.paths:
            chunk = settings().species_linear_nodes
            order, sorted_species, starts = species_chunks(species, problem.num_species, chunk)
            off_in, off_out = irreps_offsets(problem.irreps_in), irreps_offsets(problem.irreps_out)
            coefficients = _coefficients(problem, x)
            for index, p in enumerate(problem.paths):
                bk, bj = _tiles(p.mul_in, p.mul_out)
                grid = (starts.shape[0] - 1, triton.cdiv(p.mul_in, bk), triton.cdiv(p.mul_out, bj))
                weight_gradient[grid](x, grad_out, coefficients, index, sorted_species, order, starts, grad_w, n,
                                      off_in[p.i_in], off_out[p.i_out], p.weight_offset, p.species_start,
                                      p.num_species, K=p.mul_in, J=p.mul_out,
                                      D=problem.irreps_in[p.i_in].ir_dim, IN_STRIDE=problem.dim_in,
                                      OUT_STRIDE=problem.dim_out, S_STRIDE=p.num_species, BN=chunk, BK=bk,
                                      BJ=bj, PRODUCT=product_mode(x.dtype), DT=tl_dtype(x.dtype), num_warps=4)
    return grad_x, grad_w
