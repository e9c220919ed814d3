"""How many GPU kernels one MD step would launch, counted on a CPU (no GPU needed).

A replayed CUDA graph still runs every kernel of the step, and at a few hundred atoms each costs a few µs however
small it is, so the launch count bounds the step time from below. This script runs ``fastmlip.Calculator`` steps
on the CPU with the Triton kernels in the interpreter (``TRITON_INTERPRET=1``) and counts what would launch on a
GPU: every Triton grid launched, plus every leaf aten operator that computes (views, reshapes and allocations
launch nothing and are not counted). Steps reuse the Verlet list, as MD steps do.

It is an estimate: an aten operator can launch more than one kernel on CUDA (a sort, a cumsum) and host-side
bookkeeping on CPU tensors would launch none there. Calibrate it against ``scripts/profile_md.py`` on a GPU.

    python scripts/count_launches.py                       # SevenNet-0 on Si, MACE-medium-like on Cu
    python scripts/count_launches.py --cases sevenn:Si --top 40 --json launches.json
    python scripts/count_launches.py --engine              # the MD engine's steps: one cell tensor, no stress
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTMLIP_BACKEND", "triton")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_md import crystal, exported_calculator, make_calculator  # noqa: E402

# aten operators that launch no kernel on CUDA: views, metadata, allocation without a fill.
NO_KERNEL = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::expand", "aten::t",
    "aten::transpose", "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::slice",
    "aten::narrow", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::chunk", "aten::unflatten", "aten::flatten",
    "aten::view_as", "aten::expand_as", "aten::_unsafe_view", "aten::set_", "aten::is_same_size", "aten::sym_size",
    "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::diagonal", "aten::unfold",
    "aten::movedim", "aten::lift_fresh_copy", "aten::_local_scalar_dense", "prim::device",
    "aten::_has_same_storage_numel",
}
# ...and these read a result back to the host: in a CUDA graph they are impossible, in eager steps each is a sync.
HOST_READS = {"aten::_local_scalar_dense", "aten::equal", "aten::nonzero", "aten::_unique2", "aten::item"}


class LaunchCounter:
    """Counts, while active, the aten operators a step dispatches (after autograd) and the Triton grids it launches.

    A ``TorchDispatchMode`` sees each aten operator as the step calls it, backward included, not what a CPU
    kernel calls internally, which is close to one CUDA kernel per operator. fastmlip's custom operators are
    entered (their bodies' aten operators count) and Triton launches are counted and skipped: their outputs stay
    uninitialised, which changes no launch count (nothing in a step branches on values) and turns minutes of
    interpretation into seconds. The calculator is built without its self-check against the original model,
    which would run every kernel for real in the interpreter (more than half an hour for SevenNet-0).
    """

    def __init__(self, sites: bool = False):
        self.counts = collections.Counter()
        self.host_reads = collections.Counter()
        self.sites = collections.Counter() if sites else None
        self.active = False

    def install(self):
        from triton.runtime import interpreter

        original = interpreter.InterpretedFunction.run
        counter = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            if warmup:
                return None
            if counter.active:
                counter.counts[f"triton::{fn_self.fn.__name__}"] += 1
                return None
            return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = run

    def mode(self):
        counter = self
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = func._schema.name
                if name.startswith("fastmlip::"):
                    with self:  # count what the custom op's body dispatches
                        return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
                if name in HOST_READS:
                    counter.host_reads[name] += 1
                    if counter.sites is not None:
                        counter.sites[f"host read {name}", _call_site()] += 1
                if name not in NO_KERNEL:
                    counter.counts[name] += 1
                    if counter.sites is not None:
                        counter.sites[name, _call_site()] += 1
                return func(*args, **kwargs)

        return Mode()


def _call_site() -> str:
    """file:line of the innermost caller outside torch (autograd's backward has none: "backward")."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename.replace(os.sep, "/")
        if "/torch/" not in path and "count_launches" not in path:
            return f"{'/'.join(path.split('/')[-2:])}:{frame.lineno} {frame.name}"
    return "backward"


def step(atoms) -> None:
    """One energy+forces step. Skipped launches leave outputs unset, so its results may be NaN, which the
    calculator refuses after the step: its launches are counted all the same."""
    from fastmlip.calculator import StructureError

    try:
        atoms.get_forces()
    except StructureError:
        atoms.calc.reset()


class EngineSteps:
    """Steps as :func:`fastmlip.simulate` asks for them without a barostat: ``Calculator.evaluate`` on tensors,
    one cell tensor for the whole run, no stress (what a replayed MD step launches, where ``step`` counts the ASE
    calculator's energy+forces+stress calls)."""

    def __init__(self, atoms):
        calc = atoms.calc
        calc.bind(atoms)
        self.calc, self.pbc = calc, tuple(bool(p) for p in atoms.pbc)
        self.cell = torch.as_tensor(atoms.cell.array, dtype=torch.float64, device=calc.device)

    def __call__(self, atoms) -> None:
        positions = torch.as_tensor(atoms.positions, dtype=torch.float64, device=self.calc.device)
        self.calc.evaluate(positions, self.cell, self.pbc, False)


def count_steps(atoms, counter, steps, rng, step=step) -> tuple:
    """(launches per step by name, host reads per step by name) over ``steps`` steps of ``step(atoms)``."""
    counter.counts.clear()
    counter.host_reads.clear()
    if counter.sites is not None:
        counter.sites.clear()
    counter.active = True
    with counter.mode():
        for _ in range(steps):
            atoms.positions += rng.normal(0, 0.002, atoms.positions.shape)
            step(atoms)
    counter.active = False
    return ({k: v / steps for k, v in counter.counts.items()}, {k: v / steps for k, v in counter.host_reads.items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="sevenn:Si,mace-medium:Cu", help="model:crystal pairs (bench_md names)")
    ap.add_argument("--backend", default="fastmlip-eager", help="a bench_md backend")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--json", default=None, help="write the full counts here")
    ap.add_argument("--sites", action="store_true", help="also list launches and host reads by calling line")
    ap.add_argument("--engine", action="store_true",
                    help="count the MD engine's steps (Calculator.evaluate, one cell tensor, no stress) instead of "
                         "the ASE calculator's energy+forces+stress calls")
    ap.add_argument("--exported", action="store_true",
                    help="count the model as `fastmlip convert --to exported` writes it (converted on the CPU)")
    args = ap.parse_args()
    counter = LaunchCounter(sites=args.sites)
    counter.install()
    model_dir = tempfile.mkdtemp(prefix="fastmlip_launches_")
    report = []
    for case in args.cases.split(","):
        model, kind = case.split(":")
        atoms = crystal(kind, 1)
        atoms.calc = exported_calculator(model, "cpu", args.dtype, model_dir) if args.exported else \
            make_calculator(model, args.backend, "cpu", args.dtype, model_dir, check=False)
        counter.active = True
        one_step = EngineSteps(atoms) if args.engine else step
        one_step(atoms)  # builds the Verlet list, as the first MD step does; later steps reuse it
        launches, host_reads = count_steps(atoms, counter, args.steps, np.random.default_rng(0), one_step)
        triton = sum(v for k, v in launches.items() if k.startswith("triton::"))
        total = sum(launches.values())
        label = f"{model}{' (exported)' if args.exported else ''} {kind}{len(atoms)}"
        print(f"\n=== {label} ({args.backend}{', engine steps' if args.engine else ''}, "
              f"{args.dtype}, FASTMLIP_BACKEND="
              f"{os.environ['FASTMLIP_BACKEND']}): {total:.0f} launches/step ({total - triton:.0f} aten, "
              f"{triton:.0f} Triton); host reads/step: {sum(host_reads.values()):.0f} {dict(host_reads)}")
        for name, count in collections.Counter(launches).most_common(args.top):
            print(f"  {count:7.1f}  {name}")
        if counter.sites is not None:
            print("  by calling line:")
            for (name, site), count in counter.sites.most_common(args.top):
                print(f"  {count / args.steps:7.1f}  {name:24s} {site}")
        report.append({"case": label, "backend": args.backend, "dtype": args.dtype,
                       "engine_steps": args.engine,
                       "launches": total, "triton": triton, "by_name": launches, "host_reads": host_reads})
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
