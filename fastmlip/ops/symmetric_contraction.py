"""MACE's symmetric contraction as a custom op, ``fastmlip::symmetric_contraction``.

The weights stay the module's parameters and are passed in (in ``problem.weight_names`` order, see
:func:`module_weights`), so training and ``state_dict`` are untouched. The backward is the reference's explicit
plain-torch formula, which autograd differentiates again for second derivatives.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..descriptors import SymmetricContractionProblem
from ..reference import symmetric_contraction as ref
from . import dispatch, registry


@torch.library.custom_op("fastmlip::symmetric_contraction", mutates_args=())
def symmetric_contraction_fwd(x: Tensor, species: Tensor, weights: list[Tensor], key: str) -> Tensor:
    dispatch.backend_for(x, has_kernel=False)
    return ref.symmetric_contraction(registry.lookup(key), x, species, weights)


@symmetric_contraction_fwd.register_fake
def _(x, species, weights, key):
    return x.new_empty(x.shape[0], registry.lookup(key).dim_out)


def _setup(ctx, inputs, output):
    x, species, weights, key = inputs
    ctx.save_for_backward(x, species, *weights)
    ctx.key = key


def _backward(ctx, grad):
    x, species, *weights = ctx.saved_tensors
    grad_x, grad_ws = ref.symmetric_contraction_backward(registry.lookup(ctx.key), grad, x, species, weights)
    want_x, _, want_w, _ = ctx.needs_input_grad
    return grad_x if want_x else None, None, grad_ws, None


symmetric_contraction_fwd.register_autograd(_backward, setup_context=_setup)


def module_weights(problem: SymmetricContractionProblem, module) -> list:
    """The module's weight parameters in the order the op takes them."""
    return [module.get_parameter(name) for name in problem.weight_names]


def _fail(problem, msg):
    raise ValueError(f"symmetric_contraction({problem}): {msg}")


def check_species(problem, species: Tensor, n: int, num_species: int, device) -> None:
    """Shape, dtype, device and range of a species index (the range check reads one min/max from the device)."""
    if not isinstance(species, Tensor) or species.dtype not in (torch.int32, torch.int64) or species.shape != (n,):
        _fail(problem, f"species_index must be an int32/int64 tensor of shape ({n},)")
    if species.device != device:
        _fail(problem, f"devices differ: x is on {device}, species_index on {species.device}")
    if n:
        low, high = (int(v) for v in torch.aminmax(species))
        if low < 0 or high >= num_species:
            _fail(problem, f"species_index values must lie in [0, {num_species}), got [{low}, {high}]")


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
