"""Replacements for the e3nn modules both frameworks use: ``o3.Linear``, ``o3.SphericalHarmonics`` and the radial
MLP (``nn.FullyConnectedNet``), each holding the original's own parameters and buffers; and the convolution with
its radial MLP that both frameworks' interaction blocks run (:func:`radial_message`)."""
from __future__ import annotations

import contextlib
import contextvars
import uuid
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from fastmlip.descriptors import RadialBasisProblem
from fastmlip.kernels.launch import settings
from fastmlip.memo import attach, attached, derived, derived_with, derived_with_values

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
        self.table_key = uuid.uuid4().hex  # names its radial table while traced, in a copy too (tables_for_tracing)

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


def in_receiver_order(tensor: torch.Tensor, edges) -> torch.Tensor:
    """``tensor`` [E, ...] permuted into ``edges``' receiver order, once per pass: every interaction block gets the
    same edge attributes, features and lengths, and one move (the same move back in the backward) serves them all
    (:func:`fastmlip.ops.permute.permute_rows`)."""
    from fastmlip.ops.permute import permute_rows

    hit = attached(tensor, "receiver_order")
    if hit is not None and hit[0] is edges.order:
        return hit[1]
    permuted = permute_rows(tensor, edges.order)
    attach(tensor, "receiver_order", (edges.order, permuted))
    return permuted


RADIAL_SOURCE = "radial_source"  # memo key: what an edge embedding was made of (see mark_radial_source)


@dataclass(frozen=True, eq=False)
class RadialSource:
    """The edge lengths [E] an edge embedding was computed from, and the basis that computed it."""

    lengths: torch.Tensor
    basis: RadialBasisProblem
    frequencies: torch.Tensor


def mark_radial_source(embedding: torch.Tensor, lengths: torch.Tensor, basis: RadialBasisProblem,
                       frequencies: torch.Tensor) -> None:
    """Note on an edge embedding ``basis(lengths)`` where it came from: a radial MLP over it is then a function of
    the lengths alone, which :func:`radial_message` may read from a table."""
    attach(embedding, RADIAL_SOURCE, RadialSource(lengths, basis, frequencies))


# The tables of the last real pass by MLP (its table_key), while a program is traced (:func:`tables_for_tracing`)
_TRACED_TABLES: contextvars.ContextVar = contextvars.ContextVar("fastmlip_traced_tables", default=None)


@contextlib.contextmanager
def tables_for_tracing():
    """Within the block (this thread), the tables a real pass reads are kept per MLP, and a traced pass
    (``torch.export``, whose parameters are fake tensors a table cannot be built from, of a copy of the model)
    reads those: run the model once for real, then trace it, and the program holds the tables as constants."""
    token = _TRACED_TABLES.set({})
    try:
        yield
    finally:
        _TRACED_TABLES.reset(token)


def table_mode(tensor: torch.Tensor) -> str:
    """FASTMLIP_RADIAL_TABLE for a convolution over ``tensor``'s device. auto is conv where the convolution runs
    as fastmlip's kernels (faster on an H200 at 216 and 4000 atoms, both frameworks: docs/kernels.md) and off on
    the reference backend (on a CPU no speed-up was measured, and a table takes seconds to build)."""
    from fastmlip.ops.dispatch import backend_for

    mode = settings().radial_table
    if mode != "auto":
        return mode
    return "conv" if backend_for(tensor) == "triton" else "off"


def radial_table_of(net: nn.Module, source: Optional[RadialSource], dtype: torch.dtype, mode: str):
    """The table of ``net(source's embedding)`` in the lengths (:mod:`fastmlip.ops.radial_table`), or None where
    it is not used: ``mode`` (:func:`table_mode`) off, float64 (whose tolerances a table would not meet), an MLP
    fastmlip cannot describe, training (the MLP in train mode with gradients on and parameters that take them: a
    table has no weights to differentiate; in eval mode its weights get none), or a traced pass outside
    :func:`tables_for_tracing`. Built once per set of parameter values and kept on the MLP's last weight; a
    refused table (None) is kept too."""
    from fastmlip.ops.radial_table import tabulate_radial_mlp

    if mode == "off" or source is None or dtype != torch.float32 or not isinstance(net, FastFullyConnectedNet):
        return None
    traced = _TRACED_TABLES.get()
    if torch.compiler.is_compiling():
        return None if traced is None else traced.get(net.table_key)
    weights = [layer.weight for layer in net.children()]
    sources = (source.frequencies, *weights)
    if net.training and torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return None
    table = derived_with(weights[-1], ("radial_table", source.basis.key, dtype), sources,
                         lambda: tabulate_radial_mlp(source.basis, source.frequencies, net.problem, weights,
                                                     dtype=dtype))
    if traced is not None:
        traced[net.table_key] = table
    return table


def weights_kept_per_edge(net: nn.Module) -> bool:
    """Whether a convolution over ``net`` keeps E x weight_numel radial weights for its backward: not where
    FASTMLIP_RADIAL_TABLE=conv and the table of the net's current parameters was built and accepted (by the last
    real float32 pass), as the convolution's kernels then read the weights from the table themselves."""
    if not isinstance(net, FastFullyConnectedNet):
        return True
    weights = list(net.children())[-1].weight
    if table_mode(weights) != "conv":
        return True
    return not any(table is not None for table in derived_with_values(weights, "radial_table"))


def radial_message(problem, net: nn.Module, x: torch.Tensor, edge_attr: torch.Tensor, radial: torch.Tensor,
                   row_scale: Optional[torch.Tensor], edges, chunk_edges: Optional[int]) -> torch.Tensor:
    """The fused convolution of ``x`` with per-edge weights ``net(radial) * row_scale`` over receiver-sorted
    ``edges``; ``edge_attr`` and ``radial`` come in the edge list's own order, ``row_scale`` in receiver order.
    With ``chunk_edges`` the weights are recomputed in the backward, receivers in chunks of at most that many edges
    (:func:`fastmlip.ops.radial_conv.radial_conv`). Where :func:`radial_table_of` gives a table, the weights are
    read from it at the lengths ``radial`` was made of (with FASTMLIP_RADIAL_TABLE=lengths, walked sorted by
    length; with conv, by the convolution's kernels themselves), by one op whose backward never stores their
    gradient (:mod:`fastmlip.ops.table_conv`)."""
    from fastmlip.ops.radial_conv import radial_conv
    from fastmlip.ops.radial_table import radial_table
    from fastmlip.ops.table_conv import table_conv

    edge_attr = in_receiver_order(edge_attr, edges)
    source = attached(radial, RADIAL_SOURCE)
    mode = table_mode(x)
    table = radial_table_of(net, source, x.dtype, mode)
    if table is None:
        return radial_conv(problem, lambda rows, scale: radial_weights(net, rows, scale), list(net.parameters()),
                           x, edge_attr, in_receiver_order(radial, edges), row_scale, edges, chunk_edges)
    lengths = in_receiver_order(source.lengths, edges)
    if chunk_edges is not None:
        return radial_conv(problem, lambda rows, scale: radial_table(table, rows, scale), [], x, edge_attr, lengths,
                           row_scale, edges, chunk_edges)
    order = None
    if mode == "lengths":
        order = derived(lengths, "length_order", lambda: torch.argsort(lengths))
    return table_conv(problem, table, x, edge_attr, lengths, row_scale, edges, order, keep_weights=mode != "conv")


def e3nn_factories() -> dict:
    """Replacements for the e3nn node modules both frameworks use."""
    from e3nn.o3 import Linear, SphericalHarmonics

    return {Linear: FastLinear, SphericalHarmonics: FastSphericalHarmonics}
