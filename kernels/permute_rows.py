"""Triton kernel that permutes the rows of a narrow [E, W] array (out[r] = values[order[r]], or the scatter back)
or the columns of an [N, W] array (out[:, c] = values[:, index[c]], or back).

Why: torch's ``index_select`` gathers with one thread block per index row. For the narrow per-edge rows of a step
(edge attributes, 16 floats; radial features, 8) that is one block per 32-64 bytes, bound by how fast blocks are
scheduled, not by memory: two such gathers took 0.40 ms of a 4000-atom MACE-medium-like step on an H200 (312k
edges), and their ``index_add_`` backward 0.11 ms more. Here a program moves a tile of many rows. Since ``order``
is a permutation, the backward is the same move the other way (each row written once: no atomics). The same holds
for MACE's reshape of its messages, a permutation of columns, whose ``index_select(1, ...)`` and ``index_add_``
backward cost 0.17 ms of that step.
"""
from __future__ import annotations

import triton
import triton.language as tl

ELEMENTS = 4096  # elements a program moves at most: rows per program = ELEMENTS // padded width


@triton.jit(do_not_specialize=["num_rows"])
def permute(values, order, out, num_rows, WIDTH: tl.constexpr, PAD: tl.constexpr, ROWS: tl.constexpr,
            COLUMNS: tl.constexpr, SCATTER: tl.constexpr):
    """For a tile of ROWS rows: out[r] = values[order[r]] (COLUMNS: out[r, c] = values[r, order[c]]), or with
    SCATTER the move back, out[order[r]] = values[r] (out[r, order[c]] = values[r, c])."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    column = tl.arange(0, PAD)
    mask = (row < num_rows)[:, None] & (column < WIDTH)[None, :]
    here = row[:, None] * WIDTH + column[None, :]
    # the element each (row, column) of the tile moves to or from
    if COLUMNS:
        other = tl.load(order + column, mask=column < WIDTH, other=0).to(tl.int64)
        there = row[:, None] * WIDTH + other[None, :]
    else:
        other = tl.load(order + row, mask=row < num_rows, other=0).to(tl.int64)
        there = other[:, None] * WIDTH + column[None, :]
    if SCATTER:
        tl.store(out + there, tl.load(values + here, mask=mask), mask=mask)
    else:
        tl.store(out + here, tl.load(values + there, mask=mask), mask=mask)


def moved(values, order, scatter: bool, columns: bool = False):
    """``values`` [E, W] (contiguous) with its rows gathered by ``order`` (a permutation of E), or scattered; with
    ``columns``, its columns by ``order`` (a permutation of W)."""
    from .launch import new_output  # here: compile workers import this module for its kernels, without torch

    num_rows, width = values.shape
    out = new_output(values.shape, values)
    if num_rows:
        pad = triton.next_power_of_2(width)
        rows = max(1, ELEMENTS // pad)
        permute[(triton.cdiv(num_rows, rows),)](values, order, out, num_rows, WIDTH=width, PAD=pad, ROWS=rows,
                                                COLUMNS=columns, SCATTER=scatter)
    return out
