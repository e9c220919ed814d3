"""MACE's accelerated modules and the plan that swaps them in (the surgery half of :mod:`.mace`).

Each replacement keeps every parameter and buffer object of the module it replaces (state_dict unchanged) and
computes exactly its forward: :class:`FastInteraction` (radial MLP, fused conv_tp + scatter_sum, linears, the
one-hot ``skip_tp`` as a species-indexed linear), :class:`FastSymmetricContraction` (the model's own U
buffers), :class:`FastRadialEmbedding`, and e3nn's ``o3.Linear`` and spherical harmonics (from :mod:`.e3nn_modules`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from fastmlip.descriptors import (Envelope, radial_basis_problem, scaled_problem, species_linear_problem,
                                  symmetric_contraction_problem, tensor_product_problem)
from fastmlip.graph import sort_edges
from fastmlip.memo import attached, derived
from fastmlip.ops.conv import check_conv_problem
from fastmlip.ops.linear import species_linear
from fastmlip.ops.permute import permute_columns
from fastmlip.ops.radial_basis import radial_basis
from fastmlip.ops.symmetric_contraction import module_weights, symmetric_contraction

from . import e3nn_modules, files, swaps
from .e3nn_modules import in_receiver_order

SUPPORTED_INTERACTIONS = ("RealAgnosticInteractionBlock", "RealAgnosticResidualInteractionBlock")


EDGE_MASK = "edge_mask"  # memo key: the mask of placeholder edges that belongs to an edge_index (see mace.compute)


def sorted_edges(edge_index: torch.Tensor, num_nodes: int):
    """Receiver-sorted edges of ``edge_index``, computed once per forward pass for every layer (kept on the
    edge_index tensor itself: see :mod:`fastmlip.memo`)."""
    return derived(edge_index, ("sorted_edges", num_nodes),
                   lambda: sort_edges(edge_index[0], edge_index[1], num_nodes, attached(edge_index, EDGE_MASK)))


def weight_mask(edge_index: torch.Tensor, num_nodes: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """[E] 1/0 mask in receiver order of ``edge_index``'s edges, None when all of them exist."""
    mask = attached(edge_index, EDGE_MASK)
    if mask is None:
        return None
    return derived(edge_index, ("sorted_mask", num_nodes, dtype),
                   lambda: mask.index_select(0, sorted_edges(edge_index, num_nodes).order).to(dtype))


SPECIES = "species"  # memo key: the species index of a node_attrs tensor (species_of); an exported program attaches it


def species_of(node_attrs: torch.Tensor) -> torch.Tensor:
    """MACE's species index ``node_attrs.argmax(-1)``, one tensor per forward pass: every block receives the same
    node_attrs, and the kernels keep their species sorting on that index tensor."""
    return derived(node_attrs, SPECIES, lambda: node_attrs.argmax(-1))


class FastSpeciesLinear(nn.Module):
    """MACE's ``skip_tp`` = ``FullyConnectedTensorProduct(x, one_hot(species))`` as a species-indexed linear."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.problem = species_linear_problem(original)
        self.weight = original.weight
        swaps.share_tensors(self, original)
        self.irreps_in1, self.irreps_in2 = original.irreps_in1, original.irreps_in2
        self.irreps_out = original.irreps_out

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, x, node_attrs):
        return species_linear(self.problem, x, species_of(node_attrs), self.weight)


class FastSymmetricContraction(nn.Module):
    """mace ``SymmetricContraction`` through ``fastmlip.ops.symmetric_contraction`` (U from the module's buffers)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.problem = symmetric_contraction_problem(original)
        self.contractions = original.contractions
        self.irreps_in, self.irreps_out = original.irreps_in, original.irreps_out

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, x, node_attrs):
        return symmetric_contraction(self.problem, x, species_of(node_attrs), module_weights(self.problem, self))


