"""fastmlip.evaluate: batches of disjoint graphs give each structure what fastmlip.Calculator gives it alone
(float64), whatever the batch boundaries; the batched neighbour search finds exactly the pairs of the per-structure
one; bad structures are named by their index."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule

import fastmlip
from fastmlip.batch import batch_edges
from fastmlip.calculator import Calculator, StructureError
from fastmlip.neighbors import neighbor_list


def mixed_structures():
    """Different sizes, species and periodicity: a 2-atom cell smaller than the cutoff, a triclinic SiO2-like
    crystal, a molecule, a slab periodic in two directions, a cubic supercell."""
    water = molecule("H2O")
    water.center(vacuum=2.0)
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=4.0)
    quartz_like = bulk("SiO", "zincblende", a=4.6)
    quartz_like.set_cell(quartz_like.cell.array + [[0, 0.2, 0], [0.1, 0, 0], [0, 0, 0.3]], scale_atoms=True)
    structures = [bulk("Si", "diamond", a=5.43), quartz_like, water, slab,
                  bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))]
    for k, atoms in enumerate(structures):
        atoms.rattle(0.05, seed=k)
    return structures


@pytest.fixture(scope="module")
def sevenn64():
    pytest.importorskip("sevenn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Calculator("7net-0", device="cpu", dtype="float64")


def assert_each_as_alone(calculator, structures, results):
    for atoms, result in zip(structures, results):
        alone = atoms.copy()
        alone.calc = calculator
        assert abs(alone.get_potential_energy() - result["energy"]) <= 1e-9 * len(atoms)
        np.testing.assert_allclose(result["energies"], alone.get_potential_energies(), rtol=0, atol=1e-9)
        np.testing.assert_allclose(result["forces"], alone.get_forces(), rtol=0, atol=1e-8)
        if all(atoms.pbc):
            np.testing.assert_allclose(result["stress"], alone.get_stress(), rtol=0, atol=1e-9)
        else:
            assert "stress" not in result
    assert max(float(np.abs(r["forces"]).max()) for r in results) > 0.1  # real forces, not rounding noise


def test_sevennet_batch_equals_one_structure_at_a_time(sevenn64):
    structures = mixed_structures()
    results = fastmlip.evaluate(structures, sevenn64)
    assert_each_as_alone(sevenn64, structures, results)
    one_by_one = fastmlip.evaluate(structures, sevenn64, batch_atoms=1, properties=("energy", "forces"))
    for together, alone in zip(results, one_by_one):
        assert abs(together["energy"] - alone["energy"]) < 1e-10 and "stress" not in alone
        np.testing.assert_allclose(together["forces"], alone["forces"], rtol=0, atol=1e-12)


def test_mace_batch_equals_one_structure_at_a_time():
    pytest.importorskip("mace.modules")
    from ase.build import bulk as build

    from helpers import mace_models

    model = mace_models.build_model("mp0_medium", channels=16)
    calculator = Calculator(model, device="cpu", dtype="float64")
    carbon_monoxide = molecule("CO")
    carbon_monoxide.center(vacuum=2.0)
    structures = [mace_models.periodic_structure(3), carbon_monoxide, build("C", "diamond", a=3.57)]
    structures[2].rattle(0.05, seed=1)
    assert_each_as_alone(calculator, structures, fastmlip.evaluate(structures, calculator))


def test_batched_neighbour_search_equals_per_structure_lists():
    structures = mixed_structures()
    positions = torch.tensor(np.concatenate([a.positions for a in structures]))
    sizes = torch.tensor([len(a) for a in structures])
    owner = torch.repeat_interleave(torch.arange(len(structures)), sizes)
    cells = torch.tensor(np.stack([a.cell.array for a in structures]))
    pbcs = [tuple(bool(p) for p in a.pbc) for a in structures]
    i, j, vectors = batch_edges(positions, owner, sizes, cells, pbcs, cutoff=5.0)
    offset = 0
    for k, atoms in enumerate(structures):
        ref_i, ref_j, ref_s = neighbor_list(torch.tensor(atoms.positions), torch.tensor(atoms.cell.array),
                                            atoms.pbc, 5.0)
        ref_vectors = (torch.tensor(atoms.positions)[ref_j] - torch.tensor(atoms.positions)[ref_i]
                       + ref_s.double() @ torch.tensor(atoms.cell.array))
        mine = owner[i] == k
        expected = sorted(zip((ref_i + offset).tolist(), (ref_j + offset).tolist(),
                              np.round(ref_vectors.numpy(), 9).tolist()))
        got = sorted(zip(i[mine].tolist(), j[mine].tolist(), np.round(vectors[mine].numpy(), 9).tolist()))
        assert got == expected and len(got) > 0
        offset += len(atoms)


def test_bad_structures_are_named_by_index(sevenn64):
    structures = mixed_structures()
    with pytest.raises(StructureError, match="structure 2: .*element"):
        fastmlip.evaluate(structures[:2] + [Atoms("Og", positions=[[0, 0, 0]])], sevenn64)
    broken = structures[1].copy()
    broken.positions[0, 0] = np.nan
    with pytest.raises(StructureError, match="structure 1: positions contain NaN"):
        fastmlip.evaluate([structures[0], broken], sevenn64)
    with pytest.raises(ValueError, match="unknown properties"):
        fastmlip.evaluate(structures, sevenn64, properties=("energy", "dipole"))
