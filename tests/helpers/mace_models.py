"""Small MACE models with the published MACE-MP-0 / MACE-OFF23 hyperparameters, and the structure they are checked
on; shared by the tests of every layer that runs a MACE model (the patch, the faces, the kernels' whole-model run).

Models use the published MACE-MP-0 small/medium/large and MACE-OFF23-medium hyperparameters at full width
(128 channels, max_ell 3, correlation 3, 2 interactions, radial MLP [64, 64, 64], 16x0e readout MLP; residual
interaction blocks, OFF with a plain first block) for three elements; readout weights are scaled so forces are
O(1) eV/A, so agreement is checked on real numbers, not on rounding noise. They are built in float64, whatever
torch's default dtype is when they are first asked for (they are cached). Importing this module needs mace
(callers ``pytest.importorskip("mace.modules")`` first).
"""
from __future__ import annotations

import copy
import functools

import ase
import numpy as np
import torch
from e3nn import o3
from mace.modules import MACE, RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock, ScaleShiftMACE

from fastmlip.patches import mace as patch
from fastmlip.patches import self_check

# name: (model class, hidden irreps, first interaction, interaction, use_reduced_cg)
CONFIGS = {
    "mp0_small": (ScaleShiftMACE, "128x0e", RealAgnosticResidualInteractionBlock,
                  RealAgnosticResidualInteractionBlock, True),
    "mp0_medium": (ScaleShiftMACE, "128x0e+128x1o", RealAgnosticResidualInteractionBlock,
                   RealAgnosticResidualInteractionBlock, False),
    "mp0_large": (ScaleShiftMACE, "128x0e+128x1o+128x2e", RealAgnosticResidualInteractionBlock,
                  RealAgnosticResidualInteractionBlock, True),
    "off_like": (MACE, "128x0e+128x1o", RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock, False),
}
R_MAX = 4.5
ELEMENTS = [1, 6, 8]


def build_model(config: str, *, heads=None, interaction=None, channels: int = 128):
    """A fresh copy of a cached model (building MACE's U matrices costs ~10-25 s on CI's CPU); ``channels``
    narrows the published widths (the interpreter tests use it)."""
    return copy.deepcopy(_cached_model(config, tuple(heads) if heads else None, interaction, channels))


@functools.lru_cache(maxsize=None)
def _cached_model(config: str, heads, interaction, channels: int = 128, seed: int = 0):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _float64_model(config, heads, interaction, channels, seed)
    finally:
        torch.set_default_dtype(previous)


def _float64_model(config: str, heads, interaction, channels: int, seed: int):
    model_cls, hidden, first, inter, reduced = CONFIGS[config]
    hidden = hidden.replace("128x", f"{channels}x")
    heads = list(heads) if heads else None
    torch.manual_seed(seed)
    n_heads = len(heads) if heads else 1
    kwargs = dict(r_max=R_MAX, num_bessel=8, num_polynomial_cutoff=5, max_ell=3, interaction_cls=interaction or inter,
                  interaction_cls_first=first, num_interactions=2, num_elements=len(ELEMENTS),
                  hidden_irreps=o3.Irreps(hidden), MLP_irreps=o3.Irreps("16x0e"),
                  atomic_energies=np.linspace(-3.0, -1.0, len(ELEMENTS) * n_heads).reshape(
                      (n_heads, len(ELEMENTS)) if heads else (len(ELEMENTS),)),
                  avg_num_neighbors=10.0, atomic_numbers=ELEMENTS, correlation=3, gate=torch.nn.functional.silu,
                  radial_MLP=[64, 64, 64], use_reduced_cg=reduced, heads=heads)
    if model_cls is ScaleShiftMACE:
        kwargs.update(atomic_inter_scale=[1.0] * n_heads if heads else 1.0,
                      atomic_inter_shift=[0.1] * n_heads if heads else 0.1)
    model = model_cls(**kwargs).eval()
    _scale_forces(model, target=3.0)
    return model


def _scale_forces(model, target: float) -> None:
    """Scale the readouts' last weights so the largest force on the test structure is ``target`` eV/A."""
    atoms = periodic_structure()
    forces = self_check.compute_on_atoms(patch, model, atoms, self_check.neighbor_edges(atoms, R_MAX))["forces"]
    factor = target / float(forces.abs().max())
    with torch.no_grad():
        for readout in model.readouts:
            last = readout.linear if hasattr(readout, "linear") else readout.linear_2
            last.weight.mul_(factor)


def periodic_structure(seed: int = 0):
    """8 atoms of H, C, O in a rattled triclinic cell smaller than two cutoffs (periodic images matter)."""
    rng = np.random.default_rng(seed)
    cell = np.array([[5.0, 0.0, 0.0], [0.6, 4.6, 0.0], [0.4, 0.5, 4.8]])
    frac = np.array([[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5],
                     [0.25, 0.25, 0.25], [0.75, 0.75, 0.25], [0.75, 0.25, 0.75], [0.25, 0.75, 0.75]])
    atoms = ase.Atoms(numbers=[1, 6, 8, 1, 6, 8, 8, 1], scaled_positions=frac, cell=cell, pbc=True)
    atoms.positions += rng.normal(scale=0.15, size=atoms.positions.shape)
    return atoms
