"""Captured steps (fastmlip.cuda_graph): padded, masked candidate edges give the exact-list results.

On the CPU the step's eager evaluation (what a capture records) is compared with ``compute`` on the exact edge
list; on CUDA (``gpu``) the calculator's graph replays are compared with its eager steps along a short MD run
that rebuilds the Verlet list and outgrows the capture's capacity.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
from ase.build import bulk

import fastmlip
from fastmlip import api
from fastmlip.calculator import Calculator
from fastmlip.cuda_graph import CapturedStep, pack_results
from fastmlip.neighbors import VerletList

pytest.importorskip("sevenn")


def _rattled_si(repeat=1, seed=1):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
    atoms.rattle(0.1, seed=seed)
    return atoms


def _masked_and_exact(model, atoms, skin):
    """Flat results of a step over padded candidate pairs with a mask, and of ``compute`` on the exact list."""
    framework = api.framework_of(model)
    info = framework.model_info(model)
    positions = torch.as_tensor(atoms.positions)
    cell = torch.as_tensor(atoms.cell.array)
    pbc = tuple(bool(p) for p in atoms.pbc)
    numbers = torch.as_tensor(atoms.numbers)
    verlet = VerletList(info["cutoff"], skin)
    edge_i, edge_j, shifts, rebuilt = verlet.candidates(positions, cell, pbc)
    exact = verlet.update(positions, cell, pbc)
    assert rebuilt and edge_i.numel() > exact[0].numel() > 0  # some pairs lie in the skin: they must be masked
    step = CapturedStep(framework, model, numbers, cell, pbc, info["cutoff"], None, True, edge_i.numel())
    assert step.capacity > edge_i.numel() and step.load_pairs(edge_i, edge_j, shifts)  # padding is used too
    step.positions.copy_(positions)
    masked = step.evaluate()
    dtype = info["dtype"]
    eager = framework.compute(model, positions.to(dtype), cell.to(dtype), pbc, numbers, *exact, compute_stress=True)
    return masked, pack_results(eager, True)


@pytest.fixture(scope="module")
def sevenn64():
    return fastmlip.accelerate(fastmlip.load("7net-0", device="cpu", dtype=torch.float64))


def test_masked_candidates_match_exact_edges_sevenn(sevenn64):
    masked, exact = _masked_and_exact(sevenn64, _rattled_si(), skin=1.0)
    assert torch.allclose(masked, exact, rtol=0, atol=1e-10)
    assert exact[1 + 8:1 + 8 + 24].abs().max() > 0.05  # forces are O(1): a sign error could not hide


def test_masked_candidates_match_exact_edges_mace():
    from helpers.mace_models import R_MAX, build_model, periodic_structure

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = fastmlip.accelerate(build_model("mp0_medium"))
        atoms = periodic_structure()
        masked, exact = _masked_and_exact(model, atoms, skin=1.0)
    finally:
        torch.set_default_dtype(previous)
    assert R_MAX == api.framework_of(model).model_info(model)["cutoff"]
    assert torch.allclose(masked, exact, rtol=0, atol=1e-10)


def test_mask_needs_accelerated_convolutions(sevenn64):
    original = fastmlip.restore(copy.deepcopy(sevenn64))
    framework = api.framework_of(original)
    assert "not accelerated" in framework.capture_obstacle(original)
    assert framework.capture_obstacle(sevenn64) is None
    atoms = _rattled_si()
    edges = VerletList(5.0, 0.0).update(torch.as_tensor(atoms.positions), torch.as_tensor(atoms.cell.array),
                                        tuple(atoms.pbc))
    mask = torch.ones(edges[0].numel(), dtype=torch.bool)
    with pytest.raises(ValueError, match="edge_mask needs an accelerated model"):
        framework.compute(original, torch.as_tensor(atoms.positions), torch.as_tensor(atoms.cell.array),
                          tuple(atoms.pbc), torch.as_tensor(atoms.numbers), *edges, edge_mask=mask)


def test_cuda_graph_option_on_cpu(sevenn64):
    calc = Calculator(sevenn64, device="cpu")
    assert calc.cuda_graph is False and "not CUDA" in calc.cuda_graph_obstacle
    with pytest.raises(ValueError, match="cannot be captured"):
        Calculator(sevenn64, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph must be"):
        Calculator(sevenn64, device="cpu", cuda_graph="yes")


def _md_forces(calc, atoms, steps, kick):
    """Forces and energies along a deterministic trajectory with large moves (rebuilds, a growing list)."""
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(0)
    energies, forces = [], []
    for step in range(steps):
        atoms.positions += rng.normal(0, kick, atoms.positions.shape)
        if step == steps // 2:
            atoms.positions *= 0.97  # compress: more Verlet candidates than the capture's capacity -> a new capture
        energies.append(atoms.get_potential_energy())
        forces.append(atoms.get_forces())
    return np.array(energies), np.array(forces)


@pytest.mark.gpu
@pytest.mark.parametrize("pairs", ["graph", "verlet"])
@pytest.mark.parametrize("dtype,tol", [("float32", (1e-5, 1e-4)), ("float64", (1e-9, 1e-8))])
def test_graph_replays_match_eager_steps_on_gpu(dtype, tol, pairs):
    atoms = _rattled_si(repeat=3)
    graphed = Calculator("7net-0", device="cuda", dtype=dtype, cuda_graph=True, pairs=pairs)
    eager = Calculator(graphed.model, device="cuda", cuda_graph=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and falls back: not here
        e_graph, f_graph = _md_forces(graphed, atoms, 12, kick=0.08)
    e_eager, f_eager = _md_forces(eager, atoms, 12, kick=0.08)
    assert graphed.cuda_graph and graphed.replays.step is not None
    if pairs == "graph":  # the exact pairs in the graph: no list to rebuild (Si's shells keep the pair count)
        assert graphed.replays_exact_pairs and graphed.neighbor_list_rebuilds == 0 and graphed.graph_captures >= 1
    else:
        assert not graphed.replays_exact_pairs and graphed.neighbor_list_rebuilds >= 3
    assert np.abs(e_graph - e_eager).max() / len(atoms) <= tol[0]
    assert np.abs(f_graph - f_eager).max() <= tol[1]
    assert np.abs(f_eager).max() > 0.05



@pytest.mark.gpu
@pytest.mark.parametrize("pairs", ["rebuilt in the graph", "Verlet"])
def test_steps_per_replay_on_gpu_follow_single_steps_and_restart(tmp_path, monkeypatch, pairs):
    """Four steps per graph replay (integrator and Langevin noise captured) against single-step replays: the same
    kernels and the same random numbers, so the same trajectory; resumed from a restart file it is the same again,
    replaying the graph the calculator kept from the first run (no capture in the resumed run).
    With pairs rebuilt in the graph nothing goes stale. With Verlet candidates at 600 K and a 0.4 A skin the list
    goes stale every ~12 steps: on CPU (the same program, eager) this run makes 20 replays of which 3 are undone;
    hotter or with 10 steps per replay every replay is undone."""
    from fastmlip import replayed_steps
    from fastmlip.md import thermalize

    if pairs == "Verlet":  # a 64-atom cell would rebuild its pairs in the graph
        monkeypatch.setattr(replayed_steps.graph_pairs, "applies", lambda *args: False)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    thermalize(atoms, 600, np.random.default_rng(0))
    calc = Calculator("7net-0", device="cuda", dtype="float64", skin=0.4, cuda_graph=True)
    options = dict(ensemble="nvt", temperature=600, thermostat="langevin", friction=0.05, seed=5, interval=20,
                   timestep=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and falls back: not here
        replayed = fastmlip.simulate(atoms, calc, steps=80, steps_per_replay=4, **options)
    single = fastmlip.simulate(atoms, calc, steps=80, **options)
    summary = replayed.timing["replays"]
    replays, undone, captures = (int(part.split()[0]) for part in summary.split(": ")[1].split(", ")[:3])
    assert summary.endswith(pairs) and captures >= 1, summary
    assert replays > undone >= (1 if pairs == "Verlet" else 0), summary
    assert np.abs(replayed.atoms.positions - single.atoms.positions).max() < 1e-9
    assert np.abs(replayed.atoms.get_momenta() - single.atoms.get_momenta()).max() < 1e-9
    restart, kept = str(tmp_path / "run.restart"), calc.kept_replay
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastmlip.simulate(atoms, calc, steps=40, steps_per_replay=4, restart=restart, **options)
        resumed = fastmlip.simulate(atoms, calc, steps=80, steps_per_replay=4, restart=restart, **options)
    # the first run's graph has room for the pairs of this trajectory: the timed resumed run captures nothing
    resumed_captures = int(resumed.timing["replays"].split(": ")[1].split(", ")[2].split()[0])
    assert calc.kept_replay is kept and resumed_captures == 0, resumed.timing["replays"]
    # bit for bit, as on a CPU (tests/faces/test_engine.py): every sum of a step has a fixed order on the GPU too
    # (convolutions walk CSR rows, forces come from node_difference; before it, atomics left ~1e-15 A)
    for quantity in ("positions", "momenta"):
        got, want = (run.atoms.arrays[quantity] for run in (resumed, replayed))
        assert np.array_equal(got, want), f"{quantity} differ by up to {np.abs(got - want).max():.3g}"
    assert "capture failed" not in "".join(str(w.message) for w in caught)
