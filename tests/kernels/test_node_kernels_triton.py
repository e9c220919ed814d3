"""Triton node kernels (symmetric contraction, species-indexed linear, spherical harmonics) against mace / e3nn.

Values, first derivatives (the kernels' backward) and second derivatives (through the ops' autograd), float32 and
float64. Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported), so CI executes the very kernel code the GPU compiles; problems are tiny because the interpreter is
slow (this file takes about 1.5 minutes on 2 cores). ``gpu`` tests run MACE-MP-0-sized problems on CUDA.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from e3nn import o3  # noqa: E402

from fastmlip.descriptors import species_linear_problem, symmetric_contraction_problem  # noqa: E402
from fastmlip.kernels import launch  # noqa: E402
from fastmlip.kernels import symmetric_contraction as sc_kernels  # noqa: E402
from fastmlip.ops.linear import species_linear  # noqa: E402
from fastmlip.ops.spherical_harmonics import spherical_harmonics  # noqa: E402
from fastmlip.ops.symmetric_contraction import module_weights, symmetric_contraction  # noqa: E402
from helpers.derivatives import assert_close, assert_matches_reference  # noqa: E402

SymmetricContraction = pytest.importorskip("mace.modules.symmetric_contraction").SymmetricContraction

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = {torch.float32: 2e-5, torch.float64: 1e-11}


pytestmark = pytest.mark.usefixtures("triton_poisoned")  # every test runs the kernels, outputs poisoned


# --- symmetric contraction --------------------------------------------------------------------------------------

SC_CASES = {
    "corr1": (1, "2x0e+2x1o+2x2e", "2x0e+2x1o", False),
    "corr2": (2, "2x0e+2x1o", "2x0e+2x1e+2x2e", False),
    "corr3": (3, "2x0e+2x1o", "2x0e+2x1o", False),
    "corr3-reduced-cg": (3, "2x0e+2x1o", "2x0e+2x1o", True),
}


def mace_module(correlation, irreps_in, irreps_out, reduced, dtype, num_elements=4, seed=0):
    torch.manual_seed(seed)
    module = SymmetricContraction(o3.Irreps(irreps_in), o3.Irreps(irreps_out), correlation=correlation,
                                  num_elements=num_elements, use_reduced_cg=reduced)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module.to(device=DEVICE, dtype=dtype)


def species_out_of_order(n, num_species, seed, missing=()):
    gen = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([s for s in range(num_species) if s not in missing])
    return allowed[torch.randint(0, len(allowed), (n,), generator=gen)].to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(SC_CASES))
def test_symmetric_contraction_kernels_match_mace(case, dtype):
    module = mace_module(*SC_CASES[case], dtype, seed=len(case))
    problem = symmetric_contraction_problem(module)
    n = 11
    species = species_out_of_order(n, problem.num_elements, seed=3, missing=(1,))
    one_hot = torch.nn.functional.one_hot(species, problem.num_elements).to(dtype)
    x = torch.randn(n, problem.num_features, problem.coupling_dim, dtype=dtype).to(DEVICE)
    weights = [w.detach() for w in module_weights(problem, module)]

    def fast(t, *ws):
        return symmetric_contraction(problem, t, species, ws)

    def slow(t, *ws):
        return torch.func.functional_call(module, dict(zip(problem.weight_names, ws)), (t, one_hot))

    assert_matches_reference(fast, slow, [x, *weights], rtol=RTOL[dtype])


@pytest.mark.parametrize("piece_terms", [1, 5])
def test_symmetric_contraction_in_pieces_matches_mace(piece_terms, monkeypatch):
    """Polynomials cut into many kernels (each piece adds to what earlier pieces stored) give the same values
    and derivatives as one kernel per contraction."""
    monkeypatch.setattr(sc_kernels, "PIECE_TERMS", piece_terms)
    module = mace_module(*SC_CASES["corr3"], torch.float64, seed=5)
    problem = symmetric_contraction_problem(module)
    assert all(len(sc_kernels.pieces(problem, i)) > 1 for i in range(len(problem.contractions)))
    n = 7
    species = species_out_of_order(n, problem.num_elements, seed=4)
    one_hot = torch.nn.functional.one_hot(species, problem.num_elements).to(torch.float64)
    x = torch.randn(n, problem.num_features, problem.coupling_dim, dtype=torch.float64).to(DEVICE)
    weights = [w.detach() for w in module_weights(problem, module)]

    def fast(t, *ws):
        return symmetric_contraction(problem, t, species, ws)

    def slow(t, *ws):
        return torch.func.functional_call(module, dict(zip(problem.weight_names, ws)), (t, one_hot))

    assert_matches_reference(fast, slow, [x, *weights], rtol=RTOL[torch.float64])


def test_symmetric_contraction_kernel_empty_and_single_species():
    module = mace_module(2, "2x0e+2x1o", "2x0e", False, torch.float64)
    problem = symmetric_contraction_problem(module)
    weights = module_weights(problem, module)
    empty = symmetric_contraction(problem, torch.zeros(0, 2, 4, dtype=torch.float64, device=DEVICE),
                                  torch.zeros(0, dtype=torch.int64, device=DEVICE), weights)
    assert empty.shape == (0, problem.dim_out)
    x = torch.randn(20, 2, 4, dtype=torch.float64, device=DEVICE)  # more nodes of one species than one chunk
    species = torch.full((20,), 2, device=DEVICE)
    one_hot = torch.nn.functional.one_hot(species, problem.num_elements).double()
    assert_close(symmetric_contraction(problem, x, species, weights), module(x, one_hot), 1e-12, "value")


def test_species_chunks_cover_every_node_once():
    species = torch.tensor([3, 0, 3, 3, 1, 3, 0, 3, 3])
    order, sorted_species, starts = launch.species_chunks(species, 5, chunk=2)
    assert torch.equal(species[order], sorted_species)
    starts = starts.tolist()
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] == len(species)
    for a, b in zip(starts, starts[1:]):
        assert b - a <= 2 and len(set(sorted_species[a:b].tolist())) <= 1


# --- species-indexed linear -------------------------------------------------------------------------------------

SPECIES_CASES = {
    "mace-skip": ("4x0e+3x1o+2x2e", "5x0e", "3x0e+2x1o+2x2e"),
    "parities": ("3x0e+2x1o+2x1e+2x0o", "4x0e", "2x0e+3x1o+1x0o"),
    "split-species": ("2x0e+3x1o", "2x0e+3x0e", "3x0e+2x1o"),
    "wide": ("20x0e+18x1o", "3x0e", "17x0e+20x1o"),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(SPECIES_CASES))
def test_species_linear_kernels_match_fctp(case, dtype):
    irreps_in, irreps_species, irreps_out = SPECIES_CASES[case]
    torch.manual_seed(len(case))
    fctp = o3.FullyConnectedTensorProduct(irreps_in, irreps_species, irreps_out).to(device=DEVICE, dtype=dtype)
    problem = species_linear_problem(fctp)
    n = 10
    species = species_out_of_order(n, problem.num_species, seed=5, missing=(0,))
    one_hot = torch.nn.functional.one_hot(species, problem.num_species).to(dtype)
    x = torch.randn(n, problem.dim_in, dtype=dtype).to(DEVICE)
    assert_matches_reference(lambda t, w: species_linear(problem, t, species, w),
                             lambda t, w: fctp(t, one_hot, w), [x, fctp.weight.detach()], rtol=RTOL[dtype])


# --- spherical harmonics ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("ls, normalize, normalization", [
    (6, True, "integral"),
    ([0, 1, 2, 3, 4, 5, 6], False, "component"),
    ("0e+1o+2e+3o", True, "norm"),
    ([2, 0, 1], True, "component"),
])
def test_spherical_harmonics_kernels_match_e3nn(ls, normalize, normalization, dtype):
    vectors = (torch.randn(37, 3, generator=torch.Generator().manual_seed(2), dtype=dtype) * 1.5).to(DEVICE)
    assert_matches_reference(lambda v: spherical_harmonics(ls, v, normalize, normalization),
                             lambda v: o3.spherical_harmonics(ls, v, normalize, normalization), [vectors],
                             rtol=RTOL[dtype])


def test_spherical_harmonics_kernel_degree_zero_and_empty_input():
    vectors = torch.randn(5, 3, dtype=torch.float64, device=DEVICE)
    assert_close(spherical_harmonics([0], vectors, True, "integral"),
                 o3.spherical_harmonics([0], vectors, True, "integral"), 1e-15, "Y^0")
    out = spherical_harmonics([0, 1, 2, 3], torch.zeros(0, 3, device=DEVICE), True, "component")
    assert out.shape == (0, 16)


def test_spherical_harmonics_kernel_normalises_zero_and_tiny_vectors_like_e3nn():
    """The kernel normalises inside: at |v| <= 1e-12 F.normalize clamps the norm, so the gradient is g / eps."""
    vectors = torch.tensor([[0.0, 0.0, 0.0], [1e-14, -2e-14, 0.0], [0.3, -1.2, 2.0]], dtype=torch.float64,
                           device=DEVICE)
    ours = vectors.clone().requires_grad_(True)
    theirs = vectors.clone().requires_grad_(True)
    a = spherical_harmonics([0, 1, 2], ours, True, "component")
    b = o3.spherical_harmonics([0, 1, 2], theirs, True, "component")
    assert_close(a, b, 1e-14, "value")
    probe = torch.linspace(-1, 1, a.numel(), dtype=a.dtype, device=DEVICE).reshape(a.shape)
    (ga,) = torch.autograd.grad(a, ours, probe)
    (gb,) = torch.autograd.grad(b, theirs, probe)
    assert_close(ga, gb, 1e-14, "gradient")


# --- MACE-MP-0 sizes on the GPU ---------------------------------------------------------------------------------

MACE_MP0_OUTPUTS = {"small": "128x0e", "medium": "128x0e+128x1o", "large": "128x0e+128x1o+128x2e"}


def _with_backend(monkeypatch, backend, fn):
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    return fn()


def _first_order(fn, inputs, probe_seed=0):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    probe = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(probe_seed),
                        dtype=out.dtype, device=out.device)
    return [out.detach(), *torch.autograd.grad(out, leaves, probe)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("size", list(MACE_MP0_OUTPUTS))
def test_mace_mp0_sizes_on_gpu(size, dtype, monkeypatch):
    hidden = MACE_MP0_OUTPUTS[size]
    module = mace_module(3, "128x0e+128x1o+128x2e+128x3o", hidden, False, dtype, num_elements=89)
    problem = symmetric_contraction_problem(module)
    n = 1000
    species = species_out_of_order(n, 89, seed=7)
    x = torch.randn(n, 128, 16, dtype=dtype, device=DEVICE)
    weights = [w.detach() for w in module_weights(problem, module)]
    fn = lambda t, *ws: symmetric_contraction(problem, t, species, ws)  # noqa: E731
    fast = _with_backend(monkeypatch, "triton", lambda: _first_order(fn, [x, *weights]))
    slow = _with_backend(monkeypatch, "reference", lambda: _first_order(fn, [x, *weights]))
    for a, b in zip(fast, slow):
        assert_close(a, b, RTOL[dtype], f"symmetric contraction {size}")

    fctp = o3.FullyConnectedTensorProduct(hidden, "89x0e", hidden).to(device=DEVICE, dtype=dtype)
    sl = species_linear_problem(fctp)
    feats = torch.randn(n, sl.dim_in, dtype=dtype, device=DEVICE)
    fn = lambda t, w: species_linear(sl, t, species, w)  # noqa: E731
    fast = _with_backend(monkeypatch, "triton", lambda: _first_order(fn, [feats, fctp.weight]))
    slow = _with_backend(monkeypatch, "reference", lambda: _first_order(fn, [feats, fctp.weight]))
    for a, b in zip(fast, slow):
        assert_close(a, b, RTOL[dtype], f"species linear {size}")

    vectors = torch.randn(40 * n, 3, dtype=dtype, device=DEVICE)
    fn = lambda v: spherical_harmonics(3, v, True, "component")  # noqa: E731
    fast = _with_backend(monkeypatch, "triton", lambda: _first_order(fn, [vectors]))
    slow = _with_backend(monkeypatch, "reference", lambda: _first_order(fn, [vectors]))
    for a, b in zip(fast, slow):
        assert_close(a, b, RTOL[dtype], "spherical harmonics")
