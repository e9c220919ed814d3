"""sort_edges narrows its sort keys to the node count: every width gives the int64 stable sort's order."""
import pytest
import torch

from fastmlip.graph import sort_edges


@pytest.mark.parametrize("num_nodes", [7, 40_000], ids=["int16-keys", "int32-keys"])
def test_orders_and_offsets_equal_a_stable_int64_sort(num_nodes):
    g = torch.Generator().manual_seed(0)
    src, dst = (torch.randint(0, num_nodes, (3000,), generator=g) for _ in range(2))
    dst[:5] = num_nodes - 1  # the largest index must survive the narrower keys
    edges = sort_edges(src, dst, num_nodes)
    order = torch.argsort(dst, stable=True)
    assert torch.equal(edges.order, order) and torch.equal(edges.dst, dst[order])
    assert torch.equal(edges.src_perm, torch.argsort(src[order], stable=True))
    counts_in, counts_out = (torch.bincount(i, minlength=num_nodes) for i in (dst, src))
    assert torch.equal(edges.dst_ptr.diff(), counts_in) and torch.equal(edges.src_ptr.diff(), counts_out)
