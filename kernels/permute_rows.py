"""Triton kernels that permute the rows of a narrow [E, W] array (out[r] = values[order[r]], or the scatter back)
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
def permute_rows(values, order, out, num_rows, WIDTH: tl.constexpr, PAD: tl.constexpr, ROWS: tl.constexpr,
                 SCATTER: tl.constexpr):
    """out[r] = values[order[r]] (gather), or out[order[r]] = values[r] (SCATTER), for a tile of ROWS rows."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    live = row < num_rows
    other = tl.load(order + row, mask=live, other=0).to(tl.int64)
    column = tl.arange(0, PAD)
    mask = live[:, None] & (column[None, :] < WIDTH)
    if SCATTER:
        moved = tl.load(values + row[:, None] * WIDTH + column[None, :], mask=mask)
        tl.store(out + other[:, None] * WIDTH + column[None, :], moved, mask=mask)
    else:
        moved = tl.load(values + other[:, None] * WIDTH + column[None, :], mask=mask)
        tl.store(out + row[:, None] * WIDTH + column[None, :], moved, mask=mask)


@triton.jit(do_not_specialize=["num_rows"])
def permute_columns(values, index, out, num_rows, WIDTH: tl.constexpr, PAD: tl.constexpr, ROWS: tl.constexpr,
                    SCATTER: tl.constexpr):
    """out[r, c] = values[r, index[c]] (gather), or out[r, index[c]] = values[r, c] (SCATTER), for ROWS rows."""
    row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    column = tl.arange(0, PAD)
    inside = column < WIDTH
    other = tl.load(index + column, mask=inside, other=0).to(tl.int64)
    mask = (row < num_rows)[:, None] & inside[None, :]
    if SCATTER:
        moved = tl.load(values + row[:, None] * WIDTH + column[None, :], mask=mask)
        tl.store(out + row[:, None] * WIDTH + other[None, :], moved, mask=mask)
    else:
        moved = tl.load(values + row[:, None] * WIDTH + other[None, :], mask=mask)
        tl.store(out + row[:, None] * WIDTH + column[None, :], moved, mask=mask)


def permute(values, order, scatter: bool, columns: bool = False):
    """``values`` [E, W] (contiguous) with its rows gathered by ``order`` (a permutation of E), or scattered; with
    ``columns``, its columns by ``order`` (a permutation of W)."""
    from .launch import new_output  # here: compile workers import this module for its kernels, without torch

    num_rows, width = values.shape
    out = new_output(values.shape, values)
    if num_rows:
        pad = triton.next_power_of_2(width)
        rows = max(1, ELEMENTS // pad)
        kernel = permute_columns if columns else permute_rows
        kernel[(triton.cdiv(num_rows, rows),)](values, order, out, num_rows, WIDTH=width, PAD=pad, ROWS=rows,
                                               SCATTER=scatter)
    return out
