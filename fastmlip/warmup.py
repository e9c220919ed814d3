"""``fastmlip warmup``: fill the kernel cache for a model before a run needs it.

On a machine with a GPU it compiles for that GPU (what ``accelerate`` does before a first step, without the
self-check), then keeps an exported copy of the model that ``fastmlip md`` starts from without importing the
framework (:mod:`fastmlip.program_cache`). With ``--arch`` (or without a GPU, e.g. on a cluster's login node) it
compiles for the named architecture on the CPU: the model's step runs as a dry run that records its kernels and
launches nothing. Jobs that start later on GPUs of that architecture then find every kernel in the cache.
"""
from __future__ import annotations

import functools
import sys
import time


def add_arguments(parser) -> None:
    parser.add_argument("model", help="model name or path (e.g. 7net-0, a MACE .model file)")
    parser.add_argument("--dtype", default="float32",
                        help="float32, float64, or both comma-separated (default: float32)")
    parser.add_argument("--arch", default=None,
                        help="compile for this GPU architecture without using a GPU (e.g. sm_90 for H100/H200); "
                        "default: the GPU here")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per core)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .cli import add_trust_arguments

    add_trust_arguments(parser)


def _frozen_model(name: str, device: str, dtype, trusted=False, sha256=None):
    """The model as the calculator holds it: loaded, no weight gradients (they change which kernels run)."""
    from . import api

    model = api.load(name, device=device, dtype=dtype, trusted=trusted, sha256=sha256)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval()


def warm(name: str, dtype, *, arch=None, workers=None, progress=None, trusted=False, sha256=None, keep=None):
    """Compile (or find in the cache) every kernel of the accelerated ``name`` for ``arch`` (default: this GPU).

    Returns the :class:`fastmlip.kernels.precompile.Report`. ``keep(model)``: called with the accelerated model
    on this GPU once its kernels are ready (not with ``arch``).
    """
    import torch

    from . import api
    from .kernels import precompile
    from .patches import self_check

    if arch is None and not torch.cuda.is_available():
        raise ValueError("no CUDA GPU here: name the GPU architecture to compile for with --arch (e.g. sm_90)")
    if arch is None:
        model = _frozen_model(name, "cuda", dtype, trusted, sha256)
        patch = api.framework_of(model)
        patch.accelerate(model)
        report = precompile.prepare(self_check.record_kernels(model, patch), workers=workers, progress=progress)
        if keep is not None:
            keep(model)
        return report
    target = precompile.Target.parse(arch)
    specs = dry_run_kernels(name, dtype, target, trusted=trusted, sha256=sha256)
    return precompile.prepare(specs, target=target, install=False, workers=workers, progress=progress)


def dry_run_kernels(name: str, dtype, target, *, trusted=False, sha256=None) -> list:
    """The kernels (:class:`fastmlip.kernels.precompile.KernelSpec`) the accelerated ``name`` launches in a step,
    recorded by a dry run on the CPU specialised for ``target``: it compiles and launches nothing (no GPU needed)."""
    from . import api
    from .kernels import precompile
    from .ops import dispatch
    from .patches import self_check

    model = _frozen_model(name, "cpu", dtype, trusted, sha256)
    patch = api.framework_of(model)
    patch.accelerate(model)
    with precompile.target_only(target), dispatch.kernels_on_cpu():
        return self_check.record_kernels(model, patch)


def _print_kept(source: str, model, dtype: str) -> None:
    """Keep an exported copy of the accelerated ``model`` for ``fastmlip md`` (no modal named), and say so."""
    from . import program_cache

    copy, manifest = program_cache.lookup(source, dtype, None, next(model.parameters()).device)
    if manifest is not None:
        print("exported copy for fastmlip md: already in the cache" if copy is not None else
              f"no exported copy for fastmlip md (found before): {manifest['unexportable']}")
        return
    path, detail = program_cache.store(source, model, dtype, None)
    print(f"no exported copy for fastmlip md: {detail}" if path is None else
          f"exported copy for fastmlip md in {detail:.1f} s: {path}")


def run(args) -> int:
    from . import program_cache
    from .api import resolve_dtype
    from .kernels import precompile

    try:
        dtypes = [resolve_dtype(d.strip()) for d in args.dtype.split(",") if d.strip()]
        if args.arch is not None:
            precompile.Target.parse(args.arch)
        if args.workers is not None and args.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {args.workers}")
        source = program_cache.source_of(args.model, args.trust, args.sha256) if args.arch is None else None
        for dtype in dtypes:
            start = time.perf_counter()
            name = str(dtype).replace("torch.", "")
            keep = None if source is None else functools.partial(_print_kept, source, dtype=name)
            report = warm(args.model, dtype, arch=args.arch, workers=args.workers, keep=keep,
                          progress=False if args.no_progress else None, trusted=args.trust, sha256=args.sha256)
            for label, seconds in sorted(report.compiled, key=lambda item: -item[1]):
                print(f"  compiled {label} ({seconds:.1f} s)")
            for label, reason in report.failed:
                print(f"  not compiled {label}: {reason}")
            print(f"{args.model} {name}: {report.summary()} "
                  f"({time.perf_counter() - start:.1f} s in all)")
        print(f"cache: {precompile.cache_summary()['location']}")
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastmlip warmup: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    return 1 if report.failed else 0
