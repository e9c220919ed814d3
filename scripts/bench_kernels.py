"""Check, then time, the Triton fused convolution against e3nn, cuEquivariance and OpenEquivariance.

One GPU run does everything: builds the problems of ANCHORS.md (MACE medium/large, nequip-benzene, SevenNet-0
layers 0/1/4, SevenNet-l3i5 layer 1), checks fastmlip's forward, backward and double backward (sorted and
unsorted edges, outputs poisoned with NaN) against the float64 reference, then checks each implementation's forward
and gradients against that reference on the very inputs it is timed with and times it: forward,
forward+backward, forward+backward+double-backward, peak memory. A failed check is a failed row, not a time; an
implementation with another weight count is an error. Prints a table; writes JSON and a PNG chart to --out
(default $OUT or ./out).

    python scripts/bench_kernels.py --dtypes float32,float64 --precompile 12
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
import traceback

import torch

IMPLS = ("fastmlip", "fastmlip-atomic", "e3nn", "cueq-mul_ir", "cueq-ir_mul", "oeq-atomic", "oeq-det")
DEVICE = "cuda"
PROBLEMS = ("mace-medium", "mace-large", "nequip-benzene", "7net0-l0", "7net0-l1", "7net0-l4", "7net-l3i5-l1")


def build_problems(names):
    """name -> TensorProductProblem; SevenNet layers come from the loaded checkpoints' own modules."""
    from fastmlip.descriptors import channelwise_instructions, make_tensor_product_problem, tensor_product_problem

    def channelwise(i1, i2, target):
        out, ins = channelwise_instructions(i1, i2, target)
        return make_tensor_product_problem(i1, i2, out, ins)

    probs = {}
    builders = {
        "mace-medium": lambda: channelwise("128x0e+128x1o", "0e+1o+2e+3o", "128x0e+128x1o+128x2e"),
        "mace-large": lambda: channelwise("128x0e+128x1o+128x2e", "0e+1o+2e+3o", "128x0e+128x1o+128x2e+128x3o"),
        "nequip-benzene": lambda: channelwise("64x0o+64x0e+64x1o+64x1e+64x2o+64x2e+64x3o+64x3e", "0e+1o+2e+3o",
                                              "64x0o+64x0e+64x1o+64x1e+64x2o+64x2e+64x3o+64x3e"),
    }
    for name in names:
        if name in builders:
            probs[name] = builders[name]()
    sevenn_layers = {"7net0-l0": ("7net-0", 0), "7net0-l1": ("7net-0", 1), "7net0-l4": ("7net-0", 4),
                     "7net-l3i5-l1": ("7net-l3i5", 1)}
    wanted = [n for n in names if n in sevenn_layers]
    if wanted:
        try:
            import sevenn.util
            from e3nn import o3

            models = {}
            for name in wanted:
                ckpt, layer = sevenn_layers[name]
                if ckpt not in models:
                    models[ckpt] = sevenn.util.load_checkpoint(ckpt).build_model()
                tps = [m for m in models[ckpt].modules()
                       if type(m) is o3.TensorProduct and all(i.connection_mode == "uvu" for i in m.instructions)]
                probs[name] = tensor_product_problem(tps[layer])
        except Exception:
            traceback.print_exc()
    return probs


def make_graph(n_nodes, degree, device, seed=0):
    """ANCHORS.md's graph: every node the destination of ``degree`` edges, dst sorted, src random."""
    from fastmlip.graph import sort_edges

    g = torch.Generator().manual_seed(seed)
    dst = torch.arange(n_nodes).repeat_interleave(degree)
    src = (dst + torch.randint(1, n_nodes, (dst.numel(),), generator=g)) % n_nodes
    return sort_edges(src.to(device), dst.to(device), n_nodes)


