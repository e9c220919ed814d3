"""fastmlip.simulate and its integrators (CPU): NVE against ASE, canonical statistics of both thermostats, the
barostat's mean pressure, bitwise restarts.

Statistics need thousands of steps, so they run the integrators on a Lennard-Jones argon crystal in plain torch
(the integrators only see an ``evaluate(positions, cell)``); the model-facing parts run SevenNet-0.
"""
import math
import os

import numpy as np
import pytest
import torch
from ase import units
from ase.build import bulk
from ase.io import read
from ase.md.verlet import VelocityVerlet

import fastmlip
from fastmlip import integrators
from fastmlip.calculator import Calculator
from fastmlip.cuda_graph import REGROWTH
from fastmlip.md import thermalize
from fastmlip.step_replays import StepReplays

EPSILON, SIGMA, CUTOFF = 0.0104, 3.4, 8.0  # argon, eV and A


def lennard_jones(positions, cell):
    """Energy, forces and stress (ASE's sign) of LJ argon in an orthorhombic periodic cell, all pairs by the
    minimum image (cutoff < half the box)."""
    with torch.enable_grad():
        positions = positions.detach().requires_grad_(True)
        strain = torch.zeros(3, 3, dtype=positions.dtype, requires_grad=True)
        deform = torch.eye(3, dtype=positions.dtype) + strain
        box = torch.diagonal(cell @ deform)
        delta = (positions @ deform)[None] - (positions @ deform)[:, None]
        delta = delta - box * torch.round(delta / box)
        r2 = (delta * delta).sum(-1) + torch.eye(len(positions), dtype=positions.dtype) * 1e6
        s6 = (SIGMA ** 2 / r2) ** 3
        shift = (SIGMA / CUTOFF) ** 6
        pair = 4 * EPSILON * ((s6 * s6 - s6) - (shift * shift - shift)) * (r2 < CUTOFF ** 2)
        energy = 0.5 * pair.sum()
        grad_r, grad_strain = torch.autograd.grad(energy, (positions, strain))
    volume = torch.linalg.det(cell).abs()
    return energy.detach(), -grad_r, grad_strain / volume


def argon(temperature_K=60.0, seed=0):
    atoms = bulk("Ar", "fcc", a=5.30, cubic=True).repeat(3)  # 108 atoms, box 15.9 A
    thermalize(atoms, temperature_K, np.random.default_rng(seed))
    as64 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    positions, cell = as64(atoms.positions), as64(atoms.cell.array)
    energy, forces, stress = lennard_jones(positions, cell)
    masses = as64(atoms.get_masses()).reshape(-1, 1)
    return integrators.State(positions, as64(atoms.get_momenta()), masses, cell, energy, forces, stress)


def run(integrator, state, steps, every=1, seed=1):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for step in range(steps):
        state = integrator.step(state, generator)
        if step % every == 0:
            samples.append(state)
    return samples


