"""The radial-MLP op against e3nn's ``nn.FullyConnectedNet``: the problem read from the module, the reference and
the Triton kernels (interpreted without CUDA, outputs poisoned with NaN), values, gradients of x / row scale /
weights, second derivatives, torch.library.opcheck, the modules of SevenNet-0 and MACE, and bad input."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from e3nn import nn as e3nn_nn  # noqa: E402

from fastmlip.descriptors import radial_mlp_problem  # noqa: E402
from fastmlip.kernels import launch  # noqa: E402
from fastmlip.kernels import radial_mlp as mlp_kernels  # noqa: E402
from fastmlip.ops import radial_mlp as mlp_ops  # noqa: E402
from fastmlip.ops import registry  # noqa: E402
from fastmlip.patches import e3nn_modules, swaps  # noqa: E402
from fastmlip.reference import radial_mlp as ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}

# name: (widths, activation, variance_out, out_act); SevenNet-0 and MACE-MP-0 shapes, odd widths, other activations
NETS = {
    "sevennet0": ([8, 64, 64, 152], F.silu, 1, False),
    "mace-mp0": ([8, 64, 64, 64, 256], F.silu, 1, False),
    "odd-widths": ([5, 24, 37], torch.tanh, 2, False),
    "out-act": ([3, 17, 70], torch.sigmoid, 1, True),
    "linear": ([6, 9], None, 1, False),
}


def build(name, dtype=torch.float64, seed=0):
    widths, act, variance_out, out_act = NETS[name]
    torch.manual_seed(seed)
    return e3nn_nn.FullyConnectedNet(widths, act, variance_out=variance_out, out_act=out_act).to(
        device=DEVICE, dtype=dtype)


def weights_of(net):
    return [layer.weight for layer in net.children()]


def data(net, dtype, n=45, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, net.hs[0], generator=generator, dtype=dtype).to(DEVICE)
    scale = torch.rand(n, generator=generator, dtype=dtype).to(DEVICE)
    grad = torch.randn(n, net.hs[-1], generator=generator, dtype=dtype).to(DEVICE)
    return x, scale, grad


def assert_close(a, b, dtype, what):
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e}"


def first_derivatives(function, net, x, scale, grad):
    """(value, d x, d scale, d weights) of <grad, function(x, weights, scale)> with plain autograd."""
    x, scale = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    ws = [w.detach().to(x.dtype).clone().requires_grad_(True) for w in weights_of(net)]
    value = function(x, ws, scale)
    grads = torch.autograd.grad((value * grad).sum(), [x, scale, *ws])
    return (value.detach(), *grads)


def e3nn_reference(net):
    """e3nn's layer formula (``_Layer.forward``) with the weights as arguments, so they can be differentiated."""
    def function(x, ws, scale):
        h = x
        for layer, w in zip(net.children(), ws):
            h = layer.act(h @ (w / (layer.h_in * layer.var_in) ** 0.5)) * layer.var_out ** 0.5 if layer.act else \
                h @ (w / (layer.h_in * layer.var_in / layer.var_out) ** 0.5)
        return h * scale.unsqueeze(1)

    return function


def test_problem_reads_the_module():
    net = build("odd-widths")
    problem = radial_mlp_problem(net)
    assert [(layer.dim_in, layer.dim_out) for layer in problem.layers] == [(5, 24), (24, 37)]
    first, last = problem.layers
    assert first.act.name == "tanh" and first.act.scale == pytest.approx(net.layer0.act.cst)
    assert last.act is None and last.scale == pytest.approx((24 / 2) ** -0.5)
    assert str(problem) == "RadialMLP(5-24-37, tanh)"
    with pytest.raises(ValueError, match="not an e3nn FullyConnectedNet"):
        radial_mlp_problem(torch.nn.Linear(2, 3))


@pytest.mark.parametrize("name", list(NETS))
def test_reference_matches_e3nn(name):
    net = build(name)
    problem = radial_mlp_problem(net)
    x, scale, grad = data(net, torch.float64)
    with torch.no_grad():
        assert torch.equal(ref.radial_mlp(problem, x, weights_of(net)), net(x))
    expected = first_derivatives(e3nn_reference(net), net, x, scale, grad)
    got = first_derivatives(lambda xx, ws, s: mlp_ops.radial_mlp(problem, xx, ws, s), net, x, scale, grad)
    for what, a, b in zip(("value", "x", "scale", "weights"), got, expected):
        assert_close(a, b, torch.float64, what)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", ["sevennet0", "mace-mp0", "odd-widths", "out-act", "linear"])
