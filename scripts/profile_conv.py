"""Forward-kernel knob sweep with the compiler's resource report: which setting limits the fused conv forward.

Times the deterministic forward for each (block, warps, stages, unroll) setting on ANCHORS.md's graph and prints
registers/spills next to the time, so a register-bound kernel shows itself. GPU only.
"""
import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_kernels import build_problems, copy_bandwidth, floor_bytes, inputs, make_graph, median_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="mace-medium,mace-large,7net0-l1")
    ap.add_argument("--blocks", default="32,64")
    ap.add_argument("--warps", default="1,2,4")
    ap.add_argument("--stages", default="0,2,3")
    ap.add_argument("--unroll", default="1")
    args = ap.parse_args()
    os.environ["FASTMLIP_BACKEND"] = "triton"
    from fastmlip.ops.conv import fused_conv
    from fastmlip.kernels import conv as conv_kernels
    from fastmlip.kernels.launch import use_settings

    n_nodes, degree = 4096, 40
    graph = make_graph(n_nodes, degree, "cuda")
    bandwidth = copy_bandwidth()
    rows = []
    for name, problem in build_problems(args.problems.split(",")).items():
        x, y, w = (t.detach() for t in inputs(problem, n_nodes, graph.src.numel(), torch.float32, 0))
        floor_ms = floor_bytes(problem, n_nodes, graph.src.numel(), 4)[0] / bandwidth * 1e3
        reference = None
        for block, warps, stages, unroll in itertools.product(*(map(int, getattr(args, k).split(","))
                                                               for k in ("blocks", "warps", "stages", "unroll"))):
            try:
                f = lambda: fused_conv(problem, x, y, w, graph.src, graph.dst, n_nodes,  # noqa: E731
                                       dst_ptr=graph.dst_ptr)
                with use_settings(conv_block=block, conv_warps=warps, conv_stages=stages, conv_unroll=unroll):
                    out = f()
                    ms = median_ms(f)
                reference = out if reference is None else reference
                err = ((out - reference).norm() / reference.norm()).item()
                label = [k for k in conv_kernels.resource_report() if f"/b{block}/u{unroll}/s{stages}/w{warps}/" in k
                         and "fwd_csr" in k and problem.key in k]
                regs, spills = conv_kernels.resource_report()[label[-1]] if label else (None, None)
                rows.append((name, block, warps, stages, unroll, ms, 100 * floor_ms / ms, regs, spills, err))
            except Exception as exc:
                rows.append((name, block, warps, stages, unroll, float("nan"), 0, None, None, repr(exc)[:80]))
            print(*rows[-1], flush=True)
    print(f"\n{'problem':14s} blk warps stg unr       ms  %floor regs spills  rel.err")
    for r in rows:
        print(f"{r[0]:14s} {r[1]:3d} {r[2]:5d} {r[3]:3d} {r[4]:3d} {r[5]:8.3f} {r[6]:7.1f} {str(r[7]):>4s} "
              f"{str(r[8]):>6s} {r[9] if isinstance(r[9], str) else f'{r[9]:.1e}'}")


if __name__ == "__main__":
    main()
