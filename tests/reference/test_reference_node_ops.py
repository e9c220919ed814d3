"""Node-side ops (symmetric contraction, o3.Linear, species-indexed linear, spherical harmonics) against the real
e3nn / mace modules: values, first and second derivatives, equivariance, constants taken from the module, and
bad inputs. CPU, small problems: about 40 s on 2 cores, 16 s of it torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch
from e3nn import o3

from fastmlip.descriptors import (linear_problem, species_linear_problem, spherical_harmonics_problem,
                                  symmetric_contraction_problem)
from fastmlip.ops.linear import linear, species_linear
from fastmlip.ops.spherical_harmonics import spherical_harmonics
from fastmlip.ops.symmetric_contraction import module_weights, symmetric_contraction
from fastmlip.reference import spherical_harmonics as ref_sh
from helpers.derivatives import assert_matches_reference

SymmetricContraction = pytest.importorskip("mace.modules.symmetric_contraction").SymmetricContraction


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def assert_close(actual, expected, rtol=1e-12, floor=1e-30):
    """Relative to the largest expected entry; ``floor`` bounds the scale of quantities that are exactly zero."""
    scale = expected.abs().max().clamp_min(floor)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3e} > {rtol:.1e}"


# --- spherical harmonics ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalization", ["integral", "component", "norm"])
@pytest.mark.parametrize("normalize", [True, False])
def test_spherical_harmonics_matches_e3nn_to_l6(normalization, normalize):
    torch.manual_seed(1)
    v = torch.randn(40, 3) * 1.7
    for ls in [0, 1, 2, 3, 4, 5, 6, [0, 1, 2, 3, 4, 5, 6], [3, 1, 1], "0e+1o+2e+3o", "1e+2e+3e"]:
        expected = o3.spherical_harmonics(ls, v, normalize, normalization)
        assert_close(spherical_harmonics(ls, v, normalize, normalization), expected)
        assert_close(ref_sh.spherical_harmonics(ls, v, normalize, normalization), expected)


def test_spherical_harmonics_float32_and_batch_shape():
    v = torch.randn(3, 5, 3, dtype=torch.float32)
    out = spherical_harmonics([0, 1, 2, 3, 4], v, True, "component")
    assert out.shape == (3, 5, 25) and out.dtype == torch.float32
    assert_close(out, o3.spherical_harmonics([0, 1, 2, 3, 4], v, True, "component"), rtol=2e-6)


def test_spherical_harmonics_zero_vector_like_e3nn():
    v = torch.zeros(2, 3)
    assert_close(spherical_harmonics("0e+1o+2e", v, True, "component"),
                 o3.spherical_harmonics("0e+1o+2e", v, True, "component"))


@pytest.mark.parametrize("normalize", [True, False])
def test_spherical_harmonics_derivatives(normalize):
    torch.manual_seed(2)
    v = torch.randn(12, 3)
    assert_matches_reference(lambda t: spherical_harmonics(6, t, normalize, "integral"),
                             lambda t: o3.spherical_harmonics(6, t, normalize, "integral"), [v], rtol=1e-12)
    ls = o3.Irreps.spherical_harmonics(4)
    assert_matches_reference(lambda t: spherical_harmonics(ls, t, normalize, "component"),
                             lambda t: o3.spherical_harmonics(ls, t, normalize, "component"), [v], rtol=1e-12)


def test_spherical_harmonics_equivariance():
    torch.manual_seed(3)
    irreps = o3.Irreps.spherical_harmonics(6)
    rot = o3.rand_matrix()
    v = torch.randn(10, 3)
    lhs = spherical_harmonics(irreps, v @ rot.T, True, "component")
    rhs = spherical_harmonics(irreps, v, True, "component") @ irreps.D_from_matrix(rot).T
    assert_close(lhs, rhs, rtol=1e-11)


def test_spherical_harmonics_problem_from_modules():
    from sevenn.nn.edge_embedding import SphericalEncoding

    enc = SphericalEncoding(3, parity=1, normalization="norm", normalize=False)
    problem = spherical_harmonics_problem(enc.sph)
    assert problem.ls == (0, 1, 2, 3) and problem.input_parity == 1 and not problem.normalize
    v = torch.randn(7, 3)
    assert_close(spherical_harmonics(problem.ls, v, problem.normalize, problem.normalization), enc(v))
    mace_sh = o3.SphericalHarmonics(o3.Irreps.spherical_harmonics(3), normalize=True, normalization="component")
    problem = spherical_harmonics_problem(mace_sh)
    assert_close(spherical_harmonics(problem.ls, v, problem.normalize, problem.normalization), mace_sh(v))


@pytest.mark.parametrize("args, match", [
    (("1o+1e", torch.randn(3, 3), True, "component"), "parity"),
    ((2, torch.randn(3, 2), True, "component"), r"\[\.\.\., 3\]"),
    ((2, torch.ones(3, 3, dtype=torch.int64), True, "component"), "floating"),
    ((2, torch.randn(3, 3), True, "unit"), "normalization"),
    (([], torch.randn(3, 3), True, "component"), "degree"),
    (([-1], torch.randn(3, 3), True, "component"), "degree"),
])
def test_spherical_harmonics_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        spherical_harmonics(*args)


# --- o3.Linear ---------------------------------------------------------------------------------------------------

LINEAR_CASES = [
    ("5x0e+3x1o+2x1o+4x2e", "3x0e+2x1o+3x2e+2x0o", {}),
    ("4x0e+2x1e+3x3o", "6x0e+1x1e+2x3o", {"biases": True}),
    ("3x0e+2x1o+3x0e", "2x0e+4x1o", {"path_normalization": "path"}),
    ("2x0e+3x1o", "4x0e+3x1o+2x2e", {"instructions": [(0, 0), (1, 1)]}),
]


def _linear_module(irreps_in, irreps_out, kwargs, seed):
    torch.manual_seed(seed)
    module = o3.Linear(irreps_in, irreps_out, **kwargs)
    with torch.no_grad():
        if module.bias.numel():
            module.bias.normal_()
    return module


@pytest.mark.parametrize("case", range(len(LINEAR_CASES)))
def test_linear_matches_e3nn_with_derivatives(case):
    irreps_in, irreps_out, kwargs = LINEAR_CASES[case]
    module = _linear_module(irreps_in, irreps_out, kwargs, case)
    problem = linear_problem(module)
    x = torch.randn(9, module.irreps_in.dim)
    bias = module.bias if module.bias.numel() else None
    inputs = [x, module.weight.detach()] + ([bias.detach()] if bias is not None else [])
    assert_matches_reference(lambda t, w, *b: linear(problem, t, w, *b),
                             lambda t, w, *b: module(t, w, *b), inputs, rtol=1e-12)


def test_linear_float32_batch_shape_and_equivariance():
    torch.set_default_dtype(torch.float32)
    module = _linear_module("4x0e+3x1o+2x2e", "2x0e+5x1o+2x2e", {"biases": True}, 7)
    problem = linear_problem(module)
    x = torch.randn(2, 6, module.irreps_in.dim)
    out = linear(problem, x, module.weight, module.bias)
    assert out.shape == (2, 6, module.irreps_out.dim) and out.dtype == torch.float32
    assert_close(out, module(x), rtol=2e-6)
    torch.set_default_dtype(torch.float64)
    module = module.double()
    rot = o3.rand_matrix()
    x = torch.randn(5, module.irreps_in.dim)
    d_in, d_out = module.irreps_in.D_from_matrix(rot), module.irreps_out.D_from_matrix(rot)
    lhs = linear(problem, x @ d_in.T, module.weight, module.bias)
    assert_close(lhs, linear(problem, x, module.weight, module.bias) @ d_out.T, rtol=1e-12)


def test_linear_bad_input():
    module = _linear_module("4x0e+2x1o", "3x0e+2x1o", {"biases": True}, 0)
    problem = linear_problem(module)
    x = torch.randn(3, module.irreps_in.dim)
    with pytest.raises(ValueError, match="shape"):
        linear(problem, torch.randn(3, 5), module.weight, module.bias)
    with pytest.raises(ValueError, match="weight"):
        linear(problem, x, module.weight[:-1], module.bias)
    with pytest.raises(ValueError, match="float64"):
        linear(problem, x.float(), module.weight, module.bias)
    with pytest.raises(ValueError, match="biases"):
        linear(problem, x, module.weight)


# --- species-indexed linear (FullyConnectedTensorProduct with a one-hot) ----------------------------------------

SPECIES_CASES = [
    ("4x0e+3x1o+2x2e", "5x0e", "3x0e+2x1o+2x2e"),
    ("3x0e+2x1o+2x1e+2x0o", "4x0e", "2x0e+3x1o+1x0o"),
    ("2x0e+3x1o", "2x0e+3x0e", "3x0e+2x1o"),
]


@pytest.mark.parametrize("case", range(len(SPECIES_CASES)))
def test_species_linear_matches_fctp_with_derivatives(case):
    irreps_in, irreps_species, irreps_out = SPECIES_CASES[case]
    torch.manual_seed(case)
    fctp = o3.FullyConnectedTensorProduct(irreps_in, irreps_species, irreps_out)
    problem = species_linear_problem(fctp)
    num_species = o3.Irreps(irreps_species).dim
    species = torch.randint(0, num_species, (11,))
    one_hot = torch.nn.functional.one_hot(species, num_species).double()
    x = torch.randn(11, fctp.irreps_in1.dim)
    assert_matches_reference(lambda t, w: species_linear(problem, t, species, w),
                             lambda t, w: fctp(t, one_hot, w), [x, fctp.weight.detach()], rtol=1e-12)


def test_species_linear_equivariance_and_model_modules():
    import sevenn._keys as KEY
    from sevenn.nn.self_connection import SelfConnectionIntro

    torch.manual_seed(4)
    intro = SelfConnectionIntro(o3.Irreps("4x0e+2x1e+2x2e"), o3.Irreps("3x0e"), o3.Irreps("3x0e+2x1e+2x2e"),
                                lazy_layer_instantiate=False)
    problem = species_linear_problem(intro.fc_tensor_product)
    species = torch.tensor([0, 2, 1, 2, 0])
    x = torch.randn(5, problem.dim_in)
    data = intro({KEY.NODE_FEATURE: x, KEY.NODE_ATTR: torch.nn.functional.one_hot(species, 3).double()})
    out = species_linear(problem, x, species, intro.fc_tensor_product.weight)
    assert_close(out, data[KEY.SELF_CONNECTION_TEMP])
    rot = o3.rand_matrix()
    d_in = o3.Irreps("4x0e+2x1e+2x2e").D_from_matrix(rot)
    d_out = o3.Irreps("3x0e+2x1e+2x2e").D_from_matrix(rot)
    lhs = species_linear(problem, x @ d_in.T, species, intro.fc_tensor_product.weight)
    assert_close(lhs, out @ d_out.T, rtol=1e-12)


def test_species_linear_bad_input():
    fctp = o3.FullyConnectedTensorProduct("2x0e+1x1o", "3x0e", "2x0e+1x1o")
    problem = species_linear_problem(fctp)
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        species_linear(problem, x, torch.tensor([0, 1, 3, 0]), fctp.weight)
    with pytest.raises(ValueError, match="int32/int64"):
        species_linear(problem, x, torch.tensor([0.0, 1.0, 2.0, 0.0]), fctp.weight)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        species_linear(problem, x, torch.tensor([0, 1]), fctp.weight)
    with pytest.raises(ValueError, match="one-hot"):
        species_linear_problem(o3.FullyConnectedTensorProduct("2x0e", "1x1o", "2x1o"))


# --- symmetric contraction (MACE) --------------------------------------------------------------------------------

SC_CASES = [
    (1, "3x0e+3x1o+3x2e", "3x0e+3x1o"),
    (2, "2x0e+2x1o", "2x0e+2x1e+2x2e"),
    (2, "2x0e+2x1o+2x2e+2x3o", "2x0e+2x1o+2x2e+2x3o+2x4e"),
    (3, "2x0e+2x1o+2x2e", "2x0e+2x1o"),
    (3, "2x0e+2x1o", "2x1e+2x0e+2x2e"),
]


def _mace_module(correlation, irreps_in, irreps_out, num_elements=3, seed=0, use_reduced_cg=False):
    torch.manual_seed(seed)
    module = SymmetricContraction(o3.Irreps(irreps_in), o3.Irreps(irreps_out), correlation=correlation,
                                  num_elements=num_elements, use_reduced_cg=use_reduced_cg)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.normal_()
    return module


def _mace_inputs(problem, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, problem.num_features, problem.coupling_dim, generator=gen)
    species = torch.randint(0, problem.num_elements, (n,), generator=gen)
    return x, species, torch.nn.functional.one_hot(species, problem.num_elements).to(x.dtype)


def _check_against_mace(module, rtol=1e-12):
    problem = symmetric_contraction_problem(module)
    x, species, one_hot = _mace_inputs(problem)
    weights = module_weights(problem, module)
    trainable = [i for i, w in enumerate(weights) if w.requires_grad]

    def fast(t, *ws):
        full = list(weights)
        for i, w in zip(trainable, ws):
            full[i] = w
        return symmetric_contraction(problem, t, species, full)

    def slow(t, *ws):
        names = [problem.weight_names[i] for i in trainable]
        return torch.func.functional_call(module, dict(zip(names, ws)), (t, one_hot))

    assert_matches_reference(fast, slow, [x] + [weights[i].detach() for i in trainable], rtol=rtol)
    return problem


@pytest.mark.parametrize("case", range(len(SC_CASES)))
def test_symmetric_contraction_matches_mace_with_derivatives(case):
    _check_against_mace(_mace_module(*SC_CASES[case], seed=case))


@pytest.mark.parametrize("correlation", [1, 2, 3])
def test_symmetric_contraction_reduced_cg_modules(correlation):
    """Modules built with use_reduced_cg, and a basis unlike the installed e3nn's (what cuequivariance's reduced
    basis does: fewer parameters, other columns) are reproduced from the module's buffers."""
    module = _mace_module(correlation, "2x0e+2x1o+2x2e", "2x0e+2x1o", seed=10 + correlation, use_reduced_cg=True)
    _check_against_mace(module)
    gen = torch.Generator().manual_seed(correlation)
    for contraction in module.contractions:
        u = contraction.U_matrix_3 if correlation == 3 else getattr(contraction, f"U_matrix_{correlation}")
        params = u.shape[-1]
        keep = max(1, params - 2)
        mix = torch.randn(params, keep, generator=gen)
        setattr(contraction, f"U_matrix_{correlation}", u @ mix)
        contraction.weights_max = torch.nn.Parameter(torch.randn(3, keep, 2, generator=gen))
    _check_against_mace(module)


