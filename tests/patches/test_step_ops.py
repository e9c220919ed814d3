"""What a GPU step of an accelerated model dispatches, listed on a CPU.

The backward of an advanced-indexing gather (``x[idx]``) is ``index_put_`` with accumulate, which CUDA runs by
sorting every index: 57 ms of an 86 ms MACE-medium Cu 4000 step on an H200. ``index_select``/``index_add_`` do
the same sums with atomics in microseconds. These tests run one energy+forces+stress step of each framework's
accelerated model on the Triton backend (the GPU's code path; kernel launches are skipped, so their outputs are
garbage, which no aten operator's choice depends on) and fail on any accumulating ``index_put``.
"""
from __future__ import annotations

import collections
import traceback
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmlip.patches import self_check

pytest.importorskip("triton")


class DispatchRecorder(TorchDispatchMode):
    """Every aten operator a step dispatches (backward included) with the line that called it; fastmlip's custom
    operators are entered, so what their bodies dispatch counts too."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()
        self.names = collections.Counter()  # every operator, by name
        self.narrow_row_gathers = collections.Counter()  # index_select of 16-byte-aligned rows of 16-256 bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("fastmlip::"):
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        self.names[name] += 1
        accumulate = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
        if "index_put" in name and accumulate:
            self.calls[name, _call_site()] += 1
        if name == "aten::index_select" and args[1] == 0 and args[0].dim() > 1:
            row_bytes = args[0][0].numel() * args[0].element_size() if args[0].shape[0] else 0
            if row_bytes % 16 == 0 and 0 < row_bytes <= 256:
                self.narrow_row_gathers[_call_site()] += 1
        return func(*args, **kwargs)


def _call_site() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/torch/" not in frame.filename and "test_step_ops" not in frame.filename:
            return f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno} {frame.name}"
    return "autograd backward"


@pytest.fixture
def kernels_skipped(monkeypatch, tmp_path):
    """Triton backend with every kernel launch a no-op (the interpreter would take minutes at full width)."""
    from triton.runtime import interpreter

    monkeypatch.setenv("FASTMLIP_BACKEND", "triton")
    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(interpreter.InterpretedFunction, "run", lambda *args, **kwargs: None)


def accumulating_index_puts(patch, model, atoms, cutoff) -> dict:
    recorder = DispatchRecorder()
    edges = self_check.neighbor_edges(atoms, cutoff)
    with recorder:
        self_check.compute_on_atoms(patch, model, atoms, edges, compute_stress=True)
    return dict(recorder.calls)


def test_mace_step_has_no_index_backward(kernels_skipped):
    pytest.importorskip("mace.modules")
    from helpers import mace_models

    from fastmlip.patches import mace as patch

    model = mace_models.build_model("mp0_medium", channels=16).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert patch.accelerate(model) == []
    assert accumulating_index_puts(patch, model, mace_models.periodic_structure(1), mace_models.R_MAX) == {}


def dispatched(call) -> collections.Counter:
    """The operators ``call()`` dispatches, by name."""
    recorder = DispatchRecorder()
    with recorder:
        call()
    return recorder.names


def structure_tensors(atoms, cutoff) -> tuple:
    """``compute``'s structure arguments as tensors, kept for the calls that follow (as the MD engine keeps them)."""
    i, j, shifts = self_check.neighbor_edges(atoms, cutoff)
    return (torch.as_tensor(atoms.positions), torch.as_tensor(atoms.cell.array), tuple(atoms.pbc),
            torch.as_tensor(atoms.numbers), i, j, shifts)


def first_and_second_step(patch, model, atoms, cutoff) -> tuple:
    """The operators of two steps over the same structure tensors, after a step over other tensors of the same
    structure: that one builds what belongs to the parameters, not to the structure (the radial tables)."""
    patch.compute(model, *structure_tensors(atoms, cutoff), validated=True)
    structure = structure_tensors(atoms, cutoff)
    return tuple(dispatched(lambda: patch.compute(model, *structure, validated=True)) for _ in range(2))


def accelerated_sevennet():
    """(patch, SevenNet-0 accelerated in float32, rattled Si)."""
    pytest.importorskip("sevenn")
    from ase.build import bulk

    from fastmlip.patches import sevenn as patch

    if patch.resolve("7net-0") is None:
        pytest.skip("7net-0 is not installed with sevenn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = patch.load("7net-0", dtype=torch.float32)
        assert patch.accelerate(model) == []
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=3)
    return patch, model, atoms


