"""Whole-MD-loop backends of scripts/bench_md.py: engines that own the MD loop, timed per MD step.

  fastmlip-md  fastmlip.simulate: positions, momenta and the noise stay on the device; each step is one
               Calculator.evaluate (a CUDA graph replay where the model allows) plus the integrator's tensor ops
  fastmlip-md-replay  the same with REPLAY_STEPS steps, integrator included, per CUDA graph replay
               (``steps_per_replay``)
  fastmlip-md-verlet  fastmlip-md with ``Calculator(pairs="verlet")``: each replay evaluates the Verlet list's
               candidates, masked, instead of rebuilding the exact pairs itself (:mod:`fastmlip.graph_pairs`, the
               default)
  fastmace     FastMACE 1.0 (MACE models only): the whole step as CUDA graphs on cuEquivariance kernels, in a
               child process, because FastMACE must be imported before MACE (else it cannot prepare its
               OpenEquivariance runtime and falls back to plain cuEq) and patches MACE's modules in place; the
               child keeps that, and its CUDA state, away from the other rows

Both run NVT Langevin at 300 K, 1 fs, friction 0.01/fs, from the same Maxwell-Boltzmann momenta (seed 1), and
write nothing while they run (fastmlip: thermo only at the end; FastMACE: output=None). --md-warmup steps come
first, then --md-steps timed steps continue the same trajectory; ms/step is the wall time of the timed steps,
device synchronised at both ends, over their number. Step 0's energy and forces (before any MD) go to
bench_md's parity check: fastmlip-md's from the Calculator that the run then uses, FastMACE's from
``Simulation.committed()`` of the very engine that is then timed.

Run as a script, this file is that child: ``python bench_md_loops.py fastmace REQUEST.json``. Nothing here
imports torch at module level, so that the child can import fastmace first.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

MD_BACKENDS = ("fastmlip-md", "fastmlip-md-replay", "fastmlip-md-verlet", "fastmace")
REPLAY_STEPS = 10
TEMPERATURE_K, TIMESTEP_FS, FRICTION_PER_FS, SEED = 300.0, 1.0, 0.01, 1


class NotApplicable(Exception):
    """This backend cannot run this row's model (reported as the row's error, never timed)."""


def run_md_loop(backend, which, atoms, model, args):
    """(timing, (energy, forces) of step 0) of one md-loop row; raises on failure. ``model`` is the model
    file or name the step rows use; ``args`` bench_md's (device, dtype, md_steps, md_warmup, ...)."""
    atoms = thermalised(atoms)
    if backend in ("fastmlip-md", "fastmlip-md-replay", "fastmlip-md-verlet"):
        return fastmlip_md(atoms, model, args, REPLAY_STEPS if backend == "fastmlip-md-replay" else 1,
                           "verlet" if backend == "fastmlip-md-verlet" else "graph")
    if backend == "fastmace":
        if which == "sevenn":
            raise NotApplicable("FastMACE runs MACE models only; this row is SevenNet-0")
        return fastmace(atoms, model, args)
    raise ValueError(f"unknown md-loop backend {backend!r}; choose from {MD_BACKENDS}")


def thermalised(atoms):
    """A copy with Maxwell-Boltzmann momenta at 300 K (seed 1, no drift), so both engines start alike: FastMACE
    takes the structure's momenta as they are, fastmlip.simulate draws its own only when there are none."""
    from fastmlip.md import thermalize

    atoms = atoms.copy()
    thermalize(atoms, TEMPERATURE_K, np.random.default_rng(SEED))
    return atoms


def kinetic_temperature(momenta, masses):
    """K, over 3N - 3 degrees of freedom (both engines keep the centre of mass at rest): a sanity check."""
    from ase import units

    kinetic = 0.5 * float((np.asarray(momenta) ** 2 / np.asarray(masses).reshape(-1, 1)).sum())
    return 2.0 * kinetic / (max(1, 3 * len(masses) - 3) * units.kB)