def test_symmetric_contraction_float32():
    torch.set_default_dtype(torch.float32)
    module = _mace_module(3, "4x0e+4x1o+4x2e", "4x0e+4x1o", seed=5)
    problem = symmetric_contraction_problem(module)
    x, species, one_hot = _mace_inputs(problem, n=8)
    out = symmetric_contraction(problem, x, species, module_weights(problem, module))
    assert out.dtype == torch.float32
    assert_close(out, module(x, one_hot), rtol=1e-5)


def test_symmetric_contraction_equivariance():
    module = _mace_module(3, "2x0e+2x1o+2x2e", "2x0e+2x1o+2x2e", seed=6)
    problem = symmetric_contraction_problem(module)
    x, species, _ = _mace_inputs(problem)
    weights = module_weights(problem, module)
    rot = o3.rand_matrix()
    d_coupling = o3.Irreps("0e+1o+2e").D_from_matrix(rot)
    d_out = module.irreps_out.D_from_matrix(rot)
    lhs = symmetric_contraction(problem, x @ d_coupling.T, species, weights)
    assert_close(lhs, symmetric_contraction(problem, x, species, weights) @ d_out.T, rtol=1e-11)


def test_symmetric_contraction_constants_come_from_the_module():
    """An e3nn-0.4.4-trained module carries U matrices with other signs; they must be reproduced, not rebuilt."""
    module = _mace_module(3, "2x0e+2x1o+2x2e", "2x0e+2x1o", seed=8)
    fresh = symmetric_contraction_problem(module)
    gen = torch.Generator().manual_seed(8)
    for contraction in module.contractions:
        for nu in (2, 3):
            u = getattr(contraction, f"U_matrix_{nu}")
            signs = torch.where(torch.rand(u.shape[-1], generator=gen) < 0.5, -1.0, 1.0)
            signs[0] = -1.0
            setattr(contraction, f"U_matrix_{nu}", u * signs)
    flipped = _check_against_mace(module)
    x, species, one_hot = _mace_inputs(flipped)
    weights = module_weights(flipped, module)
    assert flipped.key != fresh.key
    assert (symmetric_contraction(fresh, x, species, weights) - module(x, one_hot)).abs().max() > 1e-3