@pytest.mark.parametrize("thermostat", ["langevin", "csvr"])
def test_thermostats_give_canonical_kinetic_energy(thermostat):
    temperature_K, dt = 60.0, 5 * units.fs
    state = argon(temperature_K)
    if thermostat == "langevin":
        integrator = integrators.Langevin(dt, lennard_jones, temperature_K, friction=0.02 / units.fs)
    else:
        integrator = integrators.CSVR(dt, lennard_jones, temperature_K, tau=50 * units.fs)
    samples = run(integrator, state, 2000)[400:]
    kinetic = np.array([float(integrators.kinetic_energy(s.momenta, s.masses)) for s in samples])
    ndof, kT = integrators.degrees_of_freedom(108), units.kB * temperature_K
    blocks = kinetic[: len(kinetic) // 10 * 10].reshape(10, -1).mean(1)
    error = blocks.std(ddof=1) / math.sqrt(len(blocks))
    assert abs(kinetic.mean() - 0.5 * ndof * kT) < 4 * error + 0.01 * 0.5 * ndof * kT
    assert kinetic.var() == pytest.approx(0.5 * ndof * kT ** 2, rel=0.25)  # canonical: (Ndf/2) (kT)^2
    momentum = samples[-1].momenta.sum(0)
    assert float(momentum.abs().max()) < 1e-9  # no drift of the centre of mass


def test_barostat_holds_the_target_pressure():
    temperature_K, dt, target = 60.0, 5 * units.fs, 0.05 * units.GPa
    thermostat = integrators.CSVR(dt, lennard_jones, temperature_K, tau=50 * units.fs)
    barostat = integrators.CellRescaling(thermostat, temperature_K, target, compressibility=1 / (3 * units.GPa),
                                         tau=500 * units.fs)
    samples = run(barostat, argon(temperature_K), 3000)[800:]
    pressure = np.array([float(integrators.pressure(s)) for s in samples]) / units.GPa
    blocks = pressure[: len(pressure) // 10 * 10].reshape(10, -1).mean(1)
    error = blocks.std(ddof=1) / math.sqrt(len(blocks))
    assert abs(pressure.mean() - 0.05) < 4 * error + 0.01, (pressure.mean(), error)
    volumes = [float(torch.linalg.det(s.cell)) for s in samples]
    assert max(volumes) > min(volumes)  # the cell did move


@pytest.fixture(scope="module")
def sevenn64():
    return Calculator("7net-0", device="cpu", dtype="float64", accelerate=False)


def silicon():
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=1)
    thermalize(atoms, 300, np.random.default_rng(0))
    return atoms


def test_nve_equals_ase_velocity_verlet(sevenn64):
    """The first 50 steps of the engine and of ASE's VelocityVerlet with fastmlip.Calculator, fp64."""
    atoms = silicon()
    result = fastmlip.simulate(atoms, sevenn64, steps=50, timestep=1.0)
    reference = atoms.copy()
    reference.calc = Calculator(sevenn64.model, device="cpu")
    VelocityVerlet(reference, timestep=1.0 * units.fs).run(50)
    assert np.abs(result.atoms.positions - reference.positions).max() < 1e-8
    assert np.abs(result.atoms.get_momenta() - reference.get_momenta()).max() < 1e-8
    assert result.thermo["step"].tolist() == list(range(0, 51, 10))


def test_restart_continues_bit_for_bit_and_trajectory_is_readable(sevenn64, tmp_path):
    atoms = silicon()
    options = dict(ensemble="nvt", temperature=300, thermostat="langevin", interval=2, seed=3, restart_every=3)
    whole = fastmlip.simulate(atoms, sevenn64, steps=12, **options)
    restart, trajectory = tmp_path / "run.restart", tmp_path / "run.extxyz"
    fastmlip.simulate(atoms, sevenn64, steps=6, restart=str(restart), trajectory=str(trajectory), **options)
    resumed = fastmlip.simulate(atoms, sevenn64, steps=12, restart=str(restart), trajectory=str(trajectory),
                                **options)
    assert np.array_equal(whole.atoms.positions, resumed.atoms.positions)
    assert np.array_equal(whole.atoms.get_momenta(), resumed.atoms.get_momenta())
    saved = torch.load(restart, weights_only=True)  # the step's results and where the list was built, as well
    assert saved["step"] == 12 and saved["forces"].shape == (len(atoms), 3) and len(saved["neighbors"]) == 2
    assert np.array_equal(saved["forces"].numpy(), resumed.atoms.get_forces())
    for key in whole.thermo:
        assert np.array_equal(whole.thermo[key], resumed.thermo[key])
    frames = read(trajectory, index=":")
    assert len(frames) == 7 and np.allclose(frames[-1].positions, resumed.atoms.positions)
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []  # written aside, renamed into place
    with pytest.raises(ValueError, match="other settings .*temperature"):
        fastmlip.simulate(atoms, sevenn64, steps=14, restart=str(restart), **dict(options, temperature=400))


def test_settings_are_checked(sevenn64):
    atoms = silicon()
    with pytest.raises(ValueError, match="ensemble must be one of"):
        fastmlip.simulate(atoms, sevenn64, steps=1, ensemble="nvx")
    with pytest.raises(ValueError, match="needs a temperature"):
        fastmlip.simulate(atoms, sevenn64, steps=1, ensemble="nvt")
    with pytest.raises(ValueError, match="needs a pressure"):
        fastmlip.simulate(atoms, sevenn64, steps=1, ensemble="npt", temperature=300)


def _hot_silicon(repeat: int, interval: int):
    """Rattled silicon at 1500 K and the NVT Langevin options (2 fs steps) of the replay tests: many rebuilds."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
    atoms.rattle(0.05, seed=1)
    thermalize(atoms, 1500, np.random.default_rng(0))
    return atoms, dict(ensemble="nvt", temperature=1500, thermostat="langevin", friction=0.05, seed=5,
                       interval=interval, timestep=2.0)


@pytest.fixture
def first_capture_half_room(monkeypatch):
    """The test's first captured step gets room for half its pairs, so they outgrow it (later ones get what they
    ask for); the list returned collects the pair counts every capture asked for."""
    sizes = []
    original = StepReplays.captured_step

    def captured_step(replays, cell, pbc, with_stress, num_pairs, **options):
        sizes.append(num_pairs)
        return original(replays, cell, pbc, with_stress, num_pairs // 2 if len(sizes) == 1 else num_pairs,
                        **options)

    monkeypatch.setattr(StepReplays, "captured_step", captured_step)
    return sizes


@pytest.fixture
def eager_graphs(monkeypatch):
    """CUDA-graph steps on the CPU: capture records nothing and a replay runs the captured step eagerly, so the
    calculator's graph path (masked Verlet candidates, static buffers) and the engine's deferred list checks run
    here as they do on a GPU. Replays evaluate the Verlet candidates unless ``pairs="graph"`` is asked for."""
    from fastmlip.cuda_graph import CapturedStep

    def replay(step, positions):
        step.positions.copy_(positions)
        return step.evaluate()

    monkeypatch.setattr(CapturedStep, "capture", lambda step, positions: step.positions.copy_(positions))
    monkeypatch.setattr(CapturedStep, "replay", replay)

    def calculator(pairs="verlet", **options):
        calc = Calculator("7net-0", device="cpu", dtype="float64", skin=0.4, pairs=pairs, **options)
        calc.replays.enabled, calc.replays.request = True, True
        return calc

    return calculator


def test_replays_with_pairs_rebuilt_in_the_graph_follow_the_verlet_replays(eager_graphs, first_capture_half_room):
    """Calculator(pairs="graph"): each replay builds its exact pairs itself, so deferred checks only redo steps
    whose pairs outgrew the capacity (forced here: the first capture gets room for half of them) and read the
    device once per 64 steps; the trajectory is the one of replays on Verlet candidates, to fp64 rounding."""
    atoms, options = _hot_silicon(2, interval=10)
    exact = eager_graphs(pairs="graph")
    run = fastmlip.simulate(atoms, exact, steps=20, **options)
    checks, sizes = run.timing["list_checks"], list(first_capture_half_room)
    assert exact.replays_exact_pairs and exact.neighbor_list_rebuilds == 0, checks
    assert exact.graph_captures >= 2 and len(sizes) >= 2, checks  # captured again with room for all pairs
    assert exact.replays.step.capacity == math.ceil(REGROWTH * sizes[-1])  # and more room than at first
    reasons = exact.replays.capture_reasons  # the summary says why each capture was made
    assert reasons[0] == "first" and "pairs outgrew the room" in reasons[1:], reasons
    assert checks.split(" captures: ")[1].startswith("first; pairs outgrew the room"), checks
    verlet = fastmlip.simulate(atoms, eager_graphs(), steps=20, **options)
    assert np.abs(run.atoms.positions - verlet.atoms.positions).max() < 1e-9
    assert np.abs(run.atoms.get_momenta() - verlet.atoms.get_momenta()).max() < 1e-9
    frame = atoms.copy()
    frame.calc = exact
    assert abs(frame.get_potential_energy() - verlet.thermo["epot"][0]) < 1e-9  # the ASE face takes the same path
    with pytest.raises(ValueError, match="pairs must be"):
        Calculator("7net-0", device="cpu", pairs="cells")


def test_deferred_list_checks_give_the_trajectory_of_checking_every_step(eager_graphs, monkeypatch):
    """Chunks of steps on an unchecked list, with the list's validity read once per chunk and invalid steps
    redone, follow exactly the run that checks the list at every step (hot silicon, small skin: many rebuilds)."""
    atoms, options = _hot_silicon(1, interval=30)
    deferred = fastmlip.simulate(atoms, eager_graphs(), steps=30, **options)
    checks = deferred.timing["list_checks"]
    monkeypatch.setattr(Calculator, "evaluate_unchecked", lambda *args: None)
    every_step = fastmlip.simulate(atoms, eager_graphs(), steps=30, **options)
    assert every_step.timing["list_checks"].startswith("deferred: 30 device reads")  # a checked step each
    rebuilds, redone, captures = (int(s.split()[0]) for s in checks.split(", ")[1:4])
    assert rebuilds >= 2 and redone >= 1 and captures >= 1, checks
    assert np.array_equal(deferred.atoms.positions, every_step.atoms.positions)
    assert np.array_equal(deferred.atoms.get_momenta(), every_step.atoms.get_momenta())
    assert deferred.atoms.get_potential_energy() == every_step.atoms.get_potential_energy()


def test_npt_keeps_the_verlet_list_while_the_strain_allows(sevenn64):
    """Under NPT the cell changes every step; the list is kept while strain and displacements together cannot
    have brought a left-out pair inside the cutoff, and the run equals one that rebuilds at every step."""
    atoms = silicon()
    options = dict(ensemble="npt", temperature=300, pressure=5.0, seed=2, steps=25, interval=5, timestep=2.0)
    kept = Calculator(sevenn64.model, device="cpu", skin=1.0)
    rebuilt = Calculator(sevenn64.model, device="cpu", skin=0.0)
    result = fastmlip.simulate(atoms, kept, **options)
    reference = fastmlip.simulate(atoms, rebuilt, **options)
    assert abs(result.thermo["volume"][-1] - result.thermo["volume"][0]) > 0.05  # the cell did change
    assert kept.neighbor_list_rebuilds <= 5 and rebuilt.neighbor_list_rebuilds >= 25
    np.testing.assert_allclose(result.atoms.positions, reference.atoms.positions, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.atoms.cell.array, reference.atoms.cell.array, rtol=0, atol=1e-10)


def test_steps_per_replay_follow_the_run_of_single_steps():
    """Five steps per replay (on the CPU the program a GPU captures runs eagerly), replays undone where the list
    went stale and those steps redone singly, follow the run of single steps (hot silicon, small skin: many
    rebuilds). The replay evaluates the masked Verlet candidates, the single steps the exact edges: fp64 rounding."""
    atoms, options = _hot_silicon(1, interval=10)
    calc = Calculator("7net-0", device="cpu", dtype="float64", skin=0.4)
    replayed = fastmlip.simulate(atoms, calc, steps=40, steps_per_replay=5, **options)
    single = fastmlip.simulate(atoms, calc, steps=40, **options)
    replays, undone = (int(part.split()[0]) for part in replayed.timing["replays"].split(": ")[1].split(", ")[:2])
    assert undone >= 1 and replays > undone, replayed.timing["replays"]
    assert single.timing["replays"] is None
    assert np.abs(replayed.atoms.positions - single.atoms.positions).max() < 1e-9
    assert np.abs(replayed.atoms.get_momenta() - single.atoms.get_momenta()).max() < 1e-9
    assert np.allclose(replayed.thermo["epot"], single.thermo["epot"], rtol=0, atol=1e-9)
    assert replayed.timing["replays"].endswith("pairs Verlet")  # a 5.43 A cell: no minimum image for 5 A
    with pytest.raises(ValueError, match="fixed cell"):
        fastmlip.simulate(atoms, calc, steps=2, ensemble="npt", temperature=300, pressure=1.0, steps_per_replay=2)


def test_steps_per_replay_with_pairs_rebuilt_in_the_graph_follow_single_steps(first_capture_half_room):
    """64 atoms in a cell wider than twice the cutoff: each replayed step rebuilds the exact pairs itself, so no
    list goes stale; when a step's pairs outgrow the capacity (here the first buffers get room for half of them) the
    replay is undone, those steps run singly, and the next replay gets room for the pairs there are then."""
    sizes = first_capture_half_room
    atoms, options = _hot_silicon(2, interval=12)
    calc = Calculator("7net-0", device="cpu", dtype="float64", skin=0.4)
    replayed = fastmlip.simulate(atoms, calc, steps=12, steps_per_replay=3, **options)
    single = fastmlip.simulate(atoms, calc, steps=12, **options)
    summary = replayed.timing["replays"]
    replays, undone = (int(part.split()[0]) for part in summary.split(": ")[1].split(", ")[:2])
    assert summary.endswith("pairs rebuilt in the graph") and replays > undone >= 1 and len(sizes) >= 2, summary
    assert np.abs(replayed.atoms.positions - single.atoms.positions).max() < 1e-9
    assert np.abs(replayed.atoms.get_momenta() - single.atoms.get_momenta()).max() < 1e-9
    verlet = Calculator(calc.model, device="cpu", skin=0.4, pairs="verlet")  # the same cell, Verlet asked for
    assert fastmlip.simulate(atoms, verlet, steps=3, steps_per_replay=3, **options).timing["replays"].endswith(
        "pairs Verlet")


def test_a_later_run_reuses_the_replayed_steps_its_calculator_kept(tmp_path):
    """A run resumed on the same calculator replays the steps (on CUDA: the graph) the first run built instead of
    building them again, and its trajectory is, bit for bit, the one of an uninterrupted run. Another seed reuses
    them too (only the caller's generator depends on it); other settings, steps per replay or cell build new ones."""
    atoms, options = _hot_silicon(1, interval=10)
    calc = Calculator("7net-0", device="cpu", dtype="float64", skin=0.4)
    restart = str(tmp_path / "run.restart")
    fastmlip.simulate(atoms, calc, steps=20, steps_per_replay=4, restart=restart, **options)
    kept, replays = calc.kept_replay, calc.kept_replay.replays
    resumed = fastmlip.simulate(atoms, calc, steps=40, steps_per_replay=4, restart=restart, **options)
    assert calc.kept_replay is kept and kept.replays > replays
    assert resumed.timing["replays"].startswith(f"4 steps per replay: {kept.replays - replays} replays")
    whole = fastmlip.simulate(atoms, Calculator(calc.model, device="cpu", skin=0.4), steps=40, steps_per_replay=4,
                              **options)
    assert np.array_equal(whole.atoms.positions, resumed.atoms.positions)
    assert np.array_equal(whole.atoms.get_momenta(), resumed.atoms.get_momenta())

    fastmlip.simulate(atoms, calc, steps=1, steps_per_replay=4, **dict(options, seed=6))
    assert calc.kept_replay is kept
    strained = atoms.copy()
    strained.set_cell(atoms.cell * 1.01, scale_atoms=True)
    cooler = dict(options, temperature=1200)
    for run_atoms, length, run_options in ((atoms, 4, cooler), (atoms, 2, cooler), (strained, 2, cooler)):
        fastmlip.simulate(run_atoms, calc, steps=1, steps_per_replay=length, **run_options)
        assert calc.kept_replay is not kept, (length, run_options)  # one change from the run before each
        kept = calc.kept_replay


def test_fastmlip_md_captures_one_step_at_setup(eager_graphs, monkeypatch, capsys):
    """``fastmlip md``'s first step is the engine's own (forces without stress, the engine's cell tensor): one
    capture at setup, not one for an ASE step with stress and another for the engine. Its setup line comes once
    the engine's first forces are in."""
    import argparse

    from fastmlip import md

    enable = StepReplays.__init__

    def replaying(replays, *args, **kwargs):
        enable(replays, *args, **kwargs)
        replays.enabled, replays.request = True, True

    monkeypatch.setattr(StepReplays, "__init__", replaying)
    parser = argparse.ArgumentParser()
    md.add_arguments(parser)
    args = parser.parse_args(["--demo", "si", "--repeat", "1", "--steps", "4", "--interval", "2", "--device", "cpu",
                              "--dtype", "float64", "--accelerate", "yes", "--no-progress", "--threads", "1",
                              "--no-program-cache"])
    atoms, calculator, records, _ = md.simulate(args)
    assert calculator.replays.capture_reasons == ["first"]
    assert not calculator.replays.step.with_stress
    setup_lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("setup ")]
    assert len(setup_lines) == 1 and "first step" in setup_lines[0], setup_lines
    assert len(records) == 3  # steps 0, 2, 4


