"""Compile every Triton kernel an MD step launches, for a GPU this machine does not have (Hopper, sm_90, default).

The interpreter tests check what the kernels compute; they cannot tell whether the kernels compile for a GPU, nor
how many registers they need. This script runs ``fastmlip.Calculator`` steps on the CPU with the Triton backend
while a stand-in driver reports the target GPU: each launch compiles its kernel (Triton's ``warmup`` path) instead
of running it, so outputs stay uninitialised (nothing in a step branches on them) and the self-check is off. Per
kernel it reports the compile time and, from ``cuobjdump --dump-resource-usage`` on the cubin, registers per thread
and local memory (bytes spilled). Run it with the Triton version the GPU machine has (3.6 on the lent H200s).

    python scripts/compile_kernels.py                         # SevenNet-0 and MACE-medium-like, fp32 and fp64
    python scripts/compile_kernels.py --cases sevenn:Si --dtypes float32 --json compiled.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("compile_kernels.py compiles real kernels: run it without TRITON_INTERPRET=1")
os.environ["FASTMLIP_BACKEND"] = "triton"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_md import crystal, mace_model_path  # noqa: E402


class TargetOnlyDriver:
    """Enough of a Triton driver to compile for ``target``: no device, no stream, nothing launches."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def resource_usage(kernel) -> dict:
    """Registers and local memory (spills) of a compiled kernel, read from its cubin with Triton's cuobjdump."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(kernel.asm["cubin"])
        handle.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", handle.name], capture_output=True,
                              text=True).stdout
    usage = {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}
    return {"registers": usage.get("reg"), "local_bytes": usage.get("local"), "stack_bytes": usage.get("stack"),
            "shared_bytes": kernel.metadata.shared}


class CompileOnly:
    """Replaces ``JITFunction.run`` while installed: compile (for the stand-in driver's target), never launch."""

    def __init__(self):
        self.records: dict = {}
        self._original = JITFunction.run

    def __enter__(self):
        original, records = self._original, self.records

        def run(fn_self, *args, grid, warmup, **kwargs):
            start = time.perf_counter()
            kernel = original(fn_self, *args, grid=grid, warmup=True, **kwargs)
            seconds = time.perf_counter() - start
            name = f"{fn_self.__name__} {fn_self.module.rpartition('.')[2].replace('fastmlip_generated_', '')}"
            key = (name, kernel.hash)
            if key not in records:
                records[key] = {"kernel": name, "compile_s": round(seconds, 2), "warps": kernel.metadata.num_warps,
                                **resource_usage(kernel)}
            return kernel

        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        JITFunction.run = self._original


def run_steps(model, kind, dtype, model_dir):
    """Two calculator steps (a Verlet build and a reuse) with every kernel compiled, none launched."""
    from fastmlip.calculator import Calculator

    path = "7net-0" if model == "sevenn" else mace_model_path(model, model_dir)
    atoms = crystal(kind, 1)
    atoms.calc = Calculator(path, device="cpu", dtype=dtype, check=False, cuda_graph=False)
    atoms.get_forces()
    atoms.positions += 0.01
    atoms.get_forces()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sevenn:Si,mace-medium:Cu", help="model:crystal pairs (bench_md names)")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability to compile for (90: H100/H200)")
    ap.add_argument("--json", default=None, help="write the per-kernel records here")
    args = ap.parse_args()
    from fastmlip.ops import dispatch

    dispatch.interpreting = lambda: True  # let the Triton backend take CPU tensors; nothing is launched
    triton_driver.set_active(TargetOnlyDriver(GPUTarget("cuda", args.arch, 32)))
    model_dir = tempfile.mkdtemp(prefix="fastmlip_compile_")
    report = []
    print(f"Triton {triton.__version__}, target sm_{args.arch}")
    for case in args.cases.split(","):
        model, kind = case.split(":")
        for dtype in args.dtypes.split(","):
            with CompileOnly() as compiled:
                run_steps(model, kind, dtype, model_dir)
            print(f"\n=== {model} {dtype}: {len(compiled.records)} kernels")
            print(f"  {'kernel (module)':64s} {'compile s':>9s} {'warps':>5s} {'regs':>5s} {'spill B':>7s} "
                  f"{'smem B':>7s}")
            for record in compiled.records.values():
                print(f"  {record['kernel'][:64]:64s} {record['compile_s']:9.2f} {record['warps']:5d} "
                      f"{record['registers']:5d} {record['local_bytes']:7d} {record['shared_bytes']:7d}")
                report.append({"case": case, "dtype": dtype, **record})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"triton": triton.__version__, "arch": args.arch, "kernels": report}, handle, indent=1)


if __name__ == "__main__":
    main()
