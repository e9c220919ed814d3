"""Spherical harmonics as a custom op, ``fastmlip::spherical_harmonics``: the component-normalised
polynomials Y^0..Y^lmax of raw vectors.

Input normalisation (``torch.nn.functional.normalize``, as e3nn does it) and the choice of degrees and output
normalisation are plain torch around the op. On the Triton backend forward and backward are kernels generated per
lmax (:mod:`fastmlip.kernels.spherical_harmonics`); second derivatives differentiate the reference backward
d Y^l = D^l . Y^(l-1) in plain torch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import spherical_harmonics as ref
from . import dispatch
from .symmetric_contraction import vjp_of_reference


def _kernels():
    from ..kernels import spherical_harmonics as kernels

    return kernels


@torch.library.custom_op("fastmlip::spherical_harmonics", mutates_args=())
def spherical_harmonics_fwd(vectors: Tensor, lmax: int) -> Tensor:
    if dispatch.backend_for(vectors) == "triton":
        return _kernels().forward(lmax, vectors)
    return ref.polynomials(lmax, vectors)


@spherical_harmonics_fwd.register_fake
def _(vectors, lmax):
    return vectors.new_empty(vectors.shape[0], (lmax + 1) ** 2)


def _reference_backward(lmax: int, grad: Tensor, vectors: Tensor) -> Tensor:
    low = ref.polynomials(lmax - 1, vectors) if lmax > 0 else None
    return ref.polynomials_backward(lmax, grad, low)


@torch.library.custom_op("fastmlip::spherical_harmonics_bwd", mutates_args=())
def spherical_harmonics_bwd(grad: Tensor, vectors: Tensor, lmax: int) -> Tensor:
    """d <grad, Y^0..Y^lmax(vectors)> / d vectors."""
    if dispatch.backend_for(vectors) == "triton":
        return _kernels().backward(lmax, grad, vectors)
    return _reference_backward(lmax, grad, vectors)


@spherical_harmonics_bwd.register_fake
def _(grad, vectors, lmax):
    return torch.empty_like(vectors)


def _setup(ctx, inputs, output):
    vectors, lmax = inputs
    ctx.save_for_backward(vectors)
    ctx.lmax = lmax


def _backward(ctx, grad):
    (vectors,) = ctx.saved_tensors
    return spherical_harmonics_bwd(grad, vectors, ctx.lmax), None


spherical_harmonics_fwd.register_autograd(_backward, setup_context=_setup)


def _bwd_setup(ctx, inputs, output):
    grad, vectors, lmax = inputs
    ctx.save_for_backward(grad, vectors)
    ctx.lmax = lmax


def _bwd_backward(ctx, h):
    grad, vectors = ctx.saved_tensors
    d_grad, d_vectors = vjp_of_reference(lambda g, v: _reference_backward(ctx.lmax, g, v), [grad, vectors], h)
    return d_grad, d_vectors, None


spherical_harmonics_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def spherical_harmonics(lmax_or_irreps, vectors: Tensor, normalize: bool, normalization: str = "integral") -> Tensor:
    """``e3nn.o3.spherical_harmonics`` for vectors [..., 3]: an int is ONE degree (as in e3nn), a list its
    degrees, irreps (e.g. ``Irreps.spherical_harmonics(3)``) their degrees with e3nn's parity check."""
    degrees, _ = ref.degrees(lmax_or_irreps)
    if normalization not in ref.SH_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {ref.SH_NORMALIZATIONS}, got {normalization!r}")
    if not isinstance(vectors, Tensor) or vectors.dim() < 1 or vectors.shape[-1] != 3:
        raise ValueError(f"vectors must have shape [..., 3], got "
                         f"{tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__}")
    if not vectors.is_floating_point():
        raise ValueError(f"vectors must be floating point, got {vectors.dtype}")
    flat = vectors.reshape(-1, 3)
    if normalize:
        flat = torch.nn.functional.normalize(flat, dim=-1)
    out = ref.select_and_normalize(spherical_harmonics_fwd(flat, max(degrees)), degrees, normalization)
    return out.reshape(*vectors.shape[:-1], out.shape[-1])
