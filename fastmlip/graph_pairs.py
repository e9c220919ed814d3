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

import math
import os
from typing import Optional

import torch

from .neighbors import binning_basis, wrap_basis

# The torch reference holds N^2 entries of a few float64 temporaries each (4096 atoms: ~1.5 GB in a graph's memory
# pool), so it rebuilds pairs in the graph for at most MAX_ATOMS atoms. The kernels hold none; above MAX_ATOMS they
# walk a cell list (CellBins) instead of all N atoms per atom, with no limit: at 32,000 Cu atoms (SevenNet-0, H200,
# 2026-12-03) MD steps with the cell list in the graph took 78.7 ms against 86.6 with Verlet candidates.
# FASTMLIP_GRAPH_PAIRS_MAX_ATOMS sets a limit for both.
MAX_ATOMS = 4096
MAX_ATOMS_VARIABLE = "FASTMLIP_GRAPH_PAIRS_MAX_ATOMS"


def max_atoms(kernels: bool = True) -> Optional[int]:
    """The most atoms whose pairs a captured step rebuilds itself (None: no limit): the variable's value if set,
    else none with the kernels and ``MAX_ATOMS`` with the torch reference."""
    value = os.environ.get(MAX_ATOMS_VARIABLE, "").strip()
    if not value:
        return None if kernels else MAX_ATOMS
    if not value.isdigit():
        raise ValueError(f"{MAX_ATOMS_VARIABLE}={value!r}: give a whole number of atoms")
    return int(value)


def applies(cell, pbc, cutoff: float, num_atoms: int, kernels: bool = True) -> bool:
    """Whether :class:`ExactPairs` is exact and affordable here (``kernels``: whether it runs the kernels): at most
    :func:`max_atoms` atoms and a cutoff below half of every periodic height (then no pair has two images within
    reach, and no atom sees itself)."""
    limit = max_atoms(kernels)
    if num_atoms < 2 or (limit is not None and num_atoms > limit):
        return False
    cell = torch.as_tensor(cell, dtype=torch.float64).reshape(3, 3).cpu()
    _, heights = binning_basis(cell, pbc)
    return all(cutoff * (1 + 1e-6) < heights[c] / 2 for c in range(3) if pbc[c])


def kernels_for(device) -> bool:
    """Whether :class:`ExactPairs` on ``device`` runs the Triton kernels (else the torch reference)."""
    from .ops.dispatch import backend_for

    return backend_for(torch.empty(0, device=device)) == "triton"


