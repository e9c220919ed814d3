"""node_difference (forces from edge gradients) against two index_add_: the kernel walks each node's edges in the
edges' own order, so on the interpreter it must give the CPU's sequential sums bit for bit, and rows of zeros
(masked Verlet candidates) inserted anywhere must change nothing."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastmlip.graph import sort_edges  # noqa: E402
from fastmlip.ops.node_sums import node_difference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def graph(num_nodes=9, num_edges=70, width=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, num_nodes - 1, (num_edges,), generator=g)  # the last node has no edges
    dst = torch.randint(0, num_nodes - 1, (num_edges,), generator=g)
    values = torch.randn(num_edges, width, generator=g, dtype=dtype)
    return src.to(DEVICE), dst.to(DEVICE), values.to(DEVICE)


def in_kernel_order(values, src, dst, edges, num_nodes, plus):
    """Sequential index_add_ over the plus side's edges, then the minus side's, each in the order the kernel walks
    them: receiver-sorted (stable), and grouped by sender (within a sender, by receiver)."""
    order = {"dst": (dst, edges.order), "src": (src, edges.order.index_select(0, edges.src_perm))}
    (plus_nodes, first), (minus_nodes, second) = order[plus], order["dst" if plus == "src" else "src"]
    out = torch.zeros(num_nodes, values.shape[1], dtype=values.dtype, device=values.device)
    out.index_add_(0, plus_nodes[first], values[first])
    return out.index_add_(0, minus_nodes[second], values[second], alpha=-1)


@pytest.mark.parametrize("plus", ["src", "dst"])
@pytest.mark.parametrize("width, dtype", [(3, torch.float64), (6, torch.float32)], ids=["forces", "virial-fp32"])
def test_kernel_sums_in_a_fixed_order(plus, width, dtype, triton_poisoned):
    src, dst, values = graph(width=width, dtype=dtype)
    edges = sort_edges(src, dst, 9)
    got = node_difference(values, edges, src, dst, plus)
    first, second = (src, dst) if plus == "src" else (dst, src)
    unordered = torch.zeros_like(got).index_add_(0, first, values).index_add_(0, second, values, alpha=-1)
    torch.testing.assert_close(got, unordered)
    if DEVICE == "cpu":
        assert torch.equal(got, in_kernel_order(values, src, dst, edges, 9, plus))
    assert got[8].abs().max() == 0


def test_zero_rows_change_no_bit(triton_poisoned):
    """Edges whose rows are zero, spliced in between the real ones, leave every sum as it was."""
    src, dst, values = graph()
    g = torch.Generator().manual_seed(1)
    total = 100
    keep = torch.randperm(total, generator=g)[:70].sort().values.to(DEVICE)  # the real edges, in their order
    padded_src, padded_dst = (torch.randint(0, 8, (total,), generator=g).to(DEVICE) for _ in range(2))
    padded_src[keep], padded_dst[keep] = src, dst
    padded = torch.zeros(total, 3, dtype=values.dtype, device=DEVICE)
    padded[keep] = values
    a = node_difference(values, sort_edges(src, dst, 9), src, dst, "dst")
    b = node_difference(padded, sort_edges(padded_src, padded_dst, 9), padded_src, padded_dst, "dst")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_derivatives(backend, monkeypatch, tmp_path_factory):
    """First and second derivatives (forces training) by torch.autograd.gradcheck / gradgradcheck."""
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path_factory.getbasetemp() / "fastmlip-cache"))
    src, dst, values = graph(num_nodes=5, num_edges=12)
    edges = sort_edges(src, dst, 5)
    values.requires_grad_(True)
    function = lambda v: node_difference(v, edges, src, dst, "src") ** 2  # noqa: E731
    assert torch.autograd.gradcheck(function, (values,))
    assert torch.autograd.gradgradcheck(function, (values,))


def test_bad_side():
    src, dst, values = graph()
    with pytest.raises(ValueError, match="plus='both'"):
        node_difference(values, sort_edges(src, dst, 9), src, dst, "both")
