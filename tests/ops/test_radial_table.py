"""The radial-table op: the table builder's accuracy (exact on cubics, within its tolerances on the real SevenNet-0
radial MLPs, refusing what it cannot meet), the reference and the Triton kernels (interpreted without CUDA,
outputs poisoned) to second order, in any walking order and outside the table's range, opcheck, bad input."""
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastmlip.ops import radial_table as table_ops  # noqa: E402
from fastmlip.reference import radial_table as ref  # noqa: E402
from helpers.derivatives import assert_close, assert_matches_reference  # noqa: E402
from helpers.tables import BOUNDARIES, random_table as table_on  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_table(width, dtype, **kwargs):
    return table_on(width, dtype, DEVICE, **kwargs)


def cubic(coefficients):
    """r -> (sum_k c_k r^k per column, its slope) for coefficients [4, W]."""
    def function(r):
        powers = torch.stack([torch.ones_like(r), r, r * r, r * r * r], dim=1)
        slopes = torch.stack([torch.zeros_like(r), torch.ones_like(r), 2 * r, 3 * r * r], dim=1)
        return powers @ coefficients, slopes @ coefficients
    return function


def lengths(dtype, n=50, seed=1):
    """Random lengths over the table and beyond it, and the edge cases: 0, each boundary, just below the end."""
    generator = torch.Generator().manual_seed(seed)
    r = torch.rand(n, generator=generator, dtype=torch.float64) * 5.6
    r = torch.cat([r, torch.tensor([0.0, 1.0, 4.5, 5.0, 4.9999, 7.0], dtype=torch.float64)])
    return r.to(dtype=dtype, device=DEVICE)


