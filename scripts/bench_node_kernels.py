"""Check, then time, fastmlip's node kernels against e3nn/mace and cuEquivariance at MACE-MP-0 sizes.

Ops: MACE's symmetric contraction (128x(0e+1o+2e+3o) -> small 128x0e / medium +128x1o / large +128x2e,
correlation 3, 89 elements), the species-indexed linear (skip_tp: hidden x 89x0e -> hidden), o3.Linear on
128x(0e+1o+2e+3o), spherical harmonics l <= 3 of 40 edges per node, and the radial MLP of each size's
convolution (e3nn FullyConnectedNet 8 -> 64 -> 64 -> 64 -> weights, times the per-edge cutoff) on those edges.
Kernel knobs (FASTMLIP_DOT_PRECISION, FASTMLIP_MLP_ROWS, ...) apply to the whole run: compare variants by
running it again with them set (``--ops radial_mlp`` keeps such a run short). First every
fastmlip op is checked against the mace/e3nn module at the smallest node count (value and input gradient,
PASS/FAIL per case), then each
importable implementation is timed (forward; forward + input gradient, the MD path). Prints a table with
ratios (baseline time / fastmlip time, > 1 means fastmlip is faster), writes JSON and a PNG to --out.
cuEquivariance baselines: cuet.SymmetricContraction (original_mace, ir_mul input), cuet.Linear (for the species
linear with weight_classes = elements and per-node weight_indices), cuet.SphericalHarmonics.

    python scripts/bench_node_kernels.py                 # GPU: everything
    python scripts/bench_node_kernels.py --quick         # CPU smoke test (Triton interpreter, tiny sizes)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

if "--quick" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

SIZES = {"small": "128x0e", "medium": "128x0e+128x1o", "large": "128x0e+128x1o+128x2e"}
SC_INPUT = "128x0e+128x1o+128x2e+128x3o"
QUICK_SIZES = {"small": "4x0e", "medium": "4x0e+4x1o"}
QUICK_INPUT = "4x0e+4x1o+4x2e"
TOL = {torch.float32: 5e-5, torch.float64: 1e-10}


def one_hot(species, n):
    return torch.nn.functional.one_hot(species, n)


def median_ms(fn, reps, device):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


class Case:
    """One op at one size: builders of each implementation's callable f(x) -> out, and the input."""

    def __init__(self, op, size, n_nodes, dtype, device, impls, make_input):
        self.op, self.size, self.n_nodes, self.dtype, self.device = op, size, n_nodes, dtype, device
        self.impls, self.make_input = impls, make_input


def _set_backend(name):
    os.environ["FASTMLIP_BACKEND"] = name


def sc_impls(module, problem, species, dtype, device, num_elements, irreps_in, irreps_out):
    from fastmlip.ops.symmetric_contraction import module_weights, symmetric_contraction

    weights = [w.detach() for w in module_weights(problem, module)]
    attrs = one_hot(species, num_elements).to(dtype)
    impls = {"fastmlip": lambda x: symmetric_contraction(problem, x, species, weights),
             "mace-e3nn": lambda x: module(x, attrs)}
    try:
        import cuequivariance as cue
        import cuequivariance_torch as cuet

        cu = cuet.SymmetricContraction(cue.Irreps("O3", irreps_in), cue.Irreps("O3", irreps_out),
                                       contraction_degree=3, num_elements=num_elements, layout_in=cue.ir_mul,
                                       layout_out=cue.mul_ir, original_mace=True, device=device, dtype=dtype)
        cu.requires_grad_(False)
        index = species.int()
        impls["cueq"] = lambda x: cu(x.transpose(1, 2).flatten(1), index)
    except Exception as exc:  # noqa: BLE001 - any import/constructor failure just drops the baseline
        print(f"  cueq symmetric contraction unavailable: {type(exc).__name__}: {exc}")
    return impls