def test_symmetric_contraction_bad_input():
    module = _mace_module(2, "2x0e+2x1o", "2x0e+2x1o")
    problem = symmetric_contraction_problem(module)
    x, species, _ = _mace_inputs(problem, n=4)
    weights = module_weights(problem, module)
    with pytest.raises(ValueError, match=r"\[N, 2, 4\]"):
        symmetric_contraction(problem, x.flatten(1), species, weights)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        symmetric_contraction(problem, x, torch.tensor([0, 1, 2, 3]), weights)
    with pytest.raises(ValueError, match="weight tensors"):
        symmetric_contraction(problem, x, species, weights[:-1])
    with pytest.raises(ValueError, match="is torch.float32"):
        symmetric_contraction(problem, x, species, [w.float() for w in weights])


def test_forced_triton_backend_keeps_the_reference_for_ops_without_a_kernel(monkeypatch):
    from fastmlip.descriptors import make_tensor_product_problem
    from fastmlip.ops.tensor_product import tensor_product

    problem = make_tensor_product_problem("2x0e+2x1o", "2x0e", "2x1o", [(1, 0, 0, "uvu", True)])
    x1, x2, w = torch.randn(3, 8), torch.randn(3, 2), torch.randn(3, problem.weight_numel)
    expected = tensor_product(problem, x1, x2, w)
    monkeypatch.setenv("FASTMLIP_BACKEND", "triton")
    assert torch.equal(tensor_product(problem, x1, x2, w), expected)


