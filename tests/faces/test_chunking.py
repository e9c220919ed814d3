"""Convolutions in chunks of receivers (weights recomputed in the backward) give the unchunked results.

float64, the calculator's own path: energy ≤1e-9 eV/atom, forces ≤1e-8 eV/A, stress alike, on SevenNet-0 (the
shipped checkpoint) and a MACE-MP-0-medium-like model, with chunks small enough that every layer runs many.
Plus the rule that picks chunking from free memory.
"""
import numpy as np
import pytest
import torch
from ase.build import bulk

from fastmlip import memory
from fastmlip.calculator import Calculator


def crystal(symbol, a, repeat, kind):
    atoms = bulk(symbol, kind, a=a, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=3)
    return atoms


def results(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def assert_same(chunked, whole, num_atoms):
    assert abs(chunked[0] - whole[0]) / num_atoms <= 1e-9
    assert np.abs(chunked[1] - whole[1]).max() <= 1e-8
    assert np.abs(chunked[2] - whole[2]).max() <= 1e-8


def check_model(make_calculator, atoms, chunk_edges, monkeypatch):
    from fastmlip.ops import radial_conv

    made = []
    original = radial_conv._receiver_chunks
    monkeypatch.setattr(radial_conv, "_receiver_chunks",
                        lambda ptr, edges: made.append(original(ptr, edges)) or made[-1])
    whole = make_calculator(None)
    chunked = make_calculator(chunk_edges)
    expected = results(whole, atoms)
    assert not made
    got = results(chunked, atoms)
    assert made and all(len(chunks) >= 3 for chunks in made)  # every edge list in several chunks
    assert whole.chunk_edges is None and chunked.chunk_edges == chunk_edges
    modules = [m for m in chunked.model.modules() if hasattr(type(m), "chunk_edges")]
    assert modules and all(m.chunk_edges == chunk_edges for m in modules)
    assert_same(got, expected, len(atoms))


def test_sevenn_0_chunked_equals_whole(monkeypatch):
    pytest.importorskip("sevenn")
    atoms = crystal("Si", 5.43, (1, 1, 1), "diamond")
    model = Calculator("7net-0", device="cpu", dtype="float64").model  # loaded and accelerated once
    check_model(lambda chunk: Calculator(model, device="cpu", chunk_edges=chunk), atoms, chunk_edges=40,
                monkeypatch=monkeypatch)


def test_mace_medium_chunked_equals_whole(monkeypatch):
    pytest.importorskip("mace.modules")
    from helpers.mace_models import build_model, periodic_structure

    model = build_model("mp0_medium")
    atoms = periodic_structure()
    check_model(lambda chunk: Calculator(model, device="cpu", dtype="float64", chunk_edges=chunk), atoms,
                chunk_edges=50, monkeypatch=monkeypatch)


def test_chunking_rule():
    widths = [1000, 1000, 500]  # weight_numel per layer
    # kept weights and the widest one's gradient, 1e5 edges * 3500 * 4 B = 1.4 GB: fit in half of 2.8 GB free,
    # not in half of 2.79 GB (the kept weights alone, 1 GB, would)
    assert memory.chunk_edges_for(widths, 100_000, 4, 2_800_000_000) is None
    assert memory.chunk_edges_for(widths, 100_000, 4, 2_790_000_000) is not None
    chunk = memory.chunk_edges_for(widths, 100_000, 4, 10**9)
    assert chunk == int(memory.CHUNK_SHARE * 10**9 // (2 * 1000 * 4))
    assert memory.chunk_edges_for(widths, 100_000, 4, 10**6) == memory.MIN_CHUNK_EDGES
    assert memory.chunk_edges_for([], 100_000, 4, 10) is None
    assert memory.chunk_edges_for(widths, 0, 4, 10) is None


def test_bad_chunk_request_and_cpu_auto():
    pytest.importorskip("sevenn")
    for bad in (0, -5, True):
        with pytest.raises(ValueError, match="chunk_edges"):
            Calculator("7net-0", device="cpu", accelerate=False, chunk_edges=bad)
    calc = Calculator("7net-0", device="cpu", check=False)
    results(calc, crystal("Si", 5.43, (1, 1, 1), "diamond"))
    assert calc.chunk_edges is None  # "auto" chunks only on a GPU short of memory
    assert torch.device(calc.device).type == "cpu"


def test_weights_read_from_tables_are_not_counted():
    """With FASTMLIP_RADIAL_TABLE=conv the convolutions keep no per-edge weights once their tables exist (built by
    the first float32 pass), so "auto" does not chunk for them; with lengths they are kept, and a weight changed in
    place makes its table stale until the next pass."""
    pytest.importorskip("sevenn")
    from fastmlip.kernels.launch import use_settings

    atoms = crystal("Si", 5.43, (1, 1, 1), "diamond")
    with use_settings(radial_table="conv"):
        calc = Calculator("7net-0", device="cpu", check=False)
        widths = [m.problem.weight_numel for m in memory.convolutions(calc.model)]
        assert memory.conv_weight_widths(calc.model) == widths and all(widths)
        results(calc, atoms)
        assert memory.conv_weight_widths(calc.model) == [0] * len(widths)
        assert memory.chunk_edges_for([0] * len(widths), 10**9, 4, 10) is None
        with use_settings(radial_table="lengths"):
            assert memory.conv_weight_widths(calc.model) == widths
        with torch.no_grad():
            next(memory.convolutions(calc.model)[0].radial_net.children()).weight.mul_(1.0)
        assert memory.conv_weight_widths(calc.model)[0] == widths[0]
        assert memory.conv_weight_widths(calc.model)[1:] == [0] * (len(widths) - 1)


@pytest.mark.gpu
def test_sevenn_0_chunked_on_the_gpu():
    """float32 on CUDA: chunked steps within the fp32 tolerances of whole ones, and never a graph replay."""
    pytest.importorskip("sevenn")
    atoms = crystal("Cu", 3.61, (4, 4, 4), "fcc")
    model = Calculator("7net-0", device="cuda").model
    whole = Calculator(model, device="cuda", chunk_edges=None)
    chunked = Calculator(model, device="cuda", chunk_edges=4096)
    expected, got = results(whole, atoms), results(chunked, atoms)
    assert chunked.chunk_edges == 4096 and not chunked.cuda_graph
    assert "chunks" in chunked.cuda_graph_obstacle
    assert abs(got[0] - expected[0]) / len(atoms) <= 1e-5
    assert np.abs(got[1] - expected[1]).max() <= 1e-4
