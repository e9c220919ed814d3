"""Batched evaluation of many small cells: fastmlip.evaluate (and TorchSim's FIRE) next to a Calculator loop.

The workload is a screening one: --cells small periodic cells (default 1000 of 64 atoms: 2x2x2 Si diamond, with
--species Si,Cu every other one a 4x2x2 Cu fcc cell), each rattled by 0.05 A with its own seed, so every cell is
a new structure. One fastmlip.Calculator (cuda_graph=False: a captured graph is never replayed on a new cell)
serves every row, so all of them run the very same model weights:

  calculator-loop  the Calculator as an ASE calculator, one cell after another: energy, forces and stress of
                   each (one model call per cell; ASE then answers from the calculator's results)
  evaluate         fastmlip.evaluate over the whole list, batches of disjoint graphs up to --batch-atoms atoms
                   each (a row per value); one untimed call over the whole list first, then the timed one
  torchsim-fire    (--torchsim; needs torch_sim, Python >= 3.12) all cells as one TorchSim SimState relaxed by
                   TorchSim's own FIRE (ts.fire_init / ts.fire_step, positions only) through
                   fastmlip.torchsim.Model: --fire-steps timed steps after an untimed init and step

Times are wall times with the device synchronised at both ends, reported per structure; "x loop" is the loop's
time per structure over the row's (for torchsim-fire, over the time per structure of one FIRE step, an
evaluation without stress plus the optimizer's update). Parity: each row's per-structure energies, forces and
stress (torchsim-fire: energies and forces of its initial state) against the loop's: max |dE|/atom, max |dF|,
max |dS|; a row beyond the tolerances (float32: 1e-5 eV/atom, 1e-4 eV/A, 1e-6 eV/A^3; float64: 1e-9, 1e-8,
1e-9) is a failed row: its time is kept as failed_ms_per_structure, never reported as a speed. A row that
raises (out of memory, say) is a row with an error, never the end of the run. --quick: 6 cells of 8 atoms,
small batches, 3 FIRE steps, one CPU thread (works on the CPU, for smoke tests).

    python scripts/bench_batch.py --out bench_batch                          # GPU: SevenNet-0, 1000 Si cells
    python scripts/bench_batch.py --model mace-medium --species Si,Cu --out bench_batch_mace
    python3.12 scripts/bench_batch.py --torchsim --out bench_batch_ts        # with TorchSim's FIRE
    python scripts/bench_batch.py --quick --device cpu --out /tmp/bb         # CPU smoke test
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import platform
import shlex
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch
from ase.build import bulk
from bench_md import MACE_HIDDEN, is_out_of_memory, model_source, synchronize

import fastmlip

PROPERTIES = ("energy", "forces", "stress")
RATTLE_A = 0.05
UNIT_CELLS = {"Si": lambda: bulk("Si", "diamond", a=5.43, cubic=True),  # 8 atoms
              "Cu": lambda: bulk("Cu", "fcc", a=3.61, cubic=True)}  # 4 atoms
REPEATS = {64: {"Si": (2, 2, 2), "Cu": (4, 2, 2)}, 8: {"Si": (1, 1, 1), "Cu": (2, 1, 1)}}  # by atoms per cell
# max |dE|/atom (eV), max |dF| (eV/A), max |dS| (eV/A^3) against the calculator loop
TOLERANCES = {"float32": (1e-5, 1e-4, 1e-6), "float64": (1e-9, 1e-8, 1e-9)}
SPEEDS = ("ms_per_structure", "ms_per_structure_step")  # a failed row keeps these as failed_<key>
LOOP_WARMUP_CELLS = 4


def build_cells(count, species, atoms_per_cell):
    """``count`` periodic cells of ``atoms_per_cell`` atoms, ``species`` in turn, cell k rattled with seed k."""
    cells = []
    for k in range(count):
        kind = species[k % len(species)]
        atoms = UNIT_CELLS[kind]().repeat(REPEATS[atoms_per_cell][kind])
        atoms.rattle(RATTLE_A, seed=k)
        cells.append(atoms)
    return cells


def timed(device, run):
    """``(run(), seconds)`` with the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    value = run()
    synchronize(device)
    return value, time.perf_counter() - start


