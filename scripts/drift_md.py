"""NVE energy drift of fastmlip.Calculator next to the framework's own calculator, from the same initial state.

Each backend runs velocity Verlet from the same positions and Maxwell-Boltzmann velocities (same seed) and
records the total energy per atom every step; the report gives the drift (slope of a linear fit, eV/atom/ps)
and the largest excursion from the start, per backend, and writes JSON and a PNG of E_total(t) - E_total(0).
Backends run one after another in this process (or one per process with --backends, to run them side by side).

    python scripts/drift_md.py --steps 10000 --out drift              # SevenNet-0, Si 8 atoms, 1 fs, 10 ps
    python scripts/drift_md.py --device cuda --repeat 3 --backends fastmlip,sevenn --out drift_gpu
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
from ase import units
from ase.build import bulk
from ase.md.verlet import VelocityVerlet

from fastmlip.md import energy_drift, thermalize

BACKENDS = ("fastmlip", "fastmlip-e3nn", "sevenn")


def make_calculator(backend: str, device: str, dtype: str):
    if backend == "sevenn":
        from sevenn.calculator import SevenNetCalculator

        if dtype != "float32":
            raise ValueError("SevenNetCalculator computes in float32 only")
        return SevenNetCalculator("7net-0", device=device)
    from fastmlip.calculator import Calculator

    return Calculator("7net-0", device=device, dtype=dtype, accelerate=backend == "fastmlip")


def run_nve(backend: str, args) -> dict:
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((args.repeat,) * 3)
    atoms.rattle(0.02, seed=args.seed)
    thermalize(atoms, args.temperature, np.random.default_rng(args.seed))
    atoms.calc = make_calculator(backend, args.device, args.dtype)
    dynamics = VelocityVerlet(atoms, timestep=args.timestep * units.fs)
    n = len(atoms)
    total = [atoms.get_total_energy() / n]
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        dynamics.run(1)
        total.append(atoms.get_total_energy() / n)
        if args.progress and step % max(1, args.steps // 20) == 0:
            print(f"  {backend}: step {step}/{args.steps}, E_total - E_0 = {total[-1] - total[0]:+.3e} eV/atom",
                  file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    total = np.array(total)
    slope, excursion = energy_drift(np.arange(len(total)) * args.timestep / 1000.0, total)
    return {"backend": backend, "atoms": n, "steps": args.steps, "timestep_fs": args.timestep,
            "drift_eV_per_atom_per_ps": slope, "max_excursion_eV_per_atom": excursion,
            "seconds": seconds, "total_energy_per_atom": total.tolist()}


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for result in results:
        total = np.array(result["total_energy_per_atom"])
        axis.plot(np.arange(len(total)) * result["timestep_fs"] / 1000.0, total - total[0], label=result["backend"],
                  lw=0.8)
    axis.set_xlabel("time (ps)")
    axis.set_ylabel("E_total(t) - E_total(0) (eV/atom)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="fastmlip-e3nn,sevenn" if not torch.cuda.is_available()
                    else "fastmlip,sevenn", help=f"comma-separated, from {BACKENDS}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=1, help="cubic Si cells per axis (1: 8 atoms)")
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--timestep", type=float, default=1.0, help="fs")
    ap.add_argument("--temperature", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--out", default="drift_md", help="output prefix: OUT.json, OUT.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for backend in args.backends.split(","):
        if backend not in BACKENDS:
            sys.exit(f"unknown backend {backend!r}; choose from {BACKENDS}")
        result = run_nve(backend, args)
        results.append(result)
        print(f"{backend:14s} {result['atoms']} atoms, {result['steps']} steps of {args.timestep:g} fs: drift "
              f"{result['drift_eV_per_atom_per_ps']:+.3e} eV/atom/ps, max |E(t) - E(0)| "
              f"{result['max_excursion_eV_per_atom']:.3e} eV/atom ({result['seconds']:.0f} s)", flush=True)
    meta = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
            or "cpu", "torch": torch.__version__, "dtype": args.dtype, "temperature_K": args.temperature,
            "command": " ".join(sys.argv)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(f"{args.out}.json", "w") as handle:
        json.dump({"meta": meta, "results": results}, handle)
    plot(results, f"{args.out}.png")
    print(f"wrote {args.out}.json, {args.out}.png")


if __name__ == "__main__":
    main()
