"""The convolution with weights read from a radial table (``fastmlip::table_conv``) against the two ops it fuses,
``radial_table`` then ``fused_conv``, in float64 on the reference: values, every subset of first derivatives (the
sender walk's d/dr and d/d scale, and the fallback through the weight gradient), second derivatives, the kernels'
loop variants (interpreted without CUDA, outputs poisoned), opcheck, bad input."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastmlip.descriptors import channelwise_instructions, make_tensor_product_problem  # noqa: E402
from fastmlip.graph import sort_edges  # noqa: E402
from fastmlip.ops import registry  # noqa: E402
from fastmlip.ops import table_conv as table_conv_ops  # noqa: E402
from fastmlip.ops.conv import fused_conv  # noqa: E402
from fastmlip.ops.radial_table import radial_table  # noqa: E402
from helpers.derivatives import assert_close  # noqa: E402

from helpers.tables import random_table as table_on  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_NODES, NUM_EDGES = 7, 40


def random_table(width, dtype):
    return table_on(width, dtype, DEVICE)


def problem(name):
    in1, in2, target = {"mace-like": ("4x0e+4x1o", "0e+1o+2e+3o", "4x0e+4x1o+4x2e"),
                        "multi-v": ("3x0e+2x1o", "2x0e+2x1o", "0e+1o+1e")}[name]
    out, instructions = channelwise_instructions(in1, in2, target)
    return make_tensor_product_problem(in1, in2, out, instructions)


def graph(dtype, seed=0):
    """Receiver-sorted edges, node 6 sending none, and per edge: attributes, lengths over the table and past its
    end (5 A), a scale."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, NUM_NODES - 1, (NUM_EDGES,), generator=g).to(DEVICE)
    dst = torch.randint(0, NUM_NODES, (NUM_EDGES,), generator=g).to(DEVICE)
    lengths = torch.rand(NUM_EDGES, generator=g, dtype=torch.float64) * 5.4
    lengths[:3] = torch.tensor([0.0, 4.5, 5.2])
    scale = torch.rand(NUM_EDGES, generator=g, dtype=torch.float64) + 0.5
    return sort_edges(dst, src, NUM_NODES), lengths.to(dtype=dtype, device=DEVICE), scale.to(dtype=dtype, device=DEVICE)


def tensors(prob, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(NUM_NODES, prob.dim_in1, generator=g, dtype=dtype).to(DEVICE),
            torch.randn(NUM_EDGES, prob.dim_in2, generator=g, dtype=dtype).to(DEVICE))


def fused(prob, table, x, y, lengths, scale, edges):
    return table_conv_ops.table_conv(prob, table, x, y, lengths, scale, edges, torch.argsort(lengths))


def two_ops(prob, table, x, y, lengths, scale, edges):
    w = radial_table(table, lengths, scale)
    return fused_conv(prob, x, y, w, edges.src, edges.dst, NUM_NODES, dst_ptr=edges.dst_ptr,
                      src_perm=edges.src_perm, src_ptr=edges.src_ptr)


def derivatives(conv, prob, table, inputs, edges, wanted, second):
    """out, its gradients in the inputs ``wanted`` (indices into x, y, lengths, scale), and with ``second`` the
    gradient of a function of those gradients."""
    inputs = [t.detach().clone().requires_grad_(k in wanted) if t is not None else None
              for k, t in enumerate(inputs)]
    out = conv(prob, table, *inputs[:2], inputs[2], inputs[3], edges)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape).cos()
    variables = [inputs[k] for k in wanted]
    grads = torch.autograd.grad(out, variables, g, create_graph=second)
    if not second:
        return [out, *grads]
    total = sum((gr * gr.detach().sin()).sum() for gr in grads)
    return [out, *grads, *torch.autograd.grad(total, variables, allow_unused=True)]


def compare(prob, table, inputs, edges, wanted, second, backend, monkeypatch, tolerance):
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    got = derivatives(fused, prob, table, inputs, edges, wanted, second)
    monkeypatch.setenv("FASTMLIP_BACKEND", "reference")
    want = derivatives(two_ops, prob, table, inputs, edges, wanted, second)
    names = ["out"] + [f"d/d {'x y r s'.split()[k]}" for k in wanted]
    names += [f"second {name}" for name in names[1:]]
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert not torch.isnan(a).any(), name
            assert_close(a, b, tolerance), name


WANTED = [(0, 1, 2, 3), (0, 1, 2), (2,), (3,), (1, 3)]


@pytest.mark.parametrize("wanted", WANTED, ids=["xyrs", "xyr", "r", "s", "ys"])
@pytest.mark.parametrize("name", ["mace-like", "multi-v"])
def test_kernels_match_the_two_ops_float64(name, wanted, triton_poisoned, monkeypatch):
    prob = problem(name)
    edges, lengths, scale = graph(torch.float64)
    table = random_table(prob.weight_numel, torch.float64)
    compare(prob, table, (*tensors(prob, torch.float64), lengths, scale), edges, wanted, False, "triton",
            monkeypatch, 1e-12)


