"""MD step time and peak memory: fastmlip next to each framework's own ASE calculator and to FastMACE.

Two kinds of rows, never mixed in a ratio (``"kind"`` in each row; a table each):
"step" rows time one energy+forces call through an ASE calculator, the caller owning the MD loop:
  fastmlip        fastmlip.Calculator (accelerated modules, on-device Verlet list, one transfer each way,
                  each step a CUDA graph replay where the model allows)
  fastmlip-eager  the same without CUDA graphs (cuda_graph=False)
  fastmlip-e3nn   fastmlip.Calculator with accelerate=False (the same step, the model's own e3nn modules)
  e3nn            SevenNetCalculator / MACECalculator as shipped
  cueq, oeq       the same with enable_cueq / enable_oeq (needs cuEquivariance / OpenEquivariance)
"md-loop" rows time whole MD steps of an engine that owns the loop (scripts/bench_md_loops.py): NVT Langevin
300 K, 1 fs, --md-steps timed after --md-warmup, same model file and crystal, peak memory from before the warm-up
(the engines' graph captures included; until 2026-12-04 it covered the timed steps only); selected by default on
CUDA only:
  fastmlip-md     fastmlip.simulate (device-resident state around Calculator.evaluate)
  fastmlip-md-replay  the same, 10 steps (integrator included) per CUDA graph replay
  fastmlip-md-verlet  fastmlip-md whose replays evaluate the Verlet candidates (Calculator(pairs="verlet"))
  fastmace        FastMACE 1.0's Simulation (MACE only; in a child process; not applicable to SevenNet-0)
Systems follow /work/shared/ANCHORS.md: SevenNet-0 on Si 216 and Cu 4000 atoms; MACE-medium-like and
MACE-large-like (random weights, MP-0 hyperparameters, built as anchors/bench_models.py does) on Cu 4000;
--systems Si216,Cu4000 runs the chosen systems for every chosen model instead.
Then a size sweep (Cu fcc, 108 atoms upwards) per backend until the first out-of-memory error.

Each step row moves the atoms slightly before each call (so nothing is cached) and is timed with the device
synchronised; the median over --steps after --warmup is reported. Every backend runs in try/except: a failure
is a row with an error, never the end of the run. Every row's first frame (md-loop rows: step 0, before any
MD) is compared with the framework's plain calculator (evaluated once per system, untimed): a row beyond the
fp32/fp64 tolerances is a failed row, not a speed. The md-loop table gives each row's time over the best
md-loop row of its case. ``--quick`` runs tiny systems (works on CPU, for smoke tests).

    python scripts/bench_md.py --out bench_md            # GPU: anchors + sweep, writes .json and .png
    python scripts/bench_md.py --quick --device cpu      # CPU smoke test
    python scripts/bench_md.py --models mace-medium --systems Cu4000 --backends fastmlip,fastmlip-md,fastmace \\
        --no-sweep                                       # GPU: per-step and whole-loop rows of one case
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from ase.build import bulk

from bench_md_loops import MD_BACKENDS, run_md_loop

BACKENDS = ("fastmlip", "fastmlip-eager", "fastmlip-e3nn", "e3nn", "cueq", "oeq")  # step rows
MACE_HIDDEN = {"mace-medium": "128x0e+128x1o", "mace-large": "128x0e+128x1o+128x2e"}
# (model, crystal, cubic cells per axis): SevenNet-0 Si 216 / Cu 4000, MACE Cu 4000 (ANCHORS.md)
ANCHOR_CASES = [("sevenn", "Si", 3), ("sevenn", "Cu", 10), ("mace-medium", "Cu", 10), ("mace-large", "Cu", 10)]
QUICK_CASES = [("sevenn", "Si", 1), ("mace-medium", "Cu", 1)]
SYSTEMS = {"Si216": ("Si", 3), "Cu4000": ("Cu", 10), "Cu32000": ("Cu", 20)}  # --systems: for every chosen model
SWEEP_REPEATS = [3, 4, 6, 8, 10, 13, 16, 20, 25, 32, 40, 50, 63]  # Cu fcc: 108 ... 1,000,188 atoms
QUICK_SWEEP_REPEATS = [1, 2]


def crystal(kind, repeat):
    if kind == "Si":
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((repeat,) * 3)
    else:
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat((repeat,) * 3)
    atoms.rattle(0.05, seed=1)
    return atoms


def mace_model_path(which, directory):
    """A MACE-MP-0-like model with random weights, as /work/shared/anchors/bench_models.py builds it."""
    path = os.path.join(directory, f"{which}.model")
    if os.path.exists(path):
        return path
    from e3nn import o3
    from mace import modules

    species = list(range(1, 90))
    model = modules.ScaleShiftMACE(
        r_max=6.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=len(species), hidden_irreps=o3.Irreps(MACE_HIDDEN[which]),
        MLP_irreps=o3.Irreps("16x0e"), atomic_energies=np.zeros(len(species)), avg_num_neighbors=40.0,
        atomic_numbers=species, correlation=3, gate=torch.nn.functional.silu, radial_MLP=[64, 64, 64],
        atomic_inter_scale=1.0, atomic_inter_shift=0.0)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    torch.save(model.to(torch.float64), path)
    return path


def model_source(which, model_dir):
    return "7net-0" if which == "sevenn" else mace_model_path(which, model_dir)


def make_calculator(which, backend, device, dtype, model_dir, check=True):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS + MD_BACKENDS}")
    model = model_source(which, model_dir)
    if backend.startswith("fastmlip"):
        from fastmlip.calculator import Calculator

        return Calculator(model, device=device, dtype=dtype, accelerate=backend != "fastmlip-e3nn", check=check,
                          cuda_graph="auto" if backend == "fastmlip" else False,
                          trusted=True)  # the MACE file is one this script wrote
    flags = {"enable_cueq": backend == "cueq", "enable_oeq": backend == "oeq"}
    required = {"cueq": "cuequivariance_torch", "oeq": "openequivariance"}.get(backend)
    if required:  # SevenNetCalculator would quietly fall back to e3nn without it
        import importlib.util

        if importlib.util.find_spec(required) is None:
            raise ImportError(f"{backend} needs the {required} package, not installed here")
    if which == "sevenn":
        from sevenn.calculator import SevenNetCalculator

        if dtype != "float32":
            raise ValueError("SevenNetCalculator computes in float32 only")
        return SevenNetCalculator(model, device=device, **flags)
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=model, device=device, default_dtype=dtype, **flags)


def export_model(model: str, path: str, dtype: str) -> str:
    """``model`` (a name or a file this script trusts) written by ``fastmlip convert --to exported`` to ``path``, on
    the CPU, in a process of its own that runs the self-checks with the reference ops whatever this one's kernel
    settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMLIP_BACKEND", "TRITON_INTERPRET")}
    subprocess.run([sys.executable, "-m", "fastmlip.cli", "convert", model, "-o", path, "--to", "exported",
                    "--dtype", dtype, "--trust"], env=env, check=True, timeout=900)
    return path


