"""MACE's forward for one structure, with forces and stress taken from the edge vectors (the evaluation half of
:mod:`.mace` for accelerated models).

MACE forms its edge vectors inside its forward as ``positions[receiver] - positions[sender] + shifts`` and takes
forces and stress by differentiating through that gather (and through ``cell[batch[sender]]`` and
``displacement[batch]`` for stress). The backward of an advanced-indexing gather is ``index_put_`` with
accumulate, which CUDA runs as a sort of every edge (57 ms of an 86 ms MACE-medium Cu 4000 step, measured on an
H200). Here the edge vectors are formed outside autograd, in float64 (as SevenNet and ASE do), and are the leaf
the energy is differentiated by: with ``g = dE/dvectors``,

    forces_i = sum_{sender(e) = i} g_e - sum_{receiver(e) = i} g_e          (in a fixed order: node_difference)
    stress   = sym(vectors^T g) / volume                                    (MACE's dE/d(strain) / V)

which is MACE's math (the energy is a function of the edge vectors only) in another summation order. Everything
between is the model's own modules, called with the arguments MACE's forward gives them; a readout's column is
picked by slicing, not by ``[arange, heads]`` (another indexing backward). The self-check of ``accelerate``
compares this forward with the model's own on every call of it.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastmlip import memo
from fastmlip.graph import edge_stress
from fastmlip.ops.derivatives import gradient_or_zeros
from fastmlip.ops.node_sums import node_difference

from .mace_modules import sorted_edges

# mace model classes whose forward :func:`forward` reproduces (mace-torch 0.3.x), and the extras it does not
SUPPORTED_MODELS = ("MACE", "ScaleShiftMACE")
UNSUPPORTED_PARTS = ("pair_repulsion", "joint_embedding", "embedding_readout")


def obstacle(model) -> Optional[str]:
    """Why :func:`forward` cannot stand in for ``model.forward``, None if it can."""
    name = type(model).__name__
    if type(model).__module__ != "mace.modules.models" or name not in SUPPORTED_MODELS:
        return f"{name} is not one of mace's {', '.join(SUPPORTED_MODELS)}"
    extras = [part for part in UNSUPPORTED_PARTS if hasattr(model, part)]
    if extras:
        return f"it has {', '.join(extras)}"
    return None


def _head_column(values: torch.Tensor, head: int) -> torch.Tensor:
    """MACE's ``values[arange(n), heads]`` for one head of one structure, by slicing."""
    return values.reshape(values.shape[0], -1)[:, head]


def node_energies(model, data: dict, vectors: torch.Tensor, head: int) -> tuple:
    """(node energies [N] as MACE reports them, the per-node terms MACE differentiates [N]) for edge vectors
    ``vectors`` of ``data["edge_index"]``; ScaleShiftMACE differentiates the interaction energy only (its e0 is
    a constant), MACE the total."""
    node_attrs, edge_index = data["node_attrs"], data["edge_index"]
    num_atoms = node_attrs.shape[0]
    node_heads = memo.derived(node_attrs, ("node_heads", head),  # kept: the node attributes are (see mace.build_input)
                              lambda: torch.full((num_atoms,), head, dtype=torch.long, device=node_attrs.device))
    lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)

    energies_fn = model.atomic_energies_fn  # e0 per node: the same every step of a structure, kept
    node_e0, node_e0_double = memo.derived_with(node_attrs, ("node_e0", head), (energies_fn.atomic_energies,),
                                                lambda: _with_double(_head_column(energies_fn(node_attrs), head)))
    node_feats = model.node_embedding(node_attrs)
    edge_attrs = model.spherical_harmonics(vectors)
    edge_feats, cutoff = model.radial_embedding(lengths, node_attrs, edge_index, model.atomic_numbers)
    node_feats_list = []
    for k, (interaction, product) in enumerate(zip(model.interactions, model.products)):
        node_feats, sc = interaction(node_attrs=node_attrs, node_feats=node_feats, edge_attrs=edge_attrs,
                                     edge_feats=edge_feats, edge_index=edge_index, cutoff=cutoff,
                                     first_layer=(k == 0), lammps_class=None, lammps_natoms=(0, 0))
        node_feats = product(node_feats=node_feats, sc=sc, node_attrs=node_attrs)
        node_feats_list.append(node_feats)
    single = len(model.readouts) == 1
    node_es = [_head_column(readout(node_feats_list[-1 if single else k], node_heads), head)
               for k, readout in enumerate(model.readouts)]
    if type(model).__name__ == "ScaleShiftMACE":
        node_interaction = _scaled_and_shifted(model.scale_shift, torch.stack(node_es).sum(0), node_heads)
        return node_e0_double + node_interaction.double(), node_interaction
    node_energy = torch.stack([node_e0] + node_es, dim=-1).sum(-1)
    return node_energy, node_energy


def _with_double(values: torch.Tensor) -> tuple:
    return values, values.double()


def _scaled_and_shifted(block, x: torch.Tensor, node_heads: torch.Tensor) -> torch.Tensor:
    """MACE's ``ScaleShiftBlock`` (scale[head] * x + shift[head]) with the per-node factors kept on the node heads,
    which are the same every step of a structure."""
    scale, shift = block.scale, block.shift
    scales, shifts = memo.derived_with(node_heads, "scale_shift", (scale, shift),
                                       lambda: (torch.atleast_1d(scale)[node_heads],
                                                torch.atleast_1d(shift)[node_heads]))
    return scales * x + shifts


def forward(model, data: dict, vectors: torch.Tensor, head: int, compute_stress: bool) -> dict:
    """Energy, node energies, forces and (``compute_stress``) stress of one structure, as MACE's forward gives
    them; ``vectors`` are the edge vectors of ``data["edge_index"]`` (:func:`fastmlip.graph.edge_vectors`)."""
    vectors = vectors.detach().requires_grad_(True)
    node_energy, differentiated = node_energies(model, data, vectors, head)
    energy = node_energy.sum().to(vectors.dtype)
    gradient = gradient_or_zeros(differentiated.sum(), vectors)
    edge_index = data["edge_index"]
    edges = sorted_edges(edge_index, node_energy.shape[0])
    forces = node_difference(gradient, edges, edge_index[0], edge_index[1], plus="src")
    stress = None
    if compute_stress:
        stress = edge_stress(vectors, gradient, torch.linalg.det(data["cell"].reshape(3, 3)).abs())
        stress = torch.where(stress.abs() < 1e10, stress, torch.zeros_like(stress))  # as MACE: no cell, no stress
    return {"energy": energy.detach(), "node_energy": node_energy.detach(), "forces": forces, "stress": stress}