class CellBins:
    """The atoms sorted into bins at least ``reach`` wide, every step, with fixed shapes (no host reads).

    Along a periodic axis the cell is cut into as many bins as fit (one where fewer than three would: with three
    or more, the bins around a bin are distinct, so no pair is seen twice); along a non-periodic axis there is one
    bin. A pair within reach is then in the same or adjacent bins: its fractional gap along an axis is at most
    reach / height, one bin's width."""

    def __init__(self, cell, pbc, reach: float, device):
        _, heights = binning_basis(torch.as_tensor(cell, dtype=torch.float64).reshape(3, 3).cpu(), pbc)
        shape = [int(h // reach) if p else 1 for h, p in zip(heights, pbc)]
        self.shape = tuple(n if n >= 3 else 1 for n in shape)
        self.scale = torch.tensor(self.shape, dtype=torch.float64, device=device)
        self.last = torch.tensor(self.shape, device=device) - 1
        self.strides = torch.tensor([self.shape[1] * self.shape[2], self.shape[2], 1], device=device)
        self.bounds = torch.arange(math.prod(self.shape) + 1, device=device)

    def __call__(self, fractional):
        """``(bins [N, 3], order, starts, shape)``: each atom's bin, the atoms sorted by bin, where each bin
        begins among them; ``fractional`` as :func:`fastmlip.neighbors.wrap_basis` gives it (zero off the
        periodic axes)."""
        wrapped = fractional - torch.floor(fractional)
        bins = torch.minimum((wrapped * self.scale).long(), self.last)
        ordered, order = torch.sort((bins * self.strides).sum(1), stable=True)
        return bins.contiguous(), order, torch.searchsorted(ordered, self.bounds), self.shape


class ExactPairs:
    """The exact pair list of ``num_atoms`` atoms on ``device``, rebuilt per call with fixed shapes: Triton's two
    launches (:mod:`fastmlip.kernels.pair_list`) where the dispatch picks kernels, else the torch reference over
    the whole N^2 grid of pairs (kept here, it is the same every step). The kernels walk all N atoms per atom, or
    with ``cell_list`` (default: above ``MAX_ATOMS`` atoms) the :class:`CellBins` of ``cell``, ``pbc`` and
    ``cutoff`` around it."""

    def __init__(self, num_atoms: int, device, cell=None, pbc=None, cutoff=None, cell_list=None):
        self.kernels = kernels_for(device)
        index = torch.arange(num_atoms, device=device)
        self.grid = None if self.kernels else (index.repeat_interleave(num_atoms), index.repeat(num_atoms))
        if cell_list is None:
            cell_list = num_atoms > MAX_ATOMS
        self.bins = CellBins(cell, pbc, _reach(cutoff), device) if cell_list and self.kernels else None

    def __call__(self, positions, cell, basis, cutoff: float, capacity: int):
        """``(i, j, S, count)``: the pairs with ``|positions[j] - positions[i] + S @ cell| < cutoff``, i != j,
        packed into ``capacity`` slots (i, then j), the rest repeating them in turn; ``count`` is a device scalar
        of how many there are (more than ``capacity``: some were dropped; 0: the slots hold no real pair).

        ``positions`` and ``cell`` float64; ``basis`` is :func:`fastmlip.neighbors.wrap_basis` of the cell
        (fractional coordinates, zero along non-periodic axes). Valid where :func:`applies` says so. The kernels
        list pairs up to a hair beyond the cutoff (:mod:`fastmlip.kernels.pair_list`): callers mask with
        :func:`fastmlip.neighbors.within_cutoff`.
        """
        if self.kernels:
            from .kernels.pair_list import pairs_within, pairs_within_bins

            slots = [torch.empty(capacity, dtype=torch.long, device=positions.device) for _ in range(2)]
            shifts = torch.empty(capacity, 3, dtype=torch.long, device=positions.device)
            positions, fractional, cell = positions.contiguous(), (positions @ basis).contiguous(), cell.contiguous()
            if self.bins is None:
                count = pairs_within(positions, fractional, cell, _reach(cutoff), *slots, shifts)
            else:
                count = pairs_within_bins(positions, fractional, cell, self.bins(fractional), _reach(cutoff), *slots,
                                          shifts)
            return _padded(slots[0], slots[1], shifts, count, capacity)
        return self._reference(positions, cell, basis, cutoff, capacity)

    @torch.no_grad()
    def _reference(self, positions, cell, basis, cutoff, capacity):
        pair_i, pair_j = self.grid
        n = positions.shape[0]
        fractional = positions @ basis
        shift = -torch.round(fractional[pair_j] - fractional[pair_i])  # the minimum image, 0 on non-periodic axes
        translation = shift[:, :1] * cell[0] + shift[:, 1:2] * cell[1] + shift[:, 2:] * cell[2]
        vector = positions[pair_j] - positions[pair_i] + translation
        keep = ((vector * vector).sum(1).sqrt() < cutoff) & (pair_i != pair_j)  # neighbors.within_cutoff's test
        rank = torch.cumsum(keep, 0) - 1
        count = rank[-1] + 1
        # Each kept pair goes to its rank; dropped pairs and those past the capacity to one spare slot.
        slot = torch.where(keep & (rank < capacity), rank, capacity)
        packed = torch.zeros(capacity + 1, dtype=torch.long, device=positions.device)
        packed = packed.scatter(0, slot, torch.arange(n * n, device=positions.device))[:capacity]
        return _padded(pair_i[packed], pair_j[packed], shift[packed].long(), count, capacity)


def pair_count(positions, cell, pbc, cutoff: float) -> int:
    """How many exact pairs there are now (a host read): what a new step's capacity is sized from."""
    cell = torch.as_tensor(cell, dtype=torch.float64, device=positions.device)
    basis = wrap_basis(cell, pbc).to(positions.device)
    builder = ExactPairs(positions.shape[0], positions.device, cell, pbc, cutoff)
    return int(builder(positions, cell, basis, cutoff, 1)[3])


def _reach(cutoff: float) -> float:
    """How far the kernels look: a hair beyond the cutoff (see :mod:`fastmlip.kernels.pair_list`)."""
    return cutoff * (1 + 1e-12)


def _padded(edge_i, edge_j, shifts, count, capacity: int):
    """The slots past ``count`` repeat the pairs before them in turn (padding a model masks out)."""
    filled = count.clamp(min=1, max=capacity)
    slots = torch.arange(capacity, device=edge_i.device)
    source = torch.where(slots < filled, slots, slots % filled)
    return edge_i[source], edge_j[source], shifts[source], count
