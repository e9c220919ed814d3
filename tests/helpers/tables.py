"""Radial tables for tests of the ops that read them: random knots, so every interpolation formula is exercised."""
import torch

from fastmlip.ops import radial_table as table_ops

BOUNDARIES = (0.0, 1.0, 4.5, 5.0)


def random_table(width, dtype, device, intervals=(8, 20, 6), seed=0):
    """A table of random knots over BOUNDARIES (not a smooth function: the interpolation formulas are all the same)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(sum(intervals) + 1, 2, width, generator=generator, dtype=torch.float64)
    segments = table_ops._segments(BOUNDARIES, intervals, "cpu")
    return table_ops.RadialTable(values.to(dtype=dtype, device=device), segments.to(dtype=dtype, device=device),
                                 BOUNDARIES, intervals, 0.0, 0.0)
