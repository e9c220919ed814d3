"""Spherical harmonics as a custom op, ``fastmlip::spherical_harmonics``: the component-normalised
polynomials Y^0..Y^lmax of the vectors, optionally normalised first (``torch.nn.functional.normalize``, as e3nn
does it) inside the op, so an edge's harmonics cost one launch each way instead of four more for the norm.

The choice of degrees and the output normalisation are plain torch around the op (nothing to do for e3nn's
"component" normalisation of all degrees 0..lmax, the MACE and SevenNet case). On the Triton backend forward and
backward are kernels generated per lmax (:mod:`fastmlip.kernels.spherical_harmonics`); second derivatives
differentiate the reference backward d Y^l = D^l . Y^(l-1) in plain torch.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..descriptors import NORMALIZE_EPS, SH_NORMALIZATIONS
from ..reference import spherical_harmonics as ref
from . import dispatch, library
from .derivatives import vjp_of_reference


def _kernels():
    from ..kernels import spherical_harmonics as kernels

    return kernels


def _unit(vectors: Tensor, normalize: bool) -> Tensor:
    return torch.nn.functional.normalize(vectors, dim=-1, eps=NORMALIZE_EPS) if normalize else vectors


@library.custom_op("fastmlip::spherical_harmonics")
def spherical_harmonics_fwd(vectors: Tensor, lmax: int, normalize: bool) -> Tensor:
    if dispatch.backend_for(vectors) == "triton":
        return _kernels().forward(lmax, vectors, normalize)
    return ref.polynomials(lmax, _unit(vectors, normalize))


@spherical_harmonics_fwd.register_fake
def _(vectors, lmax, normalize):
    return vectors.new_empty(vectors.shape[0], (lmax + 1) ** 2)


def _reference_backward(lmax: int, grad: Tensor, vectors: Tensor, normalize: bool) -> Tensor:
    unit = _unit(vectors, normalize)
    low = ref.polynomials(lmax - 1, unit) if lmax > 0 else None
    grad_unit = ref.polynomials_backward(lmax, grad, low)
    return ref.normalize_backward(grad_unit, vectors) if normalize else grad_unit


@library.custom_op("fastmlip::spherical_harmonics_bwd")
def spherical_harmonics_bwd(grad: Tensor, vectors: Tensor, lmax: int, normalize: bool) -> Tensor:
    """d <grad, Y^0..Y^lmax(vectors, normalised if asked)> / d vectors."""
    if dispatch.backend_for(vectors) == "triton":
        return _kernels().backward(lmax, grad, vectors, normalize)
    return _reference_backward(lmax, grad, vectors, normalize)


@spherical_harmonics_bwd.register_fake
def _(grad, vectors, lmax, normalize):
    return torch.empty_like(vectors)


def _setup(ctx, inputs, output):
    vectors, lmax, normalize = inputs
    ctx.save_for_backward(vectors)
    ctx.lmax, ctx.normalize = lmax, normalize


def _backward(ctx, grad):
    (vectors,) = ctx.saved_tensors
    return spherical_harmonics_bwd(grad, vectors, ctx.lmax, ctx.normalize), None, None


spherical_harmonics_fwd.register_autograd(_backward, setup_context=_setup)


def _bwd_setup(ctx, inputs, output):
    grad, vectors, lmax, normalize = inputs
    ctx.save_for_backward(grad, vectors)
    ctx.lmax, ctx.normalize = lmax, normalize


def _bwd_backward(ctx, h):
    grad, vectors = ctx.saved_tensors
    d_grad, d_vectors = vjp_of_reference(lambda g, v: _reference_backward(ctx.lmax, g, v, ctx.normalize),
                                         [grad, vectors], h)
    return d_grad, d_vectors, None, None


spherical_harmonics_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def spherical_harmonics(lmax_or_irreps, vectors: Tensor, normalize: bool, normalization: str = "integral") -> Tensor:
    """``e3nn.o3.spherical_harmonics`` for vectors [..., 3]: an int is ONE degree (as in e3nn), a list its
    degrees, irreps (e.g. ``Irreps.spherical_harmonics(3)``) their degrees with e3nn's parity check."""
    degrees, _ = ref.degrees(lmax_or_irreps)
    if normalization not in SH_NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {SH_NORMALIZATIONS}, got {normalization!r}")
    if not isinstance(vectors, Tensor) or vectors.dim() < 1 or vectors.shape[-1] != 3:
        raise ValueError(f"vectors must have shape [..., 3], got "
                         f"{tuple(vectors.shape) if isinstance(vectors, Tensor) else type(vectors).__name__}")
    if not vectors.is_floating_point():
        raise ValueError(f"vectors must be floating point, got {vectors.dtype}")
    flat = vectors.reshape(-1, 3)
    out = ref.select_and_normalize(spherical_harmonics_fwd(flat, max(degrees), bool(normalize)), degrees,
                                   normalization)
    return out.reshape(*vectors.shape[:-1], out.shape[-1])
