"""``fastmlip.simulate``: molecular dynamics whose state lives on the model's device (the engine behind it).

Positions, momenta, cell and the random-number generator stay on the device in float64; each step is the
integrator's tensor arithmetic (:mod:`fastmlip.integrators`) around one force evaluation of
``Calculator.evaluate`` (CUDA graph replays where the calculator uses them). The host sees the state only every
``interval`` steps (thermo, trajectory frames: copied without waiting, :mod:`fastmlip.host_copies`) and when the
restart file is written.

Restarts: the file holds positions, momenta, cell, step, the generator's state, the run's settings and the
thermo so far, written atomically every ``restart_every`` steps and at the end; running again with the same file
continues where it stopped, and on the same device the trajectory is the one an uninterrupted run makes, bit for
bit. For that it also holds the step's energy, forces and stress (not computed again: another path, a CUDA graph of
other padding, may round differently) and where the Verlet list was last built (rebuilt there: the candidates a
step masks decide how its sums are grouped).
"""
from __future__ import annotations

import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from ase import units

from . import integrators
from .host_copies import HostCopies
from .replayed_steps import CaptureFailed

ENSEMBLES = ("nve", "nvt", "npt")
THERMOSTATS = ("langevin", "csvr")
THERMO_FIELDS = ("step", "time_fs", "epot", "ekin", "temperature")
BAROSTAT_TAU_FS = 1000.0
BULK_MODULUS_GPA = 100.0  # only sets how fast the barostat relaxes the volume, not where it goes


@dataclass
class Run:
    """The end of a run: ``atoms`` (positions, momenta, cell; energy and forces attached), ``thermo`` (numpy
    arrays every ``interval`` steps: step, time_fs, epot, ekin (eV), temperature (K), and pressure (GPa) and
    volume (A^3) under NPT) and ``timing`` (setup_s, ms_per_step, ns_per_day, and chunk_edges: the convolutions'
    chunk size when the last step chunked them to fit memory, else None)."""

    atoms: object
    thermo: dict
    timing: dict


def _settings(ensemble, timestep, temperature, thermostat, friction, pressure, seed) -> dict:
    if ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {', '.join(ENSEMBLES)}, got {ensemble!r}")
    if thermostat not in THERMOSTATS:
        raise ValueError(f"thermostat must be one of {', '.join(THERMOSTATS)}, got {thermostat!r}")
    if not timestep > 0:
        raise ValueError(f"timestep must be > 0 fs, got {timestep}")
    if ensemble != "nve" and (temperature is None or not temperature > 0):
        raise ValueError(f"{ensemble.upper()} needs a temperature > 0 K, got {temperature}")
    if ensemble != "nve" and not friction > 0:
        raise ValueError(f"friction must be > 0 (1/fs), got {friction}")
    if ensemble == "npt" and pressure is None:
        raise ValueError("NPT needs a pressure (GPa)")
    return {"ensemble": ensemble, "timestep": float(timestep), "temperature": temperature,
            "thermostat": thermostat, "friction": float(friction), "pressure": pressure, "seed": int(seed)}


def _integrator(settings: dict, evaluate):
    dt = settings["timestep"] * units.fs
    if settings["ensemble"] == "nve":
        return integrators.VelocityVerlet(dt, evaluate)
    if settings["thermostat"] == "langevin":
        thermostat = integrators.Langevin(dt, evaluate, settings["temperature"], settings["friction"] / units.fs)
    else:
        thermostat = integrators.CSVR(dt, evaluate, settings["temperature"], units.fs / settings["friction"])
    if settings["ensemble"] == "nvt":
        return thermostat
    return integrators.CellRescaling(thermostat, settings["temperature"], settings["pressure"] * units.GPa,
                                     1.0 / (BULK_MODULUS_GPA * units.GPa), BAROSTAT_TAU_FS * units.fs)


def _initial_momenta(atoms, settings) -> np.ndarray:
    """The atoms' momenta; none and a temperature given: Maxwell-Boltzmann from ``seed``, centre of mass at rest."""
    momenta = atoms.get_momenta()
    if np.any(momenta) or not settings["temperature"]:
        return momenta
    from .md import thermalize

    drawn = atoms.copy()
    thermalize(drawn, settings["temperature"], np.random.default_rng(settings["seed"]))
    return drawn.get_momenta()


def _frame(atoms, positions, momenta, forces, cell, energy):
    """``atoms`` at this state (host or device tensors), energy and forces attached."""
    from ase.calculators.singlepoint import SinglePointCalculator

    frame = atoms.copy()
    frame.set_cell(cell.detach().cpu().numpy())
    frame.set_positions(positions.detach().cpu().numpy())
    frame.set_momenta(momenta.detach().cpu().numpy())
    frame.calc = SinglePointCalculator(frame, energy=float(energy), forces=forces.detach().cpu().numpy())
    return frame


