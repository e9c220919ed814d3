"""``fastmlip.evaluate``: many structures of different sizes and species, a batch of them per model call.

One structure per calculator call leaves a GPU idle on small structures (screening, batched relaxations). Here
structures are packed into batches of disjoint graphs up to ``batch_atoms`` atoms: one neighbour search for the
whole batch (every pair of atoms of the same structure times that structure's periodic images, on the model's
device, in blocks of candidates), one model call through the framework's ``compute_edges`` (per-atom energies and
dE/d(edge vectors)), and per-structure energies, forces and stress summed from those by each atom's and edge's
structure. Only per-structure metadata (3x3 cells, image ranges) is prepared on the host.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .calculator import Calculator, StructureError
from .neighbors import binning_basis

PROPERTIES = ("energy", "forces", "stress")
CANDIDATES_PER_BLOCK = 1 << 22  # pair-image candidates whose distances are tested at once (memory bound)
OWN_BATCH_ATOMS = 512  # a structure this large gets a batch of its own and the O(N) cell-list search


def evaluate(structures, model="7net-0", *, device="auto", dtype="float32", properties=PROPERTIES,
             batch_atoms: int = 4096, **calculator_options) -> list:
    """Energy, per-atom energies, forces and (3-D periodic cells) stress of each ``ase.Atoms`` in ``structures``.

    ``model`` is anything :class:`Calculator` takes (a name, a file, a model, an accelerated model or a
    Calculator); ``batch_atoms`` bounds the atoms of one model call. Returns one dict per structure, in order, in
    ASE's units and conventions: ``energy`` (eV), ``energies`` [N], ``forces`` [N, 3] (eV/A) and ``stress``
    (Voigt, eV/A^3), as requested by ``properties``.
    """
    unknown = sorted(set(properties) - set(PROPERTIES))
    if unknown:
        raise ValueError(f"unknown properties {unknown}; choose from {PROPERTIES}")
    if batch_atoms < 1:
        raise ValueError(f"batch_atoms must be >= 1, got {batch_atoms}")
    structures = list(structures)
    calculator = model if isinstance(model, Calculator) else Calculator(
        model, device=device, dtype=dtype, cuda_graph=False, **calculator_options)
    for index, atoms in enumerate(structures):
        _check_structure(calculator, index, atoms)
    results = [None] * len(structures)
    for batch in _batches([len(atoms) for atoms in structures], batch_atoms):
        for index, result in zip(batch, _evaluate_batch(calculator, [structures[k] for k in batch], properties)):
            results[index] = result
    return results


def _check_structure(calculator, index: int, atoms) -> None:
    try:
        calculator.check(atoms)
    except StructureError as exc:
        raise StructureError(f"structure {index}: {exc}") from None


def _batches(sizes: list, batch_atoms: int) -> list:
    """Consecutive structures up to ``batch_atoms`` atoms per batch; a large one alone."""
    batches, current, atoms_in = [], [], 0
    for index, size in enumerate(sizes):
        alone = size > OWN_BATCH_ATOMS
        if current and (alone or atoms_in + size > batch_atoms):
            batches.append(current)
            current, atoms_in = [], 0
        current.append(index)
        atoms_in += size
        if alone:
            batches.append(current)
            current, atoms_in = [], 0
    if current:
        batches.append(current)
    return batches


def _evaluate_batch(calculator, structures, properties) -> list:
    device = calculator.device
    as64 = lambda array: torch.as_tensor(np.asarray(array), dtype=torch.float64, device=device)  # noqa: E731
    out = evaluate_tensors(calculator, as64(np.concatenate([atoms.positions for atoms in structures])),
                           torch.as_tensor(np.concatenate([atoms.numbers for atoms in structures]), device=device),
                           torch.tensor([len(atoms) for atoms in structures], device=device),
                           as64(np.stack([atoms.cell.array for atoms in structures])),
                           [tuple(bool(p) for p in atoms.pbc) for atoms in structures], properties)
    return _split({key: value.cpu().numpy() for key, value in out.items()}, structures, properties)


def evaluate_tensors(calculator, positions, numbers, sizes, cells, pbcs, properties=PROPERTIES) -> dict:
    """One model call for a batch given as device tensors: float64 ``positions`` [N, 3] of the structures'
    atoms one structure after another, ``numbers`` [N], ``sizes`` [B], ``cells`` [B, 3, 3] (rows are lattice
    vectors), ``pbcs`` (3 bools per structure). Returns float64 device tensors: ``energy`` [B], ``energies``
    [N], and as requested ``forces`` [N, 3] and ``stress`` [B, 3, 3] (ASE's sign; meaningless for structures
    without a 3-D cell)."""
    device, count = positions.device, sizes.numel()
    owner = torch.repeat_interleave(torch.arange(count, device=device), sizes)
    edge_i, edge_j, vectors = batch_edges(positions, owner, sizes, cells, pbcs, calculator.cutoff)
    out = calculator.framework.compute_edges(calculator.model, numbers, edge_i, edge_j, vectors,
                                             modal=calculator.modal)
    gradient = out["edge_gradient"].to(torch.float64)
    energies = out["energies"].to(torch.float64)
    result = {"energy": torch.zeros(count, dtype=torch.float64, device=device).index_add_(0, owner, energies),
              "energies": energies}
    if "forces" in properties:
        result["forces"] = torch.zeros_like(positions).index_add_(0, edge_i, gradient).index_add_(
            0, edge_j, gradient, alpha=-1)
    if "stress" in properties:
        virial = torch.zeros(count, 3, 3, dtype=torch.float64, device=device).index_add_(
            0, owner[edge_i], vectors.unsqueeze(-1) * gradient.unsqueeze(-2))
        volume = torch.linalg.det(cells).abs().clamp_min(1e-300).reshape(-1, 1, 1)
        result["stress"] = 0.5 * (virial + virial.transpose(1, 2)) / volume
    return result


def _split(host: dict, structures, properties) -> list:
    results, start = [], 0
    for k, atoms in enumerate(structures):
        stop = start + len(atoms)
        result = {"energy": float(host["energy"][k]), "energies": host["energies"][start:stop]}
        if "forces" in properties:
            result["forces"] = host["forces"][start:stop]
        if "stress" in properties and all(atoms.pbc) and atoms.cell.volume > 0:
            s = host["stress"][k]
            result["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        results.append(result)
        start = stop
    return results


@torch.no_grad()
def batch_edges(positions, owner, sizes, cells, pbcs, cutoff: float) -> tuple:
    """``(i, j, vectors)`` of every pair closer than ``cutoff`` (images included, no self pairs) of a batch of
    structures whose atoms are concatenated; ``vectors = positions[j] - positions[i] + S @ cell`` in float64."""
    device, count = positions.device, sizes.numel()
    if count == 1 and int(sizes[0]) > OWN_BATCH_ATOMS:  # one large structure: the O(N) cell list
        from .neighbors import neighbor_list

        i, j, shifts = neighbor_list(positions, cells[0], pbcs[0], cutoff)
        return i, j, positions[j] - positions[i] + shifts.to(torch.float64) @ cells[0]
    bases, ranges = [], []
    for cell, pbc in zip(cells.cpu(), pbcs):  # 3x3 metadata per structure, on the host
        basis, heights = binning_basis(cell, pbc)
        bases.append(basis)
        ranges.append([math.ceil(cutoff / h) if p else 0 for h, p in zip(heights, pbc)])
    bases = torch.stack(bases).to(device)
    ranges = torch.tensor(ranges, device=device)
    periodic = torch.tensor(pbcs, device=device)
    # Wrap each atom into its cell along periodic axes; the images then needed are |S_c| <= ceil(cutoff / h_c).
    fractional = torch.linalg.solve(bases[owner].transpose(1, 2), positions.unsqueeze(-1)).squeeze(-1)
    wrap = torch.where(periodic[owner], torch.floor(fractional), torch.zeros_like(fractional))
    wrapped = positions - (wrap.unsqueeze(1) @ bases[owner]).squeeze(1)
    # Every (i, j) of the same structure: atom i pairs with the sizes[owner[i]] atoms of its structure.
    starts = torch.cumsum(sizes, 0) - sizes
    per_atom = sizes[owner]
    pair_i = torch.repeat_interleave(torch.arange(positions.shape[0], device=device), per_atom)
    first_pair = torch.cumsum(per_atom, 0) - per_atom
    pair_j = starts[owner[pair_i]] + torch.arange(pair_i.numel(), device=device) - first_pair[pair_i]
    # ... times each of its structure's images, in blocks of candidates.
    widths = 2 * ranges + 1
    images = widths.prod(1)
    found = []
    per_pair = images[owner[pair_i]]
    block_starts = torch.cumsum(per_pair, 0) - per_pair
    pair_block = 0
    while pair_block < pair_i.numel():
        upto = int(torch.searchsorted(block_starts, int(block_starts[pair_block]) + CANDIDATES_PER_BLOCK))
        upto = max(upto, pair_block + 1)
        found.append(_test_candidates(pair_i[pair_block:upto], pair_j[pair_block:upto], owner, wrapped, wrap,
                                      cells, widths, ranges, images, cutoff))
        pair_block = upto
    i = torch.cat([f[0] for f in found])
    j = torch.cat([f[1] for f in found])
    shifts = torch.cat([f[2] for f in found])
    return i, j, positions[j] - positions[i] + (shifts.to(torch.float64).unsqueeze(1) @ cells[owner[i]]).squeeze(1)


def _test_candidates(pair_i, pair_j, owner, wrapped, wrap, cells, widths, ranges, images, cutoff) -> tuple:
    """The pairs' images within ``cutoff``: (i, j, S) with S relative to the unwrapped positions."""
    structure = owner[pair_i]
    count = images[structure]
    i = torch.repeat_interleave(pair_i, count)
    j = torch.repeat_interleave(pair_j, count)
    s = structure.repeat_interleave(count)
    local = torch.arange(i.numel(), device=i.device) - torch.repeat_interleave(torch.cumsum(count, 0) - count, count)
    w = widths[s]
    shift = torch.stack([local // (w[:, 1] * w[:, 2]), (local // w[:, 2]) % w[:, 1], local % w[:, 2]], 1) - ranges[s]
    delta = wrapped[j] - wrapped[i] + (shift.to(torch.float64).unsqueeze(1) @ cells[s]).squeeze(1)
    keep = (delta.norm(dim=1) < cutoff) & ~((i == j) & (shift == 0).all(1))
    shift = shift + wrap[i].long() - wrap[j].long()
    return i[keep], j[keep], shift[keep]