def exported_calculator(which, device, dtype, model_dir):
    """The case's model as ``fastmlip convert --to exported`` writes it, in a calculator as ``fastmlip md`` makes
    one for such a file."""
    from fastmlip.calculator import Calculator

    path = export_model(model_source(which, model_dir), os.path.join(model_dir, f"{which}-{dtype}.pt2"), dtype)
    return Calculator(path, device=device, dtype=dtype, trusted=True)  # a file this script wrote


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_steps(calculator, atoms, device, steps, warmup):
    """Median ms per energy+forces step, atoms moved slightly before each; first-step results for parity."""
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(0)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, first = [], None
    for step in range(warmup + steps):
        if step:
            atoms.positions += rng.normal(0, 0.002, atoms.positions.shape)
        synchronize(device)
        start = time.perf_counter()
        energy = atoms.get_potential_energy()
        forces = atoms.get_forces()
        synchronize(device)
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        if step == 0:
            first = (float(energy), np.array(forces))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"step_ms": statistics.median(times), "min_ms": min(times), "peak_MiB": peak,
            "us_per_atom": statistics.median(times) * 1e3 / len(atoms)}, first


def is_out_of_memory(exc):
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def run_case(which, atoms, backend, args, model_dir):
    """One row: timing, or an error string; never raises."""
    row = {"model": which, "system": atoms.get_chemical_formula(mode="metal"), "natoms": len(atoms),
           "backend": backend, "kind": "md-loop" if backend in MD_BACKENDS else "step"}
    started = time.perf_counter()
    calculator = None
    try:
        if row["kind"] == "md-loop":
            timing, first = run_md_loop(backend, which, atoms, model_source(which, model_dir), args)
            timing["us_per_atom"] = timing["step_ms"] * 1e3 / len(atoms)
        else:
            calculator = make_calculator(which, backend, args.device, args.dtype, model_dir)
            timing, first = time_steps(calculator, atoms, args.device, args.steps, args.warmup)
            if hasattr(calculator, "cuda_graph"):  # whether fastmlip's steps were graph replays (else why not)
                row["cuda_graph"] = calculator.cuda_graph or calculator.cuda_graph_obstacle or "off"
                row["chunk_edges"] = calculator.chunk_edges  # convolutions in receiver chunks (None: whole)
        row.update(timing)
        row["energy0"], row["_forces0"] = first
    except Exception as exc:  # a backend that fails is reported in its row; the run goes on
        if args.verbose:
            traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"
        row["oom"] = is_out_of_memory(exc)
    finally:
        del calculator
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    row["wall_s"] = round(time.perf_counter() - started, 1)
    return row


