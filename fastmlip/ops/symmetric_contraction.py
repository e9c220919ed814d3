"""MACE's symmetric contraction as a custom op, ``fastmlip::symmetric_contraction``.

The weights stay the module's parameters and are passed in (in ``problem.weight_names`` order, see
:func:`module_weights`), so training and ``state_dict`` are untouched. On the Triton backend forward and backward
are generated kernels (:mod:`fastmlip.kernels.symmetric_contraction`); second derivatives differentiate the
reference's explicit plain-torch backward formula.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..descriptors import SymmetricContractionProblem
from ..memo import attach, attached
from ..reference import symmetric_contraction as ref
from . import dispatch, library, registry
from .derivatives import vjp_of_reference


def _kernels():
    from ..kernels import symmetric_contraction as kernels

    return kernels


@library.custom_op("fastmlip::symmetric_contraction")
def symmetric_contraction_fwd(x: Tensor, species: Tensor, weights: list[Tensor], key: str) -> Tensor:
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        return _kernels().forward(problem, x, species, weights)
    return ref.symmetric_contraction(problem, x, species, weights)


@symmetric_contraction_fwd.register_fake
def _(x, species, weights, key):
    return x.new_empty(x.shape[0], registry.lookup(key).dim_out)


@library.custom_op("fastmlip::symmetric_contraction_bwd")
def symmetric_contraction_bwd(grad_out: Tensor, x: Tensor, species: Tensor, weights: list[Tensor], key: str,
                              want_x: bool, want_w: bool) -> list[Tensor]:
    """[grad_x] + [grad_w per weight] of <grad_out, symmetric_contraction(x, weights)>; unwanted ones empty."""
    problem = registry.lookup(key)
    if dispatch.backend_for(x) == "triton":
        grad_x, grad_ws = _kernels().backward(problem, grad_out, x, species, weights, want_x, want_w)
        return [grad_x, *grad_ws]
    grad_x, grad_ws = ref.symmetric_contraction_backward(problem, grad_out, x, species, weights)
    return [grad_x if want_x else x.new_empty(0), *(g if want_w else w.new_empty(0) for g, w in zip(grad_ws, weights))]


@symmetric_contraction_bwd.register_fake
def _(grad_out, x, species, weights, key, want_x, want_w):
    return [x.new_empty(x.shape if want_x else (0,)), *(w.new_empty(w.shape if want_w else (0,)) for w in weights)]


def _setup(ctx, inputs, output):
    x, species, weights, key = inputs
    ctx.save_for_backward(x, species, *weights)
    ctx.key = key


def _backward(ctx, grad):
    x, species, *weights = ctx.saved_tensors
    want_x, _, want_ws, _ = ctx.needs_input_grad
    want_w = any(want_ws)  # a list input's entry is a list of flags, truthy even when all are False
    grad_x, *grad_ws = symmetric_contraction_bwd(grad, x, species, weights, ctx.key, want_x, want_w)
    return grad_x if want_x else None, None, grad_ws if want_w else [None] * len(weights), None


symmetric_contraction_fwd.register_autograd(_backward, setup_context=_setup)


def _bwd_setup(ctx, inputs, output):
    grad_out, x, species, weights, key, want_x, want_w = inputs
    ctx.save_for_backward(grad_out, x, species, *weights)
    ctx.key, ctx.want = key, (want_x, want_w)


def _bwd_backward(ctx, grads):
    grad_out, x, species, *weights = ctx.saved_tensors
    problem = registry.lookup(ctx.key)
    want_x, want_w = ctx.want
    h_x = grads[0] if want_x and grads[0] is not None else torch.zeros_like(x)
    h_ws = [h if want_w and h is not None else torch.zeros_like(w) for h, w in zip(grads[1:], weights)]

    def backward_formula(g, xx, *ws):
        grad_x, grad_ws = ref.symmetric_contraction_backward(problem, g, xx, species, list(ws))
        return (grad_x, *grad_ws)

    d_g, d_x, *d_ws = vjp_of_reference(backward_formula, [grad_out, x, *weights], (h_x, *h_ws))
    return d_g, d_x, None, d_ws, None, None, None


symmetric_contraction_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def module_weights(problem: SymmetricContractionProblem, module) -> list:
    """The module's weight parameters in the order the op takes them."""
    return [module.get_parameter(name) for name in problem.weight_names]


def _fail(problem, msg):
    raise ValueError(f"symmetric_contraction({problem}): {msg}")


def check_species(problem, species: Tensor, n: int, num_species: int, device) -> None:
    """Shape, dtype, device and range of a species index.

    The range check reads one min/max from the device, so it is skipped while a CUDA graph is captured (a graph
    cannot wait for the host; the eager warm-up run before every capture checks the same species) and while a
    program is exported (it has no values; an exported model's caller checks the species).
    """
    if not isinstance(species, Tensor) or species.dtype not in (torch.int32, torch.int64) or species.shape != (n,):
        _fail(problem, f"species_index must be an int32/int64 tensor of shape ({n},)")
    if species.device != device:
        _fail(problem, f"devices differ: x is on {device}, species_index on {species.device}")
    capturing = species.is_cuda and torch.cuda.is_current_stream_capturing()
    if n and not capturing and not torch.compiler.is_exporting():
        if attached(species, ("species_checked", num_species)):
            return  # the same tensor every layer of a step passes: one device read per step, not per call
        low, high = (int(v) for v in torch.aminmax(species))
        if low < 0 or high >= num_species:
            _fail(problem, f"species_index values must lie in [0, {num_species}), got [{low}, {high}]")
        attach(species, ("species_checked", num_species), True)


def symmetric_contraction(problem: SymmetricContractionProblem, x: Tensor, species_index: Tensor,
                          weights: Sequence[Tensor]) -> Tensor:
    """MACE ``SymmetricContraction(x, one_hot(species_index))``: x [N, C, L] -> [N, irreps_out.dim].

    ``species_index`` is what MACE's one-hot ``node_attrs.argmax(-1)`` gives; ``weights`` come from
    :func:`module_weights`.
    """
    shape = (problem.num_features, problem.coupling_dim)
    if not isinstance(x, Tensor) or x.dim() != 3 or tuple(x.shape[1:]) != shape:
        _fail(problem, f"x must have shape [N, {shape[0]}, {shape[1]}], got "
                       f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        _fail(problem, f"x must be floating point, got {x.dtype}")
    weights = list(weights)
    if len(weights) != len(problem.weight_shapes):
        _fail(problem, f"expected {len(problem.weight_shapes)} weight tensors ({', '.join(problem.weight_names)}), "
                       f"got {len(weights)}")
    for name, w, expected in zip(problem.weight_names, weights, problem.weight_shapes):
        if not isinstance(w, Tensor) or tuple(w.shape) != expected:
            _fail(problem, f"{name} must have shape {expected}, got "
                           f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
        if w.dtype != x.dtype or w.device != x.device:
            _fail(problem, f"{name} is {w.dtype} on {w.device}, x is {x.dtype} on {x.device}")
    check_species(problem, species_index, x.shape[0], problem.num_elements, x.device)
    key = registry.register(problem)
    return symmetric_contraction_fwd(x, species_index.long(), weights, key)
