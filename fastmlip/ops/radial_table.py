"""A radial function of the edge length read from a table, ``fastmlip::radial_table`` and its backward.

Why: MACE's and SevenNet's per-edge tensor-product weights are ``mlp(basis(r))``, a function of the edge length
alone, and the radial MLP that makes them is a third of a large MD step (its last layer is an [E, 64] x [64, W]
product, run in tf32x3 to keep float32 accuracy; docs/kernels.md). Sampled once in float64 at knots a few
thousandths of an angstrom apart, with its slopes, the same function is a cubic Hermite interpolation: per edge
four table rows and a few multiply-adds per weight, and its backward one dot product of the weight gradient with
the interpolated slope. :func:`tabulate` picks the knot spacing by measuring the interpolation's error against the
function itself, so a table exists only where it meets its tolerances.

On the Triton backend (:mod:`fastmlip.kernels.radial_table`) the edges may be walked in an ``order`` (sorted by
length): neighbouring programs then read the same table rows. The table takes no gradient; second derivatives
differentiate the reference formulas (:mod:`fastmlip.reference.radial_table`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..descriptors import RadialBasisProblem, RadialMLPProblem
from ..reference import radial_basis as ref_basis
from ..reference import radial_mlp as ref_mlp
from ..reference import radial_table as ref
from . import dispatch, library
from .derivatives import vjp_of_reference

# The interpolation's largest error, relative to the function's largest value and slope over the table, that a
# table must meet (measured at the points of each interval where a cubic Hermite interpolant errs most). Values to
# well below float32 rounding; slopes (the forces' share) to ~1e-6: SevenNet-0's five layers need 1,500-2,000
# intervals over 5 A for that, 8-16 MB each in float32.
VALUE_TOLERANCE = 1e-8
SLOPE_TOLERANCE = 1e-6
FIRST_DENSITY = 64  # intervals per angstrom to start from
SHORTEST_LENGTH = 1e-9  # A: the knot at 0 is sampled here
SHORT_RANGE = 1.0  # A: where the first segment ends
MAX_INTERVALS = 16384
# where in an interval the value's error peaks (t = 1/2) and the slope's (1/2 -+ 1/(2 sqrt 3))
_CHECK_POINTS = (0.5 - 0.5 / math.sqrt(3.0), 0.5, 0.5 + 0.5 / math.sqrt(3.0))


@dataclass(frozen=True, eq=False)
class RadialTable:
    """f(r) for r in [0, r_end]: ``values`` [knots, 2, W] (f and f' at each knot), knots uniform within each
    segment between consecutive ``boundaries`` (``intervals`` per segment), ``segments`` [3, S] what the kernels
    read of that (start, inverse step, first knot), and the interpolation's measured error relative to the
    largest |f| and |f'|."""

    values: Tensor
    segments: Tensor
    boundaries: tuple
    intervals: tuple
    value_error: float
    slope_error: float

    @property
    def r_end(self) -> float:
        return self.boundaries[-1]

    @property
    def dim_out(self) -> int:
        return self.values.shape[2]

    def __repr__(self) -> str:
        spans = ", ".join(f"[{a:g}, {b:g}] A: {n}" for a, b, n in zip(self.boundaries, self.boundaries[1:],
                                                                      self.intervals))
        return (f"RadialTable(W={self.dim_out}, intervals {spans}, errors {self.value_error:.1e} value / "
                f"{self.slope_error:.1e} slope, {self.values.dtype})")


def _knots(boundaries: Sequence[float], intervals: Sequence[int], device) -> Tensor:
    pieces = [torch.linspace(a, b, n + 1, dtype=torch.float64, device=device)[(1 if k else 0):]
              for k, (a, b, n) in enumerate(zip(boundaries, boundaries[1:], intervals))]
    return torch.cat(pieces)


def _segments(boundaries: Sequence[float], intervals: Sequence[int], device) -> Tensor:
    firsts = [sum(intervals[:k]) for k in range(len(intervals))]
    inv_steps = [n / (b - a) for a, b, n in zip(boundaries, boundaries[1:], intervals)]
    return torch.tensor([list(boundaries[:-1]), inv_steps, firsts], dtype=torch.float64, device=device)


def _segment_errors(values: Tensor, segments: Tensor, function: Callable, knots: Tensor) -> tuple:
    """(value error, slope error) per segment at the points of each interval where a cubic Hermite interpolant
    errs most, relative to the largest |f| and |f'| over the table (sampled at ``knots``)."""
    starts, steps = knots[:-1], knots[1:] - knots[:-1]
    points = torch.cat([starts + t * steps for t in _CHECK_POINTS])
    exact, exact_slope = function(points)
    value_error = (ref.interpolate(values, segments, points) - exact).abs().amax(1)
    slope_error = (ref.interpolate_slope(values, segments, points) - exact_slope).abs().amax(1)
    value_error = value_error / max(exact.abs().max().item(), values[:, 0].abs().max().item(), 1e-300)
    slope_error = slope_error / max(exact_slope.abs().max().item(), values[:, 1].abs().max().item(), 1e-300)
    segment = (points.unsqueeze(1) >= segments[0, 1:]).sum(1)
    return ([value_error[segment == k].max().item() for k in range(segments.shape[1])],
            [slope_error[segment == k].max().item() for k in range(segments.shape[1])])


def tabulate(function: Callable, boundaries: Sequence[float], *, dtype: torch.dtype, device,
             value_tolerance: float = VALUE_TOLERANCE, slope_tolerance: float = SLOPE_TOLERANCE,
             max_intervals: int = MAX_INTERVALS) -> Optional[RadialTable]:
    """The table of ``function`` (float64 lengths [M] -> (f [M, W], df/dr [M, W]), exact) over [0, r_end], with
    knots uniform between consecutive ``boundaries`` (0, ..., r_end: put one where f is not smooth, e.g. where an
    envelope switches on, and where its pace changes), as few as meet both tolerances in every segment; None if
    more than ``max_intervals`` in all would be needed (the function is then better computed than read)."""
    boundaries = tuple(float(b) for b in boundaries)
    if boundaries[0] != 0.0 or any(b <= a for a, b in zip(boundaries, boundaries[1:])):
        raise ValueError(f"table boundaries must rise from 0, got {boundaries}")
    intervals = [16 * math.ceil(FIRST_DENSITY * (b - a) / 16) for a, b in zip(boundaries, boundaries[1:])]
    while sum(intervals) <= max_intervals:
        segments = _segments(boundaries, intervals, device)
        knots = _knots(boundaries, intervals, device)
        values = torch.stack(function(knots), dim=1)
        value_errors, slope_errors = _segment_errors(values, segments, function, knots)
        if not all(math.isfinite(e) for e in value_errors + slope_errors):
            return None
        if max(value_errors) <= value_tolerance and max(slope_errors) <= slope_tolerance:
            return RadialTable(values.to(dtype).contiguous(), segments.to(dtype), boundaries, tuple(intervals),
                               max(value_errors), max(slope_errors))
        # a cubic Hermite interpolant's value error falls as step^4, its slope's as step^3: aim a little past both
        for k, (value_error, slope_error) in enumerate(zip(value_errors, slope_errors)):
            growth = max((value_error / value_tolerance) ** 0.25, (slope_error / slope_tolerance) ** (1 / 3))
            if growth > 1:
                intervals[k] = 16 * math.ceil(1.1 * growth * intervals[k] / 16)
    return None


def tabulate_radial_mlp(basis: RadialBasisProblem, frequencies: Tensor, mlp: RadialMLPProblem,
                        weights: Sequence[Tensor], *, dtype: torch.dtype) -> Optional[RadialTable]:
    """The table of ``mlp(basis(r))`` (:func:`mlp_of_basis`) on the weights' device, over [0, cutoff] with a
    segment boundary at SHORT_RANGE (below it a trained MLP, extrapolating, varies fastest) and where an XPLOR
    envelope switches on (its second derivative jumps there); None where no table meets the tolerances."""
    envelope = basis.envelope
    inner = [SHORT_RANGE] if envelope.cutoff > 2 * SHORT_RANGE else []
    if envelope.kind == "xplor" and 0 < envelope.r_on < envelope.cutoff:
        inner.append(envelope.r_on)
    boundaries = (0.0, *sorted(set(inner)), envelope.cutoff)
    return tabulate(mlp_of_basis(basis, frequencies, mlp, weights), boundaries, dtype=dtype,
                    device=weights[0].device)


def mlp_of_basis(basis: RadialBasisProblem, frequencies: Tensor, mlp: RadialMLPProblem,
                 weights: Sequence[Tensor]) -> Callable:
    """r -> (mlp(basis(r)), its d/dr) in float64 from the modules' own tensors: what MACE's and SevenNet's radial
    MLPs make of an edge length, as :func:`tabulate` samples it."""
    frequencies = frequencies.detach().to(torch.float64)
    weights = [w.detach().to(torch.float64) for w in weights]

    def function(lengths: Tensor) -> tuple:
        lengths = lengths.clamp(min=SHORTEST_LENGTH)  # sin(w r) / r at r = 0 is its limit, w
        return ref_mlp.radial_mlp_tangent(mlp, ref_basis.radial_basis(basis, lengths, frequencies),
                                          ref_basis.radial_basis_slope(basis, lengths, frequencies), weights)

    return function


@library.custom_op("fastmlip::radial_table")
def radial_table_fwd(lengths: Tensor, values: Tensor, segments: Tensor, row_scale: Optional[Tensor],
                     order: Optional[Tensor]) -> Tensor:
    if dispatch.backend_for(lengths) == "triton":
        from ..kernels import radial_table as kernels

        return kernels.forward(lengths, values, segments, row_scale, order)
    return ref.interpolate(values, segments, lengths, row_scale)


@radial_table_fwd.register_fake
def _(lengths, values, segments, row_scale, order):
    return lengths.new_empty(lengths.shape[0], values.shape[2])


@library.custom_op("fastmlip::radial_table_bwd")
def radial_table_bwd(grad_out: Tensor, lengths: Tensor, values: Tensor, segments: Tensor,
                     row_scale: Optional[Tensor], order: Optional[Tensor], want_scale: bool) -> tuple[Tensor, Tensor]:
    """(grad_lengths, grad_row_scale) of <grad_out, radial_table(lengths, ...)>; an unwanted one is empty."""
    want_scale = want_scale and row_scale is not None
    if dispatch.backend_for(lengths) == "triton":
        from ..kernels import radial_table as kernels

        return kernels.backward(grad_out, lengths, values, segments, row_scale, order, want_scale)
    grad_lengths, grad_scale = ref.interpolate_backward(grad_out, values, segments, lengths, row_scale)
    return grad_lengths, (grad_scale if want_scale else lengths.new_empty(0))


@radial_table_bwd.register_fake
def _(grad_out, lengths, values, segments, row_scale, order, want_scale):
    want_scale = want_scale and row_scale is not None
    return torch.empty_like(lengths), lengths.new_empty(lengths.shape[0] if want_scale else 0)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    lengths, values, segments, row_scale, order = ctx.saved_tensors
    want_r, _, _, want_s, _ = ctx.needs_input_grad
    grad_r, grad_s = radial_table_bwd(grad, lengths, values, segments, row_scale, order, bool(want_s))
    return grad_r if want_r else None, None, None, grad_s if want_s else None, None


radial_table_fwd.register_autograd(_backward, setup_context=_setup)


def _bwd_setup(ctx, inputs, output):
    grad_out, lengths, values, segments, row_scale, order, want_scale = inputs
    ctx.save_for_backward(grad_out, lengths, values, segments, row_scale)
    ctx.want_scale = want_scale and row_scale is not None


def _bwd_backward(ctx, h_r, h_s):
    grad_out, lengths, values, segments, row_scale = ctx.saved_tensors
    with_scale = row_scale is not None

    def backward_formula(g, r, *scale):
        grad_r, grad_s = ref.interpolate_backward(g, values, segments, r, scale[0] if scale else None)
        return (grad_r, grad_s) if scale else grad_r

    primals = [grad_out, lengths] + ([row_scale] if with_scale else [])
    if with_scale:
        h_s = h_s if ctx.want_scale and h_s is not None and h_s.numel() else torch.zeros_like(row_scale)
        grads = vjp_of_reference(backward_formula, primals, (h_r, h_s))
    else:
        grads = vjp_of_reference(backward_formula, primals, h_r)
    return grads[0], grads[1], None, None, grads[2] if with_scale else None, None, None


radial_table_bwd.register_autograd(_bwd_backward, setup_context=_bwd_setup)


def radial_table(table: RadialTable, lengths: Tensor, row_scale: Optional[Tensor] = None,
                 order: Optional[Tensor] = None) -> Tensor:
    """The tabulated function at ``lengths`` [E] -> [E, W], times ``row_scale`` [E] if given. ``order`` (a
    permutation of the edges, e.g. ``argsort(lengths)``) is the order the kernels walk them in: results do not
    depend on it."""
    check_table_inputs(table, lengths, row_scale, order)
    return radial_table_fwd(lengths, table.values, table.segments, row_scale, order)


def check_table_inputs(table: RadialTable, lengths: Tensor, row_scale: Optional[Tensor],
                       order: Optional[Tensor]) -> None:
    """A clear error for lengths, a row scale or an order that ``table`` cannot be read with."""
    values = table.values
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.dtype != values.dtype:
        shape = tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__
        raise ValueError(f"{table}: lengths must be a {values.dtype} tensor [E], got {shape}")
    if lengths.device != values.device:
        raise ValueError(f"{table}: lengths are on {lengths.device}, the table on {values.device}")
    if row_scale is not None and (row_scale.shape != lengths.shape or row_scale.dtype != lengths.dtype):
        raise ValueError(f"{table}: row_scale must be [{lengths.shape[0]}] ({lengths.dtype}), "
                         f"got {tuple(row_scale.shape)} ({row_scale.dtype})")
    if order is not None and (order.shape != lengths.shape or order.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"{table}: order must be an integer permutation [{lengths.shape[0]}]")
