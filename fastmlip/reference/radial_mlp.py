"""e3nn's ``nn.FullyConnectedNet`` (the radial MLP of MACE and SevenNet) as a problem, and in plain torch.

Both frameworks turn each edge's radial basis into tensor-product weights with an e3nn FullyConnectedNet: layers
``x @ (W / sqrt(h_in * var_in))``, a ``normalize2mom`` activation and ``* sqrt(var_out)`` on hidden layers, no
biases. The problem is read from the loaded module (widths, variances, the activation object and its constant);
an optional per-edge ``row_scale`` multiplies the output, which is how the cutoff envelope and the padding mask
of CUDA-graph steps ride along instead of costing extra launches. The backward is an explicit formula (plain
differentiable torch, so second derivatives come from autograd), giving the gradients of x and row_scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from torch import Tensor

from ..descriptors import with_key
from .activations import Activation, activation_derivative, activation_of


@dataclass(frozen=True)
class MLPLayer:
    """``act(x @ W * scale) * out_scale`` (``act`` None: ``x @ W * scale``) with W [dim_in, dim_out]."""

    dim_in: int
    dim_out: int
    scale: float
    divisor: float  # e3nn divides W by this; scale == 1 / divisor (the reference keeps e3nn's exact order)
    act: Optional[Activation]
    out_scale: float


@dataclass(frozen=True)
class RadialMLPProblem:
    layers: tuple
    key: str = field(default="", compare=False)

    @property
    def dim_in(self) -> int:
        return self.layers[0].dim_in

    @property
    def dim_out(self) -> int:
        return self.layers[-1].dim_out

    @property
    def weight_shapes(self) -> tuple:
        return tuple((layer.dim_in, layer.dim_out) for layer in self.layers)

    @property
    def has_kernel(self) -> bool:
        return all(layer.act is None or layer.act.known for layer in self.layers)

    def __str__(self) -> str:
        acts = sorted({layer.act.name for layer in self.layers if layer.act is not None})
        widths = "-".join(str(d) for d in (self.dim_in, *(layer.dim_out for layer in self.layers)))
        return f"RadialMLP({widths}, {'/'.join(acts) or 'linear'})"


def radial_mlp_problem(net) -> RadialMLPProblem:
    """Describe an e3nn ``FullyConnectedNet``; ValueError for anything else."""
    from e3nn.nn import FullyConnectedNet

    if type(net) is not FullyConnectedNet:
        raise ValueError(f"{type(net).__name__} is not an e3nn FullyConnectedNet")
    layers = []
    for child in net.children():
        if type(child).__name__ != "_Layer" or not hasattr(child, "weight"):
            raise ValueError(f"FullyConnectedNet holds a {type(child).__name__}, not e3nn's _Layer")
        h_in, h_out, var_in, var_out = child.h_in, child.h_out, child.var_in, child.var_out
        if tuple(child.weight.shape) != (h_in, h_out):
            raise ValueError(f"layer weight {tuple(child.weight.shape)} does not match {h_in} -> {h_out}")
        if child.act is not None:
            divisor = (h_in * var_in) ** 0.5
            layers.append(MLPLayer(h_in, h_out, 1.0 / divisor, divisor, activation_of(child.act), var_out ** 0.5))
        else:
            divisor = (h_in * var_in / var_out) ** 0.5
            layers.append(MLPLayer(h_in, h_out, 1.0 / divisor, divisor, None, 1.0))
    if not layers or any(a.dim_out != b.dim_in for a, b in zip(layers, layers[1:])):
        raise ValueError("FullyConnectedNet layers do not chain")
    return with_key(RadialMLPProblem(tuple(layers)))


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