def species_linear_impls(fctp, problem, species, dtype, device, num_elements, irreps):
    from fastmlip.ops.linear import species_linear

    attrs = one_hot(species, num_elements).to(dtype)
    weight = fctp.weight.detach()
    impls = {"fastmlip": lambda x: species_linear(problem, x, species, weight), "e3nn": lambda x: fctp(x, attrs)}
    try:
        import cuequivariance as cue
        import cuequivariance_torch as cuet

        cu = cuet.Linear(cue.Irreps("O3", irreps), cue.Irreps("O3", irreps), layout=cue.mul_ir, shared_weights=True,
                         weight_classes=num_elements, device=device, dtype=dtype)
        cu.requires_grad_(False)
        index = species.int()
        impls["cueq"] = lambda x: cu(x, weight_indices=index)
    except Exception as exc:  # noqa: BLE001
        print(f"  cueq species linear unavailable: {type(exc).__name__}: {exc}")
    return impls


def linear_impls(module, problem, dtype, device, irreps):
    from fastmlip.ops.linear import linear

    weight = module.weight.detach()
    impls = {"fastmlip": lambda x: linear(problem, x, weight), "e3nn": lambda x: module(x)}
    try:
        import cuequivariance as cue
        import cuequivariance_torch as cuet

        cu = cuet.Linear(cue.Irreps("O3", irreps), cue.Irreps("O3", irreps), layout=cue.mul_ir, shared_weights=True,
                         device=device, dtype=dtype)
        cu.requires_grad_(False)
        impls["cueq"] = lambda x: cu(x)
    except Exception as exc:  # noqa: BLE001
        print(f"  cueq linear unavailable: {type(exc).__name__}: {exc}")
    return impls


def sh_impls(lmax, device):
    from e3nn import o3

    from fastmlip.ops.spherical_harmonics import spherical_harmonics

    ls = list(range(lmax + 1))
    impls = {"fastmlip": lambda v: spherical_harmonics(ls, v, True, "component"),
             "e3nn": lambda v: o3.spherical_harmonics(ls, v, True, "component")}
    try:
        import cuequivariance_torch as cuet

        impls["cueq"] = cuet.SphericalHarmonics(ls, normalize=True, device=device)
    except Exception as exc:  # noqa: BLE001
        print(f"  cueq spherical harmonics unavailable: {type(exc).__name__}: {exc}")
    return impls


MLP_OUTPUTS = {"small": 512, "medium": 1024, "large": 2176}  # conv_tp.weight_numel of MACE-MP-0 at 128 channels


def radial_mlp_impls(net, problem, scale):
    from fastmlip.ops.radial_mlp import radial_mlp

    weights = [layer.weight.detach() for layer in net.children()]

    return {"fastmlip": lambda x: radial_mlp(problem, x, weights, scale),
            "e3nn": lambda x: net(x) * scale.unsqueeze(1)}


