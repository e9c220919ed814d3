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


@pytest.mark.parametrize("num_nodes", [7, 20_000], ids=["int16-keys", "int32-keys"])
def test_absent_edges_go_last_in_every_group(num_nodes):
    """With a mask, each receiver's and each sender's group holds its present edges first, in the order the
    present edges alone would sort to: padding or stale candidates around them (whose count depends on a CUDA
    graph's capacity) leave every sum's grouping of the present edges as it is."""
    g = torch.Generator().manual_seed(1)
    src, dst = (torch.randint(0, num_nodes, (3000,), generator=g) for _ in range(2))
    present = torch.rand(3000, generator=g) < 0.6
    edges = sort_edges(src, dst, num_nodes, present.double())
    alone = sort_edges(src[present], dst[present], num_nodes)
    kept = present.nonzero().flatten()
    counts_in, counts_out = (torch.bincount(i, minlength=num_nodes) for i in (dst, src))
    assert torch.equal(edges.dst_ptr.diff(), counts_in) and torch.equal(edges.src_ptr.diff(), counts_out)
    for ptr, positions, alone_ptr, alone_positions in (
            (edges.dst_ptr, edges.order, alone.dst_ptr, kept[alone.order]),
            (edges.src_ptr, edges.order[edges.src_perm], alone.src_ptr, kept[alone.order[alone.src_perm]])):
        for node in range(0, num_nodes, max(1, num_nodes // 50)):
            group = positions[ptr[node]:ptr[node + 1]]
            count = int(alone_ptr[node + 1] - alone_ptr[node])
            assert torch.equal(group[:count], alone_positions[alone_ptr[node]:alone_ptr[node + 1]])
            assert not present[group[count:]].any()
