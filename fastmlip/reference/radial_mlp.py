"""e3nn's ``nn.FullyConnectedNet`` (:class:`fastmlip.descriptors.RadialMLPProblem`) in plain torch.

An optional per-edge ``row_scale`` multiplies the output, which is how the cutoff envelope and the padding mask
of CUDA-graph steps ride along instead of costing extra launches. The backward is an explicit formula (plain
differentiable torch, so second derivatives come from autograd), giving the gradients of x and row_scale.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from ..descriptors import MLPLayer, RadialMLPProblem
from .activations import activation_derivative


def _layer(layer: MLPLayer, h: Tensor, weight: Tensor) -> tuple:
    """(pre-activation, output) of one layer, in e3nn's order of operations."""
    pre = h @ (weight / layer.divisor)
    if layer.act is None:
        return pre, pre
    out = layer.act(pre)
    return pre, (out if layer.out_scale == 1.0 else out * layer.out_scale)


def radial_mlp(problem: RadialMLPProblem, x: Tensor, weights: Sequence[Tensor],
               row_scale: Optional[Tensor] = None) -> Tensor:
    """FullyConnectedNet(x) for x [E, dim_in] -> [E, dim_out], times ``row_scale`` [E] per row if given."""
    h = x
    for layer, weight in zip(problem.layers, weights):
        h = _layer(layer, h, weight)[1]
    return h if row_scale is None else h * row_scale.unsqueeze(1)


def radial_mlp_tangent(problem: RadialMLPProblem, x: Tensor, dx: Tensor, weights: Sequence[Tensor]) -> tuple:
    """(FullyConnectedNet(x), its directional derivative along dx), both [E, dim_out]: forward-mode, layer by
    layer (a radial function's slope d/dr from the basis' slope)."""
    h, dh = x, dx
    for layer, weight in zip(problem.layers, weights):
        pre, h = _layer(layer, h, weight)
        dh = dh @ (weight / layer.divisor)
        if layer.act is not None:
            dh = dh * (activation_derivative(layer.act, pre) * layer.out_scale)
    return h, dh


def radial_mlp_backward(problem: RadialMLPProblem, grad_out: Tensor, x: Tensor, weights: Sequence[Tensor],
                        row_scale: Optional[Tensor] = None) -> tuple:
    """(grad_x, grad_row_scale or None) of <grad_out, radial_mlp(x, weights, row_scale)>."""
    inputs, pres = [], []
    h = x
    for layer, weight in zip(problem.layers, weights):
        inputs.append(h)
        pre, h = _layer(layer, h, weight)
        pres.append(pre)
    grad_scale = None
    g = grad_out
    if row_scale is not None:
        grad_scale = (grad_out * h).sum(1)
        g = grad_out * row_scale.unsqueeze(1)
    for layer, weight, pre in reversed(list(zip(problem.layers, weights, pres))):
        if layer.act is not None:
            g = g * (activation_derivative(layer.act, pre) * layer.out_scale)
        g = g @ (weight / layer.divisor).t()
    return g, grad_scale


def check_weights(problem: RadialMLPProblem, x: Tensor, weights: Sequence[Tensor]) -> None:
    """Weights as the op takes them: one [dim_in, dim_out] tensor per layer, x's dtype and device."""
    if len(weights) != len(problem.layers):
        raise ValueError(f"radial_mlp({problem}): expected {len(problem.layers)} weights, got {len(weights)}")
    for i, (w, shape) in enumerate(zip(weights, problem.weight_shapes)):
        if not isinstance(w, Tensor) or tuple(w.shape) != shape:
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"radial_mlp({problem}): weight {i} must have shape {shape}, got {got}")
        if w.dtype != x.dtype or w.device != x.device:
            raise ValueError(f"radial_mlp({problem}): weight {i} is {w.dtype} on {w.device}, "
                             f"x is {x.dtype} on {x.device}")