def test_a_later_run_replays_the_step_an_earlier_run_captured(eager_graphs):
    """simulate() in chunks on one calculator: the same atoms and cell keep their device tensors, so the second
    run replays the step the first captured instead of capturing again."""
    atoms, options = _hot_silicon(1, interval=2)
    calc = eager_graphs()
    fastmlip.simulate(atoms, calc, steps=4, **options)
    fastmlip.simulate(atoms, calc, steps=4, **options)
    assert calc.replays.capture_reasons == ["first"]


@pytest.mark.parametrize("make, operations", [
    (lambda evaluate: integrators.VelocityVerlet(1.0, evaluate), 3),  # two kicks and a drift
    (lambda evaluate: integrators.Langevin(1.0, evaluate, 300.0, 0.01), 9),  # and noise, its spread, no drift
    (lambda evaluate: integrators.CSVR(1.0, evaluate, 300.0, 100.0), 17),  # the rescaling's 13, then Verlet's 3
])
def test_an_integrator_step_is_a_few_fused_operations(make, operations):
    """Every tensor operation of an integrator step (views aside) is a kernel launch of each replayed MD step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    state = argon()
    integrator = make(lambda positions, cell: (state.energy, state.forces, state.stress))
    generator = torch.Generator().manual_seed(0)
    integrator.step(state, generator)  # what depends on the masses only is made once
    dispatched = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                dispatched.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    with Record():
        integrator.step(state, generator)
    assert len(dispatched) == operations, dispatched