def test_a_cubic_is_tabulated_exactly_with_the_fewest_intervals():
    coefficients = torch.randn(4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    table = table_ops.tabulate(cubic(coefficients), BOUNDARIES, dtype=torch.float64, device="cpu")
    assert table.intervals == (64, 224, 32)  # the starting density: nothing to refine
    assert table.value_error < 1e-14 and table.slope_error < 1e-13
    r = lengths(torch.float64).cpu()
    r = r[r <= 5.0]
    exact, exact_slope = cubic(coefficients)(r)
    assert_close(ref.interpolate(table.values, table.segments, r), exact, 1e-13)
    assert_close(ref.interpolate_slope(table.values, table.segments, r), exact_slope, 1e-12)


def test_tabulate_refines_where_needed_and_refuses_what_it_cannot_meet():
    def wavy(r):  # large and fast in the first segment, small after
        decay = torch.exp(-8 * r)
        return (torch.stack([decay * torch.sin(40 * r), torch.cos(r)], 1),
                torch.stack([decay * (40 * torch.cos(40 * r) - 8 * torch.sin(40 * r)), -torch.sin(r)], 1))

    table = table_ops.tabulate(wavy, (0.0, 1.0, 5.0), dtype=torch.float32, device="cpu")
    assert table.intervals[0] / 1.0 > 2 * table.intervals[1] / 4.0  # per angstrom: the first segment finer
    assert table.value_error <= table_ops.VALUE_TOLERANCE and table.slope_error <= table_ops.SLOPE_TOLERANCE
    assert table.values.dtype == torch.float32 and table.segments.dtype == torch.float32

    def kinked(r):  # a slope that jumps inside a segment: no table converges
        return (r - 2.3).abs().unsqueeze(1), torch.sign(r - 2.3).unsqueeze(1)

    assert table_ops.tabulate(kinked, (0.0, 5.0), dtype=torch.float64, device="cpu", max_intervals=4096) is None
    with pytest.raises(ValueError, match="rise from 0"):
        table_ops.tabulate(kinked, (0.0, 3.0, 2.0), dtype=torch.float64, device="cpu")


def test_tables_of_sevennet_0_radial_mlps_meet_their_tolerances():
    pytest.importorskip("sevenn")
    import fastmlip

    model = fastmlip.accelerate(fastmlip.load("7net-0", device="cpu", dtype="float32", trusted=True), check=False)
    embedding = next(m for m in model.modules() if type(m).__name__ == "FastEdgeEmbedding")
    convolution = next(m for m in model.modules() if type(m).__name__ == "FastIrrepsConvolution")
    net = convolution.weight_nn
    weights = [layer.weight for layer in net.children()]
    frequencies = embedding.basis_function.coeffs
    table = table_ops.tabulate_radial_mlp(embedding.problem, frequencies, net.problem, weights, dtype=torch.float64)
    assert table.boundaries == BOUNDARIES  # XPLOR switches on at 4.5 A: a knot there
    assert sum(table.intervals) < 4000
    function = table_ops.mlp_of_basis(embedding.problem, frequencies, net.problem, weights)
    r = torch.rand(20000, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 5.0
    exact, exact_slope = function(r)
    value_error = (ref.interpolate(table.values, table.segments, r) - exact).abs().max() / exact.abs().max()
    slope_error = ((ref.interpolate_slope(table.values, table.segments, r) - exact_slope).abs().max()
                   / exact_slope.abs().max())
    assert value_error <= table_ops.VALUE_TOLERANCE and slope_error <= table_ops.SLOPE_TOLERANCE
    with torch.no_grad():  # and the function is the module's: basis x cutoff, then the MLP
        module = net(embedding.basis_function(r.float()) * embedding.cutoff_function(r.float()).unsqueeze(1))
    assert_close(module.double(), exact, 2e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("scaled", [False, True], ids=["", "scaled"])
@pytest.mark.parametrize("ordered", [False, True], ids=["edge-order", "length-order"])
@pytest.mark.parametrize("width", [40, 130])
def test_kernels_match_the_reference(width, ordered, scaled, dtype, triton_poisoned, monkeypatch):
    table = random_table(width, dtype)
    r = lengths(dtype)
    order = torch.argsort(r) if ordered else None
    inputs = [r] + ([torch.rand(r.shape, dtype=dtype, device=DEVICE) + 0.5] if scaled else [])

    def kernels(rr, *scale):
        return table_ops.radial_table(table, rr, scale[0] if scale else None, order)

    def reference(rr, *scale):
        monkeypatch.setenv("FASTMLIP_BACKEND", "reference")
        try:
            return table_ops.radial_table(table, rr, scale[0] if scale else None)
        finally:
            monkeypatch.setenv("FASTMLIP_BACKEND", "triton")

    assert_matches_reference(kernels, reference, inputs, rtol=1e-12 if dtype == torch.float64 else 2e-5)


def test_outside_the_table_values_are_the_ends_and_slopes_zero():
    table = random_table(3, torch.float64)
    r = torch.tensor([0.0, -0.5, 5.0, 6.0], dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = table_ops.radial_table(table, r)
    assert torch.equal(out[1], out[0]) and torch.equal(out[3], out[2])
    assert torch.equal(out[0], table.values[0, 0]) and torch.equal(out[2], table.values[-1, 0])
    (grad,) = torch.autograd.grad(out.sum(), [r])
    assert grad[1] == 0 and grad[3] == 0 and grad[0] != 0


def test_ops_pass_torch_opcheck():
    table = random_table(7, torch.float64)
    r = lengths(torch.float64, n=6)
    scale = torch.rand(r.shape, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(table_ops.radial_table_fwd.overload,
                          (r.clone().requires_grad_(True), table.values, table.segments, scale, None))
    grad = torch.randn(r.shape[0], 7, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(table_ops.radial_table_bwd.overload,
                          (grad, r, table.values, table.segments, scale, torch.argsort(r), True))


def test_bad_input():
    table = random_table(3, torch.float64)
    r = lengths(torch.float64, n=4)
    with pytest.raises(ValueError, match=r"lengths must be a torch.float64 tensor \[E\]"):
        table_ops.radial_table(table, r.float())
    with pytest.raises(ValueError, match=r"lengths must be"):
        table_ops.radial_table(table, r.unsqueeze(1))
    with pytest.raises(ValueError, match="row_scale must be"):
        table_ops.radial_table(table, r, r[:2])
    with pytest.raises(ValueError, match="order must be an integer permutation"):
        table_ops.radial_table(table, r, order=r)
    assert "intervals [0, 1] A: 8, [1, 4.5] A: 20, [4.5, 5] A: 6" in repr(table)
    assert math.isclose(table.r_end, 5.0)