def test_ops_pass_torch_opcheck():
    """Schemas, fake (meta) kernels, autograd registration and tracing (torch.compile's path) are consistent."""
    from fastmlip.ops import registry
    from fastmlip.ops.linear import linear_fwd, species_linear_fwd
    from fastmlip.ops.spherical_harmonics import spherical_harmonics_fwd
    from fastmlip.ops.symmetric_contraction import symmetric_contraction_fwd

    lin = o3.Linear("3x0e+2x1o", "2x0e+2x1o")
    fctp = o3.FullyConnectedTensorProduct("3x0e+2x1o", "3x0e", "2x0e+2x1o")
    module = _mace_module(3, "2x0e+2x1o", "2x0e+2x1o")
    sc = symmetric_contraction_problem(module)
    x = torch.randn(4, 9, requires_grad=True)
    species = torch.tensor([0, 2, 1, 1])
    cases = [
        (linear_fwd, (x, lin.weight, registry.register(linear_problem(lin)))),
        (species_linear_fwd, (x, species, fctp.weight, registry.register(species_linear_problem(fctp)))),
        (spherical_harmonics_fwd, (torch.randn(5, 3, requires_grad=True), 4, True)),
        (symmetric_contraction_fwd, (torch.randn(4, 2, 4, requires_grad=True), species, module_weights(sc, module),
                                     registry.register(sc))),
    ]
    for op, args in cases:
        results = torch.library.opcheck(op.overload, args)
        assert all(v == "SUCCESS" for v in results.values()), (op, results)