def fastmlip_md(atoms, model, args, steps_per_replay=1, pairs="graph"):
    """fastmlip.simulate with one Calculator for the step-0 frame, the warm-up and the timed run. The timed run
    resumes the warm-up's restart file, so its steps continue the trajectory and its ``timing`` counts them
    alone (the one restart write at its end is inside the loop: well under 0.1 ms per step)."""
    import torch

    import fastmlip
    from fastmlip.calculator import Calculator

    started = time.perf_counter()
    calculator = Calculator(model, device=args.device, dtype=args.dtype, pairs=pairs,
                            trusted=True)  # the file is bench_md's
    frame = atoms.copy()
    frame.calc = calculator
    first = (float(frame.get_potential_energy()), np.array(frame.get_forces()))
    setup_s = time.perf_counter() - started
    cuda = args.device.startswith("cuda")
    total = args.md_warmup + args.md_steps
    options = dict(ensemble="nvt", thermostat="langevin", temperature=TEMPERATURE_K, timestep=TIMESTEP_FS,
                   friction=FRICTION_PER_FS, seed=SEED, interval=total, restart_every=total,
                   steps_per_replay=steps_per_replay)
    if cuda:  # the peak of the engine's whole run: its capture happens in the warm-up
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="bench_fastmlip_md_") as directory:
        restart = os.path.join(directory, "restart.pt")
        if args.md_warmup:
            fastmlip.simulate(atoms, calculator, steps=args.md_warmup, restart=restart, **options)
        rebuilds = calculator.neighbor_list_rebuilds
        run = fastmlip.simulate(atoms, calculator, steps=total, restart=restart, **options)
    timing = {"step_ms": run.timing["ms_per_step"], "md_steps": run.timing["steps"], "setup_s": setup_s,
              "timed_events": {"neighbour_rebuilds": calculator.neighbor_list_rebuilds - rebuilds},
              "peak_MiB": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
              "T_end_K": kinetic_temperature(run.atoms.get_momenta(), run.atoms.get_masses()),
              "engine": "cuda graph" if calculator.cuda_graph else f"eager ({calculator.cuda_graph_obstacle or 'off'})",
              "list_checks": run.timing["list_checks"], "replays": run.timing["replays"]}
    return timing, first


def fastmace(atoms, model, args):
    """FastMACE in a child process (``fastmace_child``): the structure, with its momenta, goes in an .npz, the
    results come back as JSON plus the step-0 forces as .npy. A child that fails, crashes or runs past
    --fastmace-timeout is this row's error."""
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # FastMACE's default planner takes CUDA whenever it sees a GPU
    elif args.device not in ("cuda", "cuda:0"):
        raise ValueError("the fastmace backend runs on the first visible GPU; choose it with CUDA_VISIBLE_DEVICES")
    with tempfile.TemporaryDirectory(prefix="bench_fastmace_") as directory:
        def path(name):
            return os.path.join(directory, name)

        np.savez(path("structure.npz"), numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell.array,
                 pbc=atoms.pbc, momenta=atoms.get_momenta())
        request = {"model": os.path.abspath(model), "structure": path("structure.npz"), "dtype": args.dtype,
                   "steps": args.md_steps, "warmup": args.md_warmup, "result": path("result.json"),
                   "forces": path("forces0.npy")}
        with open(path("request.json"), "w") as handle:
            json.dump(request, handle)
        command = [sys.executable, os.path.abspath(__file__), "fastmace", path("request.json")]
        with open(path("child.log"), "w") as handle:
            try:
                child = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                       timeout=args.fastmace_timeout)
            except subprocess.TimeoutExpired:  # subprocess.run has killed the child
                raise TimeoutError(f"the fastmace child ran past --fastmace-timeout {args.fastmace_timeout:g} s") \
                    from None
        with open(path("child.log")) as handle:
            log = handle.read()
        if args.verbose:
            print(log, flush=True)
        if not os.path.exists(request["result"]):
            last = [line.strip() for line in log.splitlines() if line.strip()][-1:] or ["no output"]
            raise RuntimeError(f"the fastmace child exited {child.returncode} without a result ({last[0]})")
        with open(request["result"]) as handle:
            result = json.load(handle)
        if "error" in result:
            raise RuntimeError(f"in the fastmace child: {result['error']}")
        forces = np.load(request["forces"])
    return result["timing"], (result["energy0"], forces)


