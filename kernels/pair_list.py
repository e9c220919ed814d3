"""Triton kernels for the exact pair list of :mod:`fastmlip.graph_pairs`: two launches, no host reads.

Why: the list in torch is ~15 passes over N^2-long temporaries (at 4000 atoms 16M pairs, ~400 MB each) in every
replayed step. Here every pair's minimum image and distance live in registers only: one program per atom i walks
the atoms j in blocks, the first launch counts i's pairs, a cumulative sum in torch turns the counts into row
offsets, and the second launch walks the same blocks again and writes each pair at its offset (j ascending: the
order of :func:`fastmlip.neighbors.neighbor_list`), dropping what falls past the capacity.

The test is a hair wider than the cutoff (``reach``): fused multiply-adds may round a squared distance
differently from torch, and the caller's exact mask (:func:`fastmlip.neighbors.within_cutoff`) decides the
edges, so a pair on the cutoff's edge can be listed and masked, never missed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


BLOCK = 128  # atoms j per loop step


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
def _pairs_of_block(fractional, positions, cell, i, j, n, reach_sq):
    """Mask of the pairs (i, j) within reach among the block ``j``, and their minimum-image shifts."""
    live = j < n
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
        keep, _, _, _ = _pairs_of_block(fractional, positions, cell, i, j, num_atoms, reach_sq)
        total += keep.to(tl.int64)
    tl.store(counts + i, tl.sum(total, axis=0))


@triton.jit(do_not_specialize=["num_atoms", "capacity"])
def write_pairs(fractional, positions, cell, offsets, edge_i, edge_j, shifts, num_atoms, capacity, reach_sq,
                BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(offsets + i)  # where atom i's first pair goes
    for start in range(0, num_atoms, BLOCK):
        j = start + tl.arange(0, BLOCK).to(tl.int64)
        keep, s0, s1, s2 = _pairs_of_block(fractional, positions, cell, i, j, num_atoms, reach_sq)
        # Each kept pair's slot: the row's next free slot plus the kept pairs before it in this block.
        ranks = tl.cumsum(keep.to(tl.int64), axis=0) - 1
        target = slot + ranks
        stored = keep & (target < capacity)
        tl.store(edge_i + target, i + 0 * j, mask=stored)
        tl.store(edge_j + target, j, mask=stored)
        tl.store(shifts + target * 3, s0.to(tl.int64), mask=stored)
        tl.store(shifts + target * 3 + 1, s1.to(tl.int64), mask=stored)
        tl.store(shifts + target * 3 + 2, s2.to(tl.int64), mask=stored)
        slot += tl.sum(keep.to(tl.int64), axis=0)


def pairs_within(positions, fractional, cell, reach: float, edge_i, edge_j, shifts):
    """Fill ``edge_i``, ``edge_j`` [capacity] and ``shifts`` [capacity, 3] (int64) with the pairs within ``reach``
    in (i, j) order, as far as they fit; return the device count of all of them. ``positions``, ``fractional``
    (positions in periodic-axis fractions, zero elsewhere) [N, 3] and ``cell`` [3, 3] are float64 and contiguous."""
    n = positions.shape[0]
    counts = positions.new_empty(n, dtype=torch.long)
    count_pairs[(n,)](fractional, positions, cell, counts, n, reach * reach, BLOCK=BLOCK)
    ends = counts.cumsum(0)
    write_pairs[(n,)](fractional, positions, cell, ends - counts, edge_i, edge_j, shifts, n, edge_i.numel(),
                      reach * reach, BLOCK=BLOCK)
    return ends[-1]


def dry_run(device) -> None:
    """Both launches on a two-atom stand-in, for a kernel dry run (:func:`fastmlip.kernels.precompile.recording`
    records them and runs nothing): the pair list's kernels depend on no model, only on float64 positions."""
    positions = torch.zeros(2, 3, dtype=torch.float64, device=device)
    slots = [torch.empty(2, dtype=torch.long, device=device) for _ in range(2)]
    shifts = torch.empty(2, 3, dtype=torch.long, device=device)
    pairs_within(positions, positions.clone(), torch.eye(3, dtype=torch.float64, device=device), 1.0, *slots, shifts)
