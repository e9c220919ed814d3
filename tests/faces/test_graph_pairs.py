"""The pair list rebuilt inside captured graphs (fastmlip.graph_pairs) against the host-side neighbour list."""
import os

import numpy as np
import pytest
import torch
from ase.build import bulk, molecule

from fastmlip import graph_pairs
from fastmlip.neighbors import neighbor_list, wrap_basis

CASES = {  # atoms, pbc, cutoff: periodic, mixed, triclinic, molecule
    "si64": (bulk("Si", "diamond", a=5.43, cubic=True).repeat(2), (True, True, True), 5.0),
    "si64-slab": (bulk("Si", "diamond", a=5.43, cubic=True).repeat(2), (True, False, True), 5.0),
    "cu-triclinic": (bulk("Cu", "fcc", a=3.61).repeat((4, 5, 6)), (True, True, True), 4.0),
    "molecule": (molecule("C6H6"), (False, False, False), 2.5),
}


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """The torch reference, and the Triton kernels (interpreted on a CPU: the kernel code itself)."""
    if request.param == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("FASTMLIP_BACKEND", request.param)
    return request.param


def _pairs(name, capacity_change=0):
    atoms, pbc, cutoff = CASES[name]
    atoms = atoms.copy()
    atoms.rattle(0.3, seed=2)
    atoms.positions += 7.3  # unwrapped: the shifts must refer to the positions as given
    positions, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    expected = neighbor_list(positions, cell, pbc, cutoff)
    capacity = expected[0].numel() + capacity_change
    builder = graph_pairs.ExactPairs(len(atoms), positions.device)
    assert builder.kernels == (os.environ["FASTMLIP_BACKEND"] == "triton")
    got = builder(positions, cell, wrap_basis(cell, pbc), cutoff, capacity)
    return atoms, pbc, cutoff, expected, got


@pytest.mark.parametrize("name", sorted(CASES))
def test_exact_pairs_equal_the_neighbour_list_in_its_order(name, backend):
    atoms, pbc, cutoff, (i, j, shifts), (gi, gj, gshifts, count) = _pairs(name, capacity_change=9)
    assert graph_pairs.applies(atoms.cell.array, pbc, cutoff, len(atoms))
    n = int(count)
    assert n == i.numel() > 0
    assert torch.equal(gi[:n], i) and torch.equal(gj[:n], j) and torch.equal(gshifts[:n], shifts)
    # the 9 slots past them repeat real pairs in turn (padding a model masks out: never a self pair at distance 0)
    assert torch.equal(gi[n:], i[:9]) and torch.equal(gj[n:], j[:9]) and torch.equal(gshifts[n:], shifts[:9])


def test_a_capacity_too_small_keeps_the_first_pairs_and_says_how_many_there_are(backend):
    _, _, _, (i, j, _), (gi, gj, _, count) = _pairs("si64", capacity_change=-25)
    assert int(count) == i.numel()
    assert torch.equal(gi, i[:-25]) and torch.equal(gj, j[:-25])