@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "unscaled"])
def test_reference_and_second_derivatives(scaled, monkeypatch):
    prob = problem("mace-like")
    edges, lengths, scale = graph(torch.float64)
    table = random_table(prob.weight_numel, torch.float64)
    inputs = (*tensors(prob, torch.float64), lengths, scale if scaled else None)
    wanted = (0, 1, 2, 3) if scaled else (0, 1, 2)
    compare(prob, table, inputs, edges, wanted, False, "reference", monkeypatch, 1e-12)
    compare(prob, table, inputs, edges, wanted, True, "reference", monkeypatch, 1e-12)


def test_kernels_second_derivatives(triton_poisoned, monkeypatch):
    prob = problem("multi-v")
    edges, lengths, scale = graph(torch.float64)
    table = random_table(prob.weight_numel, torch.float64)
    compare(prob, table, (*tensors(prob, torch.float64), lengths, scale), edges, (0, 1, 2, 3), True, "triton",
            monkeypatch, 1e-12)


@pytest.mark.parametrize("settings", [dict(conv_unroll=1), dict(conv_unroll=3), dict(conv_edge_lanes=2),
                                      dict(conv_split_rows=100, conv_split_parts=3, conv_split_edges=2),
                                      dict(conv_atomic_rows=100), dict(table_gradient="table")],
                         ids=["unroll-1", "unroll-3", "edge-lanes", "split-rows", "few-rows", "table-gradient"])
def test_every_edge_loop_float32(settings, triton_poisoned, monkeypatch, kernel_settings):
    """The sender walk's loop variants, and the weight gradient stored then read by the table's backward (few
    rows: no sender walk; or FASTMLIP_TABLE_GRADIENT=table)."""
    kernel_settings(**settings)
    prob = problem("mace-like")
    edges, lengths, scale = graph(torch.float32)
    table = random_table(prob.weight_numel, torch.float32)
    compare(prob, table, (*tensors(prob, torch.float32), lengths, scale), edges, (0, 1, 2, 3), False, "triton",
            monkeypatch, 2e-5)


def test_the_sender_walk_makes_the_length_gradient_itself(triton_poisoned, monkeypatch):
    """On the sender walk no weight gradient is stored and no table backward runs: one kernel makes d/dr."""
    from fastmlip.kernels import conv, radial_table as table_kernels

    calls = []
    monkeypatch.setattr(table_kernels, "backward", lambda *args: calls.append(args))
    launched = []
    original = conv._launch
    monkeypatch.setattr(conv, "_launch", lambda problem, variant, *rest, **kw: (
        launched.append(variant), original(problem, variant, *rest, **kw))[1])
    prob = problem("mace-like")
    edges, lengths, scale = graph(torch.float32)
    table = random_table(prob.weight_numel, torch.float32)
    x, y = tensors(prob, torch.float32)
    derivatives(fused, prob, table, (x, y, lengths, scale), edges, (0, 1, 2, 3), False)
    assert not calls and launched == ["fwd_csr", "sender_xyrs"]


def test_ops_pass_torch_opcheck():
    prob = problem("multi-v")
    edges, lengths, scale = graph(torch.float64)
    table = random_table(prob.weight_numel, torch.float64)
    x, y = tensors(prob, torch.float64)
    key = registry.register(prob)
    graph_args = (edges.src, edges.dst, edges.dst_ptr, edges.src_perm, edges.src_ptr)
    torch.library.opcheck(table_conv_ops.table_conv_fwd.overload,
                          (x.requires_grad_(), y.requires_grad_(), lengths.requires_grad_(), table.values,
                           table.segments, scale.requires_grad_(), None, *graph_args, NUM_NODES, key))
    w = radial_table(table, lengths.detach(), scale.detach())
    grad_out = torch.randn(NUM_NODES, prob.dim_out, dtype=torch.float64, device=DEVICE)
    for want in ("xyrs", "r", "y"):
        torch.library.opcheck(table_conv_ops.table_conv_bwd.overload,
                              (grad_out, x.detach(), y.detach(), w, lengths.detach(), table.values, table.segments,
                               scale.detach(), torch.argsort(lengths.detach()), *graph_args, key, want))


def test_bad_input():
    prob = problem("multi-v")
    edges, lengths, scale = graph(torch.float64)
    x, y = tensors(prob, torch.float64)
    with pytest.raises(ValueError, match="columns, .* takes"):
        table_conv_ops.table_conv(prob, random_table(3, torch.float64), x, y, lengths, scale, edges)
    table = random_table(prob.weight_numel, torch.float64)
    with pytest.raises(ValueError, match="lengths must be"):
        table_conv_ops.table_conv(prob, table, x, y, lengths.float(), scale, edges)
    with pytest.raises(ValueError, match="edge_attr must be a 2-D tensor"):
        table_conv_ops.table_conv(prob, table, x, y[:, :2], lengths, scale, edges)