def calculator_loop(calculator, cells):
    """Energy, forces and stress of each cell through the calculator's ASE interface (the first property
    computes all three; the others come from its results)."""
    return [{name: calculator.get_property(name, atoms) for name in PROPERTIES} for atoms in cells]


def loop_row(calculator, cells, device):
    """The calculator loop over the first cells (untimed), then over all of them (timed)."""
    warmup = cells[:LOOP_WARMUP_CELLS]
    _, warmup_s = timed(device, lambda: calculator_loop(calculator, warmup))
    calculator.reset()  # else a cell equal to the last warm-up one would be answered from the cache
    results, seconds = timed(device, lambda: calculator_loop(calculator, cells))
    return {"warmup_s": warmup_s, "total_s": seconds, "ms_per_structure": 1e3 * seconds / len(cells)}, results


def evaluate_row(calculator, cells, device, batch_atoms):
    """fastmlip.evaluate over all cells twice: untimed, then timed."""
    def run():
        return fastmlip.evaluate(cells, calculator, batch_atoms=batch_atoms)

    _, warmup_s = timed(device, run)
    results, seconds = timed(device, run)
    return {"warmup_s": warmup_s, "total_s": seconds, "ms_per_structure": 1e3 * seconds / len(cells)}, results


def torchsim_row(calculator, cells, device, steps):
    """TorchSim's FIRE over all cells at once: an untimed init and step, then a fresh init (untimed; its
    energies and forces go to the parity check) and ``steps`` timed steps."""
    import torch_sim as ts

    from fastmlip.torchsim import Model

    model = Model(calculator, compute_stress=False)

    def start():
        return ts.fire_init(ts.io.atoms_to_state(cells, device=model.device, dtype=model.dtype), model)

    def relax(state):  # fire_step updates the state in place
        for _ in range(steps):
            state = ts.fire_step(state, model)
        return state

    def fmax(state):
        return float(torch.linalg.vector_norm(state.forces, dim=1).max())

    _, warmup_s = timed(device, lambda: ts.fire_step(start(), model))
    state = start()
    forces = np.split(np.array(state.forces.detach().cpu(), dtype=np.float64),  # copies, before the steps
                      np.cumsum([len(atoms) for atoms in cells])[:-1])
    initial = [{"energy": float(e), "forces": f} for e, f in zip(state.energy.detach().cpu(), forces, strict=True)]
    fmax_start = fmax(state)
    relaxed, seconds = timed(device, lambda: relax(state))
    return {"warmup_s": warmup_s, "fire_steps": steps, "total_s": seconds,
            "ms_per_structure": 1e3 * seconds / len(cells), "ms_per_structure_step": 1e3 * seconds / len(cells) / steps,
            "fmax_start": fmax_start, "fmax_end": fmax(relaxed), "torch_sim": ts.__version__}, initial


