"""``fastmlip kernels``: the Triton kernels a model launches, and with ``--show`` the source of each.

A dry run of the accelerated model's step on the CPU (as ``fastmlip warmup --arch`` does) records every kernel
a step would compile, without compiling or launching any: no GPU is needed. Most kernels are generated per
problem, as Python modules with the problem's constants baked in (:mod:`fastmlip.kernels.codegen`); ``--show``
prints each such module whole, and the source of the library kernels (:mod:`fastmlip.kernels.tiles`).
"""
from __future__ import annotations

import inspect
import os
import sys


def add_arguments(parser) -> None:
    parser.add_argument("model", help="model name or path (e.g. 7net-0, a MACE .model file)")
    parser.add_argument("--dtype", default="float32", help="float32 or float64 (default: float32)")
    parser.add_argument("--show", action="store_true", help="print the source of every kernel")
    parser.add_argument("--arch", default="sm_90",
                        help="GPU architecture the dry run specialises for (default: sm_90); the sources are the "
                        "same for every architecture")
    from .cli import add_trust_arguments

    add_trust_arguments(parser)


def distinct_kernels(specs) -> list:
    """One spec per Triton function (a function may be specialised twice), in the order a step first launches."""
    seen, distinct = set(), []
    for spec in specs:
        if id(spec.function) not in seen:
            seen.add(id(spec.function))
            distinct.append(spec)
    return distinct


def kernel_file(function):
    """The generated module file that holds ``function``, or None for a library kernel."""
    if not function.module.startswith("fastmlip_generated_"):
        return None
    return sys.modules[function.module].__file__


def kernel_source(function) -> str:
    """A generated kernel's whole module (imports, constants, the kernel), or a library kernel's own source with
    its decorator (Triton's ``src`` starts at ``def``)."""
    path = kernel_file(function)
    if path is None:
        return inspect.getsource(function.fn)
    with open(path) as handle:
        return handle.read()


def run(args) -> int:
    from .api import resolve_dtype
    from .kernels import precompile
    from .ops import dispatch
    from .warmup import dry_run_kernels

    try:
        dtype = resolve_dtype(args.dtype)
        target = precompile.Target.parse(args.arch)
        if not dispatch.triton_available():
            raise ValueError("triton is not installed (pip install triton)")
        if dispatch.interpreting():
            raise ValueError("TRITON_INTERPRET=1 runs kernels in the interpreter, which compiles nothing for a dry "
                             "run to record: unset it")
        specs = dry_run_kernels(args.model, dtype, target, trusted=args.trust, sha256=args.sha256)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastmlip kernels: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    try:
        _print(args.model, dtype, distinct_kernels(specs), args.show)
    except BrokenPipeError:  # the reader stopped early (``| head``): not an error; nothing more to write
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _print(model: str, dtype, kernels: list, show: bool) -> None:
    print(f"{model} {str(dtype).replace('torch.', '')}: {len(kernels)} kernels")
    for spec in kernels:
        path = kernel_file(spec.function)
        print(f"  {spec.label}" + (f"  ({path})" if path else ""))
    if show:
        for spec in kernels:
            print(f"\n# ===== {spec.label} {'=' * max(4, 100 - len(spec.label))}\n")
            print(kernel_source(spec.function), end="")
