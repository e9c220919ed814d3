"""Triton kernels for the exact pair list of :mod:`fastmlip.graph_pairs`: two launches, no host reads.

Why: the list in torch is ~15 passes over N^2-long temporaries (at 4000 atoms 16M pairs, ~400 MB each) in every
replayed step. Here every pair's minimum image and distance live in registers only: one program per atom i walks
the atoms j in blocks, the first launch counts i's pairs, a cumulative sum in torch turns the counts into row
offsets, and the second launch walks the same blocks again and writes each pair at its offset (j ascending: the
order of :func:`fastmlip.neighbors.neighbor_list`), dropping what falls past the capacity. For many atoms the same
two passes walk only the atoms of i's own bin and the bins around it (:func:`cell_pairs`, a cell list sorted by
:class:`fastmlip.graph_pairs.CellBins` in torch each step: ~27 x a bin's atoms per atom instead of N).

The test is a hair wider than the cutoff (``reach``): fused multiply-adds may round a squared distance
differently from torch, and the caller's exact mask (:func:`fastmlip.neighbors.within_cutoff`) decides the
edges, so a pair on the cutoff's edge can be listed and masked, never missed.
"""
from __future__ import annotations

import triton
import triton.language as tl


BLOCK = 128  # atoms j per loop step
CELL_BLOCK = 32  # atoms of one bin per loop step (a bin holds ~10-20 atoms at the densities of MD)


@triton.jit
def _gap(fractional, i, j, live, axis: tl.constexpr):
    """Minus the rounded fractional gap j - i along ``axis``: the shift of j's nearest image (a tie is farther
    than any reach, so how it rounds never matters)."""
    gap = tl.load(fractional + j * 3 + axis, mask=live, other=0.0) - tl.load(fractional + i * 3 + axis)
    return -tl.floor(gap + 0.5)


@triton.jit
def _component(positions, cell, i, j, live, s0, s1, s2, axis: tl.constexpr):
    """Component ``axis`` of positions[j] - positions[i] + S @ cell."""
    translation = s0 * tl.load(cell + axis) + s1 * tl.load(cell + 3 + axis) + s2 * tl.load(cell + 6 + axis)
    return tl.load(positions + j * 3 + axis, mask=live, other=0.0) - tl.load(positions + i * 3 + axis) + translation


@triton.jit
def _pairs_of_block(fractional, positions, cell, i, j, live, reach_sq):
    """Mask of the pairs (i, j) within reach among the ``live`` atoms of the block ``j``, and their minimum-image
    shifts."""
    s0 = _gap(fractional, i, j, live, 0)
    s1 = _gap(fractional, i, j, live, 1)
    s2 = _gap(fractional, i, j, live, 2)
    d0 = _component(positions, cell, i, j, live, s0, s1, s2, 0)
    d1 = _component(positions, cell, i, j, live, s0, s1, s2, 1)
    d2 = _component(positions, cell, i, j, live, s0, s1, s2, 2)
    return live & (j != i) & (d0 * d0 + d1 * d1 + d2 * d2 < reach_sq), s0, s1, s2


