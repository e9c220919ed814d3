"""Rows and columns in another order (``fastmlip::permute``): the Triton kernel
(interpreted without CUDA, outputs poisoned) against index_select for narrow and wide rows, any trailing shape, 1-D,
no rows, and for columns; derivatives to second order; opcheck; bad input."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastmlip.ops import permute  # noqa: E402
from helpers.derivatives import assert_matches_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def permutation(n, dtype=torch.int64, seed=0):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("shape", [(37,), (37, 1), (37, 3), (37, 16), (37, 17), (37, 2, 5), (37, 80)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kernel_moves_rows_as_index_select_does(shape, dtype, triton_poisoned):
    values = torch.randn(shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    order = permutation(shape[0], torch.int32 if len(shape) == 2 else torch.int64)
    moved = permute.permute_rows(values, order)
    assert torch.equal(moved, values.index_select(0, order.long()))
    back = permute._permute(moved, order, 0, True)
    assert torch.equal(back, values)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_derivatives_are_the_move_back(backend, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path_factory.getbasetemp() / "fastmlip-cache"))
    values = torch.randn(23, 16, dtype=torch.float64, device=DEVICE)
    order = permutation(23)

    def reference(v):
        return (v * v).index_select(0, order) * 2.0

    def fast(v):
        return permute.permute_rows(v * v, order) * 2.0

    assert_matches_reference(fast, reference, [values], rtol=1e-14)


def test_no_rows_and_opcheck(triton_poisoned):
    empty = torch.zeros(0, 16, device=DEVICE)
    assert permute.permute_rows(empty, permutation(0)).shape == (0, 16)
    values = torch.randn(9, 4, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.library.opcheck(permute._permute.overload, (values, permutation(9), 0, False))
    torch.library.opcheck(permute._permute.overload, (values, permutation(9), 0, True))


def test_bad_order():
    values = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"integer permutation \[5\]"):
        permute.permute_rows(values, torch.arange(4))
    with pytest.raises(ValueError, match="integer permutation"):
        permute.permute_rows(values, torch.arange(5.0))


@pytest.mark.parametrize("width", [3, 16, 512, 640])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_kernel_moves_columns_as_index_select_does(width, dtype, triton_poisoned):
    values = torch.randn(13, width, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    index = permutation(width, seed=5)
    moved = permute.permute_columns(values, index)
    assert torch.equal(moved, values.index_select(1, index))
    assert torch.equal(permute._permute(moved, index, 1, True), values)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_column_derivatives_are_the_move_back(backend, monkeypatch, tmp_path_factory):
    monkeypatch.setenv("FASTMLIP_BACKEND", backend)
    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path_factory.getbasetemp() / "fastmlip-cache"))
    values = torch.randn(7, 12, dtype=torch.float64, device=DEVICE)
    index = permutation(12, seed=6)
    assert_matches_reference(lambda v: permute.permute_columns(v * v, index) * 2.0,
                             lambda v: (v * v).index_select(1, index) * 2.0, [values], rtol=1e-14)
    torch.library.opcheck(permute._permute.overload, (values.requires_grad_(True), index, 1, False))
    with pytest.raises(ValueError, match=r"integer permutation \[W\]"):
        permute.permute_columns(values, index[:5])
