"""Triton kernels for a radial function read from a table (:mod:`fastmlip.ops.radial_table`): its values at each
edge's length, and d/dr of their dot product with a gradient.

Each program takes a block of edges (walked in ``order`` when one is given, e.g. sorted by length, so that the
programs running together read the same few table rows from cache), finds each edge's interval and position t in
it, and combines the interval's two knots (value and slope each, [2, W] rows side by side in memory) with the
four cubic Hermite weights of t. The forward spreads the W columns over programs; the backward walks them all in
one program per block of edges and sums its products once at the end, a fixed order: no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

EDGES = 16  # edges per forward program
COLUMNS = 128  # table columns per forward program, at most
BACKWARD_EDGES = 32
BACKWARD_COLUMNS = 64


@triton.jit
def table_interval(r, segments, last_knot, SEGMENTS: tl.constexpr):
    """(knot, t, inverse step, inside) of lengths ``r`` (any shape): the knot that starts each one's interval,
    where in the interval it lies (0 to 1), that segment's inverse step, and whether it lies in the table. The
    segments rise, so a length's segment is the last one that starts at or below it."""
    start = tl.zeros_like(r) + tl.load(segments)  # r's shape, whatever the number of segments
    inv_step = tl.zeros_like(r) + tl.load(segments + SEGMENTS)
    first = tl.zeros_like(r) + tl.load(segments + 2 * SEGMENTS)
    for k in tl.static_range(1, SEGMENTS):
        later = r >= tl.load(segments + k)
        start = tl.where(later, tl.load(segments + k), start)
        inv_step = tl.where(later, tl.load(segments + SEGMENTS + k), inv_step)
        first = tl.where(later, tl.load(segments + 2 * SEGMENTS + k), first)
    s = first + (r - start) * inv_step
    inside = (s >= 0.0) & (s <= last_knot)
    s = tl.minimum(tl.maximum(s, 0.0), last_knot)
    knot = tl.minimum(s.to(tl.int64), last_knot - 1)  # s >= 0: truncation is floor
    return knot, s - knot.to(s.dtype), inv_step, inside


@triton.jit
def hermite_weights(t, step):
    """The weights of (left value, left slope, right value, right slope) at t; slopes are per angstrom, so
    theirs carry the step."""
    t2 = t * t
    return 2.0 * t2 * t - 3.0 * t2 + 1.0, (t2 * t - 2.0 * t2 + t) * step, 3.0 * t2 - 2.0 * t2 * t, (t2 * t - t2) * step


@triton.jit
def hermite_slope_weights(t, inv_step):
    """d/dr of :func:`hermite_weights`: d/dt times the inverse step (which cancels the step the slopes carry)."""
    t2 = t * t
    return ((6.0 * t2 - 6.0 * t) * inv_step, 3.0 * t2 - 4.0 * t + 1.0, (6.0 * t - 6.0 * t2) * inv_step,
            3.0 * t2 - 2.0 * t)


@triton.jit
def _locate(lengths, order, segments, slot, live, last_knot, SEGMENTS: tl.constexpr, ORDERED: tl.constexpr):
    """(edge, knot, t, inverse step, inside) of the edges in ``slot`` (see :func:`table_interval`)."""
    if ORDERED:
        edge = tl.load(order + slot, mask=live, other=0).to(tl.int64)
    else:
        edge = slot
    r = tl.load(lengths + edge, mask=live, other=0.0)
    knot, t, inv_step, inside = table_interval(r, segments, last_knot, SEGMENTS)
    return edge, knot, t, inv_step, inside


@triton.jit(do_not_specialize=["num_edges", "last_knot"])
def radial_table_forward(lengths, order, values, segments, row_scale, out, num_edges, last_knot,
                         WIDTH: tl.constexpr, SEGMENTS: tl.constexpr, EDGES: tl.constexpr, COLUMNS: tl.constexpr,
                         ORDERED: tl.constexpr, SCALED: tl.constexpr):
    """out[e, c] = the cubic Hermite interpolation of column c at lengths[e] (times row_scale[e])."""
    slot = tl.program_id(0).to(tl.int64) * EDGES + tl.arange(0, EDGES)
    live = slot < num_edges
    edge, knot, t, inv_step, _ = _locate(lengths, order, segments, slot, live, last_knot, SEGMENTS, ORDERED)
    column = tl.program_id(1) * COLUMNS + tl.arange(0, COLUMNS)
    mask = live[:, None] & (column[None, :] < WIDTH)
    w_left, w_left_slope, w_right, w_right_slope = hermite_weights(t[:, None], 1.0 / inv_step[:, None])
    row = values + knot[:, None] * (2 * WIDTH) + column[None, :]
    f = w_left * tl.load(row, mask=mask, other=0.0)
    f += w_left_slope * tl.load(row + WIDTH, mask=mask, other=0.0)
    f += w_right * tl.load(row + 2 * WIDTH, mask=mask, other=0.0)
    f += w_right_slope * tl.load(row + 3 * WIDTH, mask=mask, other=0.0)
    if SCALED:
        f = f * tl.load(row_scale + edge, mask=live, other=0.0)[:, None]
    tl.store(out + edge[:, None] * WIDTH + column[None, :], f, mask=mask)


