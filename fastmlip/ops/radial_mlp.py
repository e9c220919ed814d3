"""e3nn's FullyConnectedNet (the radial MLP) as custom ops, ``fastmlip::radial_mlp`` and ``radial_mlp_bwd``.

As e3nn modules a radial MLP is a divide, a matmul, an activation and a scale per layer, twice that backward:
~20 launches per convolution of every MD step. On the Triton backend each direction is one generated kernel
(:mod:`fastmlip.kernels.radial_mlp`) that keeps the hidden activations in registers and multiplies in the
per-edge ``row_scale`` (cutoff envelope, padding mask). Weight gradients (training) and second derivatives
differentiate the reference formulas with plain autograd; they are correct, not fast.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..descriptors import RadialMLPProblem
from ..reference import radial_mlp as ref
from . import dispatch, library, registry
from .derivatives import vjp_of_reference


def _kernels():
    from ..kernels import radial_mlp as kernels

    return kernels


@library.custom_op("fastmlip::radial_mlp")
def radial_mlp_fwd(x: Tensor, weights: list[Tensor], row_scale: Optional[Tensor], key: str) -> Tensor:
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        return _kernels().forward(problem, x, weights, row_scale)
    return ref.radial_mlp(problem, x, weights, row_scale)


@radial_mlp_fwd.register_fake
def _(x, weights, row_scale, key):
    return x.new_empty(x.shape[0], registry.lookup(key).dim_out)


@library.custom_op("fastmlip::radial_mlp_bwd")
def radial_mlp_bwd(grad_out: Tensor, x: Tensor, weights: list[Tensor], row_scale: Optional[Tensor], key: str,
                   want_x: bool, want_scale: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_row_scale) of <grad_out, radial_mlp(x, weights, row_scale)>; an unwanted one is empty."""
    problem = registry.lookup(key)
    want_scale = want_scale and row_scale is not None
    if dispatch.backend_for(x) == "triton":
        return _kernels().backward(problem, grad_out, x, weights, row_scale, want_x, want_scale)
    grad_x, grad_scale = ref.radial_mlp_backward(problem, grad_out, x, weights, row_scale)
    return (grad_x if want_x else x.new_empty(0)), (grad_scale if want_scale else x.new_empty(0))


@radial_mlp_bwd.register_fake
def _(grad_out, x, weights, row_scale, key, want_x, want_scale):
    want_scale = want_scale and row_scale is not None
    return x.new_empty(x.shape if want_x else (0,)), x.new_empty(x.shape[0] if want_scale else 0)


def _setup(ctx, inputs, output):
    x, weights, row_scale, key = inputs
    ctx.save_for_backward(x, row_scale, *weights)
    ctx.key = key


def _backward(ctx, grad):
    x, row_scale, *weights = ctx.saved_tensors
    want_x, want_ws, want_s, _ = ctx.needs_input_grad
    want_w = any(want_ws)  # a list input's entry is a list of flags, truthy even when all are False
    grad_x = grad_s = None
    grad_ws = [None] * len(weights)
    if want_x or want_s:
        grad_x, grad_s = radial_mlp_bwd(grad, x, weights, row_scale, ctx.key, want_x, bool(want_s))
    if want_w:
        problem = registry.lookup(ctx.key)
        grad_ws = list(vjp_of_reference(lambda *ws: ref.radial_mlp(problem, x, ws, row_scale), weights, grad))
    return grad_x if want_x else None, grad_ws, grad_s if want_s else None, None


radial_mlp_fwd.register_autograd(_backward, setup_context=_setup)


def _bwd_setup(ctx, inputs, output):
    grad_out, x, weights, row_scale, key, want_x, want_scale = inputs
    ctx.save_for_backward(grad_out, x, row_scale, *weights)
    ctx.key, ctx.want = key, (want_x, want_scale and row_scale is not None)


def _bwd_backward(ctx, h_x, h_s):
    grad_out, x, row_scale, *weights = ctx.saved_tensors
    problem = registry.lookup(ctx.key)
    want_x, want_s = ctx.want
    h_x = h_x if want_x and h_x is not None and h_x.numel() else torch.zeros_like(x)
    with_scale = row_scale is not None

    def backward_formula(g, xx, *rest):
        scale = rest[-1] if with_scale else None
        ws = rest[:-1] if with_scale else rest
        grad_x, grad_s = ref.radial_mlp_backward(problem, g, xx, ws, scale)
        return (grad_x, grad_s) if with_scale else grad_x

    primals = [grad_out, x, *weights] + ([row_scale] if with_scale else [])
    if with_scale:
        h_s = h_s if want_s and h_s is not None and h_s.numel() else torch.zeros_like(row_scale)
        cotangents = (h_x, h_s)
    else:
        cotangents = h_x
    grads = vjp_of_reference(backward_formula, primals, cotangents)
    d_g, d_x = grads[0], grads[1]
    d_ws = list(grads[2:2 + len(weights)])
    d_s = grads[-1] if with_scale else None
    return d_g, d_x, d_ws, d_s, None, None, None


radial_mlp_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def radial_mlp(problem: RadialMLPProblem, x: Tensor, weights: Sequence[Tensor],
               row_scale: Optional[Tensor] = None) -> Tensor:
    """e3nn ``FullyConnectedNet(x)`` for x [E, dim_in] -> [E, dim_out], times ``row_scale`` [E] if given."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != problem.dim_in or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"radial_mlp({problem}): x must be a floating tensor [E, {problem.dim_in}], got {shape}")
    weights = list(weights)
    ref.check_weights(problem, x, weights)
    if row_scale is not None:
        row_scale = row_scale.reshape(-1)
        if row_scale.shape[0] != x.shape[0] or row_scale.dtype != x.dtype or row_scale.device != x.device:
            raise ValueError(f"radial_mlp({problem}): row_scale must be [{x.shape[0]}] ({x.dtype} on {x.device}), "
                             f"got {tuple(row_scale.shape)} ({row_scale.dtype} on {row_scale.device})")
    if not problem.has_kernel:
        return ref.radial_mlp(problem, x, weights, row_scale)
    return radial_mlp_fwd(x, weights, row_scale, registry.register(problem))
