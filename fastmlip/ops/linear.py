"""e3nn ``o3.Linear`` and species-indexed linear maps as custom ops (``fastmlip::linear``,
``fastmlip::species_linear``).

Species-indexed linear is MACE's ``skip_tp`` and SevenNet's ``SelfConnectionIntro``: a FullyConnectedTensorProduct
with a one-hot species vector, computed as a gather of the species' weight block instead of a dense product.
``o3.Linear`` stays torch matmuls on every backend (cuBLAS already does shared-weight matmuls well). The
species-indexed linear runs Triton kernels on the Triton backend (:mod:`fastmlip.kernels.species_linear`); being
linear in x and in the weight, all its derivatives are again its forward and backward.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..descriptors import LinearProblem, SpeciesLinearProblem
from ..reference import linear as ref
from . import dispatch, registry
from .symmetric_contraction import check_species


def _kernels():
    from ..kernels import species_linear as kernels

    return kernels


@torch.library.custom_op("fastmlip::linear", mutates_args=())
def linear_fwd(x: Tensor, weight: Tensor, key: str) -> Tensor:
    """Shared-weight matmuls: torch's (cuBLAS) on every backend; a Triton kernel has nothing to fuse here."""
    dispatch.requested_backend()
    return ref.linear(registry.lookup(key), x, weight)


@linear_fwd.register_fake
def _(x, weight, key):
    return x.new_empty(x.shape[0], registry.lookup(key).dim_out)


def _linear_setup(ctx, inputs, output):
    x, weight, key = inputs
    ctx.save_for_backward(x, weight)
    ctx.key = key


def _linear_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = ref.linear_backward(registry.lookup(ctx.key), grad, x, weight)
    want_x, want_w, _ = ctx.needs_input_grad
    return grad_x if want_x else None, grad_w if want_w else None, None


linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("fastmlip::species_linear", mutates_args=())
def species_linear_fwd(x: Tensor, species: Tensor, weight: Tensor, key: str) -> Tensor:
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        return _kernels().forward(problem, x, species, weight)
    return ref.species_linear(problem, x, species, weight)


@species_linear_fwd.register_fake
def _(x, species, weight, key):
    return x.new_empty(x.shape[0], registry.lookup(key).dim_out)


