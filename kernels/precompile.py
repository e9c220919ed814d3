"""Compile every Triton kernel a model will launch before its first step: in parallel, into a persistent cache.

Finding the kernels. A *dry run* of the model inside :func:`recording` lets each Triton launch that would
compile report what it would compile (the function and its specialisation: argument types, alignments,
constexprs, options) and return without compiling or launching anything. Sizes are never specialised
(:func:`fastmlip.kernels.codegen.jit_header`), so the kernels a small probe structure needs are the kernels
every structure needs, and no step after the first compiles again.

Compiling them. :func:`prepare` looks each kernel up in the cache and compiles the missing ones in worker
processes (one per available core, capped), each for the target GPU without touching a GPU; then it puts every
kernel into its Triton function's own in-memory cache, so the first real launch finds it there.

The cache and the workers: :mod:`fastmlip.kernels.kernel_cache`, :mod:`fastmlip.kernels.compile_workers`.
"""
from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Optional

from . import compile_workers
from .kernel_cache import Target, cache_summary, entry_path, read_entry, target_only

__all__ = ["KernelSpec", "Report", "Target", "cache_summary", "entry_path", "prepare", "read_entry", "recording",
           "target_only", "unique"]


@dataclass(eq=False)
class KernelSpec:
    """One kernel a launch would compile, as Triton's ``jit_cache_hook`` describes it."""

    function: object  # the triton JITFunction
    key: object  # its in-memory cache key for this specialisation
    device: int
    signature: dict
    constants: dict
    attrs: dict
    specialization: str  # Triton's JSON of all the above, what JITFunction.preload takes

    @property
    def label(self) -> str:
        module = self.function.module.removeprefix("fastmlip_generated_").removeprefix("fastmlip.kernels.")
        return f"{self.function.__name__} {module}"


# --- recording -------------------------------------------------------------------------------------------------

_RECORDER: contextvars.ContextVar = contextvars.ContextVar("fastmlip_kernel_recorder", default=None)
_STREAM_RECORDERS: dict = {}  # CUDA stream handle -> the list its recording() appends to
_HOOK_LOCK = threading.Lock()


def _active_recorder(device: int):
    """The recording that this launch belongs to, if any: this thread's (CPU dry runs), or that of the CUDA
    stream the launch goes to (a backward pass runs in autograd's own thread, on its forward's stream)."""
    recorder = _RECORDER.get()
    if recorder is None and _STREAM_RECORDERS:
        import torch

        recorder = _STREAM_RECORDERS.get(torch.cuda.current_stream(device).cuda_stream)
    return recorder


def _install_hook() -> None:
    """Chain a recorder in front of Triton's ``jit_cache_hook`` (once; other hooks keep working).

    The hook acts only on launches inside a :func:`recording`; for all others it hands over to the hook that was
    there before, so other models and threads compile and launch as usual.
    """
    from triton import knobs

    with _HOOK_LOCK:
        current = knobs.runtime.jit_cache_hook
        if getattr(current, "_fastmlip_recorder", False):
            return

        def hook(**kwargs):
            compiled = kwargs["compile"]
            recorder = _active_recorder(compiled["device"])
            if recorder is None:
                return current(**kwargs) if current is not None else None
            recorder.append(KernelSpec(kwargs["fn"].jit_function, compiled["key"], compiled["device"],
                                       compiled["signature"], compiled["constants"], compiled["configs"][0],
                                       compiled["specialization_data"]))
            return True  # skip: no compile, no launch

        hook._fastmlip_recorder = True
        knobs.runtime.jit_cache_hook = hook


@contextlib.contextmanager
def recording(device=None):
    """Within the block, Triton launches that would compile are recorded and skipped instead.

    Yields the list the :class:`KernelSpec` s are appended to. On a CUDA ``device`` the block runs on a stream of
    its own and what launches there is recorded (also the backward, which autograd runs in another thread);
    otherwise what this thread launches. Outputs of skipped kernels stay uninitialised, so only run code whose
    results are thrown away (a dry run).
    """
    import torch

    _install_hook()
    specs: list = []
    token = _RECORDER.set(specs)
    stream = None
    try:
        if device is not None and torch.device(device).type == "cuda":
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with _HOOK_LOCK:
                _STREAM_RECORDERS[stream.cuda_stream] = specs
            with torch.cuda.stream(stream):
                yield specs
            stream.synchronize()
        else:
            yield specs
    finally:
        if stream is not None:
            with _HOOK_LOCK:
                _STREAM_RECORDERS.pop(stream.cuda_stream, None)
        _RECORDER.reset(token)


def _install(spec: KernelSpec, entry) -> None:
    """Put the cached kernel into the function's in-memory cache, where its next launch looks first."""
    from triton.compiler import ASTSource, CompiledKernel

    source = ASTSource(spec.function, spec.signature, spec.constants, spec.attrs)
    kernel = CompiledKernel(source, entry.files, entry.hash)
    caches = spec.function.device_caches[spec.device]
    if not (isinstance(caches, tuple) and isinstance(caches[0], dict)):
        spec.function.preload(spec.specialization)  # a Triton whose caches look different: let it load its own
        return
    caches[0][spec.key] = kernel


