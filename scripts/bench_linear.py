"""Time fastmlip's o3.Linear kernels against cuBLAS GEMMs of the same shapes, per tile variant.

The issue's bar: o3.Linear within 1.5x of a cuBLAS GEMM of the same shapes and dtype. The GEMM row does, per path,
one ``torch.mm`` of a contiguous [rows * (2l+1), mul_in] matrix by [mul_in, mul_out] (the layout e3nn does not
have; the floor, not a competitor). Each fastmlip variant (``FASTMLIP_LINEAR_*`` tiles, ``FASTMLIP_DOT_PRECISION``)
(``FASTMLIP_LINEAR_STACK``: all components of an irrep in one tile) is checked against e3nn in float64 first (max relative error of the output and of the x-gradient), then timed:
forward, and the x-gradient alone (an MD step's backward: frozen weights). Writes JSON to --out.

    python scripts/bench_linear.py --out bench_linear              # GPU
    python scripts/bench_linear.py --mlp --out bench_mlp_layers    # GPU: radial-MLP layers as 0e linears
    python scripts/bench_linear.py --quick --out q                 # CPU smoke test (Triton interpreter)

``--mlp`` times the radial MLP's dense layers instead (a layer is an o3.Linear from K x 0e to N x 0e: the same
GEMM, scaled by 1/sqrt(K)) at the edge counts of a Cu 4000 step, with a second floor: cuBLAS with TF32 tensor
cores (switched on in this process only). Above 32,768 edges a step runs these layers as e3nn's plain-fp32 cuBLAS
matmuls (4.8-5.3 ms of a 21 ms Cu 4000 step on an H200); the rows say whether fastmlip's tiles with tf32x3 dots
would beat them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--quick" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

SHAPES = {
    "mace-interaction": "128x0e+128x1o+128x2e+128x3o",
    "mace-medium-hidden": "128x0e+128x1o",
    "sevenn-0-hidden": "128x0e+64x1e+64x1o+32x2e+32x2o",
}
QUICK_SHAPES = {"tiny": "4x0e+4x1o"}
# radial-MLP layers (name: in, out, edges): SevenNet-0's [8, 64, 64, 384 | 960 | 224] over the 216,158 candidate
# edges of Cu 4000, and MACE-medium-like's 64 -> 64 hidden layer over its 344,020
MLP_SHAPES = {"sevenn-0-in": (8, 64, 216158), "sevenn-0-hidden": (64, 64, 216158),
              "sevenn-0-out-960": (64, 960, 216158), "sevenn-0-out-384": (64, 384, 216158),
              "mace-medium-hidden": (64, 64, 344020)}
QUICK_MLP_SHAPES = {"tiny-mlp": (8, 16, 8)}
MLP_VARIANTS = [(16, 64, 64, 4, 0, "ieee"), (16, 64, 64, 4, 0, "tf32x3"), (32, 32, 64, 8, 0, "tf32x3"),
                (64, 64, 64, 8, 0, "tf32x3"), (64, 64, 128, 8, 0, "tf32x3")]
# (rows, k, j, warps, stack, dot precision): the landed tiles first
VARIANTS = [(16, 16, 32, 4, 0, "ieee"), (16, 128, 32, 4, 0, "ieee"), (32, 32, 64, 4, 0, "ieee"),
            (32, 128, 64, 8, 0, "ieee"), (64, 64, 64, 8, 0, "ieee"), (16, 32, 32, 4, 1, "ieee"),
            (16, 64, 64, 4, 1, "ieee"), (8, 64, 64, 4, 1, "ieee"), (16, 128, 64, 8, 1, "ieee"),
            (32, 32, 64, 8, 1, "ieee"), (16, 16, 32, 4, 0, "tf32x3"), (32, 128, 64, 8, 0, "tf32x3"),
            (16, 64, 64, 4, 1, "tf32x3")]


def cuda_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def rel_err(a, b) -> float:
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def gemm_floor(irreps, rows: int, device):
    """One torch.mm per path on contiguous operands of the same shapes: the cuBLAS floor, fp32."""
    mats = [(torch.randn(rows * m.ir.dim, m.mul, device=device), torch.randn(m.mul, m.mul, device=device))
            for m in irreps]
    outs = [a.new_empty(a.shape[0], w.shape[1]) for a, w in mats]

    def run():
        for (a, w), o in zip(mats, outs):
            torch.mm(a, w, out=o)
    return run


def dense_floors(k: int, n: int, rows: int, reps: int) -> dict:
    """cuBLAS [rows, k] @ [k, n] in fp32: plain (FFMA, what e3nn's layers run) and with TF32 tensor cores."""
    a, w = torch.randn(rows, k, device="cuda"), torch.randn(k, n, device="cuda")
    out = a.new_empty(rows, n)
    floors = {"gemm_floor_ms": cuda_ms(lambda: torch.mm(a, w, out=out), reps)}
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        floors["gemm_tf32_ms"] = cuda_ms(lambda: torch.mm(a, w, out=out), reps)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return floors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mlp", action="store_true", help="the radial MLP's dense layers (see above)")
    parser.add_argument("--out", default="bench_linear")
    args = parser.parse_args()

    from e3nn import o3

    from fastmlip.descriptors import linear_problem
    from fastmlip.kernels import linear as linear_kernels
    from fastmlip.kernels.launch import use_settings

    device = "cpu" if args.quick else "cuda"
    if args.mlp:  # name: (irreps in, irreps out, rows)
        cases = {name: (f"{k}x0e", f"{n}x0e", 8 if args.quick else rows)
                 for name, (k, n, rows) in (QUICK_MLP_SHAPES if args.quick else MLP_SHAPES).items()}
        variants = MLP_VARIANTS[:2] if args.quick else MLP_VARIANTS
    else:
        cases = {name: (irreps, irreps, 8 if args.quick else args.rows)
                 for name, irreps in (QUICK_SHAPES if args.quick else SHAPES).items()}
        variants = [VARIANTS[0], VARIANTS[5]] if args.quick else VARIANTS
    torch.manual_seed(0)
    records = []
    for name, (irreps_text, irreps_out_text, rows) in cases.items():
        irreps, irreps_out = o3.Irreps(irreps_text), o3.Irreps(irreps_out_text)
        module = o3.Linear(irreps, irreps_out).double()
        problem = linear_problem(module)
        weight64 = module.weight.detach().to(device)
        x64 = torch.randn(rows, irreps.dim, dtype=torch.float64, device=device)
        g64 = torch.randn(rows, irreps_out.dim, dtype=torch.float64, device=device)
        xr = x64.clone().requires_grad_(True)
        ref = module.to(device)(xr)
        (ref_grad,) = torch.autograd.grad(ref, xr, g64)
        x, g, weight = x64.float(), g64.float(), weight64.float()
        floors = {}
        if not args.quick:
            floors = (dense_floors(irreps.dim, irreps_out.dim, rows, args.reps) if args.mlp
                      else {"gemm_floor_ms": cuda_ms(gemm_floor(irreps, rows, device), args.reps)})
        floor = floors.get("gemm_floor_ms")
        if irreps_out_text != irreps_text:
            irreps_text = f"{irreps_text} -> {irreps_out_text}"
        e3nn_row = dict(shape=name, irreps=irreps_text, rows=rows, impl="e3nn", **floors)
        if not args.quick:  # e3nn's own module (einsums on cuBLAS, a cat), float32: the layout-copying way
            module32 = o3.Linear(irreps, irreps_out).to(device)
            xg = x64.float().requires_grad_(True)
            e3nn_row["forward_ms"] = cuda_ms(lambda: module32(xg), args.reps)
            e3nn_row["forward_grad_x_ms"] = cuda_ms(
                lambda: torch.autograd.grad(module32(xg), xg, g64.float()), args.reps)
        records.append(e3nn_row)
        print(f"{name} ({irreps_text}, {rows} rows): cuBLAS floor {floor} ms, e3nn {e3nn_row}")
        for tile_rows, k, j, warps, stack, precision in variants:
            record = dict(shape=name, irreps=irreps_text, rows=rows, impl="fastmlip", tile_rows=tile_rows, tile_k=k,
                          tile_j=j, warps=warps, stack=stack, precision=precision, **floors)
            try:
                with use_settings(linear_rows=tile_rows, linear_k=k, linear_block=j, linear_warps=warps,
                                  linear_stack=stack, dot_precision=precision):
                    out = linear_kernels.forward(problem, x, weight)
                    grad_x = linear_kernels.backward(problem, g, x, weight, True, False, False)[0]
                    record.update(out_err=rel_err(out, ref.detach()), grad_err=rel_err(grad_x, ref_grad))
                    if not args.quick:
                        record["forward_ms"] = cuda_ms(lambda: linear_kernels.forward(problem, x, weight), args.reps)
                        record["grad_x_ms"] = cuda_ms(
                            lambda: linear_kernels.backward(problem, g, x, weight, True, False, False), args.reps)
                        record["forward_over_floor"] = record["forward_ms"] / floor
            except Exception as exc:  # a variant Triton cannot build is a row, not the end of the run
                record["error"] = f"{type(exc).__name__}: {exc}"[:300]
            records.append(record)
            print("  " + " ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                                  for key, value in record.items() if key not in ("shape", "irreps", "rows", "impl",
                                                                                  "gemm_floor_ms", "gemm_tf32_ms")),
                  flush=True)
    meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
    with open(f"{args.out}.json", "w") as f:
        json.dump(dict(meta=meta, records=records), f, indent=1)


if __name__ == "__main__":
    main()
