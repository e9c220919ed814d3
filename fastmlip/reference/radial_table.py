"""A radial function read from a table of its values and slopes (:mod:`fastmlip.ops.radial_table`) in plain torch.

The table holds f(r_k) and f'(r_k) at knots r_k, laid out [knots, 2, W]. The knots are uniform within each of a few
segments of [0, r_end] (finer where f varies fastest); ``segments`` [3, S] gives each segment's start, inverse
step, and first knot's index. Between two knots f is the cubic Hermite interpolant of their values and slopes;
lengths outside [0, r_end] read the nearest end's value with a zero slope. This is the oracle of the kernels and
the CPU backend; second derivatives come from autograd through these formulas.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _position(values: Tensor, segments: Tensor, lengths: Tensor) -> tuple:
    """(knot [E] long, t [E, 1] in [0, 1], step [E, 1], inverse step [E, 1], inside [E] bool): the interval each
    length falls in and where in it."""
    starts, inv_steps, firsts = segments[0], segments[1], segments[2]
    last_knot = values.shape[0] - 1
    segment = (lengths.detach().unsqueeze(1) >= starts[1:]).sum(1)
    inv_step, first = inv_steps[segment], firsts[segment]
    s = first + (lengths - starts[segment]) * inv_step
    inside = (s >= 0) & (s <= last_knot)
    s = s.clamp(0.0, float(last_knot))
    knot = s.detach().floor().long().clamp(max=last_knot - 1)
    inv_step = inv_step.unsqueeze(1)
    return knot, (s - knot.to(s.dtype)).unsqueeze(1), 1.0 / inv_step, inv_step, inside


def hermite_weights(t: Tensor) -> tuple:
    """The cubic Hermite basis at t: weights of the left knot's value and slope (times the step), the right's."""
    t2 = t * t
    return 2 * t2 * t - 3 * t2 + 1, t2 * t - 2 * t2 + t, 3 * t2 - 2 * t2 * t, t2 * t - t2


def hermite_slopes(t: Tensor) -> tuple:
    """d/dt of :func:`hermite_weights`."""
    t2 = t * t
    return 6 * t2 - 6 * t, 3 * t2 - 4 * t + 1, 6 * t - 6 * t2, 3 * t2 - 2 * t


def _combine(values: Tensor, knot: Tensor, weights: tuple, step: Tensor) -> Tensor:
    left, right = values[knot], values[knot + 1]
    return (weights[0] * left[:, 0] + weights[1] * step * left[:, 1] + weights[2] * right[:, 0]
            + weights[3] * step * right[:, 1])


def interpolate(values: Tensor, segments: Tensor, lengths: Tensor, row_scale: Optional[Tensor] = None) -> Tensor:
    """f(lengths) [E, W], times ``row_scale`` [E] per row if given."""
    knot, t, step, _, _ = _position(values, segments, lengths)
    out = _combine(values, knot, hermite_weights(t), step)
    return out if row_scale is None else out * row_scale.unsqueeze(1)


def interpolate_slope(values: Tensor, segments: Tensor, lengths: Tensor) -> Tensor:
    """d/d lengths of :func:`interpolate` (without a row scale) [E, W]; zero outside the table."""
    knot, t, step, inv_step, inside = _position(values, segments, lengths)
    return _combine(values, knot, hermite_slopes(t), step) * inv_step * inside.unsqueeze(1)


def interpolate_backward(grad_out: Tensor, values: Tensor, segments: Tensor, lengths: Tensor,
                         row_scale: Optional[Tensor] = None) -> tuple:
    """(d/d lengths [E], d/d row_scale [E] or None) of <grad_out, interpolate(values, segments, lengths,
    row_scale)>."""
    g = grad_out if row_scale is None else grad_out * row_scale.unsqueeze(1)
    grad_lengths = (g * interpolate_slope(values, segments, lengths)).sum(1)
    grad_scale = None if row_scale is None else (grad_out * interpolate(values, segments, lengths)).sum(1)
    return grad_lengths, grad_scale