TOLERANCES = {"float32": (1e-5, 1e-4), "float64": (1e-9, 1e-8)}  # |dE|/atom eV, max|dF| eV/A


def reference_frame(which, atoms, args, model_dir):
    """Energy and forces of the first frame from the framework's plain calculator (SevenNetCalculator /
    MACECalculator with its e3nn modules), untimed; or an error string (e.g. out of memory at sweep sizes)."""
    calculator = None
    try:
        calculator = make_calculator(which, "e3nn", args.device, args.dtype, model_dir)
        frame = atoms.copy()
        frame.calc = calculator
        return float(frame.get_potential_energy()), np.array(frame.get_forces())
    except Exception as exc:  # noqa: BLE001 - reported in the rows it would have checked
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
    finally:
        del calculator
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


def check_parity(row, reference, dtype):
    """|dE|/atom and max|dF| against the reference on the first frame. A row beyond the tolerances becomes a
    failed row: its time is kept as ``failed_step_ms``, never reported as a speed. A row whose reference could
    not run says so in ``parity``."""
    forces = row.pop("_forces0", None)
    if "step_ms" not in row:
        return
    if isinstance(reference, str):
        row["parity"] = f"unchecked: reference failed ({reference})"
        return
    row["dE_per_atom"] = abs(row["energy0"] - reference[0]) / row["natoms"]
    row["max_dF"] = float(np.abs(forces - reference[1]).max())
    e_tol, f_tol = TOLERANCES[dtype]
    if row["dE_per_atom"] <= e_tol and row["max_dF"] <= f_tol:
        row["parity"] = "ok"
        return
    row["parity"] = "failed"
    row["failed_step_ms"] = row.pop("step_ms")
    row["error"] = (f"parity failed: |dE|/atom {row['dE_per_atom']:.1e} eV (tol {e_tol:.0e}), max|dF| "
                    f"{row['max_dF']:.1e} eV/A (tol {f_tol:.0e})")


def add_ratios(rows):
    """Step rows: speed-up over the framework's plain calculator, where its row ran. Md-loop rows: time over
    the fastest md-loop row of the same case (1.00 for that one), and which one that is."""
    timed = [r for r in rows if "step_ms" in r]
    baselines = {(r["model"], r["natoms"]): r for r in timed if r["backend"] == "e3nn"}
    best = {}
    for row in timed:
        case = (row["model"], row["natoms"])
        if row["kind"] == "md-loop" and (case not in best or row["step_ms"] < best[case]["step_ms"]):
            best[case] = row
    for row in timed:
        case = (row["model"], row["natoms"])
        if row["kind"] == "step" and case in baselines:
            row["speedup_vs_e3nn"] = baselines[case]["step_ms"] / row["step_ms"]
        elif row["kind"] == "md-loop":
            row["x_best_md"], row["best_md"] = row["step_ms"] / best[case]["step_ms"], best[case]["backend"]


def outcome(row):
    return row["error"] if "error" in row else f"{row['step_ms']:.2f} ms/step ({row['kind']})"


