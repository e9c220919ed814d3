"""The radial MLP at MD sizes: the fused kernels against the split path's tile shapes, beside cuBLAS and the floor.

Why: at 4000 atoms the radial MLP's forward and backward take ~1.8-1.9 ms each of a ~10 ms MD step, ~3x the
time to write (forward) or read (backward) its per-edge weights at the H200's bandwidth. This times one MLP per
model layer shape (random e3nn weights, the widths of SevenNet-0's and MACE-MP-0's convolutions) at one edge
count per model, forward and backward (the input and row-scale gradients an MD step asks for), with the fused
kernels (``FASTMLIP_MLP_SPLIT_ROWS`` unset) and with the split path under each ``--tiles`` variant
(rows x columns, warps, stages). Each variant is first checked against e3nn in float64-accumulated reference
(relative error of value and gradients); a variant over the tolerance is marked failed, not timed into the table.
Beside them: a cuBLAS product of the last layer's shape (TF32, one pass: a lower bound that fp32 tolerances would
not accept) and the floor, the last layer's output bytes over the measured copy bandwidth.

    python scripts/bench_radial_mlp.py --out $OUT                                  # GPU
    python scripts/bench_radial_mlp.py --quick                                     # CPU smoke (interpreter)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--quick" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# name: (widths, edges): SevenNet-0's widest conv (Cu 4000: ~168k edges), MACE-medium-like's and -large-like's
# second interaction (Cu 4000 at 6 A: ~344k edges)
SHAPES = {"sevenn0-960": ([8, 64, 64, 960], 168_000), "mace-medium-1024": ([8, 64, 64, 64, 1024], 344_000),
          "mace-large-2176": ([8, 64, 64, 64, 2176], 344_000)}
TILES = "128x64w4s3,128x128w4s3,128x128w8s3,64x64w4s3,64x128w4s3,128x64w8s3,256x64w8s3,128x64w4s2"
TOL = 5e-6


def parse_tile(text: str) -> dict:
    shape, rest = text.split("w")
    warps, stages = rest.split("s")
    rows, columns = shape.split("x")
    return dict(mlp_gemm_rows=int(rows), mlp_gemm_columns=int(columns), mlp_gemm_warps=int(warps),
                mlp_gemm_stages=int(stages))


def event_ms(fn, reps: int, device: str) -> float:
    """Median ms of ``fn`` (CUDA events on a GPU, wall clock on the CPU) after two warm-up calls."""
    import time

    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def measure(name, widths, edges, variants, args, device):
    from e3nn.nn import FullyConnectedNet

    from fastmlip.descriptors import radial_mlp_problem
    from fastmlip.kernels.launch import use_settings
    from fastmlip.ops.radial_mlp import radial_mlp, radial_mlp_bwd
    from fastmlip.ops.registry import register

    torch.manual_seed(0)
    net = FullyConnectedNet(widths, torch.nn.functional.silu).to(device).requires_grad_(False)
    problem = radial_mlp_problem(net)
    key = register(problem)
    weights = [layer.weight for layer in net.children()]
    x = torch.randn(edges, widths[0], device=device)
    scale = torch.rand(edges, device=device)
    grad = torch.randn(edges, widths[-1], device=device)
    with torch.no_grad():
        expected = net.double()(x.double()) * scale.double()[:, None]
        net.float()
    xd, sd = x.double().requires_grad_(True), scale.double().requires_grad_(True)
    expected_gx, expected_gs = torch.autograd.grad(
        (net.double()(xd) * sd[:, None] * grad.double()).sum(), [xd, sd])
    net.float()
    rows = []
    for variant, knobs in variants:
        with use_settings(**knobs):
            row = dict(shape=name, edges=edges, variant=variant, **knobs)
            try:
                with torch.no_grad():
                    out = radial_mlp(problem, x, weights, scale)
                gx, gs = radial_mlp_bwd(grad, x, weights, scale, key, True, True)
                row["errors"] = [relative(out, expected), relative(gx, expected_gx), relative(gs, expected_gs)]
                row["ok"] = max(row["errors"]) <= TOL
                if row["ok"]:
                    with torch.no_grad():
                        row["forward_ms"] = event_ms(lambda: radial_mlp(problem, x, weights, scale), args.reps, device)
                    row["backward_ms"] = event_ms(lambda: radial_mlp_bwd(grad, x, weights, scale, key, True, True),
                                                  args.reps, device)
            except Exception as exc:  # noqa: BLE001 - a tile the compiler refuses is a result too
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    hidden = torch.randn(edges, widths[-2], device=device)
    last = weights[-1]
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    reference = dict(shape=name, edges=edges, variant="cublas-tf32-last-layer",
                     forward_ms=event_ms(lambda: hidden @ last, args.reps, device),
                     backward_ms=event_ms(lambda: grad @ last.T, args.reps, device))
    torch.backends.cuda.matmul.allow_tf32 = old
    copy_src = torch.empty(edges * widths[-1], device=device)
    copy_ms = event_ms(lambda: torch.empty_like(copy_src).copy_(copy_src), args.reps, device)
    reference["floor_ms"] = copy_ms / 2  # a copy reads and writes the bytes; the output is written once
    rows.append(reference)
    print(json.dumps(reference), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tiles", default=TILES, help="split-path tiles: ROWSxCOLUMNSwWARPSsSTAGES, comma-separated")
    parser.add_argument("--edges", type=int, default=None, help="edges of every shape (default: each one's 4000-atom count)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: interpreter, 300 edges, one tile")
    parser.add_argument("--out", default=None, help="folder for bench_radial_mlp.json")
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    if args.quick:
        args.tiles, args.reps = "16x16w4s1", 1
    os.environ.setdefault("FASTMLIP_BACKEND", "triton")
    variants = [("fused", {"mlp_split_rows": None})]
    variants += [(f"split {tile}", {"mlp_split_rows": 1, **parse_tile(tile)}) for tile in args.tiles.split(",")]
    rows = []
    for name in args.shapes.split(","):
        widths, edges = SHAPES[name]
        rows += measure(name, widths, 300 if args.quick else args.edges or edges, variants, args, device)
    print(f"\n{'shape':18s} {'variant':24s} {'fwd ms':>8s} {'bwd ms':>8s}  errors / floor")
    for row in rows:
        note = f"floor {row['floor_ms']:.3f}" if "floor_ms" in row else \
            ("FAILED " + row.get("error", str(row.get("errors")))) if not row.get("ok") else \
            " ".join(f"{e:.1e}" for e in row["errors"])
        print(f"{row['shape']:18s} {row['variant']:24s} {row.get('forward_ms', float('nan')):8.3f} "
              f"{row.get('backward_ms', float('nan')):8.3f}  {note}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device == "cuda" else "cpu")
        with open(os.path.join(args.out, "bench_radial_mlp.json"), "w") as fh:
            json.dump(dict(meta=meta, records=rows), fh, indent=1)


if __name__ == "__main__":
    main()
