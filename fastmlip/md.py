"""``fastmlip md``: molecular dynamics (NVE or Langevin NVT) with a MACE or SevenNet model through ASE."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# Fractional positions in a cubic cell, in the order of ase.build.bulk(..., cubic=True), which is not imported for
# them: importing ase.build (scipy's sparse graphs through ase.neighborlist) took ~0.5 s of every `fastmlip md`
_FCC = [(0.0, 0.0, 0.0), (0.0, 0.5, 0.5), (0.5, 0.0, 0.5), (0.5, 0.5, 0.0)]
_DIAMOND = [(0.0, 0.0, 0.0), (0.25, 0.25, 0.25), (0.0, 0.5, 0.5), (0.25, 0.75, 0.75),
            (0.5, 0.0, 0.5), (0.75, 0.25, 0.75), (0.5, 0.5, 0.0), (0.75, 0.75, 0.25)]
_ROCKSALT = [(0.0, 0.0, 0.0), (0.5, 0.0, 0.0), (0.0, 0.5, 0.5), (0.5, 0.5, 0.5),
             (0.5, 0.0, 0.5), (0.0, 0.0, 0.5), (0.5, 0.5, 0.0), (0.0, 0.5, 0.0)]
DEMOS = {  # name: (symbols of the cubic cell, lattice constant in A, fractional positions)
    "si": ("Si8", 5.43, _DIAMOND),
    "cu": ("Cu4", 3.61, _FCC),
    "c": ("C8", 3.567, _DIAMOND),
    "nacl": ("NaCl" * 4, 5.64, _ROCKSALT),
}
# Demo cells per axis when --repeat is not given: SevenNet-0 on a 2-core CPU takes ~0.1-0.3 s per step for
# 8 atoms (so 100 steps in about a minute), while a GPU step costs about the same for 216 atoms.
DEFAULT_REPEAT = {"cpu": 1, "cuda": 3}
# Small systems gain nothing from intra-op threads, and on a busy 2-core machine two spinning threads made an
# 8-atom SevenNet-0 step ~8x slower than one (measured); bigger systems keep torch's own thread count.
SMALL_SYSTEM_ATOMS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("structure", nargs="?", help="structure file (anything ase.io.read reads); "
                        "default: the built-in --demo crystal")
    parser.add_argument("--demo", choices=sorted(DEMOS), default="si",
                        help="built-in crystal used when no structure file is given (default: si)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="repeat the demo's cubic cell this many times per axis (default: 1 on CPU, "
                        "3 on CUDA; si: 8 / 216 atoms)")
    parser.add_argument("--model", default="7net-0", help="model name or path (default: 7net-0)")
    parser.add_argument("--modal", default=None, help="SevenNet modal / MACE head, for multi-head models")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--accelerate", choices=["auto", "yes", "no"], default="auto",
                        help="swap in fastmlip's modules; auto: on CUDA only (on CPU they run the plain-torch "
                        "reference, which is slower than e3nn)")
    parser.add_argument("--engine", choices=["device", "ase"], default="device",
                        help="device: fastmlip.simulate, the MD state on the model's device (on an H200 faster "
                        "per whole step than ASE's loop is per force call alone); ase: ASE's integrators calling "
                        "fastmlip.Calculator each step (NVE and Langevin NVT only)")
    parser.add_argument("--ensemble", choices=["nve", "nvt", "npt"], default="nve",
                        help="nve: velocity Verlet; nvt: --thermostat; npt: stochastic cell rescaling to "
                        "--pressure around --thermostat (device engine)")
    parser.add_argument("--thermostat", choices=["langevin", "csvr"], default="langevin",
                        help="NVT/NPT: langevin (BAOAB) or csvr (Bussi; the ASE engine has Langevin only)")
    parser.add_argument("--pressure", type=float, default=None, help="NPT target pressure, GPa")
    parser.add_argument("--temperature", type=float, default=300.0,
                        help="K: initial Maxwell-Boltzmann velocities, and the NVT/NPT target")
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--steps", type=int, default=100, help="the run's length (a resumed run's too)")
    parser.add_argument("--friction", type=float, default=0.01,
                        help="Langevin friction, 1/fs (CSVR: time constant 1/friction)")
    parser.add_argument("--restart", default=None,
                        help="restart file (device engine): resumed from when it exists, written every 1000 "
                        "steps and at the end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--traj", default=None, help="trajectory output: .extxyz/.xyz or .traj")
    parser.add_argument("--interval", type=int, default=10, help="write a frame every this many steps")
    parser.add_argument("--plot", default=None, help="PNG of energy and temperature vs time")
    parser.add_argument("--skin", type=float, default=None, help="Verlet-list skin in A (default 0.5)")
    parser.add_argument("--cuda-graph", choices=["auto", "yes", "no"], default="auto",
                        help="replay each step as a captured CUDA graph; auto: on CUDA when the model allows it "
                        "and a replay is measured faster than an eager step")
    parser.add_argument("--pairs", choices=["graph", "verlet"], default="graph",
                        help="what a CUDA graph replay evaluates: the exact pairs rebuilt inside the graph each step "
                        "(up to 4096 atoms in cells wider than twice the cutoff; Verlet candidates elsewhere), or "
                        "the Verlet list's candidates everywhere")
    parser.add_argument("--steps-per-replay", type=int, default=1,
                        help="device engine, NVE/NVT: this many steps, integrator included, per CUDA graph replay "
                        "(1: one model evaluation per replay)")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"CPU threads for torch (default: 1 for up to {SMALL_SYSTEM_ATOMS} atoms on CPU, "
                        "else torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-program-cache", action="store_true",
                        help="start from the model's own file, not from an exported copy in fastmlip's cache, and "
                             "keep none (by default an accelerated run keeps one, and the next run of that file "
                             "starts from it in seconds, without its framework; its steps at 216 atoms took 3-4%% "
                             "longer than the framework model's on an H200: long runs of small systems may prefer "
                             "this option)")
    from .cli import add_trust_arguments

    add_trust_arguments(parser)


def build_structure(args, device):
    """Read the structure file, or build the demo crystal (rattled so forces are non-zero)."""
    from ase import Atoms

    if args.structure:
        from ase.io import read

        if not os.path.isfile(args.structure):
            raise FileNotFoundError(f"structure file {args.structure!r} not found")
        try:
            atoms = read(args.structure)
        except KeyError as exc:  # ASE's lookup of a chemical symbol
            raise ValueError(f"{args.structure}: unknown chemical symbol {exc}") from None
        except Exception as exc:  # noqa: BLE001 - ASE raises many types for files it cannot read
            raise ValueError(f"{args.structure}: cannot read a structure from it ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:200]})") from None
        if len(atoms) == 0:
            raise ValueError(f"{args.structure}: the structure has no atoms")
        return atoms
    symbols, constant, positions = DEMOS[args.demo]
    repeat = args.repeat if args.repeat is not None else DEFAULT_REPEAT.get(device.type, 1)
    if repeat < 1:
        raise ValueError(f"--repeat must be >= 1, got {repeat}")
    cell = Atoms(symbols, cell=(constant,) * 3, pbc=True, scaled_positions=positions)
    atoms = cell.repeat((repeat,) * 3)
    atoms.rattle(0.02, seed=args.seed)
    return atoms


def validate(args):
    if args.engine == "ase" and (args.ensemble == "npt" or args.thermostat != "langevin" or args.restart):
        raise ValueError("--engine ase runs NVE and Langevin NVT without restarts; use --engine device for "
                         "NPT, --thermostat csvr and --restart")
    if args.ensemble == "npt" and args.pressure is None:
        raise ValueError("--ensemble npt needs --pressure (GPa)")
    if args.steps < 0:
        raise ValueError(f"--steps must be >= 0, got {args.steps}")
    if not args.timestep > 0:
        raise ValueError(f"--timestep must be > 0 fs, got {args.timestep}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 K, got {args.temperature}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.interval < 1:
        raise ValueError(f"--interval must be >= 1, got {args.interval}")
    if args.steps_per_replay < 1 or (args.steps_per_replay > 1 and (args.engine == "ase" or args.ensemble == "npt")):
        raise ValueError(f"--steps-per-replay must be >= 1, and > 1 only with the device engine under NVE or NVT; "
                         f"got {args.steps_per_replay} ({args.engine} engine, {args.ensemble})")
    for option, path, suffixes in (("--traj", args.traj, (".extxyz", ".xyz", ".traj")),
                                   ("--plot", args.plot, (".png", ".pdf", ".svg"))):
        if path and not path.lower().endswith(suffixes):
            raise ValueError(f"{option} must end in one of {', '.join(suffixes)}, got {path!r}")


class TrajectoryWriter:
    """Appends frames (with energy and forces) to .extxyz/.xyz or .traj."""

    def __init__(self, path, append: bool = False):
        from ase.io import Trajectory

        self.path = path
        mode = "a" if append else "w"
        if path.lower().endswith(".traj"):
            self._traj, self._handle = Trajectory(path, mode), None
        else:
            self._traj, self._handle = None, open(path, mode)

    def write(self, atoms):
        from ase.io import write

        if self._traj is not None:
            self._traj.write(atoms)
        else:
            write(self._handle, atoms, format="extxyz")
            self._handle.flush()

    def close(self):
        (self._traj or self._handle).close()


def thermalize(atoms, temperature_K: float, rng) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_K``, then the centre of mass at rest with the drawn temperature
    kept: ASE's ``thermalize_momenta`` and ``Stationary``, step for step (tests/faces/test_md.py), written out
    because importing ``ase.md`` pulls in scipy.optimize (~1 s of every ``fastmlip md`` start on the H200)."""
    from ase import units

    masses = atoms.get_masses()
    momenta = rng.standard_normal((len(masses), 3)) * np.sqrt(masses * (units.kB * temperature_K))[:, np.newaxis]
    atoms.set_momenta(momenta, apply_constraint=True)
    drawn_temperature = atoms.get_temperature()
    momenta = atoms.get_momenta()
    momenta -= np.sum(momenta, 0) / np.sum(masses) * masses[:, np.newaxis]
    atoms.set_momenta(momenta)
    if drawn_temperature > 1e-12:  # ASE's force_temperature back to the drawn temperature
        scale = drawn_temperature * units.kB / (2 * atoms.get_kinetic_energy() /
                                                atoms.get_number_of_degrees_of_freedom())
    else:
        scale = 0.0
    atoms.set_momenta(atoms.get_momenta() * np.sqrt(scale))