def format_table(rows):
    """A table per kind: step rows with their speed-up over e3nn, md-loop rows with their time over the best
    md-loop row of the case, its engine (graph or plan) and setup time."""
    tables = []
    for kind, ratio_title, width in (("step", "x e3nn", 7), ("md-loop", "x best md-loop", 24)):
        chosen = [r for r in rows if r["kind"] == kind]
        if not chosen:
            continue
        header = (f"{'model':12s} {'system':10s} {'atoms':>7s} {'backend':14s} {'ms/step':>9s} {'us/atom':>8s} "
                  f"{'peak MiB':>9s} {ratio_title:>{width}s} {'dE/atom':>8s} {'max dF':>8s}"
                  + ("  setup s  engine" if kind == "md-loop" else ""))
        lines = [f"{kind} rows" + (" (NVT Langevin 300 K, 1 fs, whole MD step)" if kind == "md-loop" else
                                   " (energy + forces through an ASE calculator)"), header, "-" * len(header)]
        for r in chosen:
            if "error" in r:
                lines.append(f"{r['model']:12s} {r['system']:10s} {r['natoms']:7d} {r['backend']:14s} "
                             f"error: {r['error'][:110]}")
                continue
            peak = f"{r['peak_MiB']:9.0f}" if r.get("peak_MiB") is not None else f"{'-':>9s}"
            if "x_best_md" in r:
                ratio = f"{r['x_best_md']:.2f} ({'best' if r['best_md'] == r['backend'] else 'of ' + r['best_md']})"
            else:
                ratio = f"{r['speedup_vs_e3nn']:.2f}" if "speedup_vs_e3nn" in r else "-"
            parity = (f"{r['dE_per_atom']:8.1e} {r['max_dF']:8.1e}" if "max_dF" in r
                      else f"{'unchecked':>17s}")
            line = (f"{r['model']:12s} {r['system']:10s} {r['natoms']:7d} {r['backend']:14s} "
                    f"{r['step_ms']:9.2f} {r['us_per_atom']:8.2f} {peak} {ratio:>{width}s} {parity}")
            if kind == "md-loop":  # what happened during the timed steps: steady state, or not quite
                events = ", ".join(f"{count:.3g} {name}" for name, count in r["timed_events"].items())
                line += f" {r['setup_s']:8.1f}  {r['engine']}" + (f" [timed steps: {events}]" if events else "")
            lines.append(line)
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def sweep(args, model_dir, backends):
    """Cu fcc of growing size per backend; a backend stops at its first error (out of memory, usually)."""
    rows, references = [], {}
    repeats = args.sweep_repeats or (QUICK_SWEEP_REPEATS if args.quick else SWEEP_REPEATS)
    for backend in backends:
        for repeat in repeats:
            atoms = crystal("Si" if args.quick else "Cu", repeat)
            if len(atoms) > args.max_atoms:
                break
            if repeat not in references:
                references[repeat] = reference_frame(args.sweep_model, atoms, args, model_dir)
            row = run_case(args.sweep_model, atoms, backend, args, model_dir)
            check_parity(row, references[repeat], args.dtype)
            rows.append(row)
            print(f"sweep {backend:14s} {len(atoms):8d} atoms: "
                  f"{outcome(row)}", flush=True)
            if "error" in row or row["step_ms"] > args.max_step_ms:
                break
    return rows