@torch.library.custom_op("fastmlip::species_linear_bwd", mutates_args=())
def species_linear_bwd(grad_out: Tensor, x: Tensor, species: Tensor, weight: Tensor, key: str, want_x: bool,
                       want_w: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_weight) of <grad_out, species_linear(x, weight)>; an unwanted one comes back empty."""
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        return _kernels().backward(problem, grad_out, x, species, weight, want_x, want_w)
    grad_x, grad_w = ref.species_linear_backward(problem, grad_out, x, species, weight)
    return grad_x if want_x else x.new_empty(0), grad_w if want_w else weight.new_empty(0)


@species_linear_bwd.register_fake
def _(grad_out, x, species, weight, key, want_x, want_w):
    return x.new_empty(x.shape if want_x else (0,)), weight.new_empty(weight.shape if want_w else (0,))


def _species_setup(ctx, inputs, output):
    x, species, weight, key = inputs
    ctx.save_for_backward(x, species, weight)
    ctx.key = key


def _species_backward(ctx, grad):
    x, species, weight = ctx.saved_tensors
    want_x, _, want_w, _ = ctx.needs_input_grad
    grad_x, grad_w = species_linear_bwd(grad, x, species, weight, ctx.key, want_x, want_w)
    return grad_x if want_x else None, None, grad_w if want_w else None, None


species_linear_fwd.register_autograd(_species_backward, setup_context=_species_setup)


def _species_bwd_setup(ctx, inputs, output):
    grad_out, x, species, weight, key, want_x, want_w = inputs
    ctx.save_for_backward(grad_out, x, species, weight)
    ctx.key, ctx.want = key, (want_x, want_w)


def _species_bwd_backward(ctx, h_x, h_w):
    """The backward is bilinear in (grad_out, x) and (grad_out, weight): its derivatives are forward and
    backward calls again, so every order runs on the same kernels."""
    grad_out, x, species, weight = ctx.saved_tensors
    want_x, want_w = ctx.want
    h_x = h_x if want_x and h_x is not None and h_x.numel() else None
    h_w = h_w if want_w and h_w is not None and h_w.numel() else None
    need_g, need_x, _, need_w = ctx.needs_input_grad[:4]
    d_g = d_x = d_w = None
    if need_g:
        terms = ([species_linear_fwd(h_x, species, weight, ctx.key)] if h_x is not None else []) + \
                ([species_linear_fwd(x, species, h_w, ctx.key)] if h_w is not None else [])
        d_g = sum(terms[1:], terms[0]) if terms else None
    if need_x and h_w is not None:
        d_x = species_linear_bwd(grad_out, x, species, h_w, ctx.key, True, False)[0]
    if need_w and h_x is not None:
        d_w = species_linear_bwd(grad_out, h_x, species, weight, ctx.key, False, True)[1]
    return d_g, d_x, None, d_w, None, None, None


species_linear_bwd.register_autograd(_species_bwd_backward, setup_context=_species_bwd_setup)


def _check_tensor(problem, name: str, t, shape: tuple, like: Optional[Tensor]) -> None:
    def fail(msg):
        raise ValueError(f"{problem}: {msg}")

    if not isinstance(t, Tensor) or tuple(t.shape) != shape:
        fail(f"{name} must have shape {shape}, got {tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if not t.is_floating_point():
        fail(f"{name} must be floating point, got {t.dtype}")
    if like is not None and (t.dtype != like.dtype or t.device != like.device):
        fail(f"{name} is {t.dtype} on {t.device}, x is {like.dtype} on {like.device}")


def _flat_input(problem, x, width: int) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != width:
        raise ValueError(f"{problem}: x must have shape [..., {width}], got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{problem}: x must be floating point, got {x.dtype}")
    return x.reshape(-1, width)


def _bias_vector(problem: LinearProblem, bias: Tensor) -> Tensor:
    """The flat bias spread over the output (zeros where no bias applies), times its path weight."""
    starts = [0]
    for m in problem.irreps_out:
        starts.append(starts[-1] + m.dim)
    parts, at = [], 0
    for b in sorted(problem.biases, key=lambda b: b.i_out):
        parts.append(bias.new_zeros(starts[b.i_out] - at))
        parts.append(b.path_weight * bias.narrow(0, b.bias_offset, b.dim))
        at = starts[b.i_out] + b.dim
    parts.append(bias.new_zeros(problem.dim_out - at))
    return torch.cat(parts)


def linear(problem: LinearProblem, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """e3nn ``o3.Linear`` forward: x [..., dim_in], weight [weight_numel] (the module's ``weight``), bias
    [bias_numel] (the module's ``bias``; required exactly when the module has biases)."""
    flat = _flat_input(problem, x, problem.dim_in)
    _check_tensor(problem, "weight", weight, (problem.weight_numel,), flat)
    if problem.bias_numel and bias is None:
        raise ValueError(f"{problem}: the module has {problem.bias_numel} biases; pass its bias tensor")
    if bias is not None:
        if not problem.bias_numel:
            raise ValueError(f"{problem}: got a bias but the module has none")
        _check_tensor(problem, "bias", bias, (problem.bias_numel,), flat)
    out = linear_fwd(flat, weight, registry.register(problem))
    if bias is not None:
        out = out + _bias_vector(problem, bias)
    return out.reshape(*x.shape[:-1], problem.dim_out)


def species_linear(problem: SpeciesLinearProblem, x: Tensor, species_index: Tensor, weight: Tensor) -> Tensor:
    """``FullyConnectedTensorProduct(x, one_hot(species_index))`` with the module's ``weight`` [weight_numel];
    x [N, dim_in], species_index [N] -> [N, dim_out]."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{problem}: x must be a 2-D tensor [N, {problem.dim_in}]")
    flat = _flat_input(problem, x, problem.dim_in)
    _check_tensor(problem, "weight", weight, (problem.weight_numel,), flat)
    check_species(problem, species_index, flat.shape[0], problem.num_species, flat.device)
    return species_linear_fwd(flat, species_index.long(), weight, registry.register(problem))
