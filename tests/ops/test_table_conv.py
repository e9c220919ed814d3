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


def fused(keep_weights):
    def conv(prob, table, x, y, lengths, scale, edges):
        return table_conv_ops.table_conv(prob, table, x, y, lengths, scale, edges, torch.argsort(lengths),
                                         keep_weights=keep_weights)
    return conv


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


def compare(prob, table, inputs, edges, wanted, second, backend, monkeypatch, tolerance, keep_weights=True):
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    got = derivatives(fused(keep_weights), prob, table, inputs, edges, wanted, second)
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


KEEP = pytest.mark.parametrize("keep_weights", [True, False], ids=["weights-kept", "weights-from-table"])


@KEEP
@pytest.mark.parametrize("name, wanted", [("mace-like", w) for w in WANTED] + [("multi-v", (0, 1, 2, 3)),
                                                                          ("multi-v", (3,))],
                         ids=[f"mace-like-{w}" for w in ("xyrs", "xyr", "r", "s", "ys")] + ["multi-v-xyrs",
                                                                                            "multi-v-s"])
def test_kernels_match_the_two_ops_float64(name, wanted, keep_weights, triton_poisoned, monkeypatch):
    prob = problem(name)
    edges, lengths, scale = graph(torch.float64)
    table = random_table(prob.weight_numel, torch.float64)
    compare(prob, table, (*tensors(prob, torch.float64), lengths, scale), edges, wanted, False, "triton",
            monkeypatch, 1e-12, keep_weights)


@KEEP
@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "unscaled"])
def test_reference_and_second_derivatives(scaled, keep_weights, monkeypatch):
    prob = problem("mace-like")
    edges, lengths, scale = graph(torch.float64)
    table = random_table(prob.weight_numel, torch.float64)
    inputs = (*tensors(prob, torch.float64), lengths, scale if scaled else None)
    wanted = (0, 1, 2, 3) if scaled else (0, 1, 2)
    compare(prob, table, inputs, edges, wanted, False, "reference", monkeypatch, 1e-12, keep_weights)
    compare(prob, table, inputs, edges, wanted, True, "reference", monkeypatch, 1e-12, keep_weights)


@KEEP
def test_kernels_second_derivatives(keep_weights, triton_poisoned, monkeypatch):
    prob = problem("multi-v")
    edges, lengths, scale = graph(torch.float64)
    table = random_table(prob.weight_numel, torch.float64)
    compare(prob, table, (*tensors(prob, torch.float64), lengths, scale), edges, (0, 1, 2, 3), True, "triton",
            monkeypatch, 1e-12, keep_weights)


@pytest.mark.parametrize("settings", [dict(conv_unroll=1), dict(conv_unroll=3), dict(conv_edge_lanes=2),
                                      dict(conv_split_rows=100, conv_split_parts=3, conv_split_edges=2),
                                      dict(conv_atomic_rows=100), dict(table_gradient="table")],
                         ids=["unroll-1", "unroll-3", "edge-lanes", "split-rows", "few-rows", "table-gradient"])
@KEEP
def test_every_edge_loop_float32(settings, keep_weights, triton_poisoned, monkeypatch, kernel_settings):
    """The row-owned kernels' loop variants, and where rows do not own their edges (few rows) or
    FASTMLIP_TABLE_GRADIENT=table: the weight gradient stored, then read by the table's backward (and the weights
    made by the table's kernel where they are not kept)."""
    kernel_settings(**settings)
    prob = problem("mace-like")
    edges, lengths, scale = graph(torch.float32)
    table = random_table(prob.weight_numel, torch.float32)
    compare(prob, table, (*tensors(prob, torch.float32), lengths, scale), edges, (0, 1, 2, 3), False, "triton",
            monkeypatch, 2e-5, keep_weights)


@pytest.mark.parametrize("keep_weights, kernels", [(True, ["fwd_csr", "sender_xyrs"]),
                                                   (False, ["fwdt_csr", "sendert_xyrs"])],
                         ids=["weights-kept", "weights-from-table"])
def test_one_kernel_a_direction(keep_weights, kernels, triton_poisoned, monkeypatch):
    """On the sender walk no weight gradient is stored and no table backward runs: one kernel makes d/dr. Without
    kept weights the table's kernels do not run at all, and autograd keeps no tensor of W columns."""
    from fastmlip.kernels import conv, radial_table as table_kernels

    calls, launched = [], []

    def recorded(module, name, record, label=lambda *args: None):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, **kw: (record.append(label(*args) or name),
                                                               original(*args, **kw))[1])

    recorded(table_kernels, "forward", calls)
    recorded(table_kernels, "backward", calls)
    recorded(conv, "_launch", launched, lambda problem, variant, *rest: variant)
    prob = problem("mace-like")
    edges, lengths, scale = graph(torch.float32)
    table = random_table(prob.weight_numel, torch.float32)
    x, y = tensors(prob, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(tuple(t.shape)), t)[1], lambda t: t):
        derivatives(fused(keep_weights), prob, table, (x, y, lengths, scale), edges, (0, 1, 2, 3), False)
    assert launched == kernels
    assert calls == ([] if not keep_weights else ["forward"])
    assert ((NUM_EDGES, prob.weight_numel) in saved) == keep_weights, saved


def test_ops_pass_torch_opcheck():
    prob = problem("multi-v")
    edges, lengths, scale = graph(torch.float64)
    table = random_table(prob.weight_numel, torch.float64)
    x, y = tensors(prob, torch.float64)
    key = registry.register(prob)
    graph_args = (edges.src, edges.dst, edges.dst_ptr, edges.src_perm, edges.src_ptr)
    for keep_weights in (True, False):
        torch.library.opcheck(table_conv_ops.table_conv_fwd.overload,
                              (x.detach().requires_grad_(), y.detach().requires_grad_(),
                               lengths.detach().requires_grad_(), table.values, table.segments,
                               scale.detach().requires_grad_(), None, *graph_args, NUM_NODES, key, keep_weights))
    w = radial_table(table, lengths, scale)
    grad_out = torch.randn(NUM_NODES, prob.dim_out, dtype=torch.float64, device=DEVICE)
    for want, weights in (("xyrs", w), ("r", w), ("y", w), ("xyrs", w[:0])):
        torch.library.opcheck(table_conv_ops.table_conv_bwd.overload,
                              (grad_out, x, y, weights, lengths, table.values, table.segments, scale,
                               torch.argsort(lengths), *graph_args, key, want))


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
