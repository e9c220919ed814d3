"""fastmlip.neighbors must reproduce ASE's edge set exactly, on every search path and precision."""

import functools

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from fastmlip.neighbors import VerletList, neighbor_list

METHODS = ("auto", "all_pairs", "cell_list")
DTYPES = (torch.float64, torch.float32)
# Reference systems keep every pair distance this far from the cutoff, so that
# float32 rounding cannot legitimately flip an edge.
MARGIN = 1e-3


def _rattled(atoms, stdev, seed):
    atoms.rattle(stdev, seed=seed)
    return atoms


def _triclinic(pbc):
    """Random atoms, some outside the cell, in a strongly skewed cell."""
    cell = np.array([[5.0, 0.0, 0.0], [3.8, 4.2, 0.0], [-2.9, 1.7, 4.4]])
    fractional = np.random.default_rng(6).uniform(-0.5, 1.5, (30, 3))
    return Atoms("H30", positions=fractional @ cell, cell=cell, pbc=pbc)


def _silicon():
    return _rattled(bulk("Si", "diamond", a=5.43, cubic=True).repeat(2), 0.05, 1)


def _unwrapped_silicon():
    """Rattled Si with every atom moved by a random lattice translation of up to 3 cells."""
    atoms = _silicon()
    shifts = np.random.default_rng(3).integers(-3, 4, (len(atoms), 3))
    atoms.positions += shifts @ atoms.cell[:]
    return atoms


# name -> (builder, cutoff)
SYSTEMS = {
    "si_diamond_rattled": (_silicon, 5.0),
    "si_unwrapped": (_unwrapped_silicon, 5.0),
    "cu_fcc_500": (lambda: _rattled(bulk("Cu", "fcc", a=3.61, cubic=True).repeat(5), 0.02, 2), 5.0),
    "triclinic": (lambda: _triclinic((True, True, True)), 4.5),
    "triclinic_slab": (lambda: _triclinic((True, True, False)), 4.5),
    "triclinic_wire": (lambda: _triclinic((False, False, True)), 4.5),
    "cell_smaller_than_cutoff": (lambda: bulk("Cu", "fcc", a=3.61), 6.0),
    "fcc111_slab": (lambda: _rattled(fcc111("Cu", size=(3, 3, 4), vacuum=8.0), 0.03, 4), 5.0),
    "benzene_no_cell": (lambda: molecule("C6H6"), 3.0),
}


@functools.lru_cache(maxsize=None)
def ase_reference(name, self_interaction=False):
    """ASE's (i, j, S, D) sorted by (i, j, S), after checking the system keeps MARGIN."""
    build, cutoff = SYSTEMS[name]
    atoms = build()
    near = ase_neighbor_list("d", atoms, cutoff + MARGIN)
    assert not ((near > cutoff - MARGIN) & (near < cutoff + MARGIN)).any(), "pair near cutoff"
    i, j, shift, vector = ase_neighbor_list(
        "ijSD", atoms, cutoff, self_interaction=self_interaction)
    order = np.lexsort((shift[:, 2], shift[:, 1], shift[:, 0], j, i))
    return atoms, cutoff, i[order], j[order], shift[order], vector[order]


def run(atoms, cutoff, dtype, **options):
    positions = torch.tensor(atoms.positions, dtype=dtype)
    cell = torch.tensor(atoms.cell[:], dtype=dtype) if atoms.pbc.any() else None
    i, j, shift = neighbor_list(positions, cell, tuple(atoms.pbc), cutoff, **options)
    return positions, i, j, shift