def test_mace_step_gathers_its_reshape_and_keeps_its_species(kernels_skipped):
    """Launches a MACE step no longer makes: reshape_irreps as one gather (its slices cost a zeroed gradient and
    a copy per irrep in the backward, then the sums), and the one-hot species, the e0 per node and
    ScaleShiftMACE's per-node scale and shift made once per numbers tensor (a second step of the same structure
    computes none of it)."""
    pytest.importorskip("mace.modules")
    from helpers import mace_models

    from fastmlip.patches import mace as patch

    model = mace_models.build_model("mp0_medium", channels=16).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert patch.accelerate(model) == []
    first, second = first_and_second_step(patch, model, mace_models.periodic_structure(1), mace_models.R_MAX)
    once = {"aten::argmax", "aten::scatter_"}  # the species' one-hot
    assert once <= set(first) and not once & set(second), second
    assert first["aten::mm"] - second["aten::mm"] == 1, (first, second)  # the e0 per node
    assert first["aten::index"] - second.get("aten::index", 0) == 2, (first, second)  # scale[head], shift[head]
    # before: a slice_backward per irrep and layer (8 here) and a cat per layer; one is left, the readout's head
    assert first["aten::slice_backward"] <= 1 and "aten::cat" not in first, first


def test_sevennet_step_has_no_index_backward(kernels_skipped):
    patch, model, atoms = accelerated_sevennet()
    assert accumulating_index_puts(patch, model, atoms, model.cutoff) == {}


@pytest.mark.parametrize("framework", ["mace", "sevenn"])
def test_narrow_edge_rows_are_not_gathered_by_index_select(framework, kernels_skipped, monkeypatch):
    """CUDA's index_select takes a thread block per row where rows are 16-byte aligned (vectorized_gather_kernel):
    for the 32-64-byte edge rows a step puts into receiver order that cost 0.40 ms of a MACE Cu 4000 step. Those
    go through fastmlip::permute, and no other such gather is left in a step."""
    if framework == "mace":
        pytest.importorskip("mace.modules")
        from helpers import mace_models

        from fastmlip.patches import mace as patch

        model = mace_models.build_model("mp0_medium", channels=16).float()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert patch.accelerate(model) == []
        atoms, cutoff = mace_models.periodic_structure(1), mace_models.R_MAX
    else:
        patch, model, atoms = accelerated_sevennet()
        cutoff = model.cutoff
    def narrow_row_gathers():
        recorder = DispatchRecorder()
        with recorder:
            self_check.compute_on_atoms(patch, model, atoms, self_check.neighbor_edges(atoms, cutoff))
        return dict(recorder.narrow_row_gathers)

    assert narrow_row_gathers() == {}
    monkeypatch.setenv("FASTMLIP_BACKEND", "reference")  # the CPU's path: index_select, which the check sees
    assert narrow_row_gathers()


def test_sevennet_step_without_stress_builds_no_virial(kernels_skipped):
    """MD without a barostat asks for no stress: no virial (~11 launches a step), and the cell volume is made
    once per cell tensor."""
    patch, model, atoms = accelerated_sevennet()
    structure = structure_tensors(atoms, model.cutoff)

    def step(stress: bool):
        out = patch.compute(model, *structure, compute_stress=stress, validated=True)
        assert (out["stress"] is not None) == stress

    first, again, stressed = dispatched(lambda: step(False)), dispatched(lambda: step(False)), \
        dispatched(lambda: step(True))
    assert "aten::linalg_cross" in first and "aten::linalg_cross" not in again, again
    assert "aten::cat" not in again and "aten::cat" in stressed, again


def test_sevennet_species_embedding_is_made_once_per_structure(kernels_skipped):
    """The species lookup, one-hot embedding and per-species energy scale and shift are kept on the
    atomic-numbers tensor: a second step of the same structure launches none of them."""
    patch, model, atoms = accelerated_sevennet()
    first, second = first_and_second_step(patch, model, atoms, model.cutoff)
    assert "aten::scatter_" in first and "aten::scatter_" not in second, second
    assert second["aten::index_select"] == first["aten::index_select"] - 1, (first, second)
    assert first["aten::index"] - second.get("aten::index", 0) == 2, (first, second)  # scale[z], shift[z]


def test_the_recorder_sees_an_index_backward():
    """The recorder itself: ``x[idx]``'s backward is what it must catch."""
    x = torch.randn(5, 3, requires_grad=True)
    recorder = DispatchRecorder()
    with recorder:
        x[torch.tensor([0, 0, 3])].sum().backward()
    assert sum(recorder.calls.values()) == 1
