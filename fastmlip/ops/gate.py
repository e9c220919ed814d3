"""e3nn's Gate as a custom op, ``fastmlip::gate``.

On the Triton backend forward and backward are one generated kernel each (:mod:`fastmlip.kernels.gate`); second
derivatives differentiate the reference's explicit plain-torch backward formula. A gate with an activation the
kernels do not know runs the reference under plain autograd (the module's own activation objects), never the op.
The problem's constants are literals in the kernels, so a call reads nothing from the host (CUDA-graph safe).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..descriptors import GateProblem
from ..reference import gate as ref
from . import dispatch, library, registry
from .derivatives import vjp_of_reference


def _kernels():
    from ..kernels import gate as kernels

    return kernels


@library.custom_op("fastmlip::gate")
def gate_fwd(x: Tensor, key: str) -> Tensor:
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        return _kernels().forward(problem, x)
    return ref.gate(problem, x)


@gate_fwd.register_fake
def _(x, key):
    return x.new_empty(x.shape[0], registry.lookup(key).dim_out)


@library.custom_op("fastmlip::gate_bwd")
def gate_bwd(grad_out: Tensor, x: Tensor, key: str) -> Tensor:
    """d x of <grad_out, gate(x)>."""
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        return _kernels().backward(problem, grad_out, x)
    return ref.gate_backward(problem, grad_out, x)


@gate_bwd.register_fake
def _(grad_out, x, key):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, key = inputs
    ctx.save_for_backward(x)
    ctx.key = key


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return gate_bwd(grad, x, ctx.key), None


gate_fwd.register_autograd(_backward, setup_context=_setup)


def _bwd_setup(ctx, inputs, output):
    grad_out, x, key = inputs
    ctx.save_for_backward(grad_out, x)
    ctx.key = key


def _bwd_backward(ctx, grad):
    grad_out, x = ctx.saved_tensors
    problem = registry.lookup(ctx.key)
    d_g, d_x = vjp_of_reference(lambda g, xx: ref.gate_backward(problem, g, xx), [grad_out, x], grad)
    return d_g, d_x, None


gate_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def gate(problem: GateProblem, x: Tensor) -> Tensor:
    """e3nn ``Gate(x)`` for x [..., dim_in] -> [..., dim_out]."""
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != problem.dim_in or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"gate({problem}): x must be a floating tensor [..., {problem.dim_in}], got {shape}")
    flat = x.reshape(-1, problem.dim_in)
    if problem.has_kernel:
        out = gate_fwd(flat, registry.register(problem))
    else:
        out = ref.gate(problem, flat)
    return out.reshape(*x.shape[:-1], problem.dim_out)
