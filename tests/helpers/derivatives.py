"""One comparison of an op with its reference, to second order, for every op test (as e3nn's
``assert_equivariant`` is one check of equivariance): MD needs the values and forces (first derivatives) exact, and
training on forces needs the second derivatives through the op's own autograd."""
from __future__ import annotations

import torch


def _derivatives(fn, inputs, seed: int, second_order: bool) -> tuple:
    """(names, tensors): fn's value, the gradient of <probe, fn> by every input and (``second_order``) the
    gradient of <h, d<probe, fn>/d inputs[0]> by every input; random probe and h fixed by ``seed``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)

    def random(like, offset):
        generator = torch.Generator().manual_seed(seed + offset)
        return torch.randn(like.shape, generator=generator, dtype=like.dtype).to(like.device)

    first = torch.autograd.grad(out, leaves, random(out, 0), create_graph=second_order, allow_unused=True)
    first = [torch.zeros_like(t) if g is None else g for g, t in zip(first, leaves)]
    names = ["value"] + [f"d/d input {i}" for i in range(len(leaves))]
    results = [out.detach()] + [g.detach() for g in first]
    if second_order:
        second = torch.autograd.grad((first[0] * random(first[0], 1)).sum(), leaves, allow_unused=True)
        names += [f"d2/d input 0 d input {i}" for i in range(len(leaves))]
        results += [torch.zeros_like(t) if g is None else g for g, t in zip(second, leaves)]
    return names, results


def assert_close(actual, expected, rtol: float, what: str = "value") -> None:
    """Largest deviation within ``rtol`` x max(largest |expected|, 1); NaN or inf anywhere fails (kernel outputs
    start as NaN under ``launch.POISON_OUTPUTS``, so an element never written shows)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if expected.numel() == 0:
        return
    scale = expected.double().abs().max().clamp_min(1.0)
    err = ((actual.double() - expected.double()).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def assert_matches_reference(fast_fn, reference_fn, inputs, *, rtol: float, second_order: bool = True,
                             seed: int = 0) -> None:
    """``fast_fn(*inputs)`` against ``reference_fn(*inputs)``: the values, every first derivative and (with
    ``second_order``) the double backward of the first input's gradient by every input, within ``rtol`` (see
    :func:`assert_close`); a derivative one side does not define counts as zero.

    Put first the input whose gradient MD takes (positions, edge vectors, edge attributes): its double backward
    is what training on forces runs. Each function's value and derivatives are all taken before the other
    function is called, so a function may pick its backend when it is called."""
    names, expected = _derivatives(reference_fn, inputs, seed, second_order)
    _, actual = _derivatives(fast_fn, inputs, seed, second_order)
    for name, a, e in zip(names, actual, expected):
        assert_close(a, e, rtol, name)