# --- preparing a model's kernels -------------------------------------------------------------------------------

@dataclass
class Report:
    """What :func:`prepare` did: kernels found in the cache, compiled, failed (left to compile at first launch)."""

    target: str
    kernels: int = 0
    cached: int = 0
    compiled: list = field(default_factory=list)  # (label, seconds)
    failed: list = field(default_factory=list)  # (label, reason)
    launchers: int = 0  # C launch stubs built (Triton 3.6)
    launchers_cached: int = 0  # C launch stubs copied from fastmlip's cache into Triton's
    workers: int = 0
    seconds: float = 0.0
    dry_run_passes: list = field(default_factory=list)  # seconds of each pass of the dry run that found them

    def summary(self) -> str:
        text = f"{self.kernels} kernels for {self.target}: {self.cached} from the cache"
        if self.compiled:
            text += f", {len(self.compiled)} compiled"
        if self.launchers_cached:
            text += f", {self.launchers_cached} launch stubs from the cache"
        if self.launchers:
            text += f", {self.launchers} launch stubs built"
        if self.compiled or self.launchers:
            text += f" on {self.workers} processes"
        if self.compiled:  # the slowest compile bounds the wall time: name it
            label, seconds = max(self.compiled, key=lambda item: item[1])
            text += f" (slowest {seconds:.1f} s: {label})"
        if self.failed:
            text += f", {len(self.failed)} left to compile at first launch ({self.failed[0][1]})"
        text += f" in {self.seconds:.1f} s"
        if self.dry_run_passes:
            text += f"; dry run {' + '.join(f'{seconds:.1f}' for seconds in self.dry_run_passes)} s"
        return text


def unique(specs) -> list:
    """Specs without repeats (the same function and specialisation recorded twice)."""
    seen, out = set(), []
    for spec in specs:
        marker = (id(spec.function), spec.specialization)
        if marker not in seen:
            seen.add(marker)
            out.append(spec)
    return out


def prepare(specs, *, target: Optional[Target] = None, install: bool = True, workers: Optional[int] = None,
            progress: Optional[bool] = None) -> Report:
    """Make every kernel in ``specs`` ready: from the cache, else compiled in worker processes; with
    ``install`` put into the in-memory caches of this process (for ``target`` = this process's GPU).

    A kernel that cannot be compiled ahead is reported in ``failed`` and left to Triton's own compile at its
    first launch: preparing never makes a run fail. ``progress``: a tqdm bar naming each compiled kernel
    (None: when stderr is a terminal).
    """
    start = time.perf_counter()
    specs = unique(specs)
    target = target or Target.current()
    report = Report(str(target), kernels=len(specs))
    missing = []
    for spec in specs:
        path = entry_path(spec, target)
        entry = read_entry(path)
        if entry is None:
            missing.append((spec, path))
            continue
        report.cached += 1
        if install:
            _install(spec, entry)
    launchers = []
    if install and compile_workers.cuda_here():
        launchers, report.launchers_cached = compile_workers.launcher_jobs(specs)
    if missing or launchers:
        _compile(missing, launchers, target, install, workers or compile_workers.default_workers(), progress, report)
    report.seconds = time.perf_counter() - start
    return report


def _compile(missing, launchers, target, install, workers, progress, report) -> None:
    """Kernels and launch stubs on a pool of workers; the longest kernel sources go first (the slowest compile
    bounds the wall time, so it must not start last)."""
    from tqdm import tqdm

    missing = sorted(missing, key=lambda item: -len(item[0].function.src))
    report.workers = min(workers, len(missing) + len(launchers))
    pool = compile_workers.Pool(report.workers)
    bar = tqdm(total=len(missing) + len(launchers), desc=f"fastmlip: compiling kernels for {target}",
               unit="kernel", file=sys.stderr, disable=None if progress is None else not progress, leave=False)
    try:
        with ThreadPoolExecutor(max_workers=report.workers) as threads:
            jobs = {threads.submit(pool.run, compile_workers.kernel_job(spec, path, target)): (spec, path) for spec, path in missing}
            jobs.update({threads.submit(pool.run, job): (None, job["label"]) for job in launchers})
            for done in as_completed(jobs):
                spec, path = jobs[done]
                label = spec.label if spec is not None else path
                try:
                    result = done.result()
                    if not result.get("ok"):
                        raise RuntimeError(result.get("error", "unknown error"))
                    if spec is None:
                        report.launchers += 1
                    else:
                        entry = read_entry(path)
                        if entry is None:
                            raise RuntimeError(f"the worker wrote no usable cache entry at {path}")
                        if install:
                            _install(spec, entry)
                        report.compiled.append((label, result["seconds"]))
                except Exception as exc:  # noqa: BLE001 - any failure leaves the kernel to Triton's lazy compile
                    report.failed.append((label, " ".join(f"{type(exc).__name__}: {exc}".split())[:300]))
                bar.set_postfix_str(label[:60], refresh=False)
                bar.update(1)
    finally:
        bar.close()
        pool.close()


