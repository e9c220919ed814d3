"""SevenNet's accelerated modules and the plan that swaps them in (the surgery half of :mod:`.sevenn`).

Each replacement keeps every parameter and buffer object of the module it replaces (state_dict unchanged) and
computes exactly its forward: :class:`FastIrrepsConvolution` (gather, tensor product and scatter fused; the radial
MLP fused too), :class:`FastEquivariantGate`, :class:`FastEdgeEmbedding` (radial basis x cutoff and spherical
harmonics), and e3nn's ``o3.Linear`` (from :mod:`.e3nn_modules`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastmlip.descriptors import (Envelope, gate_problem, radial_basis_problem, scaled_problem,
                                  spherical_harmonics_problem, tensor_product_problem)
from fastmlip.graph import sort_edges
from fastmlip.ops.conv import check_conv_problem
from fastmlip.ops.gate import gate
from fastmlip.ops.radial_basis import radial_basis
from fastmlip.ops.spherical_harmonics import spherical_harmonics

from . import e3nn_modules, files, swaps

# Data-dict entry where the first fused convolution of a forward pass leaves the receiver-sorted edges.
SORTED_EDGES_KEY = "_fastmlip_sorted_edges"
# Data-dict entry with the per-edge mask of placeholder edges (see ``sevenn.compute``).
EDGE_MASK_KEY = "_fastmlip_edge_mask"


def sorted_edges_of(data, edge_index: torch.Tensor, num_nodes: int):
    """The receiver-sorted edges of ``edge_index``: those the convolutions of this pass over ``data`` sorted,
    else sorted now (sevenn's ``edge_index[0]`` is the receiver)."""
    cached = data[SORTED_EDGES_KEY] if SORTED_EDGES_KEY in data else None
    if cached is not None and cached["inputs"][0] is edge_index:
        return cached["edges"]
    return sort_edges(edge_index[1], edge_index[0], num_nodes, data[EDGE_MASK_KEY] if EDGE_MASK_KEY in data else None)


class FastIrrepsConvolution(nn.Module):
    """``sevenn.nn.convolution.IrrepsConvolution`` with the gather-TP-scatter fused into one fastmlip op.

    Shares ``denominator`` and the radial MLP's layers with the module it replaces (same parameter objects; the
    MLP runs as fastmlip's fused radial MLP when it can be described), reads and
    writes the same data keys, and uses the tensor product's own coupling blocks and path weights (divided by a
    fixed ``denominator``). Edges go to
    the op sorted by receiver with CSR offsets, so GPU kernels take their deterministic, atomic-free path.
    ``chunk_edges`` (set through :func:`fastmlip.chunk_convolutions`) trades a recomputed MLP for memory.
    """

    chunk_edges: Optional[int] = None

    @property
    def radial_net(self) -> nn.Module:
        """The MLP that makes the convolution's per-edge weights (:mod:`fastmlip.memory` counts them)."""
        return self.weight_nn

    def __init__(self, original: nn.Module):
        super().__init__()
        self.problem = tensor_product_problem(original.convolution)
        check_conv_problem(self.problem)
        self.weight_nn = swaps.maybe_fast(original.weight_nn, e3nn_modules.FastFullyConnectedNet)
        self.denominator = original.denominator
        # A fixed denominator (sevenn's default) goes into the kernels' path weights: no division launch forward
        # and backward per layer. A trained one stays a division, so its gradient flows.
        self.folded = not original.denominator.requires_grad
        if self.folded:
            self.problem = scaled_problem(self.problem, 1.0 / float(original.denominator))
        self.key_x = original.key_x
        self.key_filter = original.key_filter
        self.key_weight_input = original.key_weight_input
        self.key_edge_idx = original.key_edge_idx

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def _sorted_edges(self, data, num_nodes: int):
        """Edges sorted by receiver (CSR offsets for the deterministic kernels), shared by all layers of a pass
        (as are the permuted radial-MLP input and edge attributes: :func:`e3nn_modules.in_receiver_order`)."""
        edge_index = data[self.key_edge_idx]
        mask = data[EDGE_MASK_KEY] if EDGE_MASK_KEY in data else None
        inputs = (edge_index, data[self.key_filter], data[self.key_weight_input], mask)
        cached = data[SORTED_EDGES_KEY] if SORTED_EDGES_KEY in data else None
        if cached is None or any(a is not b for a, b in zip(cached["inputs"], inputs)):
            edges = sort_edges(edge_index[1], edge_index[0], num_nodes, mask)
            cached = {"inputs": inputs, "edges": edges,
                      "mask": None if mask is None else mask.index_select(0, edges.order).to(inputs[2].dtype)}
            data[SORTED_EDGES_KEY] = cached
        return cached

    def forward(self, data):
        x = data[self.key_x]
        if data[self.key_edge_idx].shape[1] == 0:  # isolated atoms: nothing to gather (as sevenn's fused convs)
            weight = self.weight_nn(data[self.key_weight_input])
            out = x.new_zeros(x.shape[0], self.problem.dim_out) + 0 * (data[self.key_filter].sum() + weight.sum())
        else:
            cached = self._sorted_edges(data, x.shape[0])
            edges = cached["edges"]
            # placeholder edges (mask 0) weigh zero: their messages and gradients vanish
            out = e3nn_modules.radial_message(self.problem, self.weight_nn, x, data[self.key_filter],
                                              data[self.key_weight_input], cached["mask"], edges, self.chunk_edges)
        data[self.key_x] = out if self.folded else out.div(self.denominator)
        return data


class FastEquivariantGate(nn.Module):
    """``sevenn.nn.equivariant_gate.EquivariantGate`` through ``fastmlip.ops.gate`` (one kernel per direction
    instead of e3nn's extract, activations, elementwise product and concatenation).

    Holds the original e3nn ``Gate``: its activation objects are the ones the problem calls on the reference
    backend, and its buffers stay, so the state_dict is unchanged. Reads and writes the same data key.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.problem = gate_problem(original.gate)
        self.gate = original.gate
        self.key_x = original.key_x

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, data):
        data[self.key_x] = gate(self.problem, data[self.key_x])
        return data


class FastEdgeEmbedding(nn.Module):
    """``sevenn.nn.edge_embedding.EdgeEmbedding`` (Bessel basis x cutoff, spherical harmonics of the edge vector)
    through ``fastmlip.ops.radial_basis`` and ``spherical_harmonics``: two launches each way instead of ~30.

    Holds the original basis, cutoff and spherical modules under their names (the trainable Bessel frequencies
    are the basis module's own parameter, passed to the op), so the state_dict is unchanged.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        from sevenn.nn.edge_embedding import BesselBasis, PolynomialCutoff, SphericalEncoding, XPLORCutoff

        basis, cutoff, spherical = original.basis_function, original.cutoff_function, original.spherical
        if type(basis) is not BesselBasis or type(spherical) is not SphericalEncoding:
            raise ValueError(f"edge embedding with a {type(basis).__name__} basis and {type(spherical).__name__}")
        if type(cutoff) is PolynomialCutoff and float(cutoff.p) == int(cutoff.p):
            envelope = Envelope("polynomial", float(cutoff.cutoff_length), p=int(cutoff.p))
        elif type(cutoff) is XPLORCutoff:
            envelope = Envelope("xplor", float(cutoff.r_cut), r_on=float(cutoff.r_on))
        else:
            raise ValueError(f"edge embedding with a {type(cutoff).__name__} cutoff")
        self.problem = radial_basis_problem(basis.num_basis, basis.prefactor, envelope)
        self.sh_problem = spherical_harmonics_problem(spherical.sph)
        self.basis_function, self.cutoff_function, self.spherical = basis, cutoff, spherical

    def extra_repr(self) -> str:
        return f"problem={self.problem}, harmonics={self.sh_problem}"

    def forward(self, data):
        from sevenn._keys import EDGE_ATTR, EDGE_EMBEDDING, EDGE_LENGTH, EDGE_VEC

        vectors = data[EDGE_VEC]
        lengths = torch.linalg.norm(vectors, dim=-1)
        data[EDGE_LENGTH] = lengths
        data[EDGE_EMBEDDING] = radial_basis(self.problem, lengths, self.basis_function.coeffs)
        e3nn_modules.mark_radial_source(data[EDGE_EMBEDDING], lengths, self.problem, self.basis_function.coeffs)
        sh = self.sh_problem
        data[EDGE_ATTR] = spherical_harmonics(list(sh.ls), vectors, sh.normalize, sh.normalization)
        return data


_FAST_MODULES = (FastIrrepsConvolution, FastEquivariantGate, FastEdgeEmbedding, e3nn_modules.FastLinear,
                 e3nn_modules.FastSphericalHarmonics)


def _convolution_obstacle(module) -> Optional[str]:
    """Why an IrrepsConvolution cannot be fused (None if it can)."""
    from e3nn.o3 import TensorProduct

    if getattr(module, "is_parallel", False):
        return "built for LAMMPS parallel (ghost atoms)"
    if not isinstance(getattr(module, "convolution", None), TensorProduct):
        return f"its tensor product is a {type(getattr(module, 'convolution', None)).__name__}, not e3nn's"
    try:
        check_conv_problem(tensor_product_problem(module.convolution))
    except ValueError as exc:
        return files.one_line(exc)
    return None


def _gate_obstacle(module) -> Optional[str]:
    """Why an EquivariantGate cannot go through fastmlip's gate op (None if it can)."""
    try:
        gate_problem(module.gate)
    except (ValueError, AttributeError) as exc:
        return files.one_line(exc)
    return None


def plan(model) -> tuple:
    """([(qualified name, factory)], {qualified name: reason}) for what can and cannot be accelerated.

    Convolutions are fused (with their radial MLPs); the edge embedding, e3nn linears, spherical harmonics and
    gates go through fastmlip's ops. Any other e3nn tensor product (e.g. the 'nequip' self-connection), a gate
    the gate op cannot describe, or a convolution built for another backend (cuEquivariance, FlashTP,
    OpenEquivariance, LAMMPS parallel) is reported as not accelerated; an edge embedding fastmlip cannot
    describe stays as it is (plain torch, with its harmonics swapped).
    """
    from e3nn.o3 import ElementwiseTensorProduct, TensorProduct
    from sevenn.nn.convolution import IrrepsConvolution
    from sevenn.nn.edge_embedding import EdgeEmbedding
    from sevenn.nn.equivariant_gate import EquivariantGate

    planned, skipped = [], {}
    covered = set()
    node_factories = {**e3nn_modules.e3nn_factories(), EdgeEmbedding: FastEdgeEmbedding}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in covered) or isinstance(module, _FAST_MODULES):
            covered.add(name)
            continue
        if type(module) is IrrepsConvolution:
            covered.add(name)
            reason = _convolution_obstacle(module)
            if reason is None:
                planned.append((name, FastIrrepsConvolution))
            else:
                skipped[name] = reason
        elif type(module) is EquivariantGate:
            covered.add(name)
            reason = _gate_obstacle(module)
            if reason is None:
                planned.append((name, FastEquivariantGate))
            else:
                skipped[name] = reason
        elif (factory := swaps.fast_replacement(module, node_factories)) is not None:
            covered.add(name)
            planned.append((name, factory))
        elif "convolution" in type(module).__name__.lower() and name:
            covered.add(name)
            skipped[name] = f"{type(module).__name__} is not an e3nn IrrepsConvolution"
        elif isinstance(module, TensorProduct) and not isinstance(module, ElementwiseTensorProduct):
            covered.add(name)
            skipped[name] = f"e3nn {type(module).__name__} outside a convolution"
    return planned, skipped


def accelerate(model, *, strict: bool = False) -> list:
    """Swap SevenNet convolutions, the edge embedding, linears, spherical harmonics and gates for fastmlip's in
    place; returns the names left as they were."""
    return swaps.apply_plan(model, *plan(model), strict=strict)