def _save_restart(path: str, state: integrators.State, generator, settings: dict, thermo: list,
                  neighbors) -> None:
    """Write the restart file aside and rename it into place: a killed run leaves the previous one whole."""
    payload = {"positions": state.positions.cpu(), "momenta": state.momenta.cpu(), "cell": state.cell.cpu(),
               "energy": state.energy.cpu(), "forces": state.forces.cpu(),
               "stress": None if state.stress is None else state.stress.cpu(),
               "step": state.step, "generator": generator.get_state().cpu(), "settings": settings,
               "thermo": thermo, "neighbors": [t.cpu() for t in neighbors.reference() or ()]}
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(handle)
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    except BaseException:
        os.remove(temporary)
        raise


def _load_restart(path: str, settings: dict, atoms) -> dict:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    changed = [k for k in settings if k != "seed" and payload["settings"].get(k) != settings[k]]
    if changed:
        raise ValueError(f"{path}: restart file of a run with other settings ({', '.join(changed)})")
    if payload["positions"].shape != (len(atoms), 3):
        raise ValueError(f"{path}: restart file of {payload['positions'].shape[0]} atoms, not {len(atoms)}")
    return payload


def simulate(atoms, model="7net-0", *, ensemble: str = "nve", steps: int, timestep: float = 1.0,
             temperature=None, thermostat: str = "langevin", friction: float = 0.01, pressure=None, seed: int = 0,
             device="auto", dtype="float32", trajectory=None, interval: int = 10, restart=None,
             restart_every: int = 1000, steps_per_replay: int = 1, progress=None, on_setup=None,
             **calculator_options) -> Run:
    """Run ``steps`` MD steps of ``atoms`` (not modified) with ``model`` (anything :class:`Calculator` takes).

    ``ensemble``: "nve" (velocity Verlet), "nvt" (``thermostat`` "langevin": BAOAB, or "csvr": Bussi rescaling;
    ``friction`` in 1/fs, CSVR's time constant is 1/friction), "npt" (stochastic cell rescaling to ``pressure``
    GPa around the thermostat). ``timestep`` in fs, ``temperature`` in K. NVE uses the atoms' momenta; without
    momenta and with a temperature, Maxwell-Boltzmann velocities are drawn from ``seed``. ``trajectory``: a file
    (.extxyz, .xyz, .traj) that gets a frame every ``interval`` steps. ``restart``: see the module docstring;
    ``steps`` is the whole run's length, resumed runs included. ``progress(step)`` is called every ``interval``
    steps; ``on_setup(seconds)`` once the first forces are in, before the first step (``fastmlip md`` prints its
    setup line there). ``steps_per_replay`` > 1 (NVE, NVT): that many steps, integrator included, per CUDA graph replay
    (:mod:`fastmlip.replayed_steps`; on a CPU the same steps run eagerly; on CUDA only where the calculator
    replays its steps, else a warning says why not); the calculator keeps them, so a later run on it with the same
    settings (the seed aside), atoms, cell and ``steps_per_replay`` replays the same graph instead of capturing
    again. Other keyword arguments go to :class:`Calculator` (``skin``, ``modal``, ``trusted``, ...).
    """
    from .calculator import Calculator

    settings = _settings(ensemble, timestep, temperature, thermostat, friction, pressure, seed)
    if steps < 0 or interval < 1 or restart_every < 1 or steps_per_replay < 1:
        raise ValueError(f"steps >= 0, interval >= 1, restart_every >= 1 and steps_per_replay >= 1 are needed, got "
                         f"{steps}, {interval}, {restart_every}, {steps_per_replay}")
    if steps_per_replay > 1 and ensemble == "npt":
        raise ValueError("steps_per_replay > 1 needs a fixed cell (NVE or NVT); NPT changes it every step")
    started = time.perf_counter()
    npt = ensemble == "npt"
    if npt:
        calculator_options.setdefault("cuda_graph", False)  # a graph is captured for one cell
    calculator = model if isinstance(model, Calculator) else Calculator(model, device=device, dtype=dtype,
                                                                        **calculator_options)
    calculator.bind(atoms)
    device = calculator.device
    pbc = tuple(bool(p) for p in atoms.pbc)
    with_stress = npt  # only the barostat and its thermo read the stress

    def evaluate(positions, cell):
        return calculator.evaluate(positions, cell, pbc, with_stress)

    as_device = lambda array: torch.as_tensor(np.asarray(array), dtype=torch.float64, device=device)  # noqa: E731
    generator = torch.Generator(device=device).manual_seed(seed)
    thermo = []
    positions, momenta = as_device(atoms.positions), as_device(_initial_momenta(atoms, settings))
    cell = calculator.device_cell(atoms.cell.array, pbc)  # the tensor an earlier run's captured steps know
    step = 0
    payload = None
    if restart and os.path.exists(restart):
        payload = _load_restart(restart, settings, atoms)
        positions, momenta = as_device(payload["positions"]), as_device(payload["momenta"])
        cell = calculator.device_cell(payload["cell"], pbc)
        generator.set_state(payload["generator"].to(generator.get_state().device))
        step, thermo = int(payload["step"]), list(payload["thermo"])
        if payload.get("neighbors"):
            calculator.neighbors.restore(as_device(payload["neighbors"][0]), payload["neighbors"][1], pbc)
    masses = as_device(atoms.get_masses()).reshape(-1, 1)
    energy, forces, stress = evaluate(positions, cell)  # also where graphs are captured and lists built
    if payload is not None and payload.get("forces") is not None:  # files of older versions: evaluated
        energy = payload["energy"].to(device=device, dtype=energy.dtype)
        forces = payload["forces"].to(device=device, dtype=forces.dtype)
        if stress is not None and payload["stress"] is not None:
            stress = payload["stress"].to(device=device, dtype=stress.dtype)
    state = integrators.State(positions, momenta, masses, cell, energy, forces, stress, step)
    if npt and stress is None:
        raise ValueError("NPT needs a periodic structure with a cell of non-zero volume")
    integrator = _integrator(settings, evaluate)
    deferred = DeferredChecks(calculator, settings, pbc, with_stress, integrator) if calculator.cuda_graph else None
    replayed = None
    if steps_per_replay > 1 and device.type == "cuda" and not calculator.cuda_graph:
        warnings.warn(f"fastmlip: steps per replay off, the calculator runs eager steps "
                      f"({calculator.cuda_graph_obstacle})", RuntimeWarning, stacklevel=2)
    elif steps_per_replay > 1:  # on a CPU the replayed program runs eagerly
        replayed = calculator.replays.many_steps(atoms, settings, state, pbc, steps_per_replay,
                                                 lambda evaluate: _integrator(settings, evaluate))
    replay_counts = replayed.counts() if replayed else None
    writer = _trajectory_writer(trajectory, resume=step > 0)
    copies = HostCopies(thermo, settings["timestep"], npt, progress=progress,
                        write_frame=(lambda tensors: writer.write(_frame(atoms, *tensors))) if writer else None)
    if step == 0:
        copies.add(state, frame=writer is not None, report=False)
    setup = time.perf_counter() - started
    if on_setup:
        on_setup(setup)
    loop_start, first_step = time.perf_counter(), state.step
    try:
        while state.step < steps:
            boundary = _next_boundary(state.step, steps, interval, restart_every if restart else None)
            while replayed and boundary - state.step >= replayed.length:
                state, replayed = _replay_steps(replayed, integrator, state, generator)
            if deferred:
                state = deferred.advance(state, generator, boundary)
            else:
                while state.step < boundary:
                    state = integrator.step(state, generator)
            if state.step % interval == 0 or state.step == steps:
                copies.add(state, frame=writer is not None)
            if restart and (state.step % restart_every == 0 or state.step == steps):
                copies.drain()
                _save_restart(restart, state, generator, settings, thermo, calculator.neighbors)
        copies.drain()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        if writer:
            writer.close()
    done = state.step - first_step
    ms = 1e3 * (time.perf_counter() - loop_start) / done if done else float("nan")
    names = THERMO_FIELDS + (("pressure", "volume") if npt else ())
    columns = np.array(thermo, dtype=float).reshape(-1, len(names)).T
    final = _frame(atoms, state.positions, state.momenta, state.forces, state.cell, state.energy)
    return Run(atoms=final, thermo=dict(zip(names, columns)),
               timing={"setup_s": setup, "ms_per_step": ms, "ns_per_day": timestep * 86400 / 1e6 / ms * 1e3
                       if done else float("nan"), "steps": done,
                       "list_checks": deferred.summary() if deferred else "every step",
                       "replays": replayed.summary(replay_counts) if replayed else None,
                       "chunk_edges": calculator.chunk_edges})