def test_kernels_match_reference(name, dtype, triton_poisoned, monkeypatch):
    net = build(name, dtype)
    problem = radial_mlp_problem(net)
    x, scale, grad = data(net, dtype)
    function = lambda xx, ws, s: mlp_ops.radial_mlp(problem, xx, ws, s)  # noqa: E731
    got = first_derivatives(function, net, x, scale, grad)
    monkeypatch.setenv("FASTMLIP_BACKEND", "reference")
    expected = first_derivatives(function, net, x.double(), scale.double(), grad.double()) if dtype == torch.float32 \
        else first_derivatives(function, net, x, scale, grad)
    for what, a, b in zip(("value", "x", "scale"), got, expected):
        assert torch.isfinite(a).all(), what
        assert_close(a.double(), b.double(), dtype, what)


@pytest.mark.parametrize("groups", [2, 3])
@pytest.mark.parametrize("name", ["sevennet0", "mace-mp0", "odd-widths", "out-act"])
def test_forward_column_groups(name, groups, triton_poisoned, kernel_settings, monkeypatch):
    """FASTMLIP_MLP_COLUMN_GROUPS: programs sharing a row block each write their columns (uneven last groups,
    more groups than column blocks) with the one-program values."""
    net = build(name)
    problem = radial_mlp_problem(net)
    x, scale, _ = data(net, torch.float64)
    spans = []
    kernel = mlp_kernels._kernel
    monkeypatch.setattr(mlp_kernels, "_kernel", lambda *args: spans.append(args[4:]) or kernel(*args))
    with torch.no_grad():
        whole = mlp_ops.radial_mlp(problem, x, weights_of(net), scale)
        kernel_settings(mlp_column_groups=groups)
        split = mlp_ops.radial_mlp(problem, x, weights_of(net), scale)
    torch.testing.assert_close(split, whole, rtol=1e-14, atol=1e-14)
    blocks = -(-problem.dim_out // 64)
    assert spans == [(blocks * 64,), (-(-blocks // min(groups, blocks)) * 64,)]
    with pytest.raises(ValueError, match="FASTMLIP_MLP_COLUMN_GROUPS='0'|FASTMLIP_MLP_COLUMN_GROUPS=0"):
        launch.read_settings({"FASTMLIP_MLP_COLUMN_GROUPS": "0"})


def test_kernels_without_scale_and_without_rows(triton_poisoned):
    net = build("sevennet0")
    problem = radial_mlp_problem(net)
    x, _, grad = data(net, torch.float64, n=70)
    out = mlp_ops.radial_mlp(problem, x, weights_of(net))
    with torch.no_grad():
        assert_close(out, net(x), torch.float64, "value")
    empty = x[:0].clone().requires_grad_(True)
    value = mlp_ops.radial_mlp(problem, empty, weights_of(net))
    assert value.shape == (0, 152)
    (grad_x,) = torch.autograd.grad(value.sum(), [empty])
    assert grad_x.shape == (0, 8)


def test_kernel_row_scale_gradient_alone(triton_poisoned):
    """Only the scale needs a gradient (x is a constant): the backward kernel skips grad_x."""
    net = build("mace-mp0")
    problem = radial_mlp_problem(net)
    x, scale, grad = data(net, torch.float64)
    scale = scale.requires_grad_(True)
    (got,) = torch.autograd.grad((mlp_ops.radial_mlp(problem, x, weights_of(net), scale) * grad).sum(), [scale])
    with torch.no_grad():
        expected = (net(x) * grad).sum(1)
    assert_close(got, expected, torch.float64, "scale")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_second_derivatives_match_e3nn(backend, monkeypatch, tmp_path_factory):
    """Forces-training shape: d/dw of <v, d E / d x>, through the backward op's autograd."""
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path_factory.getbasetemp() / "fastmlip-cache"))
    net = build("sevennet0")
    problem = radial_mlp_problem(net)
    x, scale, grad = data(net, torch.float64, n=20)
    v = torch.randn_like(x)

    def second(function):
        xx, s = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
        ws = [w.detach().clone().requires_grad_(True) for w in weights_of(net)]
        gx, gs = torch.autograd.grad((function(xx, ws, s) * grad).sum(), [xx, s], create_graph=True)
        return torch.autograd.grad((gx * v).sum() + gs.sum(), [xx, s, *ws])

    got = second(lambda xx, ws, s: mlp_ops.radial_mlp(problem, xx, ws, s))
    expected = second(e3nn_reference(net))
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_close(a, b, torch.float64, f"second derivative {i}")


def test_ops_pass_torch_opcheck():
    net = build("odd-widths")
    problem = radial_mlp_problem(net)
    key = registry.register(problem)
    x, scale, grad = data(net, torch.float64, n=7)
    ws = [w.detach().clone().requires_grad_(True) for w in weights_of(net)]
    forward, backward = mlp_ops.radial_mlp_fwd.overload, mlp_ops.radial_mlp_bwd.overload
    torch.library.opcheck(forward, (x.requires_grad_(True), ws, scale.requires_grad_(True), key))
    torch.library.opcheck(forward, (x, ws, None, key))
    torch.library.opcheck(backward, (grad, x.detach(), [w.detach() for w in ws], scale.detach(), key, True, True))


def test_module_swap_keeps_parameters_and_falls_back_for_unknown_activations():
    net = build("mace-mp0")
    fast = swaps.maybe_fast(net, e3nn_modules.FastFullyConnectedNet)
    assert isinstance(fast, e3nn_modules.FastFullyConnectedNet)
    assert list(fast.state_dict()) == list(net.state_dict())
    assert all(a is b for a, b in zip(fast.parameters(), net.parameters()))
    x, scale, _ = data(net, torch.float64)
    with torch.no_grad():
        assert_close(e3nn_modules.radial_weights(fast, x, scale), net(x) * scale[:, None], torch.float64, "fast")
        assert torch.equal(e3nn_modules.radial_weights(net, x, scale), net(x) * scale[:, None])
    odd = e3nn_nn.FullyConnectedNet([4, 8, 3], F.softplus).to(DEVICE, torch.float64)
    assert swaps.maybe_fast(odd, e3nn_modules.FastFullyConnectedNet) is odd
    linear = torch.nn.Linear(3, 3)
    assert swaps.maybe_fast(linear, e3nn_modules.FastFullyConnectedNet) is linear


def test_bad_input():
    net = build("sevennet0")
    problem = radial_mlp_problem(net)
    ws = weights_of(net)
    with pytest.raises(ValueError, match=r"x must be a floating tensor \[E, 8\]"):
        mlp_ops.radial_mlp(problem, torch.zeros(3, 7, dtype=torch.float64, device=DEVICE), ws)
    with pytest.raises(ValueError, match="expected 3 weights, got 2"):
        mlp_ops.radial_mlp(problem, torch.zeros(3, 8, dtype=torch.float64, device=DEVICE), ws[:2])
    with pytest.raises(ValueError, match=r"weight 1 must have shape \(64, 64\)"):
        mlp_ops.radial_mlp(problem, torch.zeros(3, 8, dtype=torch.float64, device=DEVICE), [ws[0], ws[0], ws[2]])
    with pytest.raises(ValueError, match="weight 0 is torch.float64"):
        mlp_ops.radial_mlp(problem, torch.zeros(3, 8, dtype=torch.float32, device=DEVICE), ws)
    with pytest.raises(ValueError, match=r"row_scale must be \[3\]"):
        mlp_ops.radial_mlp(problem, torch.zeros(3, 8, dtype=torch.float64, device=DEVICE), ws,
                           torch.ones(4, dtype=torch.float64, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kernels_at_md_size_on_gpu(dtype, triton_poisoned, monkeypatch):
    net = build("mace-mp0", dtype)
    problem = radial_mlp_problem(net)
    x, scale, grad = data(net, dtype, n=50000)
    function = lambda xx, ws, s: mlp_ops.radial_mlp(problem, xx, ws, s)  # noqa: E731
    got = first_derivatives(function, net, x, scale, grad)
    monkeypatch.setenv("FASTMLIP_BACKEND", "reference")
    expected = first_derivatives(function, net, x.double(), scale.double(), grad.double())
    for what, a, b in zip(("value", "x", "scale"), got, expected):
        assert_close(a.double(), b.double(), dtype, what)


def test_frozen_weights_cost_no_weight_gradient(monkeypatch):
    """MD differentiates by positions only: frozen weights must not trigger the weight-gradient formula."""
    net = build("sevennet0")
    for p in net.parameters():
        p.requires_grad_(False)
    problem = radial_mlp_problem(net)
    x, scale, grad = data(net, torch.float64)
    monkeypatch.setattr(mlp_ops, "vjp_of_reference", lambda *args: pytest.fail("weight gradient computed"))
    x = x.requires_grad_(True)
    (gx,) = torch.autograd.grad((mlp_ops.radial_mlp(problem, x, weights_of(net), scale) * grad).sum(), [x])
    assert gx.shape == x.shape


def test_frozen_symmetric_contraction_weights_skip_their_gradient(monkeypatch):
    """The same for MACE's symmetric contraction (a list input's needs_input_grad is a list: truthy if non-empty)."""
    pytest.importorskip("mace.modules")
    from e3nn import o3
    from mace.modules.symmetric_contraction import SymmetricContraction

    from fastmlip.descriptors import symmetric_contraction_problem
    from fastmlip.ops import symmetric_contraction as sc_ops

    module = SymmetricContraction(o3.Irreps("4x0e+4x1o"), o3.Irreps("4x0e"), correlation=2, num_elements=2).double()
    for p in module.parameters():
        p.requires_grad_(False)
    problem = symmetric_contraction_problem(module)
    seen = []
    original = sc_ops.symmetric_contraction_bwd

    def recording(grad_out, x, species, weights, key, want_x, want_w):
        seen.append(want_w)
        return original(grad_out, x, species, weights, key, want_x, want_w)

    monkeypatch.setattr(sc_ops, "symmetric_contraction_bwd", recording)
    x = torch.randn(5, problem.num_features, problem.coupling_dim, dtype=torch.float64, requires_grad=True)
    species = torch.tensor([0, 1, 1, 0, 1])
    out = sc_ops.symmetric_contraction(problem, x, species, sc_ops.module_weights(problem, module))
    torch.autograd.grad(out.sum(), [x])
    assert seen == [False]


def test_dot_precision_knob(triton_poisoned, kernel_settings):
    """tf32x3 (tensor-core float32 emulation on the GPU) builds its own kernels; the interpreter computes them
    exactly, so here they must agree with the reference; float64 ignores the knob; a bad name is refused."""
    net = build("sevennet0", torch.float32)
    problem = radial_mlp_problem(net)
    x, scale, _ = data(net, torch.float32)
    kernel_settings(dot_precision="tf32x3")
    assert launch.dot_precision(torch.float32) == "tf32x3" and launch.dot_precision(torch.float64) == "ieee"
    with torch.no_grad():
        assert_close(mlp_ops.radial_mlp(problem, x, weights_of(net), scale), net(x) * scale[:, None],
                     torch.float32, "tf32x3")
    assert launch.read_settings({"FASTMLIP_DOT_PRECISION": " TF32x3 "}).dot_precision == "tf32x3"
    with pytest.raises(ValueError, match="FASTMLIP_DOT_PRECISION='bf16'"):
        launch.read_settings({"FASTMLIP_DOT_PRECISION": "bf16"})


@pytest.mark.gpu
def test_many_edges_take_the_matmul_path_on_gpu(monkeypatch, kernel_settings):
    """Above FASTMLIP_MLP_FUSED_MAX_ROWS edges the swapped module runs e3nn's own layers (cuBLAS), same values."""
    net = build("mace-mp0")
    fast = swaps.maybe_fast(net, e3nn_modules.FastFullyConnectedNet)
    x, scale, _ = data(net, torch.float64, n=300)
    kernel_settings(mlp_fused_max_rows=100)
    monkeypatch.setattr(mlp_ops, "radial_mlp_fwd", lambda *args: pytest.fail("fused kernel used"))
    with torch.no_grad():
        assert torch.equal(fast(x, scale), net(x) * scale[:, None])
