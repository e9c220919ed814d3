"""radial_conv (weights recomputed in the backward, receivers in chunks) against fused_conv with kept weights.

Both backends: the plain-torch reference and the Triton kernels (under TRITON_INTERPRET=1 on CPU). Values, the
gradients an MD step takes (x, edge attributes, the MLP's input and row scale), the MLP weights' gradients, and
second derivatives (training on forces) must equal the unchunked path's to rounding.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from e3nn import nn as e3nn_nn  # noqa: E402

from fastmlip.descriptors import channelwise_instructions, make_tensor_product_problem  # noqa: E402
from fastmlip.graph import sort_edges  # noqa: E402
from fastmlip.ops.radial_conv import radial_conv, receiver_chunks  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_NODES, NUM_EDGES = 7, 40


def setup(seed=0):
    out, ins = channelwise_instructions("4x0e+2x1o", "0e+1o+2e", "4x0e+2x1o+2x2e")
    problem = make_tensor_product_problem("4x0e+2x1o", "0e+1o+2e", out, ins)
    torch.manual_seed(seed)
    net = e3nn_nn.FullyConnectedNet([5, 8, problem.weight_numel], torch.nn.functional.silu).double().to(DEVICE)
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()  # noqa: E731
    src = torch.randint(0, NUM_NODES, (NUM_EDGES,), generator=g).to(DEVICE)
    dst = torch.randint(1, NUM_NODES, (NUM_EDGES,), generator=g).to(DEVICE)  # node 0 receives nothing
    edges = sort_edges(src, dst, NUM_NODES)
    tensors = dict(x=mk(NUM_NODES, problem.dim_in1), edge_attr=mk(NUM_EDGES, problem.dim_in2),
                   radial=mk(NUM_EDGES, 5), row_scale=mk(NUM_EDGES))
    return problem, net, edges, tensors


def evaluate(problem, net, edges, t, chunk_edges, create_graph):
    """Output, then gradients of <g, out> in x, edge_attr, radial, row_scale and the first MLP weight."""
    out = radial_conv(problem, lambda r, s: net(r) * s.reshape(-1, 1), list(net.parameters()), t["x"],
                      t["edge_attr"], t["radial"], t["row_scale"], edges, chunk_edges)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape).cos()
    wrt = [t["x"], t["edge_attr"], t["radial"], t["row_scale"], next(net.parameters())]
    grads = torch.autograd.grad(out, wrt, g, create_graph=create_graph)
    return out, grads, wrt


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("chunk_edges", [1, 9, 1000], ids=["one-receiver-chunks", "chunks", "one-chunk"])
def test_matches_kept_weights(backend, chunk_edges, monkeypatch):
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    problem, net, edges, t = setup()
    out0, grads0, _ = evaluate(problem, net, edges, t, None, create_graph=False)
    out1, grads1, _ = evaluate(problem, net, edges, t, chunk_edges, create_graph=False)
    torch.testing.assert_close(out1, out0, rtol=0, atol=1e-12)
    for a, b in zip(grads1, grads0):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("chunk_edges", [9, 1000], ids=["chunks", "one-chunk"])
def test_second_derivatives_match(chunk_edges, monkeypatch):
    """d/d(everything) of <h, d out/d edge_attr>: what training on forces differentiates."""
    monkeypatch.setenv("FASTMLIP_BACKEND", "reference")
    problem, net, edges, t = setup(seed=1)
    results = []
    for chunk in (None, chunk_edges):
        _, grads, wrt = evaluate(problem, net, edges, t, chunk, create_graph=True)
        h = torch.linspace(-2, 1, grads[1].numel(), dtype=torch.float64, device=DEVICE).reshape(grads[1].shape)
        results.append(torch.autograd.grad(grads[1], wrt, h.sin(), allow_unused=True))
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-11)


def test_receiver_chunks_cover_every_edge_once():
    _, _, edges, _ = setup()
    for chunk_edges in (1, 5, 9, 39, 40):
        chunks = receiver_chunks(edges.dst_ptr, chunk_edges)
        assert chunks[0].first == 0 and chunks[-1].last == NUM_NODES
        assert chunks[0].edge_start == 0 and chunks[-1].edge_end == NUM_EDGES
        ptr = edges.dst_ptr.tolist()
        for a, b in zip(chunks, chunks[1:]):
            assert a.last == b.first and a.edge_end == b.edge_start
        for c in chunks:
            # within the limit unless one receiver alone has more edges
            assert c.edge_end - c.edge_start <= chunk_edges or c.last - c.first == 1
            assert (c.edge_start, c.edge_end) == (ptr[c.first], ptr[c.last])
    with pytest.raises(ValueError, match="positive"):
        receiver_chunks(edges.dst_ptr, 0)
