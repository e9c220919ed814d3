"""Replacements for the e3nn modules both frameworks use: ``o3.Linear``, ``o3.SphericalHarmonics`` and the radial
MLP (``nn.FullyConnectedNet``), each holding the original's own parameters and buffers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastmlip.kernels.launch import settings

from .swaps import share_tensors


class FastLinear(nn.Module):
    """e3nn ``o3.Linear`` through ``fastmlip.ops.linear``, holding the module's own weight, bias and buffers."""

    def __init__(self, original: nn.Module):
        super().__init__()
        from fastmlip.descriptors import linear_problem

        self.problem = linear_problem(original)
        share_tensors(self, original)
        self.irreps_in, self.irreps_out = original.irreps_in, original.irreps_out

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, x):
        from fastmlip.ops.linear import linear

        return linear(self.problem, x, self.weight, self.bias if self.problem.bias_numel else None)


class FastSphericalHarmonics(nn.Module):
    """e3nn ``o3.SphericalHarmonics`` through ``fastmlip.ops.spherical_harmonics`` (same degrees, normalisation)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        from fastmlip.descriptors import spherical_harmonics_problem

        self.problem = spherical_harmonics_problem(original)
        share_tensors(self, original)
        self.irreps_in, self.irreps_out = original.irreps_in, original.irreps_out

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, vectors):
        from fastmlip.ops.spherical_harmonics import spherical_harmonics

        return spherical_harmonics(list(self.problem.ls), vectors, self.problem.normalize, self.problem.normalization)


class FastFullyConnectedNet(nn.Module):
    """e3nn ``nn.FullyConnectedNet`` (a radial MLP) through ``fastmlip.ops.radial_mlp``.

    Holds the original layers under their own names, so parameters and state_dict keys are unchanged. Takes an
    optional per-row scale (cutoff envelope, padding mask) that the kernels multiply in at no extra launch.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        from fastmlip.descriptors import radial_mlp_problem

        self.problem = radial_mlp_problem(original)
        if not self.problem.has_kernel:
            raise ValueError(f"{self.problem}: an activation the kernels do not know")
        for name, layer in original.named_children():
            self.add_module(name, layer)
        self.hs = original.hs

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, x, row_scale=None):
        from fastmlip.ops.radial_mlp import radial_mlp

        limit = fused_mlp_max_rows()
        if x.is_cuda and limit is not None and x.shape[0] > limit:  # cuBLAS wins on many edges (docs/kernels.md)
            for layer in self.children():
                x = layer(x)
            return x if row_scale is None else x * row_scale.reshape(-1, 1)
        return radial_mlp(self.problem, x, [layer.weight for layer in self.children()], row_scale)


def fused_mlp_max_rows() -> Optional[int]:
    """Edges up to which a CUDA radial MLP runs as fastmlip's fused kernels (``FASTMLIP_MLP_FUSED_MAX_ROWS``).

    With ieee dots the fused backward lost to e3nn's cuBLAS matmuls on many edges (0.6x at 160k edges, H200);
    with tf32x3 dots (the default) it wins: SevenNet-0 Cu 4000 steps (216k edges) took 15.8 ms fused against
    21.8 with e3nn's matmuls, MACE-medium-like was even (docs/md.md). So by default (None) every edge count is
    fused, and no comparison with the edge count is made: ``torch.export`` would turn one into a guard on its
    symbolic edge count that the exported program's range does not satisfy.
    """
    return settings().mlp_fused_max_rows


def radial_weights(net: nn.Module, x: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``net(x)`` times ``row_scale`` [E] per row, fused when ``net`` is fastmlip's radial MLP."""
    if isinstance(net, FastFullyConnectedNet):
        return net(x, row_scale)
    out = net(x)
    return out if row_scale is None else out * row_scale.reshape(-1, 1)


def radial_message(problem, net: nn.Module, x: torch.Tensor, edge_attr: torch.Tensor, radial: torch.Tensor,
                   row_scale: Optional[torch.Tensor], edges, chunk_edges: Optional[int]) -> torch.Tensor:
    """The fused convolution of ``x`` with per-edge weights ``net(radial) * row_scale`` over receiver-sorted
    ``edges``; with ``chunk_edges`` the weights are recomputed in the backward, receivers in chunks of at most that
    many edges (:func:`fastmlip.ops.radial_conv.radial_conv`)."""
    from fastmlip.ops.radial_conv import radial_conv

    return radial_conv(problem, lambda rows, scale: radial_weights(net, rows, scale), list(net.parameters()), x,
                       edge_attr, radial, row_scale, edges, chunk_edges)


def e3nn_factories() -> dict:
    """Replacements for the e3nn node modules both frameworks use."""
    from e3nn.o3 import Linear, SphericalHarmonics

    return {Linear: FastLinear, SphericalHarmonics: FastSphericalHarmonics}