def edge_tuples(i, j, shift):
    return list(zip(np.asarray(i).tolist(), np.asarray(j).tolist(), *np.asarray(shift).T.tolist()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", SYSTEMS)
def test_matches_ase(name, method, dtype):
    atoms, cutoff, ase_i, ase_j, ase_shift, ase_vector = ase_reference(name)
    positions, i, j, shift = run(atoms, cutoff, dtype, method=method)

    assert i.dtype == j.dtype == shift.dtype == torch.int64
    ours = edge_tuples(i, j, shift)
    assert ours == sorted(ours), "edges must come sorted by (i, j, S)"
    assert ours == edge_tuples(ase_i, ase_j, ase_shift)

    cell = torch.tensor(atoms.cell[:], dtype=dtype)
    vector = positions[j] - positions[i] + shift.to(dtype) @ cell
    tolerance = 1e-9 if dtype == torch.float64 else 2e-4
    np.testing.assert_allclose(vector.double().numpy(), ase_vector, atol=tolerance)


@pytest.mark.parametrize(
    "name", ["cu_fcc_500", "triclinic", "cell_smaller_than_cutoff", "benzene_no_cell"])
def test_search_paths_agree_exactly(name):
    atoms, cutoff, *_ = ase_reference(name)
    results = [run(atoms, cutoff, torch.float64, method=method)[1:] for method in METHODS]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_self_interaction_matches_ase():
    atoms, cutoff, ase_i, ase_j, ase_shift, _ = ase_reference("cell_smaller_than_cutoff", True)
    for method in METHODS:
        _, i, j, shift = run(atoms, cutoff, torch.float64, method=method, self_interaction=True)
        assert edge_tuples(i, j, shift) == edge_tuples(ase_i, ase_j, ase_shift)
    assert (0, 0, 0, 0, 0) in edge_tuples(i, j, shift)


def test_molecule_accepts_zero_cell():
    atoms, cutoff, ase_i, ase_j, ase_shift, _ = ase_reference("benzene_no_cell")
    positions = torch.tensor(atoms.positions)
    i, j, shift = neighbor_list(positions, torch.zeros(3, 3), (False, False, False), cutoff)
    assert edge_tuples(i, j, shift) == edge_tuples(ase_i, ase_j, ase_shift)
    assert not shift.any()


@pytest.mark.parametrize("method", METHODS)
def test_isolated_atom_and_empty_input_have_no_edges(method):
    for positions in (torch.tensor([[1.0, 2.0, 3.0]]), torch.zeros(0, 3)):
        i, j, shift = neighbor_list(positions, None, False, 5.0, method=method)
        assert i.shape == j.shape == (0,) and shift.shape == (0, 3)


def _perturbed(positions, max_step, seed):
    """Positions moved by random steps of length at most max_step."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(positions.shape, generator=generator, dtype=positions.dtype)
    length = max_step * torch.rand(len(positions), 1, generator=generator, dtype=positions.dtype)
    return positions + direction / direction.norm(dim=1, keepdim=True) * length


@pytest.mark.parametrize("dtype", DTYPES)
def test_verlet_list_reuses_cache_for_small_moves(dtype):
    atoms = _rattled(bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3), 0.05, 5)
    positions = torch.tensor(atoms.positions, dtype=dtype)
    cell, pbc = torch.tensor(atoms.cell[:], dtype=dtype), (True, True, True)
    verlet = VerletList(cutoff=4.0, skin=0.6)
    verlet.update(positions, cell, pbc)
    edge_counts = set()
    for step in range(5):
        moved = _perturbed(positions, 0.29, step)  # < skin / 2 from the first build
        cached = verlet.update(moved, cell, pbc)
        fresh = neighbor_list(moved, cell, pbc, 4.0)
        assert all(torch.equal(a, b) for a, b in zip(cached, fresh))
        edge_counts.add(len(fresh[0]))
    assert verlet.rebuilds == 1
    assert len(edge_counts) > 1, "moves should change the edge set, or the test proves little"
    i, j, shifts, rebuilt = verlet.candidates(moved, cell, pbc)  # kept compact, returned int64 by update
    assert (i.dtype, j.dtype, shifts.dtype, rebuilt) == (torch.int32, torch.int32, torch.int16, False)
    assert all(a.dtype == torch.int64 for a in cached)


def test_verlet_list_rebuilds_when_needed():
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3)
    positions = torch.tensor(atoms.positions)
    cell, pbc = torch.tensor(atoms.cell[:]), (True, True, True)
    verlet = VerletList(cutoff=4.0, skin=0.6)
    verlet.update(positions, cell, pbc)
    moved = positions.clone()
    moved[0, 0] += 0.31  # just beyond skin / 2
    result = verlet.update(moved, cell, pbc)
    assert verlet.rebuilds == 2
    assert all(torch.equal(a, b) for a, b in zip(result, neighbor_list(moved, cell, pbc, 4.0)))

    strained = verlet.update(moved * 1.01, cell * 1.01, pbc)  # a barostat's small step keeps the list ...
    assert verlet.rebuilds == 2
    assert all(torch.equal(a, b) for a, b in zip(strained, neighbor_list(moved * 1.01, cell * 1.01, pbc, 4.0)))
    verlet.update(moved, cell * 1.05, pbc)  # ... a large one does not
    assert verlet.rebuilds == 3
    verlet.update(moved, cell * 1.05, (True, True, False))
    assert verlet.rebuilds == 4
    verlet.update(moved[:-1], cell * 1.05, (True, True, False))
    assert verlet.rebuilds == 5
    verlet.update(moved[:-1], cell * 1.05, (True, True, False))
    assert verlet.rebuilds == 5


def test_verlet_list_restored_at_its_reference_holds_the_same_candidates():
    """A restart rebuilds the list where the interrupted run last built it: the same candidates (which a CUDA graph
    step pads and masks) as the run that was not interrupted, not those of a build at the resumed positions."""
    atoms = _rattled(bulk("Cu", "fcc", a=3.61, cubic=True).repeat(3), 0.05, 5)
    positions = torch.tensor(atoms.positions)
    cell, pbc = torch.tensor(atoms.cell[:]), (True, True, True)
    running = VerletList(cutoff=4.0, skin=0.6)
    running.candidates(positions, cell, pbc)
    moved = _perturbed(positions, 0.29, 0)  # within skin / 2: the running list is kept
    kept = running.candidates(moved, cell, pbc)
    assert not kept[3] and running.rebuilds == 1
    resumed = VerletList(cutoff=4.0, skin=0.6)
    resumed.restore(*running.reference(), pbc)
    restored = resumed.candidates(moved, cell, pbc)
    assert not restored[3] and all(torch.equal(a, b) for a, b in zip(kept[:3], restored[:3]))
    assert not torch.equal(neighbor_list(moved, cell, pbc, 4.6)[0], restored[0].long())  # a fresh build differs
    resumed.restore(*running.reference(), pbc)  # already there: kept
    assert resumed.rebuilds == 1


def test_verlet_list_kept_under_strain_equals_a_fresh_build():
    """Random small strains (shear included) and displacements of a triclinic cell: whenever the list is kept,
    its filtered edges are exactly a fresh build's."""
    generator = torch.Generator().manual_seed(7)
    atoms = bulk("Cu", "fcc", a=3.61).repeat((3, 3, 3))
    positions, cell, pbc = torch.tensor(atoms.positions), torch.tensor(atoms.cell[:]), (True, True, True)
    kept = 0
    for _ in range(40):
        verlet = VerletList(cutoff=4.0, skin=0.8)
        verlet.update(positions, cell, pbc)
        strain = torch.eye(3, dtype=torch.float64) + 0.02 * torch.randn(3, 3, generator=generator,
                                                                         dtype=torch.float64)
        new_positions = positions @ strain + 0.1 * torch.randn(positions.shape, generator=generator,
                                                                dtype=torch.float64)
        result = verlet.update(new_positions, cell @ strain, pbc)
        if verlet.rebuilds == 1:
            kept += 1
            fresh = neighbor_list(new_positions, cell @ strain, pbc, 4.0)
            assert all(torch.equal(a, b) for a, b in zip(result, fresh))
    assert 5 <= kept < 40


def test_rejects_bad_inputs():
    positions = torch.rand(10, 3) * 5
    cell = torch.eye(3) * 5
    broken = positions.clone()
    broken[3, 1] = float("nan")
    broken[7, 0] = float("inf")
    with pytest.raises(ValueError, match=r"positions contain NaN or inf at atom indices \[3, 7\]"):
        neighbor_list(broken, cell, True, 3.0)
    with pytest.raises(ValueError, match=r"positions contain NaN or inf at atom indices \[3, 7\]"):
        VerletList(3.0, 0.5).update(broken, cell, True)

    flat = cell.clone()
    flat[2] = 0
    with pytest.raises(ValueError, match="pbc is True along axis 2 .* zero or degenerate"):
        neighbor_list(positions, flat, True, 3.0)
    neighbor_list(positions, flat, (True, True, False), 3.0)  # fine when that axis is open
    parallel = cell.clone()
    parallel[1] = parallel[0] * 2
    with pytest.raises(ValueError, match="degenerate"):
        neighbor_list(positions, parallel, (True, True, False), 3.0)
    with pytest.raises(ValueError, match="no cell"):
        neighbor_list(positions, None, (True, False, False), 3.0)

    for cutoff in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="cutoff must be a positive"):
            neighbor_list(positions, cell, True, cutoff)
    for shape in ((10, 2), (30,), (2, 5, 3)):
        with pytest.raises(ValueError, match="positions must have shape"):
            neighbor_list(torch.zeros(shape), cell, True, 3.0)
    with pytest.raises(ValueError, match="method"):
        neighbor_list(positions, cell, True, 3.0, method="octree")