class FastRadialEmbedding(nn.Module):
    """mace ``RadialEmbeddingBlock`` (Bessel basis x polynomial cutoff, zero beyond r_max) through
    ``fastmlip.ops.radial_basis``: one launch each way instead of ~30. Holds the block's own basis and cutoff
    modules (the Bessel frequencies are passed to the op), so the state_dict is unchanged.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        from mace.modules.radial import BesselBasis, PolynomialCutoff

        basis, cutoff = original.bessel_fn, original.cutoff_fn
        if type(basis) is not BesselBasis or type(cutoff) is not PolynomialCutoff:
            raise ValueError(f"radial embedding with {type(basis).__name__} x {type(cutoff).__name__}")
        if hasattr(original, "distance_transform"):
            raise ValueError("radial embedding with a distance transform")
        if not getattr(original, "apply_cutoff", True):
            raise ValueError("radial embedding that returns its cutoff separately")
        envelope = Envelope("polynomial", float(cutoff.r_max), p=int(cutoff.p), hard=True)
        self.problem = radial_basis_problem(basis.bessel_weights.numel(), float(basis.prefactor), envelope)
        self.bessel_fn, self.cutoff_fn = basis, cutoff
        self.out_dim = original.out_dim

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, edge_lengths, node_attrs=None, edge_index=None, atomic_numbers=None):
        lengths = edge_lengths.reshape(-1)
        embedding = radial_basis(self.problem, lengths, self.bessel_fn.bessel_weights)
        e3nn_modules.mark_radial_source(embedding, lengths, self.problem, self.bessel_fn.bessel_weights)
        return embedding, None


def _fast_node_module(module) -> Optional[type]:
    """The fastmlip replacement class for an e3nn/mace node module, None when it has none or cannot describe it."""
    from mace.modules.blocks import RadialEmbeddingBlock
    from mace.modules.symmetric_contraction import SymmetricContraction

    return swaps.fast_replacement(module, {**e3nn_modules.e3nn_factories(), SymmetricContraction: FastSymmetricContraction,
                                            RadialEmbeddingBlock: FastRadialEmbedding})


class FastInteraction(nn.Module):
    """A MACE ``RealAgnostic[Residual]InteractionBlock`` whose conv_tp + scatter_sum is one fused fastmlip op.

    Holds the block's own submodules under the same names (radial MLP, conv_tp kept for its state), with
    ``linear_up``/``linear`` through fastmlip's linear and ``skip_tp`` through the species-indexed linear, and
    computes exactly the original forward: linear_up, radial weights x cutoff, fused conv, linear / avg_num_neighbors
    (a constant average folded into the conv's path weights),
    skip_tp (before the conv in the residual block, after it otherwise), reshape. ``chunk_edges`` (set through
    :func:`fastmlip.chunk_convolutions`) trades a recomputed MLP for memory.
    """

    chunk_edges: Optional[int] = None

    @property
    def radial_net(self) -> nn.Module:
        """The MLP that makes the convolution's per-edge weights (:mod:`fastmlip.memory` counts them)."""
        return self.conv_tp_weights

    def __init__(self, original: nn.Module):
        super().__init__()
        self.problem = tensor_product_problem(original.conv_tp)
        check_conv_problem(self.problem)
        self.residual = type(original).__name__ == "RealAgnosticResidualInteractionBlock"
        for key, value in vars(original).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        # linear(message) / avg = linear(message / avg): a constant average goes into the conv's path weights, so
        # no division launches forward and backward
        self.folded_average = type(self.avg_num_neighbors) in (int, float)
        if self.folded_average:
            self.problem = scaled_problem(self.problem, 1.0 / self.avg_num_neighbors)
        self.linear_up = swaps.maybe_fast(original.linear_up, e3nn_modules.FastLinear)
        self.conv_tp = original.conv_tp
        self.conv_tp_weights = swaps.maybe_fast(original.conv_tp_weights, e3nn_modules.FastFullyConnectedNet)
        self.linear = swaps.maybe_fast(original.linear, e3nn_modules.FastLinear)
        self.skip_tp = swaps.maybe_fast(original.skip_tp, FastSpeciesLinear)
        self.reshape = original.reshape
        device = next(original.parameters()).device  # surgery happens where the model already is
        self.register_buffer("reshape_index", _reshape_index(original.reshape, device), persistent=False)

    def extra_repr(self) -> str:
        return f"problem={self.problem}, residual={self.residual}"

    def forward(self, node_attrs, node_feats, edge_attrs, edge_feats, edge_index, cutoff=None, lammps_class=None,
                lammps_natoms=(0, 0), first_layer=False):
        if lammps_class is not None:
            raise NotImplementedError("fastmlip's MACE interaction does not run under LAMMPS ghost-atom exchange; "
                                      "restore the model (fastmlip.restore) for LAMMPS")
        sc = self.skip_tp(node_feats, node_attrs) if self.residual else None
        node_feats = self.linear_up(node_feats)
        edges = sorted_edges(edge_index, node_feats.shape[0])
        row_scale = None if cutoff is None else in_receiver_order(cutoff, edges).reshape(-1)
        mask = weight_mask(edge_index, node_feats.shape[0], node_feats.dtype)
        if mask is not None:  # placeholder edges weigh zero: their messages and gradients vanish
            row_scale = mask if row_scale is None else row_scale * mask
        message = e3nn_modules.radial_message(self.problem, self.conv_tp_weights, node_feats, edge_attrs, edge_feats,
                                              row_scale, edges, self.chunk_edges)
        message = self.linear(message)
        if not self.folded_average:
            message = message / self.avg_num_neighbors
        if not self.residual:
            message = self.skip_tp(message, node_attrs)
        if self.reshape_index is None:
            return self.reshape(message), sc
        # MACE's reshape_irreps as one permutation of columns: its slices and cat cost ~11 launches a layer forward
        # and backward (a zeroed gradient and a copy per irrep, then the sums); its backward is the move back
        reshaped = permute_columns(message, self.reshape_index)
        return reshaped.view(message.shape[0], self.reshape.muls[0], -1), sc


def _reshape_index(reshape: nn.Module, device) -> Optional[torch.Tensor]:
    """The column each output column of MACE's ``reshape_irreps`` reads, in its "mul_ir" layout (without
    cuEquivariance, or with it in "mul_ir"): output [N, mul, sum of dims] column (u, offset of irrep i + k) is input
    column (start of irrep i + u * dim i + k). None where the layout is another (the module then runs as it is)."""
    config = getattr(reshape, "cueq_config", None)
    muls, dims = list(getattr(reshape, "muls", ())), list(getattr(reshape, "dims", ()))
    if (config is not None and config.layout_str != "mul_ir") or not muls or len(set(muls)) != 1:
        return None
    starts = [sum(m * d for m, d in zip(muls[:i], dims[:i])) for i in range(len(muls))]
    return torch.tensor([start + u * d + k for u in range(muls[0]) for start, d in zip(starts, dims)
                         for k in range(d)], dtype=torch.long, device=device)


def _interaction_obstacle(module) -> Optional[str]:
    """Why an interaction block cannot be fused (None if it can)."""
    from e3nn.o3 import TensorProduct

    kind = type(module).__name__
    if kind not in SUPPORTED_INTERACTIONS or not type(module).__module__.startswith("mace."):
        return f"{kind} is not one of {', '.join(SUPPORTED_INTERACTIONS)}"
    if hasattr(module, "conv_fusion"):
        return "built with cuEquivariance/OpenEquivariance conv fusion"
    if type(getattr(module, "conv_tp", None)) is not TensorProduct:
        return f"its conv_tp is a {type(getattr(module, 'conv_tp', None)).__name__}, not e3nn's TensorProduct"
    try:
        check_conv_problem(tensor_product_problem(module.conv_tp))
    except ValueError as exc:
        return files.one_line(exc)
    return None


_FAST_MODULES = (FastInteraction, FastSpeciesLinear, FastSymmetricContraction, FastRadialEmbedding,
                 e3nn_modules.FastLinear, e3nn_modules.FastSphericalHarmonics)


def plan(model) -> tuple:
    """([(qualified name, factory)], {qualified name: reason}): what is swapped and what stays e3nn.

    Activations and reshapes stay torch by design (radial MLPs go inside the fused interactions, the radial
    embedding through fastmlip's radial basis when it is a Bessel basis with MACE's polynomial cutoff); an
    interaction block of another kind, any other e3nn tensor product, or a module fastmlip cannot describe is
    reported.
    """
    from e3nn.o3 import TensorProduct
    from mace.modules.blocks import InteractionBlock

    planned, skipped, covered = [], {}, set()
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in covered):
            continue
        if isinstance(module, _FAST_MODULES):
            covered.add(name)
        elif isinstance(module, InteractionBlock):
            covered.add(name)
            reason = _interaction_obstacle(module)
            if reason is None:
                planned.append((name, FastInteraction))
            else:
                skipped[name] = reason
        elif (factory := _fast_node_module(module)) is not None:
            covered.add(name)
            planned.append((name, factory))
        elif isinstance(module, TensorProduct) or type(module).__name__ == "SymmetricContraction":
            covered.add(name)
            skipped[name] = f"{type(module).__name__} that fastmlip cannot describe"
    return planned, skipped


def accelerate(model, *, strict: bool = False) -> list:
    """Swap MACE's e3nn modules for fastmlip ones in place; returns the names left as they were."""
    if swaps.is_accelerated(model):
        return []
    return swaps.apply_plan(model, *plan(model), strict=strict)
