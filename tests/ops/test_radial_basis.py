"""The radial-basis op (Bessel basis x cutoff envelope) against the frameworks' own modules: SevenNet's BesselBasis
with PolynomialCutoff and XPLORCutoff, MACE's RadialEmbeddingBlock (polynomial cutoff, zero beyond r_max); the
reference and the Triton kernels (interpreted without CUDA, outputs poisoned), values, d/dr, the trainable
frequencies' gradient, second derivatives, opcheck, the module swaps, bad input."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastmlip.descriptors import Envelope, radial_basis_problem  # noqa: E402
from fastmlip.ops import radial_basis as basis_ops  # noqa: E402
from fastmlip.ops import registry  # noqa: E402
from helpers.derivatives import assert_matches_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 3e-6}


def sevenn_case(cutoff_kind, dtype):
    """(problem, frequencies, the framework's function r -> features) for a SevenNet edge embedding."""
    sevenn_embedding = pytest.importorskip("sevenn.nn.edge_embedding")
    basis = sevenn_embedding.BesselBasis(5.0, 8).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        basis.coeffs.add_(0.05 * torch.arange(8, dtype=dtype, device=DEVICE))  # trained-looking frequencies
    if cutoff_kind == "polynomial":
        cutoff = sevenn_embedding.PolynomialCutoff(5.0, 6)
        envelope = Envelope("polynomial", 5.0, p=6)
    else:
        cutoff = sevenn_embedding.XPLORCutoff(5.0, 4.5)
        envelope = Envelope("xplor", 5.0, r_on=4.5)
    problem = radial_basis_problem(8, basis.prefactor, envelope)
    return problem, basis.coeffs, lambda r, w: basis.prefactor * torch.sin(w * r.unsqueeze(-1)) / r.unsqueeze(-1) \
        * cutoff(r).unsqueeze(-1)


def mace_case(dtype):
    pytest.importorskip("mace.modules")
    from mace.modules.blocks import RadialEmbeddingBlock

    block = RadialEmbeddingBlock(r_max=5.0, num_bessel=8, num_polynomial_cutoff=5).to(device=DEVICE, dtype=dtype)
    problem = radial_basis_problem(8, float(block.bessel_fn.prefactor), Envelope("polynomial", 5.0, p=5,
                                                                                     hard=True))

    def framework(r, w):
        numerator = torch.sin(w * r.unsqueeze(-1))
        radial = block.bessel_fn.prefactor * (numerator / r.unsqueeze(-1))
        return radial * block.cutoff_fn(r.unsqueeze(-1))

    return problem, block.bessel_fn.bessel_weights, framework


CASES = {"sevenn-polynomial": lambda dt: sevenn_case("polynomial", dt), "sevenn-xplor": lambda dt: sevenn_case(
    "xplor", dt), "mace": mace_case}


def lengths(dtype, n=61):
    """Edge lengths across the whole range: short, inside XPLOR's switching zone, at and beyond the cutoff."""
    r = torch.linspace(0.4, 5.6, n, dtype=torch.float64)
    r = torch.cat([r, torch.tensor([4.5, 5.0, 4.999999])]).to(dtype)
    return r.to(DEVICE)


def derivatives(function, r, w, seed=0):
    """(value, d r, d w) of <g, function(r, w)> with a fixed random g."""
    r, w = r.clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    value = function(r, w)
    g = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(
        device=DEVICE, dtype=value.dtype)  # the same g in every dtype
    return (value.detach(), *torch.autograd.grad((value * g).sum(), [r, w]))


def assert_close(a, b, dtype, what):
    err = float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_the_frameworks(case):
    problem, w, framework = CASES[case](torch.float64)
    r = lengths(torch.float64)
    expected = derivatives(framework, r, w)
    got = derivatives(lambda rr, ww: basis_ops.radial_basis(problem, rr, ww), r, w)
    for what, a, b in zip(("value", "d r", "d frequencies"), got, expected):
        assert_close(a, b, torch.float64, what)
    if problem.envelope.hard:
        assert torch.all(got[0][r >= 5.0] == 0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_the_frameworks(case, dtype, triton_poisoned):
    problem, w, framework = CASES[case](dtype)
    r = lengths(dtype)
    got = derivatives(lambda rr, ww: basis_ops.radial_basis(problem, rr, ww), r, w)
    problem64, w64, framework64 = CASES[case](torch.float64)
    expected = derivatives(framework64, r.double(), w.double())
    for what, a, b in zip(("value", "d r", "d frequencies"), got, expected):
        assert torch.isfinite(a).all(), what
        assert_close(a, b, dtype, what)


def test_kernels_without_edges(triton_poisoned):
    problem, w, _ = CASES["mace"](torch.float64)
    r = torch.zeros(0, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = basis_ops.radial_basis(problem, r, w)
    assert out.shape == (0, 8)
    (grad,) = torch.autograd.grad(out.sum(), [r])
    assert grad.shape == (0,)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", ["sevenn-xplor", "mace"])
def test_second_derivatives(case, backend, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path_factory.getbasetemp() / "fastmlip-cache"))
    problem, w, framework = CASES[case](torch.float64)
    r = lengths(torch.float64, n=13)
    assert_matches_reference(lambda rr, ww: basis_ops.radial_basis(problem, rr, ww), framework, [r, w], rtol=1e-12)


def test_ops_pass_torch_opcheck():
    problem, w, _ = CASES["sevenn-xplor"](torch.float64)
    key = registry.register(problem)
    r = lengths(torch.float64, n=6)
    torch.library.opcheck(basis_ops.radial_basis_fwd.overload, (r.clone().requires_grad_(True), w.detach().clone()
                                                       .requires_grad_(True), key))
    torch.library.opcheck(basis_ops.radial_basis_bwd.overload, (torch.randn(r.shape[0], 8, dtype=torch.float64,
                                                                   device=DEVICE), r, w.detach(), key))


def test_bad_input_and_problems():
    problem, w, _ = CASES["mace"](torch.float64)
    with pytest.raises(ValueError, match=r"lengths must be a floating tensor \[E\]"):
        basis_ops.radial_basis(problem, torch.ones(3, 1, dtype=torch.float64), w)
    with pytest.raises(ValueError, match=r"frequencies must be \[8\]"):
        basis_ops.radial_basis(problem, torch.ones(3, dtype=torch.float64), w[:4])
    with pytest.raises(ValueError, match="frequencies are torch.float64"):
        basis_ops.radial_basis(problem, torch.ones(3, dtype=torch.float32, device=DEVICE), w)
    with pytest.raises(ValueError, match="integer p >= 1"):
        radial_basis_problem(8, 1.0, Envelope("polynomial", 5.0, p=0))
    with pytest.raises(ValueError, match="r_on < cutoff"):
        radial_basis_problem(8, 1.0, Envelope("xplor", 5.0, r_on=5.5))


def test_model_swaps_keep_state_dicts():
    pytest.importorskip("mace.modules")
    from mace.modules.blocks import RadialEmbeddingBlock

    from fastmlip.patches import mace as mace_patch

    block = RadialEmbeddingBlock(r_max=5.0, num_bessel=8, num_polynomial_cutoff=5).double()
    fast = mace_patch.FastRadialEmbedding(block)
    assert list(fast.state_dict()) == list(block.state_dict())
    r = lengths(torch.float64).cpu().unsqueeze(1)
    expected, cutoff = block(r, None, None, None)
    got, none = fast(r)
    assert cutoff is None and none is None
    assert_close(got, expected, torch.float64, "MACE radial embedding")
    transformed = RadialEmbeddingBlock(r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, distance_transform="Agnesi")
    with pytest.raises(ValueError, match="distance transform"):
        mace_patch.FastRadialEmbedding(transformed)
