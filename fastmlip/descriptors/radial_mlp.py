"""e3nn's ``nn.FullyConnectedNet`` (the radial MLP of MACE and SevenNet) as a problem.

Both frameworks turn each edge's radial basis into tensor-product weights with an e3nn FullyConnectedNet: layers
``x @ (W / sqrt(h_in * var_in))``, a ``normalize2mom`` activation and ``* sqrt(var_out)`` on hidden layers, no
biases. The problem is read from the loaded module: widths, variances, the activation object and its constant.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .activations import Activation, activation_of
from .irreps import with_key


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
    """The layers of a FullyConnectedNet, input to output; the weights are inputs (the module's own tensors)."""

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
