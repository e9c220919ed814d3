"""Where an MD step's time goes: wall time, GPU kernel time, launch count, and the host-side hot spots.

For each system it runs ``fastmlip.Calculator`` steps (atoms moved slightly each step) and reports:
median wall ms/step; the sum of GPU kernel time per step and the number of kernel launches per step
(torch.profiler); the top operators by self CPU time; the top kernels by GPU time, each with the operators that
launched it (their input shapes and the innermost fastmlip source line: which ``index_select`` a gather kernel is);
and the top Python functions by own time (cProfile). A step whose wall time far exceeds its kernel time is
host-bound; the tables say where the host time goes. Eager steps only name their launchers: inside a CUDA graph
replay the profiler sees the graph launch, not the operators.

    python scripts/profile_md.py --out prof            # GPU: SevenNet-0 Si 216, Cu 4000, MACE-medium-like Cu 4000
    python scripts/profile_md.py --cases sevenn:Si:1 --device cpu --steps 2
"""
from __future__ import annotations

import argparse
import collections
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_md import crystal, make_calculator  # noqa: E402


def parse_cases(text):
    cases = []
    for item in text.split(","):
        model, kind, repeat = item.split(":")
        cases.append((model, kind, int(repeat)))
    return cases


def run_steps(atoms, steps, device, rng):
    times = []
    for _ in range(steps):
        atoms.positions += rng.normal(0, 0.002, atoms.positions.shape)
        start = time.perf_counter()
        atoms.get_forces()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return times


OUR_SOURCES = ("fastmlip", "/patches/", "/kernels/")


def launch_sites(events, kernel_names, steps: int, top: int = 3) -> dict:
    """For each of ``kernel_names``: the operators whose launches ran it, by GPU ms per step, each with its input
    shapes and the innermost line of fastmlip's own code on its Python stack."""
    sites = {name: collections.Counter() for name in kernel_names}
    for event in events:
        for kernel in event.kernels:
            if kernel.name in sites:
                line = next((frame for frame in event.stack if any(s in frame for s in OUR_SOURCES)), "")
                shapes = "x".join(str(list(shape)) for shape in event.input_shapes if shape)
                sites[kernel.name][(event.name, shapes, line)] += kernel.duration
    return {name: [{"op": op, "input_shapes": shapes, "line": line, "gpu_ms_per_step": us / 1e3 / steps}
                   for (op, shapes, line), us in counter.most_common(top)] for name, counter in sites.items()}


def profiled_steps(atoms, steps, device, rng, traced: bool = False):
    """The profiler of ``steps`` steps; ``traced``: with input shapes and Python stacks (slower on the host)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=traced, with_stack=traced) as prof:
        run_steps(atoms, steps, device, rng)
    return prof


def kernel_summary(atoms, steps, device, rng, top):
    """GPU kernel time and launches per step, the top operators by self CPU time, and the top kernels by GPU time
    with the operators that launched them (from a second, traced run of as many steps)."""
    prof = profiled_steps(atoms, steps, device, rng)
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) if device.startswith("cuda") else 0.0
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    table = [{"op": e.key, "calls_per_step": e.count / steps, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
             for e in rows]
    kernels = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.self_device_time_total, reverse=True)[:top]
    sites = launch_sites(profiled_steps(atoms, steps, device, rng, traced=True).events(), [e.key for e in kernels],
                         steps) if kernels else {}
    kernel_table = [{"kernel": e.key, "launches_per_step": e.count / steps,
                     "gpu_ms_per_step": e.self_device_time_total / 1e3 / steps, "launched_by": sites[e.key]}
                    for e in kernels]
    return gpu_us / 1e3 / steps, launches / steps, table, kernel_table


def python_hot_spots(atoms, steps, device, rng, top):
    profiler = cProfile.Profile()
    profiler.enable()
    run_steps(atoms, steps, device, rng)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(top)
    return stream.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sevenn:Si:3,sevenn:Cu:10,mace-medium:Cu:10")
    ap.add_argument("--backend", default="fastmlip-eager", help="a bench_md backend (eager: the profiler sees "
                    "each launch; a graph replay hides them)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None, help="folder for profile_md.json and the cProfile text")
    args = ap.parse_args()
    model_dir = tempfile.mkdtemp(prefix="fastmlip_profile_")
    results = []
    for model, kind, repeat in parse_cases(args.cases):
        atoms = crystal(kind, repeat)
        atoms.calc = make_calculator(model, args.backend, args.device, args.dtype, model_dir)
        rng = np.random.default_rng(0)
        run_steps(atoms, args.warmup, args.device, rng)
        wall = statistics.median(run_steps(atoms, args.steps, args.device, rng))
        gpu_ms, launches, ops, kernels = kernel_summary(atoms, args.steps, args.device, rng, args.top)
        hot = python_hot_spots(atoms, args.steps, args.device, rng, args.top)
        name = f"{model} {kind}{len(atoms)}"
        print(f"\n=== {name} ({args.backend}, {args.dtype}): wall {wall:.2f} ms/step, "
              f"GPU kernels {gpu_ms:.2f} ms/step, {launches:.0f} launches/step")
        for row in ops:
            print(f"  {row['self_cpu_ms_per_step']:8.3f} ms  {row['calls_per_step']:7.1f}x  {row['op'][:90]}")
        if kernels:
            print("  GPU kernels by time:")
        for row in kernels:
            print(f"  {row['gpu_ms_per_step']:8.3f} ms  {row['launches_per_step']:7.1f}x  {row['kernel'][:90]}")
            for site in row["launched_by"][:2]:
                print(f"  {'':8s}    {site['gpu_ms_per_step']:8.3f} ms by {site['op']} {site['input_shapes'][:60]} "
                      f"{site['line'][-70:]}")
        print("\n".join(hot.splitlines()[:args.top + 12]))
        results.append({"case": name, "wall_ms": wall, "gpu_kernel_ms": gpu_ms, "launches": launches, "ops": ops,
                        "kernels": kernels, "python": hot})
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_md.json"), "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
