"""The reference tensor product and fused convolution against e3nn: values, gradients, equivariance, errors."""
import random

import pytest
import torch
from e3nn import o3

from fastmlip.descriptors import (channelwise_instructions, irreps_str, make_tensor_product_problem,
                                  tensor_product_problem)
from fastmlip.graph import sort_edges
from fastmlip.ops.conv import fused_conv
from fastmlip.ops.tensor_product import tensor_product

NORMALISATIONS = [("component", "element"), ("norm", "path"), ("none", "none"), ("component", "path")]


def random_irreps(rng, max_l=4, max_terms=4):
    terms = []
    for _ in range(rng.randint(1, max_terms)):
        terms.append(f"{rng.choice([1, 2, 3, 5])}x{rng.randint(0, max_l)}{rng.choice('eo')}")
    return o3.Irreps("+".join(terms)).simplify()


def random_conv_module(seed, irrep_normalization="component", path_normalization="element"):
    rng = random.Random(seed)
    in1 = random_irreps(rng)
    in2 = o3.Irreps("+".join(f"1x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(rng.randint(1, 4) + 1)))
    mid, ins = channelwise_instructions(in1, in2, o3.Irreps.spherical_harmonics(4) + o3.Irreps.spherical_harmonics(
        4, p=1))
    if not ins:
        return random_conv_module(seed + 1000, irrep_normalization, path_normalization)
    return o3.TensorProduct(in1, in2, irreps_str(mid), list(ins), shared_weights=False, internal_weights=False,
                            irrep_normalization=irrep_normalization, path_normalization=path_normalization)


def graph(num_nodes, num_edges, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_nodes, (num_edges,), generator=g), torch.randint(0, num_nodes, (num_edges,),
                                                                                  generator=g)


def conv_inputs(tp, num_nodes, src, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_nodes, tp.irreps_in1.dim, generator=g, dtype=dtype).requires_grad_()
    y = torch.randn(len(src), tp.irreps_in2.dim, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(len(src), tp.weight_numel, generator=g, dtype=dtype).requires_grad_()
    return x, y, w


def e3nn_conv(tp, x, y, w, src, dst, num_nodes):
    return torch.zeros(num_nodes, tp.irreps_out.dim, dtype=x.dtype).index_add(0, dst, tp(x[src], y, w))


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("norms", NORMALISATIONS)
def test_conv_matches_e3nn_float64_with_grads(seed, norms):
    tp = random_conv_module(seed, *norms).double()
    problem = tensor_product_problem(tp)
    n = 7
    src, dst = graph(n, 23, seed)
    x, y, w = conv_inputs(tp, n, src, torch.float64, seed)
    out, ref = fused_conv(problem, x, y, w, src, dst, n), e3nn_conv(tp, x, y, w, src, dst, n)
    assert rel(out, ref) <= 1e-12
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (x, y, w), g, create_graph=True)
    ref_grads = torch.autograd.grad(ref, (x, y, w), g, create_graph=True)
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) <= 1e-12
    second = torch.autograd.grad(sum((a * a).sum() for a in grads), (x, y, w))
    ref_second = torch.autograd.grad(sum((b * b).sum() for b in ref_grads), (x, y, w))
    for a, b in zip(second, ref_second):
        assert rel(a, b) <= 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_conv_matches_e3nn_float32(seed):
    tp = random_conv_module(seed)
    problem = tensor_product_problem(tp)
    src, dst = graph(5, 17, seed)
    x, y, w = conv_inputs(tp, 5, src, torch.float32, seed)
    assert rel(fused_conv(problem, x, y, w, src, dst, 5), e3nn_conv(tp, x, y, w, src, dst, 5)) <= 1e-5


def test_conv_gradient_of_edge_attr_only_and_double_backward_mixed():
    """Forces differentiate through edge attributes and weights only; mixed second derivatives must agree."""
    tp = random_conv_module(11).double()
    problem = tensor_product_problem(tp)
    src, dst = graph(6, 20, 11)
    x, y, w = conv_inputs(tp, 6, src, torch.float64, 11)
    out, ref = fused_conv(problem, x, y, w, src, dst, 6), e3nn_conv(tp, x, y, w, src, dst, 6)
    (gy,) = torch.autograd.grad(out.pow(2).sum(), (y,), create_graph=True)
    (ref_gy,) = torch.autograd.grad(ref.pow(2).sum(), (y,), create_graph=True)
    assert rel(gy, ref_gy) <= 1e-12
    v = torch.randn_like(gy)
    mixed = torch.autograd.grad((gy * v).sum(), (x, w))
    ref_mixed = torch.autograd.grad((ref_gy * v).sum(), (x, w))
    for a, b in zip(mixed, ref_mixed):
        assert rel(a, b) <= 1e-12


def test_conv_equivariance_under_rotation():
    tp = random_conv_module(3).double()
    problem = tensor_product_problem(tp)
    src, dst = graph(6, 19, 3)
    x, y, w = conv_inputs(tp, 6, src, torch.float64, 3)
    rot = o3.rand_matrix(dtype=torch.float64)
    d1, d2, d_out = (tp.irreps_in1.D_from_matrix(rot), tp.irreps_in2.D_from_matrix(rot),
                     tp.irreps_out.D_from_matrix(rot))
    rotated_after = fused_conv(problem, x, y, w, src, dst, 6) @ d_out.T
    rotated_before = fused_conv(problem, x @ d1.T, y @ d2.T, w, src, dst, 6)
    e3nn_error = rel(e3nn_conv(tp, x @ d1.T, y @ d2.T, w, src, dst, 6), e3nn_conv(tp, x, y, w, src, dst, 6) @ d_out.T)
    # e3nn's Wigner D matrices (via Euler angles) are accurate to ~1e-7, so that bounds any check through them
    assert rel(rotated_before, rotated_after) <= max(1e-6, 2 * e3nn_error)


def test_sorted_edges_and_empty_nodes_give_the_same_result():
    tp = random_conv_module(5).double()
    problem = tensor_product_problem(tp)
    n = 9
    src, dst = graph(n, 15, 5)
    dst = dst % 4  # nodes 4..8 receive nothing
    x, y, w = conv_inputs(tp, n, src, torch.float64, 5)
    plain = fused_conv(problem, x, y, w, src, dst, n)
    s = sort_edges(src, dst, n)
    ordered = fused_conv(problem, x, y[s.order], w[s.order], s.src, s.dst, n, dst_ptr=s.dst_ptr,
                         src_perm=s.src_perm, src_ptr=s.src_ptr)
    assert rel(ordered, plain) <= 1e-13
    assert torch.all(plain[4:] == 0)
    assert torch.equal(s.dst_ptr[-1], torch.tensor(15))


def test_conv_with_no_edges_is_zero():
    tp = random_conv_module(2).double()
    problem = tensor_product_problem(tp)
    empty = torch.zeros(0, dtype=torch.int64)
    x = torch.randn(4, tp.irreps_in1.dim, dtype=torch.float64)
    out = fused_conv(problem, x, torch.zeros(0, tp.irreps_in2.dim, dtype=torch.float64),
                     torch.zeros(0, tp.weight_numel, dtype=torch.float64), empty, empty, 4)
    assert out.shape == (4, tp.irreps_out.dim) and torch.all(out == 0)


def test_constants_come_from_the_module_not_from_installed_e3nn():
    """A module built under another e3nn sign convention must be reproduced with its own coupling blocks."""
    tp = o3.TensorProduct("3x1o", "1x1o+1x2e", "3x1e+3x2o", [(0, 0, 0, "uvu", True), (0, 1, 1, "uvu", True)],
                          shared_weights=False, internal_weights=False).double()
    graph_module = tp._compiled_main_left_right
    flipped = [name for name, _ in graph_module.named_buffers() if name.startswith("_w3j_")]
    assert flipped, "expected stored wigner_3j buffers"
    for name in flipped:  # l1+l2+l3 odd: (1,1,1) and (1,2,2) -- the blocks whose sign e3nn changed
        getattr(graph_module, name).neg_()
    problem = tensor_product_problem(tp)
    src, dst = graph(4, 9, 0)
    x, y, w = conv_inputs(tp, 4, src, torch.float64)
    assert rel(fused_conv(problem, x, y, w, src, dst, 4), e3nn_conv(tp, x, y, w, src, dst, 4)) <= 1e-12


@pytest.mark.parametrize("mode", ["uvw", "uvu", "uvv", "uuw", "uuu"])
def test_unfused_tensor_product_all_modes(mode):
    ins = [(0, 0, 0, mode, True), (1, 1, 2, mode, True), (1, 0, 1, mode, True)]
    if mode != "uvw" and mode != "uuw":
        ins.append((1, 1, 0, mode, False))
    problem = make_tensor_product_problem("3x0e+3x1o", "3x0e+3x1o", "3x0e+3x1o+3x1e", ins)
    tp = o3.TensorProduct("3x0e+3x1o", "3x0e+3x1o", "3x0e+3x1o+3x1e", ins, shared_weights=False,
                          internal_weights=False).double()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 12, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.randn(5, 12, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(5, tp.weight_numel, dtype=torch.float64, generator=g).requires_grad_()
    out, ref = tensor_product(problem, a, b, w), tp(a, b, w)
    assert rel(out, ref) <= 1e-12
    grads = torch.autograd.grad(out.pow(2).sum(), (a, b, w), create_graph=True)
    ref_grads = torch.autograd.grad(ref.pow(2).sum(), (a, b, w), create_graph=True)
    for x, y in zip(grads, ref_grads):
        assert rel(x, y) <= 1e-12
    second = torch.autograd.grad(sum(x.pow(2).sum() for x in grads), (a, b, w))
    ref_second = torch.autograd.grad(sum(y.pow(2).sum() for y in ref_grads), (a, b, w))
    for x, y in zip(second, ref_second):
        assert rel(x, y) <= 1e-12


def test_sevenn_convolution_descriptor_reproduces_the_module():
    sevenn_util = pytest.importorskip("sevenn.util")
    model = sevenn_util.load_checkpoint("7net-0").build_model()
    checked = 0
    for name, module in model.named_modules():
        if not name.endswith("_convolution"):
            continue
        tp = module.convolution
        problem = tensor_product_problem(tp)
        src, dst = graph(6, 25, checked)
        x, y, w = conv_inputs(tp, 6, src, torch.float32, checked)
        assert rel(fused_conv(problem, x, y, w, src, dst, 6), e3nn_conv(tp, x, y, w, src, dst, 6)) <= 2e-6
        checked += 1
    assert checked == 5


class TestBadArguments:
    @pytest.fixture
    def setup(self):
        tp = random_conv_module(1).double()
        problem = tensor_product_problem(tp)
        src, dst = graph(4, 6, 1)
        x, y, w = conv_inputs(tp, 4, src, torch.float64)
        return problem, x.detach(), y.detach(), w.detach(), src, dst

    def test_wrong_width(self, setup):
        problem, x, y, w, src, dst = setup
        with pytest.raises(ValueError, match="x must be a 2-D tensor with"):
            fused_conv(problem, x[:, :-1], y, w, src, dst)

    def test_mismatched_dtype(self, setup):
        problem, x, y, w, src, dst = setup
        with pytest.raises(ValueError, match="dtypes differ"):
            fused_conv(problem, x, y.float(), w, src, dst)

    def test_mismatched_device(self, setup):
        problem, x, y, w, src, dst = setup
        with pytest.raises(ValueError, match="devices differ"):
            fused_conv(problem, x, y.to("meta"), w, src, dst)

    def test_bad_index_dtype_and_edge_count(self, setup):
        problem, x, y, w, src, dst = setup
        with pytest.raises(ValueError, match="src must be an int32/int64"):
            fused_conv(problem, x, y, w, src.float(), dst)
        with pytest.raises(ValueError, match="edge_weight has"):
            fused_conv(problem, x, y, w[:-1], src, dst)

    def test_unsupported_connection_mode(self):
        problem = make_tensor_product_problem("2x0e", "2x0e", "2x0e", [(0, 0, 0, "uvw", True)])
        x = torch.randn(3, 2)
        with pytest.raises(ValueError, match="supports weighted 'uvu' paths only"):
            fused_conv(problem, x, torch.randn(2, 2), torch.randn(2, 8), torch.tensor([0, 1]), torch.tensor([1, 2]))
        with pytest.raises(ValueError, match="unsupported connection mode 'uvuv'"):
            make_tensor_product_problem("2x0e", "2x0e", "4x0e", [(0, 0, 0, "uvuv", True)])

    def test_backend_variable_is_checked(self, setup, monkeypatch):
        problem, x, y, w, src, dst = setup
        monkeypatch.setenv("FASTMLIP_BACKEND", "cuda-magic")
        with pytest.raises(ValueError, match="FASTMLIP_BACKEND='cuda-magic'"):
            fused_conv(problem, x, y, w, src, dst)

    def test_forced_triton_on_cpu_without_interpreter(self, setup, monkeypatch):
        problem, x, y, w, src, dst = setup
        monkeypatch.setenv("FASTMLIP_BACKEND", "triton")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            fused_conv(problem, x, y, w, src, dst)


def test_conv_ops_pass_torch_opcheck():
    """Schemas, fake kernels and autograd registration agree (what torch.compile and export rely on)."""
    from fastmlip.ops import conv as conv_ops
    from fastmlip.ops import registry

    tp = random_conv_module(4).double()
    problem = tensor_product_problem(tp)
    key = registry.register(problem)
    src, dst = graph(5, 12, 4)
    x, y, w = conv_inputs(tp, 5, src, torch.float64, 4)
    s = sort_edges(src, dst, 5)
    y, w = y.detach()[s.order].requires_grad_(), w.detach()[s.order].requires_grad_()
    torch.library.opcheck(conv_ops.conv_fwd.overload, (x, y, w, s.src, s.dst, s.dst_ptr, s.src_perm, s.src_ptr, 5, key))
    g = torch.randn(5, problem.dim_out, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(conv_ops.conv_bwd.overload, (g, x, y, w, s.src, s.dst, s.dst_ptr, s.src_perm, s.src_ptr, key,
                                              True, True, True))


def test_conv_under_torch_compile():
    tp = random_conv_module(6).double()
    problem = tensor_product_problem(tp)
    src, dst = graph(5, 12, 6)
    x, y, w = conv_inputs(tp, 5, src, torch.float64, 6)

    def energy(x, y, w):
        return fused_conv(problem, x, y, w, src, dst, 5).pow(2).sum()

    compiled = torch.compile(energy, backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(energy(x, y, w), (x, y, w))
    for a, b in zip(torch.autograd.grad(compiled(x, y, w), (x, y, w)), expected):
        assert rel(a, b) <= 1e-12