def fastmace_child(request_path):
    """The child's whole life: import fastmace first, build a Simulation (its own plan: backend, tier, rewrites)
    with no output, read step 0, run the warm-up, time the timed steps, write the result. Any exception is
    written as the result's error (and its traceback goes to the log)."""
    import fastmace as fm  # before torch and MACE: see the module docstring

    with open(request_path) as handle:
        request = json.load(handle)
    try:
        result = _fastmace_run(fm, request)
    except Exception as exc:  # noqa: BLE001 - handed to the parent as the row's error
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
    with open(request["result"], "w") as handle:
        json.dump(result, handle)


def _fastmace_run(fm, request):
    import torch
    from ase import Atoms

    data = np.load(request["structure"])
    atoms = Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"], pbc=data["pbc"])
    atoms.set_momenta(data["momenta"])
    if torch.cuda.is_available():  # the peak of the engine's whole run: its build captures its graphs
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    force_field = fm.ForceField(fm.load(request["model"], trusted=True), atoms, precision=request["dtype"])
    integrator = fm.integrators.Langevin(timestep_fs=TIMESTEP_FS, temperature_K=TEMPERATURE_K,
                                         friction_per_fs=FRICTION_PER_FS)
    simulation = fm.Simulation(atoms, force_field, integrator=integrator, seed=SEED, output=None)
    first = simulation.committed()  # step 0, evaluated by the engine at its build
    setup_s = time.perf_counter() - started
    cuda = torch.cuda.is_available()
    if request["warmup"]:
        simulation.run(steps=request["warmup"])
    before = _engine_counters(simulation)
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    simulation.run(steps=request["steps"])  # returns synchronised (its loop clock and energy check sync)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    after = _engine_counters(simulation)
    last = simulation.committed()
    report = simulation.report
    summary = report.text()
    simulation.close()
    np.save(request["forces"], np.asarray(first.forces, dtype=np.float64))
    plan = next((line.split(":", 1)[1].replace("(reasons in run.plan)", "").strip()
                 for line in summary.splitlines() if line.startswith("plan:")), None)
    timing = {"step_ms": elapsed * 1e3 / request["steps"], "md_steps": request["steps"], "setup_s": setup_s,
              "peak_MiB": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
              "T_end_K": kinetic_temperature(last.momenta, last.masses), "engine": plan,
              "timed_events": {key: after[key] - before[key] for key in after if key in before},
              "fastmace_setup_s": dict(report.setup_s), "fastmace_speed": dict(report.speed),
              "fastmace_report": summary}
    return {"timing": timing, "energy0": float(first.energy)}


def _engine_counters(simulation):
    """Neighbour-list rebuilds and CUDA graph captures so far (``Simulation.metadata()``'s engine counters,
    ``GraphEngine.info``): their change over the timed steps says whether those steps were steady state. Only
    those the engine keeps: a plan on another engine (or run in FastMACE's own child) may keep none, and that
    must not cost the row its timing."""
    engine = (simulation.metadata().get("counters") or {}).get("engine") or {}
    names = {"neighbour_rebuilds": "neighbour_rebuilds", "captures": "captures", "capture_seconds": "capture_s"}
    return {name: engine[key] for key, name in names.items() if isinstance(engine.get(key), (int, float))}


if __name__ == "__main__":
    if sys.argv[1:2] != ["fastmace"] or len(sys.argv) != 3:
        sys.exit("usage: bench_md_loops.py fastmace REQUEST.json (the child of bench_md.py's fastmace rows)")
    fastmace_child(sys.argv[2])