CELL_LIST_CASES = {  # atoms, pbc, cutoff, bins per axis: a slab (one bin across), triclinic (the interpreter is slow)
    "si64-slab": (bulk("Si", "diamond", a=5.43, cubic=True).repeat(2), (True, False, True), 3.0, (3, 1, 3)),
    "cu-triclinic": (bulk("Cu", "fcc", a=3.61).repeat(4), (True, True, True), 2.7, (3, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(CELL_LIST_CASES))
def test_cell_list_kernels_list_the_same_pairs(name, monkeypatch):
    """The cell-list walk (used above MAX_ATOMS atoms; here asked for) finds exactly the neighbour list's pairs
    and shifts, atom by atom (each atom's in bin order)."""
    pytest.importorskip("triton")
    monkeypatch.setenv("FASTMLIP_BACKEND", "triton")
    atoms, pbc, cutoff, shape = CELL_LIST_CASES[name]
    atoms = atoms.copy()
    atoms.rattle(0.3, seed=4)
    atoms.positions += 7.3  # unwrapped: the shifts must refer to the positions as given
    positions, cell = torch.tensor(atoms.positions), torch.tensor(atoms.cell.array)
    i, j, shifts = neighbor_list(positions, cell, pbc, cutoff)
    builder = graph_pairs.ExactPairs(len(atoms), positions.device, cell, pbc, cutoff, cell_list=True)
    assert builder.bins.shape == shape
    gi, gj, gshifts, count = builder(positions, cell, wrap_basis(cell, pbc), cutoff, i.numel())
    assert int(count) == i.numel()
    assert torch.equal(gi, i)  # atom by atom
    assert _pair_set(gi, gj, gshifts) == _pair_set(i, j, shifts)


def _pair_set(i, j, shifts) -> list:
    """The pairs (i, j, shift) in one order, whatever order they were listed in."""
    return sorted(map(tuple, torch.cat([i[:, None], j[:, None], shifts], 1).tolist()))


def test_applies_only_where_the_minimum_image_is_exact_and_affordable(monkeypatch):
    si8 = bulk("Si", "diamond", a=5.43, cubic=True)
    assert not graph_pairs.applies(si8.cell.array, (True,) * 3, 5.0, len(si8))  # 5.43 A cell, 5 A cutoff
    assert graph_pairs.applies(si8.cell.array, (True, True, False), 2.6, len(si8))
    assert not graph_pairs.applies(si8.cell.array, (True,) * 3, 2.72, len(si8))  # just above half the height
    assert graph_pairs.applies(np.zeros((3, 3)), (False,) * 3, 50.0, 12)
    many = graph_pairs.MAX_ATOMS + 1
    assert graph_pairs.applies(np.eye(3) * 1e3, (True,) * 3, 5.0, many)  # the kernels: a cell list, no limit
    assert not graph_pairs.applies(np.eye(3) * 1e3, (True,) * 3, 5.0, many, kernels=False)  # N^2 temporaries
    monkeypatch.setenv(graph_pairs.MAX_ATOMS_VARIABLE, str(10 * graph_pairs.MAX_ATOMS))
    assert graph_pairs.applies(np.eye(3) * 1e3, (True,) * 3, 5.0, many, kernels=False)
    monkeypatch.setenv(graph_pairs.MAX_ATOMS_VARIABLE, "100")
    assert not graph_pairs.applies(np.eye(3) * 1e3, (True,) * 3, 5.0, many)


def _copper_on_gpu(repeat: int, seed: int, cutoff: float):
    """Rattled fcc Cu on the GPU, its neighbour list, and its exact pairs as ``ExactPairs`` lists them (room for
    100 more): ``(builder, (i, j, shifts), (gi, gj, gshifts, count))``."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(repeat)
    atoms.rattle(0.1, seed=seed)
    positions, cell = torch.tensor(atoms.positions, device="cuda"), torch.tensor(atoms.cell.array, device="cuda")
    pbc = (True, True, True)
    expected = neighbor_list(positions, cell, pbc, cutoff)
    builder = graph_pairs.ExactPairs(len(atoms), "cuda", cell, pbc, cutoff)
    got = builder(positions, cell, wrap_basis(cell, pbc).cuda(), cutoff, expected[0].numel() + 100)
    return builder, expected, got


@pytest.mark.gpu
def test_cell_list_kernels_on_gpu_list_the_pairs_of_32000_copper_atoms():
    builder, (i, j, shifts), (gi, gj, gshifts, count) = _copper_on_gpu(20, seed=5, cutoff=5.0)
    assert builder.kernels and builder.bins is not None and builder.bins.shape == (14, 14, 14)
    n = int(count)
    assert n == i.numel() and torch.equal(gi[:n], i)
    assert _pair_set(gi[:n], gj[:n], gshifts[:n]) == _pair_set(i, j, shifts)


@pytest.mark.gpu
def test_kernels_on_gpu_list_the_pairs_of_4000_copper_atoms():
    builder, (i, j, shifts), (gi, gj, gshifts, count) = _copper_on_gpu(10, seed=3, cutoff=6.0)
    assert builder.kernels
    n = int(count)
    assert n == i.numel()
    assert torch.equal(gi[:n], i) and torch.equal(gj[:n], j) and torch.equal(gshifts[:n], shifts)