def make_dynamics(atoms, args):
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    rng = np.random.default_rng(args.seed)
    thermalize(atoms, args.temperature, rng)
    if args.ensemble == "nve":
        return VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    return Langevin(atoms, timestep=args.timestep * units.fs, temperature_K=args.temperature,
                    friction=args.friction / units.fs, rng=rng)


def energy_drift(times_ps, total_energy_per_atom):
    """Slope of a linear fit (eV/atom/ps) and the largest excursion from the start (eV/atom)."""
    if len(times_ps) < 2:
        return 0.0, 0.0
    slope = float(np.polyfit(times_ps, total_energy_per_atom, 1)[0])
    excursion = float(np.abs(total_energy_per_atom - total_energy_per_atom[0]).max())
    return slope, excursion


def plot(path, times_ps, potential, total, temperature):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (energy_axis, temperature_axis) = plt.subplots(2, 1, sharex=True, figsize=(7, 5))
    energy_axis.plot(times_ps, potential - total[0], label="potential")
    energy_axis.plot(times_ps, total - total[0], label="total")
    energy_axis.set_ylabel("E - E_total(0) (eV/atom)")
    energy_axis.legend()
    temperature_axis.plot(times_ps, temperature, color="tab:red")
    temperature_axis.set_ylabel("T (K)")
    temperature_axis.set_xlabel("time (ps)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def describe_setup(calculator, first_step_seconds: float) -> str:
    """Where the time before the first MD step went: loading, the surgery, the kernels (dry run, compiled or
    cached), the self-check and the first step."""
    from .api import kernel_report, setup_timing
    from .patches import files

    parts = [f"model {calculator.setup_seconds['load']:.1f} s"]
    loading = calculator.model.__dict__.get(files.LOAD_TIMING_ATTRIBUTE)
    timing, report = setup_timing(calculator.model), kernel_report(calculator.model)
    kernels = f"kernels {timing['kernels']:.1f} s ({report.summary()})" if report is not None else None
    accelerated_here = "accelerate" in calculator.setup_seconds  # else an exported file's load prepared them
    if loading:
        parts[0] += (f" (imports {loading['imports']:.1f}, build {loading['build']:.1f}, to "
                     f"{calculator.device.type} {loading['to_device']:.1f}"
                     f"{f'; {kernels}' if kernels and not accelerated_here else ''})")
    if accelerated_here:
        parts.append(f"surgery {timing['surgery']:.1f} s")
        if kernels:
            parts.append(kernels)
        if "check" in timing:
            parts.append(f"self-check {timing['check']:.1f} s")
    parts.append(f"first step {first_step_seconds:.1f} s")
    return "; ".join(parts)


def simulate(args):
    from . import cuda_context
    from .api import resolve_device
    from .calculator import DEFAULT_SKIN, Calculator

    validate(args)
    cuda_context.create_in_background(args.device)  # meanwhile: torch's import, the model's
    device = resolve_device(args.device)
    atoms = build_structure(args, device)
    threads = args.threads or (1 if device.type == "cpu" and len(atoms) <= SMALL_SYSTEM_ATOMS else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    accelerate = args.accelerate == "yes" or (args.accelerate == "auto" and device.type == "cuda")
    skin = DEFAULT_SKIN if args.skin is None else args.skin
    load_start = time.perf_counter()
    source, copy = kept_program(args, atoms, device, skin) if accelerate else (None, None)
    calculator = Calculator(str(copy) if copy else args.model, device=device, dtype=args.dtype,
                            accelerate=accelerate, modal=args.modal, skin=skin,
                            cuda_graph={"auto": "auto", "yes": True, "no": False}[args.cuda_graph],
                            trusted=args.trust or copy is not None, sha256=None if copy else args.sha256,
                            pairs=args.pairs)
    atoms.calc = calculator
    dynamics = make_dynamics(atoms, args) if args.engine == "ase" else None
    if dynamics is None and not np.any(atoms.get_momenta()):
        thermalize(atoms, args.temperature, np.random.default_rng(args.seed))

    def announce(first_step_seconds: float) -> None:
        load_seconds = time.perf_counter() - load_start
        modules = "fastmlip modules" if calculator.framework.is_accelerated(calculator.model) else "e3nn modules"
        framework = calculator.framework.FRAMEWORK
        if copy is not None:
            framework = f"{calculator.model.meta['framework']}, its exported copy in fastmlip's cache"
        dtype = str(calculator.dtype).replace("torch.", "")
        steps_as = "CUDA graph replays" if calculator.cuda_graph else f"eager steps: {calculator.cuda_graph_obstacle}"
        if calculator.chunk_edges is not None:
            steps_as += (f"; convolutions in chunks of at most {calculator.chunk_edges} edges (weights recomputed in "
                         "the backward: they would not fit whole)")
        print(f"{len(atoms)} atoms {atoms.get_chemical_formula()}, model {args.model} ({framework}, {modules}, "
              f"{dtype}, {calculator.device}{f', {threads} thread(s)' if threads else ''}; {steps_as}), "
              f"{args.ensemble.upper()} at {args.temperature:g} K, dt {args.timestep:g} fs", flush=True)
        print(f"setup {load_seconds:.1f} s: {describe_setup(calculator, first_step_seconds)}", flush=True)

    if args.engine == "device":  # its first step is the engine's own: forces without stress, its cell tensor
        records, step_seconds = _run_engine(args, atoms, calculator, announce)
    else:
        records, step_seconds = _run_ase(args, atoms, calculator, dynamics, announce)
    if source is not None and copy is None and calculator.framework.is_accelerated(calculator.model):
        keep_program(source, calculator, args)
    return atoms, calculator, records, step_seconds


def kept_program(args, atoms, device, skin: float) -> tuple:
    """(the model's file when an exported copy of it may be kept in fastmlip's cache, that copy when this run can
    start from it: :mod:`fastmlip.program_cache`); (None, None) with ``--no-program-cache`` or for a system whose
    radial weights would not fit whole (the framework's model cuts its convolutions into chunks then, a copy
    cannot)."""
    from . import program_cache
    from .api import resolve_dtype

    source = None if args.no_program_cache else program_cache.source_of(args.model, args.trust, args.sha256)
    if source is None:
        return None, None
    copy, manifest = program_cache.lookup(source, args.dtype, args.modal, device)
    if copy is None and manifest is not None:  # an earlier run found this model cannot be exported
        return None, None
    if copy is not None and not program_cache.fits_whole(manifest, atoms, skin, resolve_dtype(args.dtype), device):
        return None, None
    return source, copy


def keep_program(source: str, calculator, args) -> None:
    """Export the run's accelerated model into fastmlip's cache, for the next run of the same file to start from."""
    from . import program_cache
    from .api import chunk_convolutions

    chunk_convolutions(calculator.model, None)  # an exported program keeps its radial weights whole
    path, detail = program_cache.store(source, calculator.model, args.dtype, args.modal)
    if path is None:
        print(f"no exported copy kept for faster starts: {detail}")
    else:
        print(f"kept an exported copy for faster starts in {detail:.1f} s: {path} (--no-program-cache: never)")


def _run_ase(args, atoms, calculator, dynamics, announce) -> tuple:
    """MD through ASE's integrator, one calculator call a step; (records, step_seconds)."""
    from tqdm import tqdm

    first_step = time.perf_counter()
    atoms.get_forces()  # first step: neighbour list, CUDA graph capture; timed separately
    announce(time.perf_counter() - first_step)
    writer = TrajectoryWriter(args.traj) if args.traj else None
    n_atoms = len(atoms)
    records = []  # (time ps, potential eV/atom, kinetic eV/atom, temperature K)

    def record(step):
        records.append((step * args.timestep / 1000, atoms.get_potential_energy() / n_atoms,
                        atoms.get_kinetic_energy() / n_atoms, atoms.get_temperature()))
        if writer and step % args.interval == 0:
            writer.write(atoms)

    step_seconds = []
    bar = tqdm(total=args.steps, unit="step", disable=args.no_progress, file=sys.stderr)
    try:
        record(0)
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            tick = time.perf_counter()
            dynamics.run(1)
            step_seconds.append(time.perf_counter() - tick)
            record(step)
            rate = step / (time.perf_counter() - start)
            bar.set_postfix_str(f"{rate:.2f} steps/s, {rate * args.timestep * 86400 / 1e6:.3f} ns/day",
                                refresh=False)
            bar.update(1)
    finally:
        bar.close()
        if writer:
            writer.close()
    return np.array(records).reshape(-1, 4), np.array(step_seconds)


def _run_engine(args, atoms, calculator, announce) -> tuple:
    """MD through fastmlip.simulate; (records, step_seconds) as the ASE loop returns them (every step the same:
    the engine times the whole loop, it does not wait for each step). ``announce(seconds)`` prints the setup line
    once the engine's first forces are in."""
    from tqdm import tqdm

    from .engine import simulate

    bars = []  # opened after the setup line, which must not land inside the bar

    def setup_done(seconds: float) -> None:
        announce(seconds)
        bars.append(tqdm(total=args.steps, unit="step", disable=args.no_progress, file=sys.stderr))

    try:
        run = simulate(atoms, calculator, ensemble=args.ensemble, steps=args.steps, timestep=args.timestep,
                       temperature=args.temperature, thermostat=args.thermostat, friction=args.friction,
                       pressure=args.pressure, seed=args.seed, trajectory=args.traj, interval=args.interval,
                       restart=args.restart, steps_per_replay=args.steps_per_replay,
                       progress=lambda step: bars[0].update(step - bars[0].n), on_setup=setup_done)
    finally:
        for bar in bars:
            bar.close()
    if run.timing["replays"]:
        print(f"replays: {run.timing['replays']}")
    atoms.set_cell(run.atoms.cell)
    atoms.set_positions(run.atoms.positions)
    atoms.set_momenta(run.atoms.get_momenta())
    n = len(atoms)
    thermo = run.thermo
    records = np.stack([thermo["time_fs"] / 1000, thermo["epot"] / n, thermo["ekin"] / n, thermo["temperature"]], 1)
    if "pressure" in thermo:
        print(f"pressure: mean {thermo['pressure'].mean():.3f} GPa (target {args.pressure:g} GPa), volume "
              f"{thermo['volume'][0]:.1f} -> {thermo['volume'][-1]:.1f} A^3")
    return records, np.full(run.timing["steps"], run.timing["ms_per_step"] / 1e3)


def report(args, atoms, calculator, records, step_seconds):
    times_ps, potential, kinetic, temperature = records.T
    total = potential + kinetic
    lines = []
    if len(step_seconds):
        median = float(np.median(step_seconds))
        statistic = "median" if args.engine == "ase" else "mean"
        lines.append(f"timing: {len(step_seconds)} steps in {step_seconds.sum():.2f} s, {statistic} "
                     f"{median * 1e3:.1f} ms/step ({1 / median:.2f} steps/s, "
                     f"{args.timestep * 86400 / 1e6 / median:.4f} ns/day, "
                     f"{median / len(atoms) * 1e6:.1f} us/atom/step); "
                     f"neighbour list built {calculator.neighbor_list_rebuilds} time(s)")
    slope, excursion = energy_drift(times_ps, total)
    if args.ensemble == "nve":
        lines.append(f"energy drift: {slope:+.3e} eV/atom/ps (linear fit), max |E(t) - E(0)| "
                     f"{excursion:.3e} eV/atom over {times_ps[-1]:.3f} ps")
    else:
        lines.append(f"temperature: mean {temperature.mean():.1f} K (target {args.temperature:g} K); "
                     f"total energy is not conserved under a thermostat")
    lines.append(f"final: E_pot {potential[-1]:.6f} eV/atom, T {temperature[-1]:.1f} K")
    if args.traj:
        lines.append(f"trajectory: {args.traj} (every {args.interval} steps)")
    if args.plot:
        plot(args.plot, times_ps, potential, total, temperature)
        lines.append(f"plot: {args.plot}")
    print("\n".join(lines))
    return {"drift_eV_per_atom_per_ps": slope, "max_excursion_eV_per_atom": excursion,
            "median_step_s": float(np.median(step_seconds)) if len(step_seconds) else None}


def run(args) -> int:
    try:
        atoms, calculator, records, step_seconds = simulate(args)
    except (FileNotFoundError, ValueError) as exc:  # StructureError and UntrustedFileError are ValueErrors
        print(f"fastmlip md: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    report(args, atoms, calculator, records, step_seconds)
    return 0
