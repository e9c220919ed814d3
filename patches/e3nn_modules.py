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

        if x.is_cuda and x.shape[0] > fused_mlp_max_rows():  # cuBLAS wins on many edges (docs/kernels.md)
            for layer in self.children():
                x = layer(x)
            return x if row_scale is None else x * row_scale.reshape(-1, 1)
        return radial_mlp(self.problem, x, [layer.weight for layer in self.children()], row_scale)


def fused_mlp_max_rows() -> int:
    """Edges up to which a CUDA radial MLP runs as fastmlip's fused kernels (``FASTMLIP_MLP_FUSED_MAX_ROWS``).

    With ieee dots the fused backward lost to e3nn's cuBLAS matmuls on many edges (0.6x at 160k edges, H200);
    with tf32x3 dots (the default) it wins: SevenNet-0 Cu 4000 steps (216k edges) took 15.8 ms fused against
    21.8 with e3nn's matmuls, MACE-medium-like was even (docs/md.md). So by default every edge count is fused.
    """
    return settings().mlp_fused_max_rows


def radial_weights(net: nn.Module, x: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``net(x)`` times ``row_scale`` [E] per row, fused when ``net`` is fastmlip's radial MLP."""
    if isinstance(net, FastFullyConnectedNet):
        return net(x, row_scale)
    out = net(x)
    return out if row_scale is None else out * row_scale.reshape(-1, 1)


def radial_message(problem, net: nn.Module, x: torch.Tensor, edge_attr: torch.Tensor, radial: torch.Tensor,
                   row_scale: Optional[torch.Tensor], edges, chunk_edges: Optional[int],
                   ahead: Optional[WeightsAhead] = None, key=None) -> torch.Tensor:
    """The fused convolution of ``x`` with per-edge weights ``net(radial) * row_scale`` over receiver-sorted
    ``edges``; with ``chunk_edges`` the weights are recomputed in the backward, receivers in chunks of at most that
    many edges (:func:`fastmlip.ops.radial_conv.radial_conv`). The weights ``ahead`` holds for ``key`` are used
    when it has them (:func:`weights_ahead`)."""
    from fastmlip.ops.radial_conv import radial_conv, sorted_conv

    weights = ahead.take(key, radial, row_scale) if ahead is not None and chunk_edges is None else None
    if weights is not None:
        return sorted_conv(problem, x, edge_attr, weights, edges)
    return radial_conv(problem, lambda rows, scale: radial_weights(net, rows, scale), list(net.parameters()), x,
                       edge_attr, radial, row_scale, edges, chunk_edges)


def _has_streams(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


class WeightsAhead:
    """Per-edge weights of a pass's later convolutions, launched on a second CUDA stream by :func:`weights_ahead`;
    each convolution takes its own with :meth:`take`, which makes the current stream wait for just those."""

    def __init__(self, inputs: tuple, weights: dict):
        self.inputs = inputs  # (radial, row_scale) the weights were computed from
        self.weights = weights  # key -> (weights, CUDA event recorded after them)

    def take(self, key, radial: torch.Tensor, row_scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The weights launched for ``key`` from these very inputs (None otherwise: compute them in place)."""
        entry = self.weights.get(key)
        if entry is None or radial is not self.inputs[0] or row_scale is not self.inputs[1]:
            return None
        weights, done = entry
        stream = torch.cuda.current_stream(weights.device)
        stream.wait_event(done)
        weights.record_stream(stream)  # made on the side stream, read here: not reused before these reads end
        return weights


def weights_ahead(nets, radial: torch.Tensor, row_scale: Optional[torch.Tensor]) -> Optional[WeightsAhead]:
    """``radial_weights(net, radial, row_scale)`` for every ``(key, net)`` in ``nets``, launched now on a second CUDA
    stream, where ``FASTMLIP_RADIAL_AHEAD`` asks for it (None elsewhere: CPU, tracing, the setting off).

    Why: at a few hundred atoms a step's kernels leave most of the GPU idle, and a later layer's radial MLP
    depends only on the edges, so it can run beside the layers before it; autograd runs each MLP's backward on
    the stream of its forward, so the backward overlaps too. The operations are the same: the energy is the same
    bit for bit, forces and stress to rounding (autograd adds the MLP inputs' gradients in another order).
    """
    if not (_has_streams(radial) and settings().radial_ahead) or torch.compiler.is_compiling():
        return None
    side = torch.cuda.Stream(radial.device)
    side.wait_stream(torch.cuda.current_stream(radial.device))
    weights = {}
    with torch.cuda.stream(side):
        for key, net in nets:
            out = radial_weights(net, radial, row_scale)
            done = torch.cuda.Event()
            done.record(side)
            weights[key] = (out, done)
    for tensor in (radial, row_scale):  # made on the current stream, read on the side one
        if tensor is not None:
            tensor.record_stream(side)
    return WeightsAhead((radial, row_scale), weights)


def e3nn_factories() -> dict:
    """Replacements for the e3nn node modules both frameworks use."""
    from e3nn.o3 import Linear, SphericalHarmonics

    return {Linear: FastLinear, SphericalHarmonics: FastSphericalHarmonics}
