"""Whole accelerated models on the Triton backend against the same models on the reference backend.

Without CUDA every kernel (fused convolution, o3.Linear, gate, radial basis and MLP, symmetric contraction,
species linear, spherical harmonics) runs in Triton's interpreter (TRITON_INTERPRET=1, set in conftest) with its
outputs poisoned with NaN, so an element a kernel forgets to write shows up. Energies, per-atom energies, forces and
stress must agree to the accelerated-model tolerances; edges come in a shuffled order, so the atomic (unsorted)
paths run where a model does not sort its edges itself. Small structures keep the interpreter at about a minute
per model.
"""
import warnings

import pytest
import torch

from fastmlip.kernels import conv as conv_kernels
from fastmlip.kernels import conv_table
from fastmlip.kernels import gate as gate_kernels
from fastmlip.kernels import launch
from fastmlip.kernels import linear as linear_kernels
from fastmlip.kernels import (radial_basis, radial_mlp, radial_table, species_linear, spherical_harmonics,
                              symmetric_contraction)
from fastmlip.patches import self_check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


KERNEL_MODULES = (conv_kernels, conv_table, gate_kernels, linear_kernels, radial_basis, radial_mlp, radial_table,
                  species_linear, spherical_harmonics, symmetric_contraction)


@pytest.fixture
def kernel_calls(monkeypatch, tmp_path_factory):
    """Poisoned outputs, and a record of which kernel families ran: {"conv.forward", "gate.backward", ...}."""
    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path_factory.getbasetemp() / "fastmlip-cache"))
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    calls = set()
    for module in KERNEL_MODULES:
        family = module.__name__.rpartition(".")[2]
        for entry in ("table_forward", "table_backward") if module is conv_table else ("forward", "backward"):
            monkeypatch.setattr(module, entry, _recorded(getattr(module, entry), f"{family}.{entry}", calls))
    return calls


def _recorded(function, name, calls):
    def wrapper(*args, **kwargs):
        calls.add(name)
        return function(*args, **kwargs)

    return wrapper


def ran_forward_and_backward(calls, families):
    return {f"{family}.{entry}" for family in families for entry in ("forward", "backward")} <= calls


def convolution_calls(dtype) -> set:
    """The kernels of a convolution with its radial MLP under the default (FASTMLIP_RADIAL_TABLE=auto): float32
    on the kernels' backend reads the MLP from a table inside the convolution (the basis of the lengths, which
    the table replaces, then gets no gradient); float64 computes the MLP."""
    if dtype == torch.float32:
        return {"conv_table.table_forward", "conv_table.table_backward", "radial_basis.forward"}
    return {f"{family}.{entry}" for family in ("conv", "radial_mlp", "radial_basis")
            for entry in ("forward", "backward")}


def backends_agree(patch, model, atoms, monkeypatch, cutoff):
    """Evaluate the accelerated ``model`` on both backends; returns the deviation (asserted within tolerance)."""
    edges = self_check.neighbor_edges(atoms, cutoff)
    order = torch.randperm(edges[0].numel(), generator=torch.Generator().manual_seed(11))
    edges = tuple(t[order] for t in edges)
    results = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("FASTMLIP_BACKEND", backend)
        results[backend] = self_check.compute_on_atoms(patch, model, atoms, edges)
    dtype = results["reference"]["forces"].dtype
    e_tol, f_tol, _ = self_check.tolerances(dtype)
    dev = self_check.deviation(results["reference"], results["triton"], len(atoms))
    assert dev["energy_per_atom"] <= e_tol and dev["forces"] <= f_tol, dev
    if results["reference"]["stress"] is not None:
        assert dev["stress"] <= f_tol, dev
    assert torch.isfinite(results["triton"]["forces"]).all()
    return dev


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_sevennet0_triton_matches_reference(dtype, kernel_calls, monkeypatch):
    pytest.importorskip("sevenn")
    from ase.build import bulk

    from fastmlip.patches import sevenn as patch

    if "7net-0" not in patch.pretrained_checkpoints():
        pytest.skip("7net-0 is not installed with sevenn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = patch.load("7net-0", device=DEVICE, dtype=dtype)
    assert patch.accelerate(model) == []
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.05, seed=3)
    print(backends_agree(patch, model, atoms, monkeypatch, model.cutoff))
    assert convolution_calls(dtype) <= kernel_calls, kernel_calls
    assert ran_forward_and_backward(kernel_calls, ("gate", "linear", "spherical_harmonics")), kernel_calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_mace_triton_matches_reference(dtype, kernel_calls, monkeypatch):
    pytest.importorskip("mace.modules")
    from helpers import mace_models

    from fastmlip.patches import mace as patch

    # MACE-MP-0-medium's irreps, correlation and radial MLP at 32 channels (128 cost the interpreter ~4x the time;
    # every kernel path, multi-piece contractions included, is the same)
    model = mace_models.build_model("mp0_medium", channels=32).to(device=DEVICE, dtype=dtype)
    assert patch.accelerate(model) == []
    atoms = mace_models.periodic_structure(seed=5)[:4]
    print(backends_agree(patch, model, atoms, monkeypatch, mace_models.R_MAX))
    assert convolution_calls(dtype) <= kernel_calls, kernel_calls
    assert ran_forward_and_backward(kernel_calls, ("linear", "species_linear", "spherical_harmonics",
                                                   "symmetric_contraction")), kernel_calls


@pytest.mark.parametrize("framework, mode", [("sevenn", "lengths"), ("mace", "conv")])
def test_radial_tables_through_the_kernels(framework, mode, kernel_calls, monkeypatch):
    """Radial tables, float32, through the kernels against the reference, which reads the same tables
    (tests/patches/test_radial_tables.py holds that against the original models): with ``lengths`` the table's
    kernel makes the weights and the convolution's sender walk their length gradients; with ``conv`` the
    convolution's kernels read the weights from the table themselves, forward and backward."""
    from ase.build import bulk

    from fastmlip.kernels.launch import use_settings

    if framework == "sevenn":
        pytest.importorskip("sevenn")
        from fastmlip.patches import sevenn as patch

        if "7net-0" not in patch.pretrained_checkpoints():
            pytest.skip("7net-0 is not installed with sevenn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = patch.load("7net-0", device=DEVICE, dtype=torch.float32)
        atoms, cutoff = bulk("Si", "diamond", a=5.43), model.cutoff
        atoms.rattle(0.05, seed=3)
    else:
        pytest.importorskip("mace.modules")
        from helpers import mace_models

        from fastmlip.patches import mace as patch

        model = mace_models.build_model("mp0_medium", channels=32).to(device=DEVICE, dtype=torch.float32)
        atoms, cutoff = mace_models.periodic_structure(seed=5)[:4], mace_models.R_MAX
    assert patch.accelerate(model) == []
    with use_settings(radial_table=mode):
        print(backends_agree(patch, model, atoms, monkeypatch, cutoff))
    assert "conv_table.table_backward" in kernel_calls, kernel_calls
    assert not {"radial_mlp.forward", "radial_table.backward"} & kernel_calls, kernel_calls
    if mode == "conv":  # no weights made outside the convolution
        assert "conv_table.table_forward" in kernel_calls and "radial_table.forward" not in kernel_calls, kernel_calls
    else:
        assert "radial_table.forward" in kernel_calls and "conv_table.table_forward" not in kernel_calls, kernel_calls
