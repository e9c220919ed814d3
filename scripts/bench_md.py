"""MD step time and peak memory: fastmlip.Calculator next to each framework's own ASE calculator.

Backends, side by side in one run:
  fastmlip        fastmlip.Calculator (accelerated modules, on-device Verlet list, one transfer each way,
                  each step a CUDA graph replay where the model allows)
  fastmlip-eager  the same without CUDA graphs (cuda_graph=False)
  fastmlip-e3nn   fastmlip.Calculator with accelerate=False (the same step, the model's own e3nn modules)
  e3nn            SevenNetCalculator / MACECalculator as shipped
  cueq, oeq       the same with enable_cueq / enable_oeq (needs cuEquivariance / OpenEquivariance)
Systems follow /work/shared/ANCHORS.md: SevenNet-0 on Si 216 and Cu 4000 atoms; MACE-medium-like and
MACE-large-like (random weights, MP-0 hyperparameters, built as anchors/bench_models.py does) on Cu 4000.
Then a size sweep (Cu fcc, 108 atoms upwards) per backend until the first out-of-memory error.

Each step moves the atoms slightly (so nothing is cached) and is timed with the device synchronised; the
median over --steps after --warmup is reported. Every backend runs in try/except: a failure is a row with an
error, never the end of the run. Every row's first frame is compared with the framework's plain calculator
(evaluated once per system, untimed): a row beyond the fp32/fp64 tolerances is a failed row, not a speed.
``--quick`` runs tiny systems (works on CPU, for smoke tests).

    python scripts/bench_md.py --out bench_md            # GPU: anchors + sweep, writes .json and .png
    python scripts/bench_md.py --quick --device cpu      # CPU smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from ase.build import bulk

BACKENDS = ("fastmlip", "fastmlip-eager", "fastmlip-e3nn", "e3nn", "cueq", "oeq")
MACE_HIDDEN = {"mace-medium": "128x0e+128x1o", "mace-large": "128x0e+128x1o+128x2e"}
# (model, crystal, cubic cells per axis): SevenNet-0 Si 216 / Cu 4000, MACE Cu 4000 (ANCHORS.md)
ANCHOR_CASES = [("sevenn", "Si", 3), ("sevenn", "Cu", 10), ("mace-medium", "Cu", 10), ("mace-large", "Cu", 10)]
QUICK_CASES = [("sevenn", "Si", 1), ("mace-medium", "Cu", 1)]
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


def make_calculator(which, backend, device, dtype, model_dir):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    model = "7net-0" if which == "sevenn" else mace_model_path(which, model_dir)
    if backend.startswith("fastmlip"):
        from fastmlip.calculator import Calculator

        return Calculator(model, device=device, dtype=dtype, accelerate=backend != "fastmlip-e3nn",
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
           "backend": backend}
    started = time.perf_counter()
    calculator = None
    try:
        calculator = make_calculator(which, backend, args.device, args.dtype, model_dir)
        timing, first = time_steps(calculator, atoms, args.device, args.steps, args.warmup)
        row.update(timing)
        if hasattr(calculator, "cuda_graph"):  # whether fastmlip's steps were graph replays (else why not)
            row["cuda_graph"] = calculator.cuda_graph or calculator.cuda_graph_obstacle or "off"
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
    """Speed-up over the framework's plain calculator, where its row ran."""
    baselines = {(r["model"], r["natoms"]): r for r in rows if r["backend"] == "e3nn" and "step_ms" in r}
    for row in rows:
        base = baselines.get((row["model"], row["natoms"]))
        if base is not None and "step_ms" in row:
            row["speedup_vs_e3nn"] = base["step_ms"] / row["step_ms"]


def outcome(row):
    return row["error"] if "error" in row else f"{row['step_ms']:.2f} ms/step"


def format_table(rows):
    header = (f"{'model':12s} {'system':10s} {'atoms':>7s} {'backend':14s} {'ms/step':>9s} {'us/atom':>8s} "
              f"{'peak MiB':>9s} {'x e3nn':>7s} {'dE/atom':>8s} {'max dF':>8s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:12s} {r['system']:10s} {r['natoms']:7d} {r['backend']:14s} "
                         f"error: {r['error'][:90]}")
            continue
        peak = f"{r['peak_MiB']:9.0f}" if r.get("peak_MiB") is not None else f"{'-':>9s}"
        ratio = f"{r['speedup_vs_e3nn']:7.2f}" if "speedup_vs_e3nn" in r else f"{'-':>7s}"
        parity = (f"{r['dE_per_atom']:8.1e} {r['max_dF']:8.1e}" if "max_dF" in r
                  else f"{'unchecked':>17s}")
        lines.append(f"{r['model']:12s} {r['system']:10s} {r['natoms']:7d} {r['backend']:14s} "
                     f"{r['step_ms']:9.2f} {r['us_per_atom']:8.2f} {peak} {ratio} {parity}")
    return "\n".join(lines)


