"""The exact pair list rebuilt inside a captured CUDA graph, at every step: fixed shapes, no host reads.

A Verlet list is built on the host side (sizes, sorts), so a graph of many steps cannot rebuild it and must be
undone when an atom moves too far. For small systems in cells wider than twice the cutoff, the list can come from
all N^2 pairs under the minimum image convention instead: every pair ``(i, j)`` has at most one image within the
cutoff (a fractional coordinate difference below ``cutoff / height < 1/2`` along each periodic axis), and it is the
rounded one. The pairs within the cutoff are packed in order (i, then j: the order of
:func:`fastmlip.neighbors.neighbor_list`) into a buffer of fixed capacity; the slots past them repeat real pairs
(padding the model masks out, as :mod:`fastmlip.cuda_graph` does) and the count says when the capacity was too
small, so the caller can redo those steps with more room.
"""
from __future__ import annotations

import torch

from .neighbors import binning_basis

# All pairs are N^2 entries of a few float64 temporaries each: 4096 atoms take ~1.5 GB in a graph's memory pool.
MAX_ATOMS = 4096


def applies(cell, pbc, cutoff: float, num_atoms: int) -> bool:
    """Whether :func:`exact_pairs` is exact and affordable here: at most ``MAX_ATOMS`` atoms and a cutoff below
    half of every periodic height (then no pair has two images within reach, and no atom sees itself)."""
    if num_atoms > MAX_ATOMS or num_atoms < 2:
        return False
    cell = torch.as_tensor(cell, dtype=torch.float64).reshape(3, 3).cpu()
    _, heights = binning_basis(cell, pbc)
    return all(cutoff * (1 + 1e-6) < heights[c] / 2 for c in range(3) if pbc[c])


def pair_grid(num_atoms: int, device) -> tuple:
    """(i, j) of every ordered pair, row-major: the static operands of :func:`exact_pairs`."""
    index = torch.arange(num_atoms, device=device)
    return index.repeat_interleave(num_atoms), index.repeat(num_atoms)


@torch.no_grad()
def exact_pairs(positions, cell, basis, cutoff: float, capacity: int, grid):
    """``(i, j, S, count)``: the pairs with ``|positions[j] - positions[i] + S @ cell| < cutoff``, i != j, packed
    into ``capacity`` slots (i, then j), the rest repeating them in turn; ``count`` is a device scalar of how many
    there are (more than ``capacity``: some were dropped; 0: the slots hold no real pair).

    ``basis`` is :func:`fastmlip.neighbors.wrap_basis` of the cell (fractional coordinates, zero along
    non-periodic axes); ``grid`` is :func:`pair_grid`. Valid where :func:`applies` says so.
    """
    pair_i, pair_j = grid
    n = positions.shape[0]
    fractional = positions @ basis
    shift = -torch.round(fractional[pair_j] - fractional[pair_i])  # the minimum image, 0 on non-periodic axes
    translation = shift[:, :1] * cell[0] + shift[:, 1:2] * cell[1] + shift[:, 2:] * cell[2]
    vector = positions[pair_j] - positions[pair_i] + translation
    keep = ((vector * vector).sum(1).sqrt() < cutoff) & (pair_i != pair_j)  # the test of neighbors.within_cutoff
    rank = torch.cumsum(keep, 0) - 1
    count = rank[-1] + 1 if n else torch.zeros((), dtype=torch.long, device=positions.device)
    # Each kept pair goes to its rank; dropped pairs and those past the capacity to one spare slot.
    slot = torch.where(keep & (rank < capacity), rank, capacity)
    packed = torch.zeros(capacity + 1, dtype=torch.long, device=positions.device)
    packed = packed.scatter(0, slot, torch.arange(n * n, device=positions.device))
    filled = count.clamp(min=1, max=capacity)
    slots = torch.arange(capacity, device=positions.device)
    chosen = packed[torch.where(slots < filled, slots, slots % filled)]
    return pair_i[chosen], pair_j[chosen], shift[chosen].long(), count
