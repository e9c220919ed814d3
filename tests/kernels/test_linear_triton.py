"""The Triton ``o3.Linear`` kernels (``kernels/linear.py``) against e3nn's module and the plain-torch reference.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), so CI
executes the very kernel code the GPU compiles; problems are tiny because the interpreter is slow. Outputs start as
NaN (``launch.POISON_OUTPUTS``), so any element a kernel fails to write shows. ``gpu`` tests run MD-sized problems.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from e3nn import o3  # noqa: E402

from fastmlip.descriptors import linear_problem  # noqa: E402
from fastmlip.kernels import linear as kernels  # noqa: E402
from fastmlip.kernels.launch import use_settings  # noqa: E402
from fastmlip.ops import registry  # noqa: E402
from fastmlip.ops.linear import linear, linear_bwd, linear_fwd  # noqa: E402
from fastmlip.reference import linear as ref  # noqa: E402
from helpers.derivatives import assert_matches_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}

CASES = {
    "basic": ("4x0e+3x1o+2x2e", "5x0e+2x1o+3x2e", {}),
    "biases": ("4x0e+3x1o+2x2e", "5x0e+2x1o+3x2e", {"biases": True}),
    "unreached-output": ("4x0e+3x1o+2x2e", "5x0e+2x1o+3x2e+2x1e", {"biases": True}),
    "one-scalar": ("1x0e", "1x0e", {"biases": True}),
    "scalar-to-unreached": ("1x0e", "3x0e+1x1o", {}),
    "two-paths-into-one": ("3x0e+2x1o+3x0e", "2x0e+4x1o", {"path_normalization": "path"}),
    "instruction-subset": ("2x0e+3x1o", "4x0e+3x1o+2x2e", {"instructions": [(0, 0), (1, 1)]}),
    # neighbouring inputs of one kind into one output (MACE's interaction linear): merged into one path
    "stacked-inputs": ("3x0e+3x0e+2x1o+2x1o+2x1o+2x2e", "4x0e+2x1o+3x2e", {"biases": True}),
    # several channel blocks along both the input (k) and output (j) multiplicities, l = 4
    "wide-l4": ("40x0e+2x4e", "70x0e+3x4e", {"biases": True}),
}


pytestmark = pytest.mark.usefixtures("triton_poisoned")  # every test runs the kernels, outputs poisoned


def make_module(name, seed=0):
    irreps_in, irreps_out, kwargs = CASES[name]
    torch.manual_seed(seed)
    module = o3.Linear(irreps_in, irreps_out, **kwargs).double()
    with torch.no_grad():
        module.bias.normal_()
    return module


def assert_close(actual, expected, rtol):
    assert actual.shape == expected.shape and not actual.isnan().any()
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} x {scale:.3g}"


def value_and_grads(fn, x, weight, bias, probe):
    """fn's output and the gradients of <probe, output> wrt x, weight and (when given) bias."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    out = fn(*inputs)
    return [out] + list(torch.autograd.grad(out, inputs, probe))


# float32 tile variants: the defaults, one tile per irrep component (the former defaults), narrow stacked tiles,
# wide K slices
VARIANTS = {"landed": {}, "per-component": dict(linear_stack=0, linear_k=16, linear_block=32),
            "stacked": dict(linear_stack=1, linear_rows=8, linear_k=32, linear_block=16),
            "wide": dict(linear_rows=32, linear_k=128, linear_block=64, linear_warps=8)}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype, variant", [(torch.float64, "landed")] + [(torch.float32, v) for v in VARIANTS],
                         ids=lambda p: str(p).replace("torch.", ""))
def test_matches_e3nn(name, dtype, variant):
    """float64 always uses its broadcast-product tiles; the tile variants are float32 settings."""
    with use_settings(**VARIANTS[variant]):
        check_against_e3nn(name, dtype)


def check_against_e3nn(name, dtype):
    module = make_module(name)
    problem = linear_problem(module)
    bias = module.bias.detach() if problem.bias_numel else None
    torch.manual_seed(1)
    x, probe = torch.randn(37, problem.dim_in, dtype=torch.float64), torch.randn(37, problem.dim_out).double()
    expected = value_and_grads(module, x, module.weight.detach(), bias, probe)
    cast = [t.to(dtype) if t is not None else None for t in (x, module.weight.detach(), bias)]
    actual = value_and_grads(lambda *t: linear(problem, *t), *cast, probe.to(dtype))
    for a, e in zip(actual, expected):
        assert a.dtype == dtype
        assert_close(a, e, TOL[dtype])


@pytest.mark.parametrize("name", ["unreached-output", "wide-l4"])
def test_weight_gradient_over_several_splits(name, monkeypatch):
    """Rows beyond ROWS_PER_SPLIT go to separate partial sums (the last one partial) that torch adds up."""
    monkeypatch.setattr(kernels, "ROWS_PER_SPLIT", 16)
    module = make_module(name)
    problem = linear_problem(module)
    x, grad_out = torch.randn(40, problem.dim_in).double(), torch.randn(40, problem.dim_out).double()
    grads = kernels.backward(problem, grad_out, x, module.weight.detach(), True, True, True)
    ref_x, ref_w = ref.linear_backward(problem, grad_out, x, module.weight.detach())
    assert_close(grads[0], ref_x, 1e-12)
    assert_close(grads[1], ref_w, 1e-12)
    bias = module.bias.detach().clone().requires_grad_(True)
    (module(x, module.weight.detach(), bias) * grad_out).sum().backward()
    assert_close(grads[2], bias.grad, 1e-12)
    again = kernels.backward(problem, grad_out, x, module.weight.detach(), True, True, True)
    assert all(torch.equal(a, b) for a, b in zip(grads, again)), "the backward must be deterministic"


