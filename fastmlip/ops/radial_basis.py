"""Edge radial features (Bessel basis x cutoff envelope) as custom ops, ``fastmlip::radial_basis`` and its backward.

On the Triton backend each direction is one generated kernel (:mod:`fastmlip.kernels.radial_basis`); the
frequencies are the module's own tensor, passed in. Their gradient (training SevenNet, whose frequencies are
trainable) and second derivatives differentiate the reference formulas with plain autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..descriptors import RadialBasisProblem
from ..reference import radial_basis as ref
from . import dispatch, library, registry
from .derivatives import vjp_of_reference


def _kernels():
    from ..kernels import radial_basis as kernels

    return kernels


@library.custom_op("fastmlip::radial_basis")
def radial_basis_fwd(lengths: Tensor, frequencies: Tensor, key: str) -> Tensor:
    problem = registry.lookup(key)
    if dispatch.backend_for(lengths) == "triton":
        return _kernels().forward(problem, lengths, frequencies)
    return ref.radial_basis(problem, lengths, frequencies)


@radial_basis_fwd.register_fake
def _(lengths, frequencies, key):
    return lengths.new_empty(lengths.shape[0], registry.lookup(key).num_basis)


@library.custom_op("fastmlip::radial_basis_bwd")
def radial_basis_bwd(grad_out: Tensor, lengths: Tensor, frequencies: Tensor, key: str) -> Tensor:
    """d <grad_out, radial_basis(lengths, frequencies)> / d lengths."""
    problem = registry.lookup(key)
    if dispatch.backend_for(lengths) == "triton":
        return _kernels().backward(problem, grad_out, lengths, frequencies)
    return ref.radial_basis_backward(problem, grad_out, lengths, frequencies)


@radial_basis_bwd.register_fake
def _(grad_out, lengths, frequencies, key):
    return torch.empty_like(lengths)


def _setup(ctx, inputs, output):
    lengths, frequencies, key = inputs
    ctx.save_for_backward(lengths, frequencies)
    ctx.key = key


def _backward(ctx, grad):
    lengths, frequencies = ctx.saved_tensors
    want_r, want_w, _ = ctx.needs_input_grad
    grad_r = radial_basis_bwd(grad, lengths, frequencies, ctx.key) if want_r else None
    grad_w = None
    if want_w:
        problem = registry.lookup(ctx.key)
        (grad_w,) = vjp_of_reference(lambda w: ref.radial_basis(problem, lengths, w), [frequencies], grad)
    return grad_r, grad_w, None


radial_basis_fwd.register_autograd(_backward, setup_context=_setup)


def _bwd_setup(ctx, inputs, output):
    grad_out, lengths, frequencies, key = inputs
    ctx.save_for_backward(grad_out, lengths, frequencies)
    ctx.key = key


def _bwd_backward(ctx, h):
    grad_out, lengths, frequencies = ctx.saved_tensors
    problem = registry.lookup(ctx.key)
    d_g, d_r, d_w = vjp_of_reference(lambda g, r, w: ref.radial_basis_backward(problem, g, r, w),
                                     [grad_out, lengths, frequencies], h)
    return d_g, d_r, d_w, None


radial_basis_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def radial_basis(problem: RadialBasisProblem, lengths: Tensor, frequencies: Tensor) -> Tensor:
    """prefactor * sin(w r) / r * envelope(r): lengths [E] -> [E, num_basis]."""
    ref.check_inputs(problem, lengths, frequencies)
    return radial_basis_fwd(lengths, frequencies, registry.register(problem))