def median_ms(fn, reps=20, warmup=3):
    """Median of CUDA-event times; slow functions (over 50 ms) get fewer repeats to fit the lease."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    if a.elapsed_time(b) > 50:
        reps = 5
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth():
    """Bytes read + written per second by a large device-to-device copy: the HBM ceiling of this run."""
    a = torch.empty(2 ** 28, dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    ms = median_ms(lambda: b.copy_(a), reps=10)
    return 2 * a.numel() * 4 / (ms * 1e-3)


def floor_bytes(problem, n_nodes, n_edges, itemsize):
    """Fewest bytes each pass must move: inputs read once, outputs written once (indices ignored)."""
    fwd = (n_nodes * (problem.dim_in1 + problem.dim_out) + n_edges * (problem.dim_in2 + problem.weight_numel))
    bwd = fwd + n_nodes * problem.dim_in1 + n_edges * (problem.dim_in2 + problem.weight_numel)
    return fwd * itemsize, (fwd + bwd) * itemsize


def inputs(problem, n_nodes, n_edges, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device=DEVICE, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(n_nodes, problem.dim_in1), mk(n_edges, problem.dim_in2), mk(n_edges, problem.weight_numel)


def fastmlip_fn(problem, graph, n_nodes, deterministic):
    from fastmlip.ops.conv import fused_conv

    kw = dict(dst_ptr=graph.dst_ptr, src_perm=graph.src_perm, src_ptr=graph.src_ptr) if deterministic else {}
    return lambda x, y, w: fused_conv(problem, x, y, w, graph.src, graph.dst, n_nodes, **kw)


def passes(f, x, y, w, g, h):
    """The three timed passes; the double backward is force training's (grad wrt edge_attr, then wrt w, x)."""
    def fwd():
        return f(x, y, w)

    def fwd_bwd():
        return torch.autograd.grad(f(x, y, w), (x, y, w), g)

    def fwd_bwd_dbl():
        gy, = torch.autograd.grad(f(x, y, w), (y,), g, create_graph=True)
        return torch.autograd.grad((gy * h).sum(), (x, w))

    return fwd, fwd_bwd, fwd_bwd_dbl


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check(problem, graph, n_nodes, dtype, seed):
    """Max relative error of every fastmlip output vs the float64 reference, sorted and unsorted edges."""
    from fastmlip.kernels import launch

    x, y, w = inputs(problem, n_nodes, graph.src.numel(), dtype, seed)
    g = torch.randn(n_nodes, problem.dim_out, device=DEVICE, dtype=dtype)
    h = torch.randn_like(y)

    def all_outputs(f, xx, yy, ww):
        out = f(xx, yy, ww)
        grads = torch.autograd.grad(out, (xx, yy, ww), g.to(out.dtype), create_graph=True)
        dbl = torch.autograd.grad((grads[1] * h.to(out.dtype)).sum(), (xx, ww))
        return [out, *grads, *dbl]

    os.environ["FASTMLIP_BACKEND"] = "reference"
    x64, y64, w64 = (t.detach().double().requires_grad_() for t in (x, y, w))
    want = all_outputs(fastmlip_fn(problem, graph, n_nodes, True), x64, y64, w64)
    os.environ["FASTMLIP_BACKEND"] = "triton"
    launch.POISON_OUTPUTS = True
    errs = {}
    for label, det in (("sorted", True), ("atomic", False)):
        got = all_outputs(fastmlip_fn(problem, graph, n_nodes, det), x, y, w)
        for name, a, b in zip(("out", "gx", "gy", "gw", "ddx", "ddw"), got, want):
            errs[f"{label}/{name}"] = float("nan") if torch.isnan(a).any() else rel_err(a, b)
    launch.POISON_OUTPUTS = False
    return errs


CHECK_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}  # relative (norm) error vs the float64 reference


