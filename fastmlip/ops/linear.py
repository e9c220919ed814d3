"""e3nn ``o3.Linear`` and species-indexed linear maps as custom ops (``fastmlip::linear``,
``fastmlip::species_linear``).

Species-indexed linear is MACE's ``skip_tp`` and SevenNet's ``SelfConnectionIntro``: a FullyConnectedTensorProduct
with a one-hot species vector, computed as a gather of the species' weight block instead of a dense product.
On the Triton backend ``o3.Linear`` runs one generated kernel forward (all paths and the bias) and one backward
(:mod:`fastmlip.kernels.linear`): as torch ops it was an einsum per path plus a cat and a bias add, launches that
dominate the tiny matmuls of an MD step. The species-indexed linear runs :mod:`fastmlip.kernels.species_linear`.
Both are linear in x and in the weight, so all their derivatives are again their forward and backward ops.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..descriptors import LinearProblem, SpeciesLinearProblem, irreps_offsets
from ..reference import linear as ref
from . import dispatch, library, registry
from .symmetric_contraction import check_species


def _kernels():
    from ..kernels import species_linear as kernels

    return kernels


def _linear_kernels():
    from ..kernels import linear as kernels

    return kernels


@library.custom_op("fastmlip::linear")
def linear_fwd(x: Tensor, weight: Tensor, key: str, bias: Optional[Tensor] = None) -> Tensor:
    """x [N, dim_in] -> [N, dim_out], plus the bias (flat, the module's layout) on its scalar outputs if given."""
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        return _linear_kernels().forward(problem, x, weight, bias)
    return ref.linear(problem, x, weight, bias)


@linear_fwd.register_fake
def _(x, weight, key, bias=None):
    return x.new_empty(x.shape[0], registry.lookup(key).dim_out)


def _bias_gradient(problem: LinearProblem, grad_out: Tensor) -> Tensor:
    """path_weight times each biased output's column sums, in the flat bias layout."""
    starts = irreps_offsets(problem.irreps_out)
    parts = [b.path_weight * grad_out.narrow(1, starts[b.i_out], b.dim).sum(0)
             for b in sorted(problem.biases, key=lambda b: b.bias_offset)]
    return torch.cat(parts) if parts else grad_out.new_zeros(0)


@library.custom_op("fastmlip::linear_bwd")
def linear_bwd(grad_out: Tensor, x: Tensor, weight: Tensor, key: str, want_x: bool, want_w: bool,
               want_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_bias) of <grad_out, linear(x, weight, bias)>; an unwanted one comes back empty."""
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        return _linear_kernels().backward(problem, grad_out, x, weight, want_x, want_w, want_b)
    grad_x, grad_w = ref.linear_backward(problem, grad_out, x, weight)
    return (grad_x if want_x else x.new_empty(0), grad_w if want_w else weight.new_empty(0),
            _bias_gradient(problem, grad_out) if want_b else x.new_empty(0))


@linear_bwd.register_fake
def _(grad_out, x, weight, key, want_x, want_w, want_b):
    return (x.new_empty(x.shape if want_x else (0,)), weight.new_empty(weight.shape if want_w else (0,)),
            x.new_empty(registry.lookup(key).bias_numel if want_b else 0))


def input_for_backward(x: Tensor, weight: Tensor) -> Tensor:
    """What a linear map keeps of its input x for the backward: x itself where the weight gradient may be asked
    for, else a stand-in of its shape that holds no memory (the input gradient needs only the weight, and MD runs
    with frozen weights: the linears' inputs were most of what a chunked step keeps, docs/memory.md)."""
    return x if weight.requires_grad else x.new_empty(()).expand(x.shape)  # never read: no fill launched


def _linear_setup(ctx, inputs, output):
    x, weight, key = inputs[:3]
    ctx.save_for_backward(input_for_backward(x, weight), weight)
    ctx.key = key


def _linear_backward(ctx, grad):
    """One gradient per input the call passed (bias is optional and may be absent)."""
    x, weight = ctx.saved_tensors
    want_x, want_w, _, want_b = (tuple(ctx.needs_input_grad) + (False,))[:4]
    grad_x, grad_w, grad_b = linear_bwd(grad, x, weight, ctx.key, want_x, want_w, want_b)
    grads = (grad_x if want_x else None, grad_w if want_w else None, None, grad_b if want_b else None)
    return grads[:len(ctx.needs_input_grad)]


linear_fwd.register_autograd(_linear_backward, setup_context=_linear_setup)


def _linear_bwd_setup(ctx, inputs, output):
    grad_out, x, weight, key, want_x, want_w, want_b = inputs
    ctx.save_for_backward(grad_out, x, weight)
    ctx.key, ctx.want = key, (want_x, want_w, want_b)


def _linear_bwd_backward(ctx, h_x, h_w, h_b):
    """The backward is bilinear in (grad_out, x) and (grad_out, weight) and linear in grad_out for the bias: its
    derivatives are forward and backward calls again, so every order runs on the same kernels."""
    grad_out, x, weight = ctx.saved_tensors
    h_x, h_w, h_b = (h if wanted and h is not None and h.numel() else None
                     for h, wanted in zip((h_x, h_w, h_b), ctx.want))
    need_g, need_x, need_w = ctx.needs_input_grad[:3]
    d_g = d_x = d_w = None
    if need_g:
        terms = ([linear_fwd(h_x, weight, ctx.key, h_b)] if h_x is not None else []) + \
                ([linear_fwd(x, h_w, ctx.key, None if h_x is not None else h_b)] if h_w is not None else [])
        if h_b is not None and not terms:
            terms = [linear_fwd(x, torch.zeros_like(weight), ctx.key, h_b)]
        d_g = sum(terms[1:], terms[0]) if terms else None
    if need_x and h_w is not None:
        d_x = linear_bwd(grad_out, x, h_w, ctx.key, True, False, False)[0]
    if need_w and h_x is not None:
        d_w = linear_bwd(grad_out, h_x, weight, ctx.key, False, True, False)[1]
    return d_g, d_x, d_w, None, None, None, None


linear_bwd.register_autograd(_linear_bwd_backward, setup_context=_linear_bwd_setup)


@library.custom_op("fastmlip::species_linear")
def species_linear_fwd(x: Tensor, species: Tensor, weight: Tensor, key: str) -> Tensor:
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        return _kernels().forward(problem, x, species, weight)
    return ref.species_linear(problem, x, species, weight)


@species_linear_fwd.register_fake
def _(x, species, weight, key):
    return x.new_empty(x.shape[0], registry.lookup(key).dim_out)


@library.custom_op("fastmlip::species_linear_bwd")
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
    ctx.save_for_backward(input_for_backward(x, weight), species, weight)
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
    out = linear_fwd(flat, weight, registry.register(problem), bias)
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