def build_cases(args, dtype, device):
    """Yield Case objects; modules are built once per size (mace's U matrices take seconds) and cast."""
    from e3nn import o3
    from mace.modules.symmetric_contraction import SymmetricContraction

    from e3nn.nn import FullyConnectedNet

    from fastmlip.descriptors import (linear_problem, radial_mlp_problem, species_linear_problem,
                                      symmetric_contraction_problem)

    sizes, irreps_in = (QUICK_SIZES, QUICK_INPUT) if args.quick else (SIZES, SC_INPUT)
    num_elements = 5 if args.quick else 89
    for size in args.sizes.split(","):
        if size not in sizes:
            continue
        hidden = sizes[size]
        torch.manual_seed(0)
        sc = SymmetricContraction(o3.Irreps(irreps_in), o3.Irreps(hidden), correlation=3,
                                  num_elements=num_elements).to(device=device, dtype=dtype)
        fctp = o3.FullyConnectedTensorProduct(hidden, f"{num_elements}x0e", hidden).to(device=device, dtype=dtype)
        lin = o3.Linear(irreps_in, irreps_in).to(device=device, dtype=dtype)
        net = FullyConnectedNet([8, 64, 64, 64, 16 if args.quick else MLP_OUTPUTS[size]],
                                torch.nn.functional.silu).to(device=device, dtype=dtype)
        for m in (sc, fctp, lin, net):
            m.requires_grad_(False)
        mlp_problem = radial_mlp_problem(net)
        sc_problem, sl_problem = symmetric_contraction_problem(sc), species_linear_problem(fctp)
        lin_problem = linear_problem(lin)
        for n in [int(v) for v in args.nodes.split(",")]:
            gen = torch.Generator().manual_seed(n)
            species = torch.randint(0, num_elements, (n,), generator=gen).to(device)
            c, big_l = sc_problem.num_features, sc_problem.coupling_dim
            yield Case("symmetric_contraction", size, n, dtype, device,
                       sc_impls(sc, sc_problem, species, dtype, device, num_elements, irreps_in, hidden),
                       lambda n=n: torch.randn(n, c, big_l, dtype=dtype, device=device))
            yield Case("species_linear", size, n, dtype, device,
                       species_linear_impls(fctp, sl_problem, species, dtype, device, num_elements, hidden),
                       lambda n=n, d=sl_problem.dim_in: torch.randn(n, d, dtype=dtype, device=device))
            edges = n * args.degree
            scale = torch.rand(edges, dtype=dtype, device=device)
            yield Case("radial_mlp", f"{size} x{args.degree} edges", n, dtype, device,
                       radial_mlp_impls(net, mlp_problem, scale),
                       lambda e=edges: torch.randn(e, 8, dtype=dtype, device=device))
            if size == "small":  # o3.Linear and the harmonics do not depend on the model size
                yield Case("linear", "any", n, dtype, device, linear_impls(lin, lin_problem, dtype, device, irreps_in),
                           lambda n=n, d=lin_problem.dim_in: torch.randn(n, d, dtype=dtype, device=device))
                yield Case("spherical_harmonics", f"l3 x{args.degree} edges", n, dtype, device, sh_impls(3, device),
                           lambda e=edges: torch.randn(e, 3, dtype=dtype, device=device))


def check(case, impl="fastmlip"):
    """A fastmlip implementation (Triton backend) vs the mace/e3nn one: value and input gradient."""
    _set_backend("triton")
    fast = case.impls[impl]
    slow = case.impls[[k for k in case.impls if not k.startswith("fastmlip")][0]]
    x = case.make_input().requires_grad_(True)
    outs = []
    for fn in (fast, slow):
        out = fn(x)
        probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape).cos()
        (grad,) = torch.autograd.grad(out, x, probe)
        outs.append((out.detach(), grad))
    errs = [rel_err(a, b) for a, b in zip(*outs)]
    return max(errs) <= TOL[case.dtype], errs


def time_case(case, impl, reps):
    _set_backend("triton")
    fn = case.impls[impl]
    x = case.make_input()
    result = {}
    with torch.no_grad():
        result["fwd"] = median_ms(lambda: fn(x), reps, case.device)
    xg = x.clone().requires_grad_(True)

    def fwd_bwd():
        out = fn(xg)
        torch.autograd.grad(out, xg, torch.ones_like(out))

    result["fwd+bwd"] = median_ms(fwd_bwd, reps, case.device)
    return result