def test_every_gradient_subset_and_zero_rows():
    module = make_module("unreached-output")
    problem = linear_problem(module)
    weight = module.weight.detach()
    x, grad_out = torch.randn(5, problem.dim_in).double(), torch.randn(5, problem.dim_out).double()
    full = kernels.backward(problem, grad_out, x, weight, True, True, True)
    for wants in [(True, False, False), (False, True, False), (False, False, True), (True, False, True)]:
        got = kernels.backward(problem, grad_out, x, weight, *wants)
        for wanted, g, f in zip(wants, got, full):
            assert torch.equal(g, f) if wanted else g.numel() == 0
    empty = torch.empty(0, problem.dim_in, dtype=torch.float64)
    out = linear(problem, empty, weight, module.bias.detach())
    assert out.shape == (0, problem.dim_out)
    grads = kernels.backward(problem, out, empty, weight, True, True, True)
    assert grads[0].shape == (0, problem.dim_in)
    assert torch.equal(grads[1], torch.zeros_like(weight))
    assert torch.equal(grads[2], torch.zeros(problem.bias_numel, dtype=torch.float64))


def test_double_backward_gradgradcheck():
    """Every first and second derivative, bias included, against finite differences (fast mode: the interpreter
    is slow, and one random direction per check exercises every op of the autograd chain)."""
    module = make_module("one-scalar")
    problem = linear_problem(module)
    inputs = [torch.randn(2, problem.dim_in).double(), module.weight.detach(), module.bias.detach()]
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    fn = lambda *t: linear(problem, *t)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


def test_second_derivatives_match_e3nn():
    """Force-training shape: the double backward of d out / d x, through the backward op's autograd."""
    module = make_module("biases")
    problem = linear_problem(module)
    torch.manual_seed(2)
    inputs = [torch.randn(6, problem.dim_in).double(), module.weight.detach(), module.bias.detach()]
    assert_matches_reference(lambda *t: linear(problem, *t), module, inputs, rtol=1e-12)


def test_triton_backend_never_calls_the_reference(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran on the triton backend")

    monkeypatch.setattr(ref, "linear", fail)
    monkeypatch.setattr(ref, "linear_backward", fail)
    module = make_module("biases")
    problem = linear_problem(module)
    inputs = [t.detach().clone().requires_grad_(True)
              for t in (torch.randn(4, problem.dim_in).double(), module.weight, module.bias)]
    (gx,) = torch.autograd.grad(linear(problem, *inputs).square().sum(), inputs[0], create_graph=True)
    torch.autograd.grad(gx.square().sum(), inputs)


@pytest.mark.parametrize("with_bias", [False, True])
def test_ops_pass_torch_opcheck(with_bias):
    module = make_module("biases")
    key = registry.register(linear_problem(module))
    x = torch.randn(3, module.irreps_in.dim, dtype=torch.float64, requires_grad=True)
    weight, bias = module.weight.detach().clone().requires_grad_(True), module.bias.detach().clone()
    cases = [(linear_fwd, (x, weight, key) + ((bias.requires_grad_(True),) if with_bias else ())),
             (linear_bwd, (torch.randn(3, module.irreps_out.dim).double(), x, weight, key, True, True, with_bias))]
    for op, args in cases:
        results = torch.library.opcheck(op.overload, args)
        assert all(v == "SUCCESS" for v in results.values()), (op, results)


GPU_IRREPS = ("128x0e+128x1o+128x2e+128x3o", "128x0e+128x1o+128x2e+128x3o")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("biases", [False, True])
def test_gpu_size_against_reference(dtype, biases):
    torch.manual_seed(0)
    module = o3.Linear(*GPU_IRREPS, biases=biases).to(DEVICE)
    problem = linear_problem(module)
    weight = module.weight.detach().double()
    bias = torch.randn(problem.bias_numel, dtype=torch.float64, device=DEVICE) if biases else None
    x = torch.randn(4000, problem.dim_in, dtype=torch.float64, device=DEVICE)
    grad_out = torch.randn(4000, problem.dim_out, dtype=torch.float64, device=DEVICE)
    expected_out = ref.linear(problem, x, weight, bias)
    expected_x, expected_w = ref.linear_backward(problem, grad_out, x, weight)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    out = kernels.forward(problem, cast(x), cast(weight), cast(bias))
    grad_x, grad_w, grad_b = kernels.backward(problem, cast(grad_out), cast(x), cast(weight), True, True, biases)
    assert_close(out, expected_out, TOL[dtype])
    assert_close(grad_x, expected_x, TOL[dtype])
    assert_close(grad_w, expected_w, TOL[dtype])
    if biases:
        assert_close(grad_b, grad_out[:, :128].sum(0), TOL[dtype])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_frozen_weights_keep_no_input_for_the_backward(backend, monkeypatch):
    """With weights that want no gradient (MD) the op keeps a stand-in of x that holds no memory, and the input
    gradient, first and second order, is unchanged."""
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    module = make_module("biases")
    problem = linear_problem(module)
    weight, bias = module.weight.detach().to(DEVICE), module.bias.detach().to(DEVICE)
    x = torch.randn(37, problem.dim_in, dtype=torch.float64, device=DEVICE, requires_grad=True)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        out = linear(problem, x, weight, bias)
    inputs_kept = [t for t in kept if t.shape == x.shape]
    assert inputs_kept and all(t.untyped_storage().nbytes() <= 8 for t in inputs_kept)
    probe = torch.randn_like(out)
    (grad_x,) = torch.autograd.grad(out, x, probe)
    expected = value_and_grads(module.to(DEVICE), x.detach(), weight, bias, probe)[1]
    assert_close(grad_x, expected, TOL[torch.float64])