@triton.jit(do_not_specialize=["num_atoms"])
def count_pairs(fractional, positions, cell, counts, num_atoms, reach_sq, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK], tl.int64)
    for start in range(0, num_atoms, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        keep, _, _, _ = _pairs_of_block(fractional, positions, cell, i, j, j < num_atoms, reach_sq)
        total += keep.to(tl.int64)
    tl.store(counts + i, tl.sum(total, axis=0))


@triton.jit(do_not_specialize=["num_atoms", "capacity"])
def write_pairs(fractional, positions, cell, offsets, edge_i, edge_j, shifts, num_atoms, capacity, reach_sq,
                BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(offsets + i)  # where atom i's first pair goes
    for start in range(0, num_atoms, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        keep, s0, s1, s2 = _pairs_of_block(fractional, positions, cell, i, j, j < num_atoms, reach_sq)
        slot = _store_block(edge_i, edge_j, shifts, capacity, slot, i, j, keep, s0, s1, s2)


@triton.jit
def _store_block(edge_i, edge_j, shifts, capacity, slot, i, j, keep, s0, s1, s2):
    """Write the kept pairs of a block from ``slot`` on (those that fit); the row's next free slot."""
    # Each kept pair's slot: the row's next free slot plus the kept pairs before it in this block.
    ranks = tl.cumsum(keep.to(tl.int64), axis=0) - 1
    target = slot + ranks
    stored = keep & (target < capacity)
    tl.store(edge_i + target, i + 0 * j, mask=stored)
    tl.store(edge_j + target, j, mask=stored)
    tl.store(shifts + target * 3, s0.to(tl.int64), mask=stored)
    tl.store(shifts + target * 3 + 1, s1.to(tl.int64), mask=stored)
    tl.store(shifts + target * 3 + 2, s2.to(tl.int64), mask=stored)
    return slot + tl.sum(keep.to(tl.int64), axis=0)


@triton.jit(do_not_specialize=["num_atoms", "capacity", "nb0", "nb1", "nb2"])
def cell_pairs(fractional, positions, cell, bins, order, starts, offsets, edge_i, edge_j, shifts, num_atoms, capacity,
               nb0, nb1, nb2, reach_sq, BLOCK: tl.constexpr, WRITE: tl.constexpr):
    """Atom i's pairs among the atoms of its own bin and the bins around it: ``WRITE`` False counts them into
    ``offsets[i]``, True writes them from slot ``offsets[i]`` on. Bins are ``nb0 x nb1 x nb2``, each axis 1 or
    at least 3 bins long (so each neighbouring bin is visited once); ``bins`` [N, 3] holds each atom's bin,
    ``order`` the atoms sorted by bin and ``starts`` where each bin's atoms begin in it."""
    i = tl.program_id(0).to(tl.int64)
    b0 = tl.load(bins + i * 3)
    b1 = tl.load(bins + i * 3 + 1)
    b2 = tl.load(bins + i * 3 + 2)
    span0, span1, span2 = tl.minimum(nb0, 3), tl.minimum(nb1, 3), tl.minimum(nb2, 3)
    slot = tl.load(offsets + i)  # where atom i's first pair goes (the count pass ignores it)
    total = tl.zeros([BLOCK], tl.int64)
    for d0 in range(0, span0):
        c0 = (b0 + d0 - span0 // 2 + nb0) % nb0
        for d1 in range(0, span1):
            c1 = (b1 + d1 - span1 // 2 + nb1) % nb1
            for d2 in range(0, span2):
                c2 = (b2 + d2 - span2 // 2 + nb2) % nb2
                neighbour = (c0 * nb1 + c1) * nb2 + c2
                end = tl.load(starts + neighbour + 1)
                # The bin's atoms in blocks (one block at MD densities), with every test as in the N^2 walk.
                for first in range(tl.load(starts + neighbour), end, BLOCK):
                    where = first + tl.arange(0, BLOCK)
                    live = where < end
                    j = tl.load(order + where, mask=live, other=0).to(tl.int64)
                    keep, s0, s1, s2 = _pairs_of_block(fractional, positions, cell, i, j, live, reach_sq)
                    if WRITE:
                        slot = _store_block(edge_i, edge_j, shifts, capacity, slot, i, j, keep, s0, s1, s2)
                    else:
                        total += keep.to(tl.int64)
    if not WRITE:
        tl.store(offsets + i, tl.sum(total, axis=0))


def pairs_within_bins(positions, fractional, cell, binned, reach: float, edge_i, edge_j, shifts):
    """:func:`pairs_within` through a cell list: ``binned`` is ``(bins, order, starts, (nb0, nb1, nb2))`` of
    :class:`fastmlip.graph_pairs.CellBins`. Pairs come atom by atom (i ascending), each atom's in bin order."""
    n = positions.shape[0]
    bins, order, starts, shape = binned
    counts = edge_i.new_zeros(n)
    common = (fractional, positions, cell, bins, order, starts)
    rest = (n, edge_i.numel(), *shape, reach * reach)
    cell_pairs[(n,)](*common, counts, edge_i, edge_j, shifts, *rest, BLOCK=CELL_BLOCK, WRITE=False)
    ends = counts.cumsum(0)
    cell_pairs[(n,)](*common, ends - counts, edge_i, edge_j, shifts, *rest, BLOCK=CELL_BLOCK, WRITE=True)
    return ends[-1]


def pairs_within(positions, fractional, cell, reach: float, edge_i, edge_j, shifts):
    """Fill ``edge_i``, ``edge_j`` [capacity] and ``shifts`` [capacity, 3] (int64) with the pairs within ``reach``
    in (i, j) order, as far as they fit; return the device count of all of them. ``positions``, ``fractional``
    (positions in periodic-axis fractions, zero elsewhere) [N, 3] and ``cell`` [3, 3] are float64 and contiguous."""
    n = positions.shape[0]
    counts = edge_i.new_empty(n)
    count_pairs[(n,)](fractional, positions, cell, counts, n, reach * reach, BLOCK=BLOCK)
    ends = counts.cumsum(0)
    write_pairs[(n,)](fractional, positions, cell, ends - counts, edge_i, edge_j, shifts, n, edge_i.numel(),
                      reach * reach, BLOCK=BLOCK)
    return ends[-1]


def dry_run(device) -> None:
    """Both launches of the N^2 walk on a two-atom stand-in, for a kernel dry run
    (:func:`fastmlip.kernels.precompile.recording` records them and runs nothing): the pair list's kernels depend on
    no model, only on float64 positions. The cell list's, used only above ``graph_pairs.MAX_ATOMS`` atoms where
    asked for, compile at their first step."""
    import torch  # here: compile workers import this module for its kernels, and torch's import costs them seconds

    positions = torch.zeros(2, 3, dtype=torch.float64, device=device)
    slots = [torch.empty(2, dtype=torch.long, device=device) for _ in range(2)]
    shifts = torch.empty(2, 3, dtype=torch.long, device=device)
    pairs_within(positions, positions.clone(), torch.eye(3, dtype=torch.float64, device=device), 1.0, *slots, shifts)