def plot(path, anchors, sweep_rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, lines, memory) = plt.subplots(1, 3, figsize=(19, 5))
    cases = sorted({(r["model"], r["natoms"]) for r in anchors}, key=lambda c: (c[0], c[1]))
    backends = [b for b in BACKENDS + MD_BACKENDS if any(r["backend"] == b for r in anchors)]
    width = 0.8 / max(1, len(backends))
    for k, backend in enumerate(backends):
        values = [next((r["step_ms"] for r in anchors if (r["model"], r["natoms"]) == c
                        and r["backend"] == backend and "step_ms" in r), np.nan) for c in cases]
        label = f"{backend} (whole MD step)" if backend in MD_BACKENDS else backend
        bars.bar(np.arange(len(cases)) + k * width, values, width, label=label)
    bars.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
    bars.set_xticklabels([f"{m}\n{n} atoms" for m, n in cases], fontsize=8)
    bars.set_ylabel("ms per MD step (energy + forces)")
    bars.set_yscale("log")
    bars.legend(fontsize=8)
    for backend in BACKENDS + MD_BACKENDS:
        points = [(r["natoms"], r["step_ms"]) for r in sweep_rows if r["backend"] == backend and "step_ms" in r]
        if points:
            lines.plot(*zip(*points), marker="o", label=backend)
        per_atom = [(r["natoms"], r["peak_MiB"] * 1024 / r["natoms"]) for r in sweep_rows
                    if r["backend"] == backend and r.get("peak_MiB")]
        if per_atom:
            memory.plot(*zip(*per_atom), marker="o", label=backend)
    for axes, label in ((lines, "ms per step"), (memory, "peak KiB per atom")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("atoms")
        axes.set_ylabel(label)
        axes.set_title(f"size sweep (until out of memory): {label}")
        if axes.lines:
            axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def choose_cases(args, parser):
    """(model, crystal, cells per axis) to run: --systems for every model of --models, else the anchor cases
    (quick: the tiny ones) of those models."""
    models = [m for m in args.models.split(",") if m]
    if not args.systems:
        return [case for case in (QUICK_CASES if args.quick else ANCHOR_CASES) if case[0] in models]
    if args.quick:
        parser.error("--systems picks full-size systems; --quick runs its own tiny ones")
    systems = [s for s in args.systems.split(",") if s]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    return [(which, *SYSTEMS[system]) for which in models for system in systems]


def write_json(args, anchors, sweep_rows):
    """OUT.json; written after every anchor row too, so a run cut short by a time limit keeps its rows."""
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = {"device": args.device, "device_name": device_name, "dtype": args.dtype, "steps": args.steps,
            "warmup": args.warmup, "md_steps": args.md_steps, "md_warmup": args.md_warmup,
            "md_loop": "NVT Langevin 300 K, 1 fs, friction 0.01/fs, Maxwell-Boltzmann start (seed 1)",
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(f"{args.out}.json", "w") as handle:
        json.dump({"meta": meta, "anchors": anchors, "sweep": sweep_rows}, handle, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick: 1)")
    parser.add_argument("--backends", default=None, help=f"from {','.join(BACKENDS + MD_BACKENDS)}; default: "
                        "the step backends, and on CUDA the md-loop ones too")
    parser.add_argument("--models", default="sevenn,mace-medium,mace-large",
                        help="which anchor cases to run (sevenn, mace-medium, mace-large)")
    parser.add_argument("--systems", default=None, help=f"from {','.join(SYSTEMS)}: these systems for every "
                        "model of --models (default: the ANCHORS.md cases); not with --quick")
    parser.add_argument("--md-steps", type=int, default=None, help="md-loop rows: timed MD steps "
                        "(default 300; quick: 5)")
    parser.add_argument("--md-warmup", type=int, default=None, help="md-loop rows: MD steps before them "
                        "(default 50; quick: 2)")
    parser.add_argument("--fastmace-timeout", type=float, default=900, help="seconds for each fastmace row's "
                        "child process, setup included")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--sweep-model", default="sevenn", choices=["sevenn", *MACE_HIDDEN])
    parser.add_argument("--sweep-backends", default=None, help="default: fastmlip,e3nn,cueq,oeq "
                        "(quick: fastmlip,e3nn)")
    parser.add_argument("--sweep-repeats", type=lambda text: [int(r) for r in text.split(",")], default=None,
                        help="Cu fcc cubic cells per axis of each sweep size, comma separated (default: 3 ... 63, "
                        "108 to 1,000,188 atoms)")
    parser.add_argument("--max-atoms", type=int, default=2_000_000)
    parser.add_argument("--max-step-ms", type=float, default=30_000, help="stop a sweep after a step this slow")
    parser.add_argument("--quick", action="store_true", help="tiny systems, few steps (CPU smoke test)")
    parser.add_argument("--out", default="bench_md", help="writes OUT.json and OUT.png")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing backends and the "
                        "fastmace child's log")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and args.quick:
        torch.set_num_threads(1)  # tiny systems: threads only contend (see fastmlip/md.py)
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    args.md_steps = args.md_steps or (5 if args.quick else 300)
    args.md_warmup = args.md_warmup if args.md_warmup is not None else (2 if args.quick else 50)
    warnings.filterwarnings("ignore")
    default_backends = BACKENDS + (MD_BACKENDS if args.device.startswith("cuda") else ())
    backends = [b for b in (args.backends or ",".join(default_backends)).split(",") if b]
    cases = choose_cases(args, parser)

    model_dir = tempfile.mkdtemp(prefix="fastmlip_bench_")
    anchors = []
    for which, kind, repeat in cases:
        atoms = crystal(kind, repeat)
        reference = reference_frame(which, atoms, args, model_dir)
        for backend in backends:
            row = run_case(which, atoms, backend, args, model_dir)
            check_parity(row, reference, args.dtype)
            anchors.append(row)
            print(f"{which:12s} {len(atoms):6d} {backend:14s} "
                  f"{outcome(row)}", flush=True)
            if "fastmace_report" in row:  # FastMACE's own summary: its plan, setup stages and why not faster
                print(row["fastmace_report"], flush=True)
            write_json(args, anchors, [])
    add_ratios(anchors)
    sweep_backends = args.sweep_backends or ("fastmlip,e3nn" if args.quick else "fastmlip,e3nn,cueq,oeq")
    sweep_rows = [] if args.no_sweep else sweep(args, model_dir, [b for b in sweep_backends.split(",") if b])
    add_ratios(sweep_rows)

    print()
    print(format_table(anchors))
    if sweep_rows:
        print()
        print(format_table(sweep_rows))
    write_json(args, anchors, sweep_rows)
    plot(f"{args.out}.png", anchors, sweep_rows)
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