def sweep(args, model_dir, backends):
    """Cu fcc of growing size per backend; a backend stops at its first error (out of memory, usually)."""
    rows, references = [], {}
    repeats = QUICK_SWEEP_REPEATS if args.quick else SWEEP_REPEATS
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

    figure, (bars, lines) = plt.subplots(1, 2, figsize=(13, 5))
    cases = sorted({(r["model"], r["natoms"]) for r in anchors}, key=lambda c: (c[0], c[1]))
    backends = [b for b in BACKENDS if any(r["backend"] == b for r in anchors)]
    width = 0.8 / max(1, len(backends))
    for k, backend in enumerate(backends):
        values = [next((r["step_ms"] for r in anchors if (r["model"], r["natoms"]) == c
                        and r["backend"] == backend and "step_ms" in r), np.nan) for c in cases]
        bars.bar(np.arange(len(cases)) + k * width, values, width, label=backend)
    bars.set_xticks(np.arange(len(cases)) + 0.4 - width / 2)
    bars.set_xticklabels([f"{m}\n{n} atoms" for m, n in cases], fontsize=8)
    bars.set_ylabel("ms per MD step (energy + forces)")
    bars.set_yscale("log")
    bars.legend(fontsize=8)
    for backend in BACKENDS:
        points = [(r["natoms"], r["step_ms"]) for r in sweep_rows if r["backend"] == backend and "step_ms" in r]
        if points:
            lines.plot(*zip(*points), marker="o", label=backend)
    lines.set_xscale("log")
    lines.set_yscale("log")
    lines.set_xlabel("atoms")
    lines.set_ylabel("ms per step")
    lines.set_title("size sweep (until out of memory)")
    lines.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10; quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick: 1)")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--models", default="sevenn,mace-medium,mace-large",
                        help="which anchor cases to run (sevenn, mace-medium, mace-large)")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--sweep-model", default="sevenn", choices=["sevenn", *MACE_HIDDEN])
    parser.add_argument("--sweep-backends", default=None, help="default: fastmlip,e3nn,cueq,oeq "
                        "(quick: fastmlip,e3nn)")
    parser.add_argument("--max-atoms", type=int, default=2_000_000)
    parser.add_argument("--max-step-ms", type=float, default=30_000, help="stop a sweep after a step this slow")
    parser.add_argument("--quick", action="store_true", help="tiny systems, few steps (CPU smoke test)")
    parser.add_argument("--out", default="bench_md", help="writes OUT.json and OUT.png")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing backends")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and args.quick:
        torch.set_num_threads(1)  # tiny systems: threads only contend (see fastmlip/md.py)
    args.steps = args.steps or (2 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    warnings.filterwarnings("ignore")
    backends = [b for b in args.backends.split(",") if b]
    models = set(args.models.split(","))

    model_dir = tempfile.mkdtemp(prefix="fastmlip_bench_")
    anchors = []
    for which, kind, repeat in (QUICK_CASES if args.quick else ANCHOR_CASES):
        if which not in models:
            continue
        atoms = crystal(kind, repeat)
        reference = reference_frame(which, atoms, args, model_dir)
        for backend in backends:
            row = run_case(which, atoms, backend, args, model_dir)
            check_parity(row, reference, args.dtype)
            anchors.append(row)
            print(f"{which:12s} {len(atoms):6d} {backend:14s} "
                  f"{outcome(row)}", flush=True)
    add_ratios(anchors)
    sweep_backends = args.sweep_backends or ("fastmlip,e3nn" if args.quick else "fastmlip,e3nn,cueq,oeq")
    sweep_rows = [] if args.no_sweep else sweep(args, model_dir, [b for b in sweep_backends.split(",") if b])
    add_ratios(sweep_rows)

    print()
    print(format_table(anchors))
    if sweep_rows:
        print()
        print(format_table(sweep_rows))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = {"device": args.device, "device_name": device_name, "dtype": args.dtype, "steps": args.steps,
            "warmup": args.warmup, "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(f"{args.out}.json", "w") as handle:
        json.dump({"meta": meta, "anchors": anchors, "sweep": sweep_rows}, handle, indent=1)
    plot(f"{args.out}.png", anchors, sweep_rows)
    print(f"\nwrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