def reference_outputs(problem, graph, n_nodes, x, y, w, g):
    """Forward and first derivatives of the fused conv in float64 through fastmlip's reference (exact to e3nn)."""
    backend = os.environ.get("FASTMLIP_BACKEND")
    os.environ["FASTMLIP_BACKEND"] = "reference"
    try:
        x64, y64, w64 = (t.detach().double().requires_grad_() for t in (x, y, w))
        out = fastmlip_fn(problem, graph, n_nodes, True)(x64, y64, w64)
        return [out, *torch.autograd.grad(out, (x64, y64, w64), g.double())]
    finally:
        os.environ["FASTMLIP_BACKEND"] = backend or "triton"


def check_impl(kind, f, problem, graph, n_nodes, dtype, seed):
    """Worst relative error of an implementation's forward and gradients against the float64 reference, on the
    inputs it will be timed with; raises when it is beyond CHECK_TOLERANCE (a failed row, not a time)."""
    x, y, w = inputs(problem, n_nodes, graph.src.numel(), dtype, seed)
    g = torch.randn(n_nodes, problem.dim_out, device=DEVICE, dtype=dtype)
    want = reference_outputs(problem, graph, n_nodes, x, y, w, g)
    out = f(x, y, w)
    got = [out, *torch.autograd.grad(out, (x, y, w), g)]
    errors = {name: rel_err(a, b) if a.shape == b.shape else float("inf")
              for name, a, b in zip(("out", "gx", "gy", "gw"), got, want)}
    worst = max(errors, key=lambda k: errors[k] if errors[k] == errors[k] else float("inf"))
    if not errors[worst] <= CHECK_TOLERANCE[dtype]:
        raise ValueError(f"check failed: {kind} {worst} relative error {errors[worst]:.1e} "
                         f"(tolerance {CHECK_TOLERANCE[dtype]:.0e}); not timed")
    return errors


def _ir_mul(irreps, to: bool):
    """Reorder the last axis between e3nn's mul_ir layout and cuEquivariance's ir_mul, block by block."""
    def convert(t):
        blocks, start = [], 0
        for m in irreps:
            block = t[..., start:start + m.dim]
            shape = (m.mul, m.ir_dim) if to else (m.ir_dim, m.mul)
            blocks.append(block.reshape(*t.shape[:-1], *shape).transpose(-1, -2).reshape(*t.shape[:-1], m.dim))
            start += m.dim
        return torch.cat(blocks, -1)
    return convert


def baseline_fn(kind, problem, graph, n_nodes, dtype):
    from fastmlip.descriptors import irreps_str

    i1, i2, io = (irreps_str(r) for r in (problem.irreps_in1, problem.irreps_in2, problem.irreps_out))
    instr = [(p.i_in1, p.i_in2, p.i_out, "uvu", True) for p in problem.paths]
    src, dst = graph.src, graph.dst
    if kind == "e3nn":
        from e3nn import o3

        tp = o3.TensorProduct(i1, i2, io, instr, shared_weights=False, internal_weights=False).to("cuda", dtype)
        return (lambda x, y, w: torch.zeros(n_nodes, tp.irreps_out.dim, device=DEVICE, dtype=dtype).index_add_(
            0, dst, tp(x[src], y, w))), tp.weight_numel
    if kind.startswith("cueq"):
        import cuequivariance as cue
        import cuequivariance_torch as cuet

        ir_mul = kind.endswith("ir_mul")
        tp = cuet.ChannelWiseTensorProduct(cue.Irreps("O3", i1), cue.Irreps("O3", i2),
                                           filter_irreps_out=cue.Irreps("O3", io),
                                           layout=cue.ir_mul if ir_mul else cue.mul_ir,
                                           shared_weights=False, internal_weights=False, device="cuda", dtype=dtype)
        if not ir_mul:
            return (lambda x, y, w: tp(x, y, w, indices_1=src, indices_out=dst, size_out=n_nodes)), tp.weight_numel
        # inputs and outputs in e3nn's layout, converted around the op (the conversions are timed too)
        to_1, to_2 = _ir_mul(problem.irreps_in1, True), _ir_mul(problem.irreps_in2, True)
        back = _ir_mul(problem.irreps_out, False)
        return (lambda x, y, w: back(tp(to_1(x), to_2(y), w, indices_1=src, indices_out=dst, size_out=n_nodes))), \
            tp.weight_numel
    if kind.startswith("oeq"):
        import numpy as np
        import openequivariance as oeq

        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        tpp = oeq.TPProblem(i1, i2, io, instr, shared_weights=False, internal_weights=False, irrep_dtype=np_dtype,
                            weight_dtype=np_dtype)
        det = kind.endswith("det")
        tp = oeq.TensorProductConv(tpp, torch_op=True, deterministic=det)
        perm = torch.argsort(src, stable=True)
        if det:
            return (lambda x, y, w: tp.forward(x, y, w, dst, src, perm)), tpp.weight_numel
        return (lambda x, y, w: tp.forward(x, y, w, dst, src)), tpp.weight_numel
    raise ValueError(kind)