def _replay_steps(replayed, integrator, state, generator):
    """One replay of ``replayed.length`` steps; where the Verlet list went stale within them, the steps up to and
    including that one through the checked path instead (which rebuilds the list). A capture that fails on CUDA
    hands the run back to the other paths with a warning (``generator`` is untouched: the graph was to draw from
    its own), and the calculator no longer keeps these steps. ``(state, replayed or None)``."""
    try:
        advanced = replayed.advance(state, generator)
    except CaptureFailed as exc:
        warnings.warn(f"fastmlip: steps per replay off, their capture failed ({exc})", RuntimeWarning, stacklevel=3)
        replayed.calculator.replays.kept = None
        return state, None
    if advanced is not None:
        return advanced, replayed
    for _ in range(replayed.stale_at + 1):
        state = integrator.step(state, generator)
    return state, replayed


def _next_boundary(step: int, steps: int, interval: int, restart_every) -> int:
    """The next step at which the host needs the state: thermo, frames, a restart file, the end."""
    boundary = min(steps, (step // interval + 1) * interval)
    if restart_every:
        boundary = min(boundary, (step // restart_every + 1) * restart_every)
    return boundary


class DeferredChecks:
    """Steps of a CUDA-graph run whose Verlet-list check is read back once per chunk of steps, not every step.

    Asking each step whether some atom moved more than skin/2 reads the device, and the GPU idles while the
    host then prepares the next step. Here a chunk of steps replays on the current list, each step leaving a
    device flag (:meth:`Calculator.evaluate_unchecked`); one read at the chunk's end says whether all of them
    were valid. If step k was not, the run goes back to the state and generator state before step k and redoes
    it with the checked :meth:`Calculator.evaluate`, which rebuilds the list there: exactly the steps, and so the
    trajectory, of a run that checks every step. Chunks end just before the next rebuild the past rebuilds
    predict, so few steps are redone.
    """

    MAX_CHUNK = 64

    def __init__(self, calculator, settings, pbc, with_stress, checked):
        self.calculator, self.pbc, self.with_stress, self.checked = calculator, pbc, with_stress, checked
        self.unchecked = _integrator(settings, self._evaluate)
        self.flags = []
        self.rebuild_steps = [0]
        self.chunks = self.redone = 0

    def _evaluate(self, positions, cell):
        out = self.calculator.evaluate_unchecked(positions, cell, self.pbc, self.with_stress)
        if out is None:
            raise _NoCapturedStep
        energy, forces, stress, stale = out
        self.flags.append(stale)
        return energy, forces, stress

    def _chunk_length(self, step: int) -> int:
        if self.calculator.replays_exact_pairs:  # only outgrown capacity (rare) redoes a step
            return self.MAX_CHUNK
        intervals = [b - a for a, b in zip(self.rebuild_steps[-5:], self.rebuild_steps[-4:])]
        expected = min(intervals) if intervals else 8
        return max(1, min(self.MAX_CHUNK, expected - (step - self.rebuild_steps[-1]) - 1))

    def advance(self, state, generator, target: int):
        """Steps from ``state`` to step ``target``."""
        while state.step < target:
            state = self._chunk(state, generator, min(target - state.step, self._chunk_length(state.step)))
        return state

    def _chunk(self, state, generator, length: int):
        saved = [(state, generator.get_state())]
        self.flags.clear()
        self.chunks += 1
        try:
            for _ in range(length):
                state = self.unchecked.step(state, generator)
                saved.append((state, generator.get_state()))
        except _NoCapturedStep:  # no captured step fits (yet): the steps flagged so far are still checked
            pass
        stale = torch.stack(self.flags).cpu() if self.flags else torch.zeros(0, dtype=torch.bool)
        valid = int(stale.int().argmax()) if bool(stale.any()) else stale.numel()  # the chunk's one device read
        if valid == length:
            return state
        self.redone += len(saved) - 1 - valid
        state, generator_state = saved[valid]
        generator.set_state(generator_state)
        rebuilds = self.calculator.neighbor_list_rebuilds
        state = self.checked.step(state, generator)
        if self.calculator.neighbor_list_rebuilds > rebuilds:
            self.rebuild_steps.append(state.step)
        return state

    def summary(self) -> str:
        timing = self.calculator.cuda_graph_timing
        why = self.calculator.replays.capture_reasons
        reasons = f": {'; '.join(why)}" if why else ""
        chosen = f" (at setup a replay took {timing['replay_ms']:.2f} ms, an eager step {timing['eager_ms']:.2f})" \
            if timing else ""
        return (f"deferred: {self.chunks} device reads, {len(self.rebuild_steps) - 1} list rebuilds, "
                f"{self.redone} steps redone, {self.calculator.graph_captures} captures{reasons}{chosen}")


class _NoCapturedStep(Exception):
    pass


def _trajectory_writer(path, resume: bool):
    if not path:
        return None
    from .md import TrajectoryWriter

    return TrajectoryWriter(path, append=resume)