def run_row(row, measure, device, verbose):
    """Fill ``row`` from ``measure()`` (timings, per-structure results); the results, or None when it raised
    (then the row holds the error). Never raises."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results = None
    try:
        timing, results = measure()
        row.update(timing)
        if device.startswith("cuda"):
            row["peak_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    except Exception as exc:  # noqa: BLE001 - a row that fails is reported in the row; the run goes on
        if verbose:
            traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"
        row["oom"] = is_out_of_memory(exc)
    finally:
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return results


def check_parity(row, results, reference, dtype):
    """Max |dE|/atom, |dF| and |dS| (stress where both have it) of ``results`` against the loop's
    ``reference``; beyond the tolerances the row is failed and its times are no speeds."""
    if results is None:
        return
    if reference is None:
        row["parity"] = "unchecked: the calculator loop failed"
        return
    pairs = list(zip(results, reference, strict=True))
    row["dE_per_atom"] = max(abs(r["energy"] - ref["energy"]) / len(ref["forces"]) for r, ref in pairs)
    row["max_dF"] = max(float(np.abs(r["forces"] - ref["forces"]).max()) for r, ref in pairs)
    stress = [float(np.abs(r["stress"] - ref["stress"]).max()) for r, ref in pairs if "stress" in r]
    if stress:
        row["max_dS"] = max(stress)
    limits = dict(zip(("dE_per_atom", "max_dF", "max_dS"), TOLERANCES[dtype], strict=True))
    beyond = [f"{key} {row[key]:.1e} (tol {limit:.0e})" for key, limit in limits.items() if row.get(key, 0) > limit]
    if not beyond:
        row["parity"] = "ok"
        return
    row["parity"] = "failed"
    for key in SPEEDS:
        if key in row:
            row[f"failed_{key}"] = row.pop(key)
    row["error"] = "parity failed: " + ", ".join(beyond)


def add_speedups(rows):
    """``speedup_vs_loop``: the loop's ms per structure over the row's (per FIRE step for torchsim-fire)."""
    loop = next((r for r in rows if r["method"] == "calculator-loop" and "ms_per_structure" in r), None)
    for row in rows:
        if loop is not None and row is not loop and "ms_per_structure" in row:
            row["speedup_vs_loop"] = loop["ms_per_structure"] / row.get("ms_per_structure_step",
                                                                         row["ms_per_structure"])


def format_table(title, rows):
    header = (f"{'method':16s} {'batch_atoms':>11s} {'total s':>8s} {'ms/struct':>10s} {'x loop':>7s} "
              f"{'dE/atom':>8s} {'max dF':>8s} {'max dS':>8s}  notes")
    lines = [title, header, "-" * len(header)]
    for r in rows:
        batch = f"{r['batch_atoms']:11d}" if "batch_atoms" in r else f"{'-':>11s}"
        if "ms_per_structure" not in r:
            lines.append(f"{r['method']:16s} {batch} error: {r['error'][:110]}")
            continue
        speedup = f"{r['speedup_vs_loop']:7.1f}" if "speedup_vs_loop" in r else f"{'-':>7s}"
        parity = " ".join(f"{r[key]:8.1e}" if key in r else f"{'-':>8s}" for key in ("dE_per_atom", "max_dF", "max_dS"))
        notes = "reference" if r["method"] == "calculator-loop" else ""
        if r["method"] == "torchsim-fire":
            notes = (f"{r['fire_steps']} FIRE steps, {r['ms_per_structure_step']:.3f} ms/struct/step, "
                     f"fmax {r['fmax_start']:.3f} -> {r['fmax_end']:.3f} eV/A")
        if "peak_MiB" in r:
            notes += f"{', ' if notes else ''}peak {r['peak_MiB']:.0f} MiB"
        lines.append(f"{r['method']:16s} {batch} {r['total_s']:8.3f} {r['ms_per_structure']:10.3f} {speedup} "
                     f"{parity}  {notes}")
    return "\n".join(lines)


def write_json(path, meta, rows):
    """OUT.json; written after every row, so a run cut short keeps the rows it has."""
    with open(f"{path}.json", "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=1)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sevenn", choices=["sevenn", *MACE_HIDDEN],
                        help="SevenNet-0, or a MACE-MP-0-like model with random weights (as bench_md.py builds)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--cells", type=int, default=None, help="how many cells (default 1000; quick: 6)")
    parser.add_argument("--atoms-per-cell", type=int, default=None, choices=sorted(REPEATS),
                        help="atoms of each cell (default 64; quick: 8)")
    parser.add_argument("--species", default="Si", help="comma-separated, from Si,Cu: the cells' crystals in turn")
    parser.add_argument("--batch-atoms", default=None, help="comma-separated batch_atoms of fastmlip.evaluate, "
                        "a row each (default 4096,16384; quick: 16,4096)")
    parser.add_argument("--torchsim", action="store_true", help="also relax all cells with TorchSim's FIRE "
                        "through fastmlip.torchsim.Model (skipped, saying why, where torch_sim does not import)")
    parser.add_argument("--fire-steps", type=int, default=None, help="timed FIRE steps (default 50; quick: 3)")
    parser.add_argument("--no-self-check", action="store_true", help="skip the Calculator's check of the "
                        "accelerated model against the original at setup (slow on a CPU; the rows' parity "
                        "still compares the batched paths with the loop)")
    parser.add_argument("--quick", action="store_true", help="6 cells of 8 atoms, small batches, 3 FIRE steps, "
                        "one thread on the CPU (smoke test)")
    parser.add_argument("--out", default="bench_batch", help="writes OUT.json")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failing rows")
    args = parser.parse_args(argv)
    args.species = [s for s in args.species.split(",") if s]
    unknown = sorted(set(args.species) - set(UNIT_CELLS))
    if unknown or not args.species:
        parser.error(f"unknown species {unknown or args.species}; choose from {list(UNIT_CELLS)}")
    defaults = {"cells": (6, 1000), "atoms_per_cell": (8, 64), "batch_atoms": ("16,4096", "4096,16384"),
                "fire_steps": (3, 50)}  # (quick, full)
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.batch_atoms = [int(b) for b in args.batch_atoms.split(",") if b]
    if min(args.cells, args.fire_steps, *args.batch_atoms) < 1:
        parser.error("--cells, --fire-steps and --batch-atoms must be positive")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick and args.device == "cpu":
        torch.set_num_threads(1)  # tiny cells: threads only contend (a shared machine slows them 10x and more)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore")  # the frameworks' deprecation chatter, once per model load
    cells = build_cells(args.cells, args.species, args.atoms_per_cell)
    with tempfile.TemporaryDirectory(prefix="fastmlip_bench_") as model_dir:  # a MACE file, loaded and gone
        calculator = fastmlip.Calculator(model_source(args.model, model_dir), device=args.device, dtype=args.dtype,
                                         cuda_graph=False, check=not args.no_self_check,
                                         trusted=True)  # the MACE file is one bench_md.model_source wrote
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = {"command": shlex.join(["scripts/bench_batch.py", *argv]), "fastmlip": fastmlip.__version__,
            "torch": torch.__version__, "python": platform.python_version(), "device": args.device,
            "device_name": device_name, "threads": torch.get_num_threads(), "model": args.model, "dtype": args.dtype,
            "cells": args.cells, "atoms_per_cell": args.atoms_per_cell, "species": args.species, "rattle_A": RATTLE_A,
            "self_check": not args.no_self_check, "loop_warmup_cells": LOOP_WARMUP_CELLS,
            "setup_s": calculator.setup_seconds,
            "tolerances": dict(zip(("dE_per_atom", "max_dF", "max_dS"), TOLERANCES[args.dtype], strict=True))}
    rows = []

    def record(row, measure, reference):
        """Run one row, check it against ``reference`` (the loop's results; None: the loop row itself, or the
        loop failed), save and print it; its per-structure results."""
        results = run_row(row, measure, args.device, args.verbose)
        if row["method"] != "calculator-loop":
            check_parity(row, results, reference, args.dtype)
        elif results is not None:
            row["parity"] = "reference"
        rows.append(row)
        write_json(args.out, meta, rows)
        print(f"{row['method']:16s} {row.get('batch_atoms', ''):>6} "
              + (row["error"] if "error" in row else f"{row['ms_per_structure']:.3f} ms/structure"), flush=True)
        return results

    reference = record({"method": "calculator-loop"}, functools.partial(loop_row, calculator, cells, args.device),
                       None)
    for batch_atoms in args.batch_atoms:
        record({"method": "evaluate", "batch_atoms": batch_atoms},
               functools.partial(evaluate_row, calculator, cells, args.device, batch_atoms), reference)
    if args.torchsim:
        try:
            import torch_sim  # noqa: F401
        except ImportError as exc:
            meta["torchsim"] = f"skipped: torch_sim does not import ({exc}); it needs Python >= 3.12"
            print(f"torchsim-fire    {meta['torchsim']}", flush=True)
        else:
            record({"method": "torchsim-fire"},
                   functools.partial(torchsim_row, calculator, cells, args.device, args.fire_steps), reference)
    add_speedups(rows)
    write_json(args.out, meta, rows)
    print()
    print(format_table(f"{args.model} {args.dtype} on {device_name}: {args.cells} cells of {args.atoms_per_cell} "
                       f"atoms ({','.join(args.species)})", rows))
    print(f"\nwrote {args.out}.json")


if __name__ == "__main__":
    main()
