"""e3nn's ``o3.Linear`` and species-indexed linear maps in plain torch, with explicit backward formulas.

Both are block-sparse matmuls in the mul_ir layout: x[:, i_in] viewed as [N, mul_in, 2l+1] times a
[mul_in, mul_out] block. The species-indexed form gathers each node's block from a per-species stack, which is
what ``FullyConnectedTensorProduct(x, one_hot(species))`` computes with a dense one-hot product.
The backward functions are plain differentiable torch, so second derivatives come from autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..descriptors import LinearProblem, SpeciesLinearProblem, irreps_offsets


def _block(x: Tensor, offset: int, mul: int, ir_dim: int) -> Tensor:
    return x.narrow(1, offset, mul * ir_dim).reshape(x.shape[0], mul, ir_dim)


def _assemble(blocks: list, irreps, like: Tensor) -> Tensor:
    """Concatenate per-irrep [N, mul, 2l+1] sums (None for an irrep nothing writes) into [N, dim]."""
    n = like.shape[0]
    parts = [like.new_zeros(n, m.dim) if b is None else b.reshape(n, m.dim) for b, m in zip(blocks, irreps)]
    return torch.cat(parts, dim=1) if parts else like.new_zeros(n, 0)


def _add(acc, term):
    return term if acc is None else acc + term


def linear(problem: LinearProblem, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """e3nn ``Linear.forward(x)`` for x [N, dim_in], shared weight [weight_numel], bias [bias_numel] or None."""
    off_in = irreps_offsets(problem.irreps_in)
    outs = [None] * len(problem.irreps_out)
    for p in problem.paths:
        ir_dim = problem.irreps_in[p.i_in].ir_dim
        w = weight.narrow(0, p.weight_offset, p.mul_in * p.mul_out).view(p.mul_in, p.mul_out)
        term = p.path_weight * torch.einsum("uw,zui->zwi", w, _block(x, off_in[p.i_in], p.mul_in, ir_dim))
        outs[p.i_out] = _add(outs[p.i_out], term)
    if bias is not None:
        for b in problem.biases:
            term = (b.path_weight * bias.narrow(0, b.bias_offset, b.dim)).view(1, b.dim, 1)
            outs[b.i_out] = _add(outs[b.i_out], term.expand(x.shape[0], b.dim, 1))
    return _assemble(outs, problem.irreps_out, x)


def linear_backward(problem: LinearProblem, grad_out: Tensor, x: Tensor, weight: Tensor) -> tuple:
    """Gradients (d x, d weight) of <grad_out, linear(x, weight)> (the bias gradient is a plain column sum)."""
    off_in, off_out = irreps_offsets(problem.irreps_in), irreps_offsets(problem.irreps_out)
    grads_in = [None] * len(problem.irreps_in)
    grad_w = [None] * len(problem.paths)
    for k, p in enumerate(problem.paths):
        ir_dim = problem.irreps_in[p.i_in].ir_dim
        w = weight.narrow(0, p.weight_offset, p.mul_in * p.mul_out).view(p.mul_in, p.mul_out)
        g = _block(grad_out, off_out[p.i_out], p.mul_out, ir_dim)
        grads_in[p.i_in] = _add(grads_in[p.i_in], p.path_weight * torch.einsum("uw,zwi->zui", w, g))
        grad_w[k] = p.path_weight * torch.einsum("zui,zwi->uw", _block(x, off_in[p.i_in], p.mul_in, ir_dim),
                                                 g).reshape(-1)
    order = sorted(range(len(problem.paths)), key=lambda k: problem.paths[k].weight_offset)
    flat_w = torch.cat([grad_w[k] for k in order]) if order else weight.new_zeros(0)
    return _assemble(grads_in, problem.irreps_in, x), flat_w


def _species_blocks(path, weight: Tensor, species: Tensor):
    """Per-node weight blocks [N, mul_in, mul_out] for this path and a mask of the nodes it applies to."""
    w = weight.narrow(0, path.weight_offset, path.mul_in * path.num_species * path.mul_out)
    w = w.view(path.mul_in, path.num_species, path.mul_out).transpose(0, 1)
    local = species - path.species_start
    inside = (local >= 0) & (local < path.num_species)
    return w, local.clamp(0, path.num_species - 1), inside


def species_linear(problem: SpeciesLinearProblem, x: Tensor, species: Tensor, weight: Tensor) -> Tensor:
    """``FullyConnectedTensorProduct(x, one_hot(species), weight)`` as a gathered matmul; species [N] int64."""
    off_in = irreps_offsets(problem.irreps_in)
    outs = [None] * len(problem.irreps_out)
    for p in problem.paths:
        ir_dim = problem.irreps_in[p.i_in].ir_dim
        w, local, inside = _species_blocks(p, weight, species)
        term = torch.einsum("zuw,zui->zwi", w[local], _block(x, off_in[p.i_in], p.mul_in, ir_dim))
        if p.num_species != problem.num_species:
            term = term * inside.to(term.dtype).view(-1, 1, 1)
        outs[p.i_out] = _add(outs[p.i_out], p.coefficient * term)
    return _assemble(outs, problem.irreps_out, x)


def species_linear_backward(problem: SpeciesLinearProblem, grad_out: Tensor, x: Tensor, species: Tensor,
                            weight: Tensor) -> tuple:
    """Gradients (d x, d weight) of <grad_out, species_linear(x, species, weight)>."""
    off_in, off_out = irreps_offsets(problem.irreps_in), irreps_offsets(problem.irreps_out)
    grads_in = [None] * len(problem.irreps_in)
    grad_w = torch.zeros_like(weight)
    for p in problem.paths:
        ir_dim = problem.irreps_in[p.i_in].ir_dim
        w, local, inside = _species_blocks(p, weight, species)
        g = _block(grad_out, off_out[p.i_out], p.mul_out, ir_dim) * p.coefficient
        if p.num_species != problem.num_species:
            g = g * inside.to(g.dtype).view(-1, 1, 1)
        grads_in[p.i_in] = _add(grads_in[p.i_in], torch.einsum("zuw,zwi->zui", w[local], g))
        per_node = torch.einsum("zui,zwi->zuw", _block(x, off_in[p.i_in], p.mul_in, ir_dim), g)
        block = torch.zeros_like(w).index_add(0, local, per_node).transpose(0, 1).reshape(-1)
        grad_w = grad_w + torch.nn.functional.pad(
            block, (p.weight_offset, weight.numel() - p.weight_offset - block.numel()))
    return _assemble(grads_in, problem.irreps_in, x), grad_w
