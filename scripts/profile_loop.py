"""Where a device-resident MD loop's time goes: is the GPU busy, and with how many kernels per step?

Runs ``fastmlip.simulate`` (NVT Langevin, as bench_md's md-loop rows) for --warmup steps, then --steps under
torch.profiler, and reports per step: wall ms, the GPU's busy time (the union of kernel intervals, so overlapping
kernels count once), its idle time (wall minus busy: the GPU waited for the host), kernel launches (graph replays
included: the profiler sees the kernels inside a graph), and the kernels by total time. A loop whose idle time is
most of the step is host-bound (cut Python and syncs: more steps per replay); one that is busy and launches many
short kernels is latency-bound (cut launches); one that is busy with few long kernels is bound by the kernels.

    python scripts/profile_loop.py --cases mace-medium:Si:3,sevenn:Si:3 --out prof    # GPU
    python scripts/profile_loop.py --cases sevenn:Si:1 --device cpu --steps 3 --warmup 1 --out /tmp/p  # smoke
    python scripts/profile_loop.py --cases sevenn:Si:3 --exported        # the exported file's loop beside it
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_md import crystal, exported_calculator, make_calculator  # noqa: E402
from bench_md_loops import thermalised  # noqa: E402

from fastmlip.kernels.launch import settings  # noqa: E402


def busy_ms(intervals) -> float:
    """Length of the union of (start, end) intervals, in ms (profiler times are in us)."""
    total, reach = 0.0, None
    for start, end in sorted(intervals):
        if reach is None or start > reach:
            total += end - start
            reach = end
        elif end > reach:
            total += end - reach
            reach = end
    return total / 1e3


def gpu_kernels(profiler):
    """(name, start_us, duration_us) of every GPU kernel the profiler saw."""
    kernels = []
    for event in profiler.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.name and \
                not event.name.startswith(("Memcpy", "Memset", "cudaDeviceSynchronize")):
            kernels.append((event.name, event.time_range.start, event.time_range.elapsed_us()))
    return kernels


def profile_case(which, kind, repeat, args, model_dir, exported=False):
    import fastmlip

    atoms = thermalised(crystal(kind, repeat))
    calculator = exported_calculator(which, args.device, args.dtype, model_dir) if exported else \
        make_calculator(which, "fastmlip", args.device, args.dtype, model_dir)
    options = dict(ensemble="nvt", temperature=300.0, thermostat="langevin", friction=0.01, seed=1,
                   interval=args.interval)
    warm = fastmlip.simulate(atoms, calculator, steps=args.warmup, **options)
    start = warm.atoms
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        began = time.perf_counter()
        run = fastmlip.simulate(start, calculator, steps=args.steps, **options)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall = (time.perf_counter() - began) * 1e3
    kernels = gpu_kernels(profiler)
    steps = args.steps
    busy = busy_ms((t, t + d) for _, t, d in kernels)
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for name, _, duration in kernels:
        by_name[name][0] += duration / 1e3
        by_name[name][1] += 1
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:args.top]
    return {"model": which + (" (exported)" if exported else ""), "system": f"{kind}{len(atoms)}", "natoms": len(atoms), "steps": steps,
            "wall_ms_per_step": wall / steps, "loop_ms_per_step": run.timing["ms_per_step"],
            "gpu_busy_ms_per_step": busy / steps, "gpu_idle_ms_per_step": (wall - busy) / steps,
            "kernels_per_step": len(kernels) / steps, "list_checks": run.timing.get("list_checks"),
            "top_kernels": [{"name": name, "ms_per_step": total / steps, "per_step": count / steps}
                            for name, (total, count) in top]}


def report(row) -> str:
    lines = [f"=== {row['model']} {row['system']}: wall {row['wall_ms_per_step']:.3f} ms/step, GPU busy "
             f"{row['gpu_busy_ms_per_step']:.3f}, idle {row['gpu_idle_ms_per_step']:.3f}, "
             f"{row['kernels_per_step']:.1f} kernels/step ({row['list_checks']})"]
    lines += [f"  {k['ms_per_step']:8.4f} ms {k['per_step']:6.1f}x  {k['name'][:100]}" for k in row["top_kernels"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="mace-medium:Si:3,sevenn:Si:3", help="model:crystal:repeat, comma "
                        "separated (Si: 8-atom diamond cells, Cu: 4-atom fcc cells, per axis)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--interval", type=int, default=100, help="thermo every this many steps")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--out", default=None, help="folder for profile_loop.json")
    parser.add_argument("--exported", action="store_true",
                        help="also each case's model as `fastmlip convert --to exported` writes it")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as model_dir:
        for item in args.cases.split(","):
            which, kind, repeat = item.split(":")
            for exported in (False, True) if args.exported else (False,):
                row = profile_case(which, kind, int(repeat), args, model_dir, exported)
                print(report(row), flush=True)
                rows.append(row)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile_loop.json"), "w") as handle:
            json.dump({"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                       "torch": torch.__version__, "argv": sys.argv[1:],
                       "settings": dataclasses.asdict(settings()), "rows": rows}, handle, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