def chart(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
        return
    labels = sorted({(r["op"], r["size"], r["nodes"], r["dtype"]) for r in rows if r["impl"] != "fastmlip"})
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(labels)), 5))
    impls = sorted({r["impl"] for r in rows if r["impl"] != "fastmlip" and "speedup_fwd+bwd" in r})
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        values = []
        for label in labels:
            match = [r for r in rows if (r["op"], r["size"], r["nodes"], r["dtype"]) == label and r["impl"] == impl]
            values.append(match[0].get("speedup_fwd+bwd", 0) if match else 0)
        ax.bar([i + k * width for i in range(len(labels))], values, width, label=f"vs {impl}")
    ax.axhline(1, color="k", lw=0.8)
    ax.set_xticks([i + 0.4 for i in range(len(labels))])
    ax.set_xticklabels([f"{o}\n{s} {n} {d}" for o, s, n, d in labels], rotation=90, fontsize=6)
    ax.set_ylabel("speed-up of fastmlip, forward + input gradient")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke test: Triton interpreter, tiny sizes")
    ap.add_argument("--sizes", default="small,medium,large")
    ap.add_argument("--ops", default=None, help="comma-separated op names to run (default: all)")
    ap.add_argument("--nodes", default=None, help="comma-separated node counts (default 4000,40000)")
    ap.add_argument("--degree", type=int, default=40, help="edges per node for the spherical harmonics")
    ap.add_argument("--dtypes", default="float32,float64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    device = "cpu" if args.quick else "cuda"
    if args.quick:
        args.nodes, args.degree, args.reps = args.nodes or "6", 3, 1
    args.nodes = args.nodes or "4000,40000"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --quick for the CPU smoke test")
    os.makedirs(args.out, exist_ok=True)
    rows, checks, failures = [], [], 0
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for case in build_cases(args, dtype, device):
            if args.ops and case.op not in args.ops.split(","):
                continue
            tag = f"{case.op:22s} {case.size:16s} {case.n_nodes:6d} {dtype_name}"
            for impl in [k for k in case.impls if k.startswith("fastmlip")]:
                if case.n_nodes != min(int(v) for v in args.nodes.split(",")):
                    break
                try:
                    ok, errs = check(case, impl)
                    failures += not ok
                    checks.append(dict(op=case.op, size=case.size, dtype=dtype_name, impl=impl, ok=ok, errors=errs))
                    print(f"{'PASS' if ok else 'FAIL'} {tag} {impl} rel err value {errs[0]:.2e} grad {errs[1]:.2e}")
                except Exception as exc:  # noqa: BLE001
                    failures += 1
                    checks.append(dict(op=case.op, size=case.size, dtype=dtype_name, impl=impl, ok=False,
                                       error=repr(exc)))
                    print(f"FAIL {tag} {impl} {type(exc).__name__}: {exc}")
                    traceback.print_exc()
            base = None
            for impl in case.impls:
                row = dict(op=case.op, size=case.size, nodes=case.n_nodes, dtype=dtype_name, impl=impl)
                try:
                    row.update(time_case(case, impl, args.reps))
                except Exception as exc:  # noqa: BLE001 - OOM or an API mismatch in one baseline
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                if device == "cuda":
                    torch.cuda.empty_cache()
                if impl == "fastmlip":
                    base = row
                elif base is not None and "fwd" in base and "fwd" in row:
                    for k in ("fwd", "fwd+bwd"):
                        row[f"speedup_{k}"] = row[k] / base[k]
                rows.append(row)
                timing = (f"fwd {row['fwd']:9.3f} ms  fwd+bwd {row['fwd+bwd']:9.3f} ms" if "fwd" in row
                          else row["error"])
                ratio = (f"  x{row['speedup_fwd']:.2f} / x{row['speedup_fwd+bwd']:.2f}"
                         if "speedup_fwd" in row else "")
                print(f"     {tag} {impl:10s} {timing}{ratio}", flush=True)
    with open(os.path.join(args.out, "bench_node_kernels.json"), "w") as fh:
        json.dump(dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                       torch=torch.__version__, checks=checks, timings=rows), fh, indent=1)
    chart(rows, os.path.join(args.out, "bench_node_kernels.png"))
    print(f"{len(checks) - failures}/{len(checks)} checks passed; wrote {args.out}/bench_node_kernels.json")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
