"""Radial MLPs read from tables (FASTMLIP_RADIAL_TABLE) in whole models: the shipped SevenNet checkpoints and MACE
models with MACE-MP/OFF hyperparameters still reproduce their originals within the float32 tolerances; where a
table is not used (float64, training, setting off) the MLP runs; a table follows in-place changes of the weights.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from fastmlip.kernels.launch import use_settings
from fastmlip.ops import radial_table as table_ops
from fastmlip.ops import table_conv as table_conv_ops
from fastmlip.patches import self_check


@pytest.fixture
def table_reads(monkeypatch):
    """The tables the convolutions read their weights from, once per read: by the convolution that reads a table
    (``table_conv``), or by ``radial_table`` (chunked convolutions)."""
    reads = []

    def count(module, name, table_argument):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            reads.append(args[table_argument])
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)

    count(table_ops, "radial_table", 0)
    count(table_conv_ops, "table_conv", 1)
    return reads


def sevenn_model(name, dtype=torch.float32, device="cpu"):
    pytest.importorskip("sevenn")
    from fastmlip.patches import sevenn as patch

    if name not in patch.pretrained_checkpoints():
        pytest.skip(f"{name} is not installed with sevenn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return patch, patch.load(name, device=device, dtype=dtype)


def silicon(repeat=1):
    from ase.build import bulk

    atoms = bulk("Si", "diamond", a=5.43, cubic=True) * (repeat, repeat, repeat)
    atoms.rattle(0.05, seed=1)
    return atoms


def original_and_accelerated(patch, model, atoms, mode, cutoff, modal=None):
    edges = self_check.neighbor_edges(atoms, cutoff)
    original = self_check.compute_on_atoms(patch, model, atoms, edges, modal=modal)
    assert patch.accelerate(model) == []
    try:
        with use_settings(radial_table=mode):
            accelerated = self_check.compute_on_atoms(patch, model, atoms, edges, modal=modal)
    finally:
        patch.restore(model)
    return original, accelerated


def assert_within_tolerances(original, accelerated, num_atoms, dtype):
    e_tol, f_tol, s_tol = self_check.tolerances(dtype)
    deviation = self_check.deviation(original, accelerated, num_atoms)
    assert deviation["energy_per_atom"] <= e_tol and deviation["forces"] <= f_tol, deviation
    assert deviation.get("stress", 0.0) <= s_tol, deviation  # no cell, no stress
    return deviation


@pytest.mark.parametrize("name, mode", [("7net-0", "lengths"), ("7net-0", "edges"), ("7net-0", "conv"),
                                        ("7net-l3i5", "lengths"), ("7net-mf-0", "lengths")])
def test_sevennet_checkpoints_keep_the_float32_tolerances(name, mode, table_reads):
    patch, model = sevenn_model(name)
    modal = (patch.model_info(model)["modals"] or [None])[0]
    atoms = silicon()
    original, accelerated = original_and_accelerated(patch, model, atoms, mode, model.cutoff, modal)
    convolutions = sum(type(m).__name__ == "IrrepsConvolution" for m in model.modules())
    assert len(table_reads) == convolutions  # every layer read its table
    print(f"{name} {mode}: {assert_within_tolerances(original, accelerated, len(atoms), torch.float32)}")


@pytest.mark.parametrize("config, mode", [("mp0_medium", "lengths"), ("mp0_medium", "conv"), ("off_like", "lengths")])
def test_mace_models_keep_the_float32_tolerances(config, mode, table_reads):
    pytest.importorskip("mace.modules")
    from fastmlip.patches import mace as patch
    from helpers.mace_models import R_MAX, build_model, periodic_structure

    model = build_model(config).float().eval()
    atoms = periodic_structure(seed=1)
    original, accelerated = original_and_accelerated(patch, model, atoms, mode, R_MAX)
    assert len(table_reads) == len(model.interactions)
    print(f"{config}: {assert_within_tolerances(original, accelerated, len(atoms), torch.float32)}")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["edges", "lengths", "conv", "auto"])
def test_on_the_gpu_the_kernels_keep_the_float32_tolerances(mode, table_reads):
    """SevenNet-0 on 64 Si atoms and a MACE-MP-medium-like model on its 8-atom cell, tables read by the kernels
    (auto, the default, reads them there too)."""
    pytest.importorskip("mace.modules")
    from fastmlip.patches import mace as mace_patch
    from helpers.mace_models import R_MAX, build_model, periodic_structure

    patch, model = sevenn_model("7net-0", device="cuda")
    atoms = silicon(repeat=2)
    original, accelerated = original_and_accelerated(patch, model, atoms, mode, model.cutoff)
    print(f"7net-0 {mode}: {assert_within_tolerances(original, accelerated, len(atoms), torch.float32)}")
    model = build_model("mp0_medium").float().eval().cuda()
    atoms = periodic_structure(seed=1)
    original, accelerated = original_and_accelerated(mace_patch, model, atoms, mode, R_MAX)
    print(f"mp0_medium {mode}: {assert_within_tolerances(original, accelerated, len(atoms), torch.float32)}")
    assert len(table_reads) == 5 + 2


def test_auto_reads_tables_where_the_kernels_run(table_reads):
    """The default (auto) is conv where the convolution runs as fastmlip's kernels and off on the reference
    backend: SevenNet-0 on the CPU reads no table; a named setting holds everywhere."""
    from fastmlip.ops import dispatch
    from fastmlip.patches.e3nn_modules import table_mode

    cpu = torch.zeros(1)
    with use_settings(radial_table="auto"):
        assert table_mode(cpu) == "off"
        with dispatch.kernels_on_cpu():
            assert table_mode(cpu) == "conv"
        patch, model = sevenn_model("7net-0")
        atoms = silicon()
        original, accelerated = original_and_accelerated(patch, model, atoms, "auto", model.cutoff)
        assert not table_reads
        assert_within_tolerances(original, accelerated, len(atoms), torch.float32)
    with use_settings(radial_table="lengths"):
        assert table_mode(cpu) == "lengths"


def test_no_table_in_float64_in_training_or_when_off(table_reads):
    patch, model = sevenn_model("7net-0", torch.float64)
    atoms = silicon()
    edges = self_check.neighbor_edges(atoms, model.cutoff)
    patch.accelerate(model)
    try:
        with use_settings(radial_table="lengths"):
            self_check.compute_on_atoms(patch, model, atoms, edges)
        assert not table_reads
    finally:
        patch.restore(model)
    patch, model = sevenn_model("7net-0")
    patch.accelerate(model)
    try:
        self_check.compute_on_atoms(patch, model, atoms, edges)
        assert not table_reads  # the setting's default: off
        model.train()
        weights = [p for name, p in model.named_parameters() if "weight_nn" in name]
        for weight in weights:
            weight.requires_grad_(True)
        with use_settings(radial_table="lengths"):
            result = self_check.compute_on_atoms(patch, model, atoms, edges)
        assert not table_reads  # training: the MLP runs, so its weights get their gradients
        assert result["forces"].shape == (len(atoms), 3)
    finally:
        for weight in weights:
            weight.requires_grad_(False)
        model.eval()
        patch.restore(model)


def test_a_table_follows_in_place_changes_of_the_weights(table_reads):
    patch, model = sevenn_model("7net-0")
    atoms = silicon()
    edges = self_check.neighbor_edges(atoms, model.cutoff)
    last_weight = [p for name, p in model.named_parameters() if "weight_nn" in name][-1]
    saved = last_weight.detach().clone()
    try:
        with torch.no_grad():
            last_weight.mul_(1.5)
        original = self_check.compute_on_atoms(patch, model, atoms, edges)
        with torch.no_grad():
            last_weight.copy_(saved)
        patch.accelerate(model)
        with use_settings(radial_table="lengths"):
            before = self_check.compute_on_atoms(patch, model, atoms, edges)
            with torch.no_grad():
                last_weight.mul_(1.5)
            after = self_check.compute_on_atoms(patch, model, atoms, edges)
        layers = len(table_reads) // 2
        assert table_reads[0] is table_reads[layers]  # the first layer's table kept
        assert table_reads[layers - 1] is not table_reads[-1]  # the last layer's tabulated again
        assert self_check.deviation(original, before, len(atoms))["energy_per_atom"] > 1e-4
        assert_within_tolerances(original, after, len(atoms), torch.float32)
    finally:
        with torch.no_grad():
            last_weight.copy_(saved)
        patch.restore(model)


def test_chunked_convolutions_read_the_same_tables(table_reads):
    """Receivers in chunks (memory-bounded convolutions) recompute their weights from the table in the backward."""
    import fastmlip

    patch, model = sevenn_model("7net-0")
    atoms = silicon()
    edges = self_check.neighbor_edges(atoms, model.cutoff)
    patch.accelerate(model)
    try:
        with use_settings(radial_table="lengths"):
            whole = self_check.compute_on_atoms(patch, model, atoms, edges)
            fastmlip.chunk_convolutions(model, 100)
            chunked = self_check.compute_on_atoms(patch, model, atoms, edges)
    finally:
        fastmlip.chunk_convolutions(model, None)
        patch.restore(model)
    assert len(table_reads) > 10  # the chunks' forward and backward read it too
    deviation = self_check.deviation(whole, chunked, len(atoms))
    assert deviation["energy_per_atom"] <= 1e-6 and deviation["forces"] <= 1e-5, deviation


def test_an_exported_program_holds_the_tables(tmp_path, table_reads):
    """``fastmlip convert --to exported`` with tables on: the program reads them as constants (no MLP), on any
    size, and still reproduces the original within the float32 tolerances."""
    from ase import Atoms

    from fastmlip import api, convert
    from fastmlip.patches import exported

    patch, model = sevenn_model("7net-0")
    path = tmp_path / "7net-0.pt2"
    with use_settings(radial_table="lengths"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = convert.convert("7net-0", str(path), "exported", dtype="float32")
    assert result["check"] is not None
    program = api.load(path, trusted=True)
    assert program.meta["radial_tables"] == 5
    names = {str(node.target) for node in program.program.graph.nodes if node.op == "call_function"}
    assert "fastmlip.table_conv.default" in names and not any("radial_mlp" in name for name in names)
    for atoms in (silicon(repeat=2), Atoms("O", positions=[[0, 0, 0]])):
        edges = self_check.neighbor_edges(atoms, model.cutoff)
        original = self_check.compute_on_atoms(patch, model, atoms, edges)
        from_program = self_check.compute_on_atoms(exported, program, atoms, edges)
        assert_within_tolerances(original, from_program, len(atoms), torch.float32)
