"""Compile every kernel of a model's MD step for a GPU twice, with Triton's own pipeline and with the compile
workers' stage hook (:mod:`fastmlip.kernels.compile_passes`, which leaves the coalescing pass out where it is
inert), and compare their PTX and compile times. Needs no GPU; run it with the Triton the GPU machine has.

    python scripts/check_coalescing.py 7net-0
    python scripts/check_coalescing.py mace-medium --arch sm_90 --top 12

Every kernel's PTX must be the same both ways; the script exits 1 if one differs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("check_coalescing.py compiles real kernels: run it without TRITON_INTERPRET=1")
os.environ.setdefault("FASTMLIP_CACHE", tempfile.mkdtemp(prefix="fastmlip_coalescing_"))

import torch  # noqa: E402
from triton import knobs  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_md import mace_model_path  # noqa: E402

from fastmlip.kernels import compile_passes, precompile  # noqa: E402
from fastmlip.warmup import dry_run_kernels  # noqa: E402


def compile_once(spec, hook) -> tuple:
    """(seconds, PTX digest) of ``spec`` compiled in a fresh Triton cache under ``hook`` (None: Triton's own)."""
    knobs.runtime.add_stages_inspection_hook = hook
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_coalescing_")
    spec.function.device_caches.clear()
    start = time.perf_counter()
    kernel = spec.function.preload(spec.specialization)
    return time.perf_counter() - start, hashlib.sha256(kernel.asm["ptx"].encode()).hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="7net-0 (or another name or file fastmlip loads) or a bench_md MACE name "
                        "(mace-medium, mace-large)")
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--top", type=int, default=8, help="list the slowest this many kernels")
    args = parser.parse_args()

    model = args.model
    if model.startswith("mace-"):
        model = mace_model_path(model, os.path.join(os.environ["FASTMLIP_CACHE"], "models"))
    target = precompile.Target.parse(args.arch)
    specs = precompile.unique(dry_run_kernels(model, getattr(torch, args.dtype), target, trusted=True))
    rows = []
    with precompile.target_only(target):
        for spec in specs:
            plain = compile_once(spec, None)
            hook = compile_passes.StagesHook()
            hooked = compile_once(spec, hook)
            rows.append((plain[0], hooked[0], plain[1] == hooked[1], hook.skipped > 0, spec.label))
    knobs.runtime.add_stages_inspection_hook = None
    rows.sort(reverse=True)
    for plain_s, hooked_s, same, skipped, label in rows[:args.top]:
        print(f"{plain_s:6.2f} -> {hooked_s:6.2f} s  {'same' if same else 'DIFFERENT'} PTX  "
              f"{'skipped' if skipped else 'coalesced'}  {label}")
    different = [label for _, _, same, _, label in rows if not same]
    print(f"{args.model} {args.dtype} for {target}: {len(rows)} kernels, coalescing skipped in "
          f"{sum(r[3] for r in rows)}, PTX {'the same for all' if not different else f'DIFFERENT for {different}'}; "
          f"compile time {sum(r[0] for r in rows):.1f} -> {sum(r[1] for r in rows):.1f} s in all, slowest kernel "
          f"{rows[0][0]:.2f} -> {max(r[1] for r in rows):.2f} s")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
