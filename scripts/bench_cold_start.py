"""Time to the first MD step, as a new user meets it: ``fastmlip md`` in a fresh process, cold and warm.

cold: an empty fastmlip cache and an empty Triton cache, so every kernel is generated and compiled.
warm: the fastmlip cache the cold run filled, and again an empty Triton cache (fastmlip's cache alone must do:
      a job on another node; Triton 3.6's C launch stubs come from fastmlip's cache).
warm+triton: both caches as the warm run left them (a second run on the same machine).
Each run is a fresh ``python`` process; "to first step" is measured from just before the process starts to the
moment it prints its ``setup`` line, which comes right after the first step (so it includes Python's start, the
imports, loading the model, preparing kernels, the self-check and the first step with its CUDA graph capture);
``setup`` is what ``fastmlip md`` itself reports (the same without Python's start and the imports).

    python scripts/bench_cold_start.py --out docs/cold_start            # SevenNet-0 and MACE-medium-like, Si 216
    python scripts/bench_cold_start.py --cases sevenn --repeat 2 --steps 50
    python scripts/bench_cold_start.py --exported    # also each model as ``fastmlip convert --to exported`` wrote it
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

MODELS = {"sevenn": "7net-0", "mace-medium": None}  # None: bench_md's MACE-MP-0-medium-like model file


def model_argument(case: str, model_dir: str) -> str:
    if MODELS[case] is not None:
        return MODELS[case]
    from bench_md import mace_model_path

    return mace_model_path(case, model_dir)


# imported before the profiler starts (cProfile misattributes everything once torch._dynamo is imported under it),
# with the framework of the case, so that the profile shows fastmlip's part of the start
PROFILE_PRELUDE = "import torch, torch._dynamo, e3nn.o3, ase, fastmlip.cli, cProfile, sys; "
FRAMEWORK_IMPORTS = {"sevenn": "import sevenn.checkpoint; ", "mace-medium": "import mace.modules; "}


def import_seconds(module: str) -> float:
    """Seconds a fresh interpreter takes to import ``module`` (the second of two runs shows the page cache warm;
    without bytecode, as on a machine whose packages were installed with none, every run compiles the source)."""
    code = f"import time; start = time.perf_counter(); import {module}; print(time.perf_counter() - start)"
    return round(float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                      text=True).stdout.split()[-1]), 3)


def exported_file(model: str, workdir: str, case: str) -> str:
    """``model`` converted ``--to exported`` (float32, on the CPU) into ``workdir``, untimed."""
    from bench_md import export_model

    return export_model(model, os.path.join(workdir, f"{case}.pt2"), "float32")


def run_md(model: str, cache: str, triton_cache: str, repeat: int, steps: int, extra_env: dict,
           profile: str = None, importtime: bool = False, prelude: str = "") -> dict:
    """One fresh ``fastmlip md`` process; the time to its ``setup`` line and what it printed (``profile``: run
    ``fastmlip md`` under cProfile after the heavy imports, writing the statistics there; ``importtime``: Python's
    ``-X importtime`` report, kept as ``stderr``; ``prelude``: more imports before the profiler starts)."""
    md = ["md", "--model", model, "--trust", "--demo", "si", "--repeat", str(repeat), "--steps", str(steps),
          "--no-progress"]  # --trust: the MACE file is one this script wrote
    if profile:
        command = [sys.executable, "-c", PROFILE_PRELUDE + prelude + f"sys.argv = {['fastmlip', *md]!r}; "
                   f"cProfile.run('fastmlip.cli.main()', {profile!r})"]
    else:
        command = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "fastmlip.cli", *md]
    env = dict(os.environ, FASTMLIP_CACHE=cache, TRITON_CACHE_DIR=triton_cache, PYTHONUNBUFFERED="1", **extra_env)
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: -X importtime writes more than a pipe holds
        with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=errors, text=True) as process:
            lines, first_step = [], None
            for line in process.stdout:
                lines.append(line.rstrip())
                if first_step is None and line.startswith("setup"):
                    first_step = time.perf_counter() - start
            code = process.wait()
        total = time.perf_counter() - start
        errors.seek(0)
        stderr = errors.read()
    text = "\n".join(lines)
    setup = re.search(r"^setup ([\d.]+) s", text, re.M)
    median = re.search(r"(?:median|mean) ([\d.]+) ms/step", text)  # the device engine prints its mean
    return {"returncode": code, "to_first_step_s": first_step, "setup_s": float(setup.group(1)) if setup else None,
            "ms_per_step": float(median.group(1)) if median else None, "wall_s": total, "stdout": text,
            "stderr_tail": stderr[-3000:], **({"importtime": stderr} if importtime else {})}


def slowest_imports(report: str, top: int = 25) -> list:
    """The ``top`` imports at most two levels below a top-level import of an ``-X importtime`` report, by cumulative
    time, each with the modules that imported it: (cumulative ms, "module <- importer <- ...")."""
    entries = []
    for line in report.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if match:
            entries.append((int(match.group(2)), len(match.group(3)) // 2, match.group(4)))
    chains = []
    for index, (cumulative, depth, name) in enumerate(entries):
        if depth > 2:  # deeper ones mostly pass their parents' time on
            continue
        chain, level = [name], depth
        for later_cumulative, later_depth, later_name in entries[index + 1:]:  # importers are reported after
            if later_depth < level:
                chain.append(later_name)
                level = later_depth
        chains.append((cumulative / 1000, " <- ".join(chain)))
    return sorted(chains, reverse=True)[:top]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sevenn,mace-medium", help=f"comma-separated, from {list(MODELS)}")
    ap.add_argument("--repeat", type=int, default=3, help="Si cubic cells per axis (3: 216 atoms)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=None, help="write cold_start.json here")
    ap.add_argument("--profile", action="store_true",
                    help="one more warm run per case under cProfile (after the heavy imports): the top functions")
    ap.add_argument("--importtime", action="store_true",
                    help="one more warm run per case under -X importtime: the slowest imports and who imported them")
    ap.add_argument("--exported", nargs="?", const="also", choices=("also", "only"),
                    help="also (or only) time each model from the file `fastmlip convert --to exported` writes "
                         "(no framework)")
    args = ap.parse_args()
    import torch

    workdir = tempfile.mkdtemp(prefix="fastmlip_cold_")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__, "python": platform.python_version(),
               "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "runs": []}
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass
    results["import_torch_s"] = [import_seconds("torch") for _ in range(2)]  # part of every start, none of ours
    cases = [(case, model_argument(case, workdir)) for case in args.cases.split(",")]
    if args.exported:
        exported = [(f"{case}-exported", exported_file(model, workdir, case)) for case, model in cases]
        cases = exported if args.exported == "only" else cases + exported
    for case, model in cases:
        cache = os.path.join(workdir, f"cache-{case}")
        for state in ("cold", "warm", "warm+triton"):
            triton_cache = os.path.join(workdir, f"triton-{case}-{state.replace('+triton', '')}")
            run = run_md(model, cache, triton_cache, args.repeat, args.steps, {})
            run.update(case=case, state=state)
            results["runs"].append(run)
            print(f"--- {case} {state}: rc {run['returncode']}, to first step {run['to_first_step_s']} s\n"
                  f"{run['stdout']}\n{run['stderr_tail'][-1500:] if run['returncode'] else ''}", flush=True)
        warm_triton = os.path.join(workdir, f"triton-{case}-warm")
        if args.importtime:
            run = run_md(model, cache, warm_triton, args.repeat, args.steps, {}, importtime=True)
            results.setdefault("importtime", {})[case] = {"to_first_step_s": run["to_first_step_s"],
                                                          "slowest": slowest_imports(run.pop("importtime"))}
            print(f"--- {case} warm+triton under -X importtime: to first step {run['to_first_step_s']} s")
            for milliseconds, chain in results["importtime"][case]["slowest"]:
                print(f"{milliseconds:8.0f} ms  {chain}")
        if args.profile:
            import pstats

            path = os.path.join(workdir, f"setup_{case}.prof")
            run = run_md(model, cache, warm_triton, args.repeat, args.steps, {}, path,
                         prelude=FRAMEWORK_IMPORTS.get(case, ""))
            print(f"--- {case} warm+triton, profiled after the imports ({path}; rc {run['returncode']}):")
            pstats.Stats(path).sort_stats("cumulative").print_stats(60)
            pstats.Stats(path).sort_stats("tottime").print_stats(25)
    print(f"\nimport torch in a fresh process (part of every start): {results['import_torch_s']} s")
    print(f"{'case':12s} {'state':11s} {'to first step s':>16s} {'setup s':>8s} {'ms/step':>8s}")
    for run in results["runs"]:
        first = f"{run['to_first_step_s']:.1f}" if run["to_first_step_s"] is not None else "failed"
        setup = f"{run['setup_s']:.1f}" if run["setup_s"] is not None else "-"
        step = f"{run['ms_per_step']:.2f}" if run["ms_per_step"] is not None else "-"
        print(f"{run['case']:12s} {run['state']:11s} {first:>16s} {setup:>8s} {step:>8s}")
    if args.out:
        with open(os.path.join(args.out, "cold_start.json"), "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
