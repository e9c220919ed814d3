"""Compile every Triton kernel of a model's MD step for a GPU this machine does not have (sm_90 by default) and
report each kernel's compile time, registers and spills.

The interpreter tests check what the kernels compute; they cannot tell whether the kernels compile for a GPU, nor
how many registers they need. This is ``fastmlip warmup --arch``'s path (a CPU dry run records the kernels, worker
processes compile them in parallel into a fresh cache) plus, per kernel, ``cuobjdump --dump-resource-usage`` on
its cubin. Run it with the Triton version the GPU machine has (3.6 on the lent H200s).

    python scripts/compile_kernels.py                         # SevenNet-0 and MACE-medium-like, fp32 and fp64
    python scripts/compile_kernels.py --cases sevenn --dtypes float32 --json compiled.json

``--gpu-tests --cache .devcache`` fills a cache with the kernels of the models the GPU tests accelerate, built as
those tests build them; carried to the lent GPU (device_session.sh copies it into place), it spares the tests the
compiles (190 s of the 461 s that tests/faces and tests/patches took on a fresh H200 were SevenNet-l3i5's alone).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels.py compiles real kernels: run it without TRITON_INTERPRET=1")
os.environ.setdefault("FASTMLIP_CACHE", tempfile.mkdtemp(prefix="fastmlip_compile_"))

import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_md import mace_model_path  # noqa: E402


def resource_usage(cubin: str) -> dict:
    """Registers, stack and local memory (spills) of a compiled kernel, read with Triton's cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    text = subprocess.run([cuobjdump, "--dump-resource-usage", cubin], capture_output=True, text=True).stdout
    usage = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return {"registers": usage.get("reg"), "local_bytes": usage.get("local"), "stack_bytes": usage.get("stack"),
            "shared_bytes": usage.get("shared")}


def frozen(name: str, dtype: str):
    """A model as the calculator holds it (bench_md's own MACE file, or a shipped one)."""
    from fastmlip.warmup import _frozen_model

    return lambda: _frozen_model(name, "cpu", dtype, trusted=True)


def gpu_test_models():
    """(case, dtype, model factory) of every model the GPU tests accelerate, built as they build them: the
    calculator's frozen SevenNet-0 (tests/faces) and tests/patches/test_gpu_models.py's models, whose weights
    keep requires_grad (which changes the kernels)."""
    import torch

    from fastmlip import api

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from helpers import mace_models

    for dtype in ("float32", "float64"):
        yield "sevenn", dtype, frozen("7net-0", dtype)
        for name in ("7net-0", "7net-l3i5"):
            yield name, dtype, lambda name=name, dtype=dtype: api.load(name, device="cpu", dtype=dtype)
        for config in mace_models.CONFIGS:
            yield config, dtype, lambda c=config, d=dtype: mace_models.build_model(c).to(dtype=getattr(torch, d))


def compile_case(make_model, target, workers):
    from fastmlip.api import framework_of
    from fastmlip.kernels import precompile
    from fastmlip.ops import dispatch
    from fastmlip.patches import self_check

    model = make_model()
    patch = framework_of(model)
    patch.accelerate(model)
    with precompile.target_only(target), dispatch.kernels_on_cpu():
        specs = precompile.unique(self_check.record_kernels(model, patch))
    report = precompile.prepare(specs, target=target, install=False, workers=workers, progress=False)
    seconds = dict(report.compiled)
    records = []
    for spec in specs:
        entry = precompile.read_entry(precompile.entry_path(spec, target))
        cubin = next((path for name, path in entry.files.items() if name.endswith(".cubin")), None) if entry else None
        records.append({"kernel": spec.label, "compile_s": seconds.get(spec.label),
                        **(resource_usage(cubin) if cubin else {})})
    return report, records


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sevenn,mace-medium", help="sevenn and/or bench_md's MACE model names")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--arch", default="sm_90", help="GPU architecture to compile for (sm_90: H100/H200)")
    ap.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    ap.add_argument("--json", default=None, help="write the per-kernel records here")
    ap.add_argument("--cache", default=None, help="the cache to fill (default: a fresh temporary one)")
    ap.add_argument("--gpu-tests", action="store_true", help="the GPU tests' models instead of --cases/--dtypes")
    args = ap.parse_args()
    if args.cache:
        os.environ["FASTMLIP_CACHE"] = os.path.abspath(args.cache)
    from fastmlip.kernels import precompile

    target = precompile.Target.parse(args.arch)
    model_dir = tempfile.mkdtemp(prefix="fastmlip_models_")
    if args.gpu_tests:
        cases = list(gpu_test_models())
    else:
        cases = [(case, dtype, frozen("7net-0" if case == "sevenn" else mace_model_path(case, model_dir), dtype))
                 for case in args.cases.split(",") for dtype in args.dtypes.split(",")]
    out = []
    print(f"Triton {triton.__version__}, target {target}, cache {os.environ['FASTMLIP_CACHE']}")
    for case, dtype, make_model in cases:
        report, records = compile_case(make_model, target, args.workers)
        print(f"\n=== {case} {dtype}: {report.summary()}")
        print(f"  {'kernel (module)':70s} {'compile s':>9s} {'regs':>5s} {'spill B':>7s} {'smem B':>7s}")
        for r in sorted(records, key=lambda r: -(r["compile_s"] or 0)):
            print(f"  {r['kernel'][:70]:70s} {r['compile_s'] or 0:9.2f} {r.get('registers') or 0:5d} "
                  f"{r.get('local_bytes') or 0:7d} {r.get('shared_bytes') or 0:7d}")
            out.append({"case": case, "dtype": dtype, **r})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"triton": triton.__version__, "arch": str(target), "kernels": out}, handle, indent=1)


if __name__ == "__main__":
    main()