@triton.jit(do_not_specialize=["num_edges", "last_knot"])
def radial_table_backward(grad_out, lengths, order, values, segments, row_scale, grad_lengths, grad_scale,
                          num_edges, last_knot, WIDTH: tl.constexpr, SEGMENTS: tl.constexpr, EDGES: tl.constexpr,
                          COLUMNS: tl.constexpr, ORDERED: tl.constexpr, SCALED: tl.constexpr,
                          WANT_SCALE: tl.constexpr):
    """grad_lengths[e] = sum_c grad_out[e, c] * d out[e, c] / d lengths[e] (zero outside the table), and
    grad_scale[e] = sum_c grad_out[e, c] * out[e, c] / row_scale[e]."""
    slot = tl.program_id(0).to(tl.int64) * EDGES + tl.arange(0, EDGES)
    live = slot < num_edges
    edge, knot, t, inv_step, inside = _locate(lengths, order, segments, slot, live, last_knot, SEGMENTS, ORDERED)
    d_left, d_left_slope, d_right, d_right_slope = hermite_slope_weights(t[:, None], inv_step[:, None])
    if WANT_SCALE:
        w_left, w_left_slope, w_right, w_right_slope = hermite_weights(t[:, None], 1.0 / inv_step[:, None])
        acc_scale = tl.zeros([EDGES, COLUMNS], values.dtype.element_ty)
    acc = tl.zeros([EDGES, COLUMNS], values.dtype.element_ty)
    for first_column in tl.range(0, WIDTH, COLUMNS):
        column = first_column + tl.arange(0, COLUMNS)
        mask = live[:, None] & (column[None, :] < WIDTH)
        g = tl.load(grad_out + edge[:, None] * WIDTH + column[None, :], mask=mask, other=0.0)
        row = values + knot[:, None] * (2 * WIDTH) + column[None, :]
        left = tl.load(row, mask=mask, other=0.0)
        left_slope = tl.load(row + WIDTH, mask=mask, other=0.0)
        right = tl.load(row + 2 * WIDTH, mask=mask, other=0.0)
        right_slope = tl.load(row + 3 * WIDTH, mask=mask, other=0.0)
        acc += g * (d_left * left + d_left_slope * left_slope + d_right * right + d_right_slope * right_slope)
        if WANT_SCALE:
            acc_scale += g * (w_left * left + w_left_slope * left_slope + w_right * right
                              + w_right_slope * right_slope)
    total = tl.sum(acc, axis=1)
    if SCALED:
        total = total * tl.load(row_scale + edge, mask=live, other=0.0)
    tl.store(grad_lengths + edge, tl.where(inside, total, 0.0), mask=live)
    if WANT_SCALE:
        tl.store(grad_scale + edge, tl.sum(acc_scale, axis=1), mask=live)


def forward(lengths, values, segments, row_scale, order):
    """[E, W] values of the table at ``lengths`` (see :func:`radial_table_forward`)."""
    from .launch import new_output  # here: compile workers import this module for its kernels, without torch

    num_edges, width = lengths.shape[0], values.shape[2]
    out = new_output((num_edges, width), values)
    if num_edges:
        columns = min(COLUMNS, triton.next_power_of_2(width))
        grid = (triton.cdiv(num_edges, EDGES), triton.cdiv(width, columns))
        radial_table_forward[grid](
            lengths, lengths if order is None else order, values, segments.contiguous(),
            lengths if row_scale is None else row_scale, out, num_edges, values.shape[0] - 1,
            WIDTH=width, SEGMENTS=segments.shape[1], EDGES=EDGES, COLUMNS=columns, ORDERED=order is not None,
            SCALED=row_scale is not None)
    return out


def backward(grad_out, lengths, values, segments, row_scale, order, want_scale: bool):
    """(grad_lengths [E], grad_row_scale [E] or empty) (see :func:`radial_table_backward`)."""
    from .launch import new_output

    num_edges, width = lengths.shape[0], values.shape[2]
    grad_lengths = new_output((num_edges,), lengths)
    grad_scale = new_output((num_edges if want_scale else 0,), lengths)
    if num_edges:
        columns = min(BACKWARD_COLUMNS, triton.next_power_of_2(width))
        radial_table_backward[(triton.cdiv(num_edges, BACKWARD_EDGES),)](
            grad_out.contiguous(), lengths, lengths if order is None else order, values, segments.contiguous(),
            lengths if row_scale is None else row_scale, grad_lengths, grad_scale if want_scale else grad_lengths,
            num_edges, values.shape[0] - 1, WIDTH=width, SEGMENTS=segments.shape[1], EDGES=BACKWARD_EDGES,
            COLUMNS=columns, ORDERED=order is not None, SCALED=row_scale is not None, WANT_SCALE=want_scale)
    return grad_lengths, grad_scale
