"""``compute_edges``: energies and dE/d(edge vectors), the form LAMMPS ML-IAP hands edges in, agree with
``compute``'s energies, forces and stress on the same structure (float64, both frameworks, both with and without
acceleration where the framework allows)."""
from __future__ import annotations

import warnings

import pytest
import torch

from fastmlip.patches import self_check


def edge_inputs(atoms, cutoff):
    i, j, shifts = self_check.neighbor_edges(atoms, cutoff)
    positions = torch.as_tensor(atoms.positions, dtype=torch.float64)
    cell = torch.as_tensor(atoms.cell.array, dtype=torch.float64)
    vectors = positions[j] - positions[i] + shifts.to(torch.float64) @ cell
    return i, j, shifts, vectors


def assert_edges_reproduce_compute(patch, model, atoms, cutoff):
    i, j, shifts, vectors = edge_inputs(atoms, cutoff)
    expected = self_check.compute_on_atoms(patch, model, atoms, (i, j, shifts))
    got = patch.compute_edges(model, torch.as_tensor(atoms.numbers), i, j, vectors)
    gradient = got["edge_gradient"]
    forces = torch.zeros(len(atoms), 3, dtype=gradient.dtype).index_add_(0, i, gradient).index_add_(0, j, gradient,
                                                                                                      alpha=-1)
    virial = vectors.T.to(gradient.dtype) @ gradient
    stress = 0.5 * (virial + virial.T) / atoms.cell.volume
    torch.testing.assert_close(got["energies"], expected["energies"], atol=1e-9, rtol=0)
    torch.testing.assert_close(got["energy"], expected["energy"], atol=1e-9 * len(atoms), rtol=0)
    torch.testing.assert_close(forces, expected["forces"], atol=1e-8, rtol=0)
    torch.testing.assert_close(stress, expected["stress"], atol=1e-9, rtol=0)
    assert float(expected["forces"].abs().max()) > 0.1  # real forces, not rounding noise
    local = patch.compute_edges(model, torch.as_tensor(atoms.numbers), i, j, vectors, num_local=3)
    torch.testing.assert_close(local["energy"], got["energies"][:3].sum(), atol=1e-12, rtol=0)
    assert not torch.equal(local["edge_gradient"], gradient)


@pytest.mark.parametrize("accelerated", [False, True], ids=["e3nn", "fast"])
def test_sevennet_edges(accelerated):
    pytest.importorskip("sevenn")
    from ase.build import bulk

    from fastmlip.patches import sevenn as patch

    if patch.resolve("7net-0") is None:
        pytest.skip("7net-0 is not installed with sevenn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = patch.load("7net-0", dtype=torch.float64)
    if accelerated:
        patch.accelerate(model)
    atoms = bulk("SiO", "zincblende", a=4.6).repeat((2, 1, 1))
    atoms.rattle(0.1, seed=4)
    assert_edges_reproduce_compute(patch, model, atoms, model.cutoff)


@pytest.mark.parametrize("accelerated", [False, True], ids=["e3nn", "fast"])
def test_mace_edges(accelerated):
    pytest.importorskip("mace.modules")
    from helpers import mace_models

    from fastmlip.patches import mace as patch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = mace_models.build_model("mp0_medium", channels=16)
        if accelerated:
            patch.accelerate(model)
        assert_edges_reproduce_compute(patch, model, mace_models.periodic_structure(2), mace_models.R_MAX)
    finally:
        torch.set_default_dtype(previous)
