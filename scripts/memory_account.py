"""Where the memory of one energy+forces step goes, by tensor family, counted on a CPU (no GPU needed).

It runs one step of an accelerated model on the GPU's code path (Triton backend; kernel launches skipped, so
outputs are uninitialised and untouched: sizes are real, values are not) over the Verlet candidates a captured
step sees (cutoff + skin), and counts:

* saved: every tensor autograd keeps for the force backward (``saved_tensors_hooks``; custom ops' saved tensors
  included), each storage once, by the innermost module that saved it;
* made: every tensor an operator creates during the forward and the backward, by module (what the allocator
  must serve at some point; the peak is less, as transients die);
* inputs: positions, edge indices, shifts and vectors of the step.

Families are the module classes (FastInteraction: radial MLP outputs = per-edge weights, messages; spherical
harmonics; linears; symmetric contraction; ...). The account is per step at one size; it is not a peak.

    python scripts/memory_account.py --model sevenn --repeat 10          # Cu fcc 4000 atoms
    python scripts/memory_account.py --model mace-medium --repeat 10 --json account.json
    python scripts/memory_account.py --model sevenn --repeat 10 --chunk-edges 65536   # weights recomputed
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTMLIP_BACKEND", "triton")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_md import crystal, model_source  # noqa: E402



class Account:
    """Bytes by (module family, kind), each storage counted once per kind."""

    def __init__(self):
        self.bytes = collections.Counter()
        self.seen = {"saved": set(), "made": set()}
        self.stack = ["(model)"]

    def add(self, kind: str, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.seen[kind] or not storage.nbytes():
            return
        self.seen[kind].add(key)
        self.bytes[self.stack[-1], kind] += storage.nbytes()

    def track_modules(self, model) -> None:
        for module in model.modules():
            name = type(module).__name__
            module.register_forward_pre_hook(lambda m, a, name=name: self.stack.append(name))
            module.register_forward_hook(lambda m, a, o: self.stack.pop() and None)  # None: keep the output


def skip_kernel_launches() -> None:
    from triton.runtime import interpreter

    interpreter.InterpretedFunction.run = lambda *args, **kwargs: None


def account_step(which: str, repeat: int, dtype: str, chunk_edges=None) -> dict:
    import fastmlip
    from fastmlip.calculator import DEFAULT_SKIN
    from fastmlip.neighbors import neighbor_list

    model_dir = tempfile.mkdtemp(prefix="fastmlip_memory_")
    model = fastmlip.load(model_source(which, model_dir), device="cpu", dtype=getattr(torch, dtype), trusted=True)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    fastmlip.accelerate(model, check=False)
    fastmlip.chunk_convolutions(model, chunk_edges)
    framework = fastmlip.api.framework_of(model)
    cutoff = float(framework.model_info(model)["cutoff"])
    atoms = crystal("Cu", repeat)
    positions = torch.tensor(atoms.positions)
    cell = torch.tensor(atoms.cell.array)
    i, j, shifts = neighbor_list(positions, cell, atoms.pbc, cutoff + DEFAULT_SKIN)
    account = Account()
    account.track_modules(model)
    for name, tensor in (("positions", positions), ("edge_i", i), ("edge_j", j), ("shifts", shifts)):
        account.bytes["(step inputs)", name] += tensor.nbytes

    class Made(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                account.add("made", tensor)
            return out

    with torch.autograd.graph.saved_tensors_hooks(lambda t: (account.add("saved", t), t)[1], lambda t: t), Made():
        framework.compute(model, positions, cell, torch.tensor(atoms.pbc), torch.tensor(atoms.numbers), i, j,
                          shifts, compute_stress=True, edge_mask=torch.ones(i.numel(), dtype=torch.bool),
                          validated=True)
    rows = sorted(((family, kind, nbytes) for (family, kind), nbytes in account.bytes.items()),
                  key=lambda row: -row[2])
    return {"model": which, "atoms": len(atoms), "edges": int(i.numel()), "dtype": dtype, "skin": DEFAULT_SKIN,
            "chunk_edges": chunk_edges,
            "rows": [{"family": f, "kind": k, "MiB": round(b / 2**20, 2)} for f, k, b in rows],
            "saved_MiB": round(sum(b for (f, k), b in account.bytes.items() if k == "saved") / 2**20, 1),
            "made_MiB": round(sum(b for (f, k), b in account.bytes.items() if k == "made") / 2**20, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sevenn", help="sevenn, mace-medium or mace-large (bench_md's models)")
    parser.add_argument("--repeat", type=int, default=10, help="Cu fcc cubic cells per axis (10: 4000 atoms)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--chunk-edges", type=int, default=None, help="convolutions recompute their weights in "
                        "receiver chunks of at most this many edges (fastmlip.chunk_convolutions)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    skip_kernel_launches()
    report = account_step(args.model, args.repeat, args.dtype, args.chunk_edges)
    print(f"{report['model']} Cu {report['atoms']} atoms, {report['edges']} candidate edges (cutoff + skin "
          f"{report['skin']} A), {report['dtype']}, chunk_edges {report['chunk_edges']}: saved for backward "
          f"{report['saved_MiB']} MiB, made in the step {report['made_MiB']} MiB")
    for row in report["rows"][:25]:
        print(f"  {row['MiB']:10.2f} MiB  {row['kind']:10s} {row['family']}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