def sweep_setting(kind):
    """The kernel settings named by 'fastmlip-bNN-uK', for the duration of a block."""
    from fastmlip.kernels.launch import use_settings

    block, unroll = kind[len("fastmlip-b"):].split("-u")
    return use_settings(conv_block=int(block), conv_unroll=int(unroll))


def time_impl(kind, problem, graph, n_nodes, dtype, seed):
    """kind 'fastmlip-bNN-uK' times only the deterministic forward, NN channels per program, K edges per step."""
    n_edges = graph.src.numel()
    os.environ["FASTMLIP_BACKEND"] = "triton"
    if kind.startswith("fastmlip-b"):
        with sweep_setting(kind):
            f = fastmlip_fn(problem, graph, n_nodes, True)
            x, y, w = inputs(problem, n_nodes, n_edges, dtype, seed)
            with torch.no_grad():
                return {"fwd_ms": median_ms(lambda: f(x, y, w))}
    if kind.startswith("fastmlip"):
        f, n_w = fastmlip_fn(problem, graph, n_nodes, kind == "fastmlip"), problem.weight_numel
    else:
        f, n_w = baseline_fn(kind, problem, graph, n_nodes, dtype)
    if n_w != problem.weight_numel:
        raise ValueError(f"{kind} has {n_w} weights per edge, the problem {problem.weight_numel}: not the same "
                         f"tensor product, not timed")
    errors = check_impl(kind, f, problem, graph, n_nodes, dtype, seed)
    x, y, w = inputs(problem, n_nodes, n_edges, dtype, seed)
    out = f(x, y, w)
    g = torch.randn_like(out)
    h = torch.randn_like(y)
    fwd, fwd_bwd, fwd_bwd_dbl = passes(f, x, y, w, g, h)
    res = {"check_max_rel_err": max(errors.values()), "fwd_ms": median_ms(fwd)}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res["fwd_bwd_ms"] = median_ms(fwd_bwd)
    res["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    try:
        res["fwd_bwd_dbl_ms"] = median_ms(fwd_bwd_dbl, reps=10)
    except Exception as ex:  # some baselines have no double backward
        res["fwd_bwd_dbl_ms"] = None
        res["dbl_error"] = f"{type(ex).__name__}: {str(ex)[:120]}"
    return res


def _precompile_worker(job):
    """Compile every kernel variant of one (problem, dtype) on a small graph so the main run hits the cache."""
    name, dtype_name, sweep = job
    from fastmlip.kernels import conv

    if torch.cuda.is_available():
        torch.cuda.init()
    probs = build_problems([name])
    if name not in probs:
        return name, dtype_name, {}
    graph = make_graph(64, 40, DEVICE)
    try:
        if sweep:
            with sweep_setting(sweep), torch.no_grad():
                x, y, w = inputs(probs[name], 64, graph.src.numel(), getattr(torch, dtype_name), 1)
                fastmlip_fn(probs[name], graph, 64, True)(x, y, w)
        else:
            check(probs[name], graph, 64, getattr(torch, dtype_name), seed=1)
    except Exception:
        traceback.print_exc()
    return name, dtype_name, conv.compile_report()


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["problem"], r["dtype"]) for r in results})
    impls = [i for i in IMPLS if any(r["impl"] == i and "fwd_ms" in r for r in results)]
    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    for ax, metric in zip(axes, ("fwd_ms", "fwd_bwd_ms")):
        width = 0.8 / max(1, len(impls))
        for k, impl in enumerate(impls):
            vals = [next((r.get(metric) or 0 for r in results if (r["problem"], r["dtype"]) == key
                          and r["impl"] == impl and "fwd_ms" in r), 0) for key in keys]
            ax.bar([i + k * width for i in range(len(keys))], vals, width, label=impl)
        ax.set_xticks([i + 0.4 for i in range(len(keys))])
        ax.set_xticklabels([f"{p}\n{d[5:]}" for p, d in keys], rotation=60, fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel(f"{metric} (log)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def smoke(args):
    """Checks only, on the CPU through Triton's interpreter: exercises this script's problem and check code."""
    global DEVICE
    DEVICE = "cpu"
    probs = build_problems(args.problems.split(","))
    graph = make_graph(args.nodes, args.degree, DEVICE)
    for dtype_name in args.dtypes.split(","):
        for name, problem in probs.items():
            dtype = getattr(torch, dtype_name)
            errs = check(problem, graph, args.nodes, dtype, seed=2)
            print(f"CHECK {name} {dtype_name} worst rel err {max(errs.values()):.2e}", flush=True)
            f = fastmlip_fn(problem, graph, args.nodes, True)
            errs = check_impl("fastmlip", f, problem, graph, args.nodes, dtype, seed=3)
            print(f"CHECK-BEFORE-TIMING {name} {dtype_name} worst rel err {max(errs.values()):.2e}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--impls-float64", default="fastmlip,fastmlip-atomic,cueq-mul_ir,oeq-det",
                    help="implementations timed in float64 (the slow e3nn is left out by default)")
    ap.add_argument("--problems-float64", default=",".join(PROBLEMS))
    ap.add_argument("--sweep", default="", help="forward-only kernel settings to time, e.g. b32-u1,b64-u2")
    ap.add_argument("--sweep-problems", default="mace-medium,mace-large,7net0-l1")
    ap.add_argument("--nodes", type=int, default=4096)
    ap.add_argument("--degree", type=int, default=40)
    ap.add_argument("--precompile", type=int, default=0, help="processes compiling kernels in parallel first")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="CPU only (TRITON_INTERPRET=1): run the checks, no timing")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.smoke:
        return smoke(args)
    import triton

    from fastmlip.kernels import conv

    names, dtypes = args.problems.split(","), args.dtypes.split(",")
    t0 = time.time()
    cold = {}
    if args.precompile:
        with mp.get_context("spawn").Pool(args.precompile) as pool:
            sweeps = [f"fastmlip-{k}" for k in args.sweep.split(",") if k]
            jobs = [(n, d, None) for d in dtypes for n in names if d == "float32" or n in args.problems_float64]
            jobs = [(n, "float32", k) for k in sweeps for n in args.sweep_problems.split(",")] + jobs
            for name, dt, report in pool.imap_unordered(_precompile_worker, jobs):
                cold.update(report)
        print(f"precompiled in {time.time() - t0:.0f}s", flush=True)
    probs = build_problems(names)
    graph = make_graph(args.nodes, args.degree, "cuda")
    n_edges = graph.src.numel()
    bandwidth = copy_bandwidth()
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "nodes": args.nodes, "edges": n_edges, "copy_GBps": bandwidth / 1e9,
            "block": conv._block_size(next(iter(probs.values()))) if probs else None}
    print("META", json.dumps(meta), flush=True)
    results, checks = [], {}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for name, problem in probs.items():
            if dtype == torch.float64 and name not in args.problems_float64.split(","):
                continue
            if not args.skip_check:
                try:
                    errs = check(problem, graph, args.nodes, dtype, seed=2)
                    worst = max(errs, key=lambda k: errs[k] if errs[k] == errs[k] else float("inf"))
                    print(f"CHECK {name} {dtype_name} worst rel err {errs[worst]:.2e} ({worst})", flush=True)
                except Exception as ex:
                    traceback.print_exc()
                    errs = {"error": f"{type(ex).__name__}: {str(ex)[:300]}"}
                checks[f"{name}/{dtype_name}"] = errs
                torch.cuda.empty_cache()
            fwd_b, all_b = floor_bytes(problem, args.nodes, n_edges, torch.finfo(dtype).bits // 8)
            impls = (args.impls if dtype == torch.float32 else args.impls_float64).split(",")
            if dtype == torch.float32 and name in args.sweep_problems.split(","):
                impls += [f"fastmlip-{k}" for k in args.sweep.split(",") if k]
            for impl in impls:
                t1 = time.time()
                try:
                    r = time_impl(impl, problem, graph, args.nodes, dtype, seed=3)
                    r["floor_fwd_frac"] = fwd_b / bandwidth * 1e3 / r["fwd_ms"]
                    if "fwd_bwd_ms" in r:
                        r["floor_fwd_bwd_frac"] = all_b / bandwidth * 1e3 / r["fwd_bwd_ms"]
                except Exception as ex:
                    r = {"error": f"{type(ex).__name__}: {str(ex)[:300]}"}
                r.update(problem=name, dtype=dtype_name, impl=impl, wall_s=round(time.time() - t1, 1))
                results.append(r)
                print("  ", json.dumps(r), flush=True)
                torch.cuda.empty_cache()
                with open(os.path.join(args.out, "bench_kernels.json"), "w") as fh:
                    json.dump({"meta": meta, "checks": checks, "results": results, "compile_cold_s": cold,
                               "compile_first_call_s": conv.compile_report()}, fh, indent=1)
    compile_hot = conv.compile_report()
    try:
        chart(results, os.path.join(args.out, "bench_kernels.png"))
    except Exception:
        traceback.print_exc()
    print(f"\n{'problem':15s} {'dtype':8s} {'impl':16s} {'fwd':>8s} {'fwd+bwd':>8s} {'+dbl':>8s} {'peakMiB':>8s} "
          f"{'%floor':>6s} {'vs best fwd':>11s} {'vs best fb':>10s}")
    for r in results:
        if "error" in r:
            print(f"{r['problem']:15s} {r['dtype']:8s} {r['impl']:16s} ERROR {r['error'][:60]}")
            continue
        others = [o for o in results if o["problem"] == r["problem"] and o["dtype"] == r["dtype"]
                  and "error" not in o and not o["impl"].startswith(("fastmlip", "e3nn"))]
        bf = min((o["fwd_ms"] for o in others), default=float("nan"))
        bb = min((o["fwd_bwd_ms"] for o in others if o.get("fwd_bwd_ms")), default=float("nan"))
        dbl = r.get("fwd_bwd_dbl_ms")
        fb, peak = r.get("fwd_bwd_ms") or float("nan"), r.get("peak_extra_MiB", float("nan"))
        print(f"{r['problem']:15s} {r['dtype']:8s} {r['impl']:16s} {r['fwd_ms']:8.3f} {fb:8.3f} "
              f"{(dbl if dbl else float('nan')):8.3f} {peak:8.0f} {100 * r['floor_fwd_frac']:6.1f} "
              f"{bf / r['fwd_ms']:11.2f} {bb / fb:10.2f}")
    print(f"total {time.time() - t0:.0f}s; max first-call (cold compile) s:",
          max(cold.values(), default=None), "; main-process first calls s:", max(compile_hot.values(), default=None))


if __name__ == "__main__":
    main()
