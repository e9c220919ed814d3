"""Worker processes that compile kernels and Triton's C launch stubs for :func:`fastmlip.kernels.precompile.prepare`.

Each worker is ``python -m fastmlip.kernels.compile_workers``, fed one JSON job per line on its stdin and
answering one JSON line on its stdout. Plain subprocesses, not ``multiprocessing``: a user's script without a
``__main__`` guard must not be run again by them. They import Triton and the generated kernel modules but not
torch (see :mod:`fastmlip.kernels.tiles`), so they start in a fraction of a second, and compile for the target GPU
without touching a GPU (a stand-in Triton driver).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .kernel_cache import (Target, TargetOnlyDriver, entry_lock, launcher_path, read_entry, read_launcher,
                           write_entry, write_launcher)

MAX_WORKERS = 32  # more processes than this only compete for memory and the disk


def default_workers() -> int:
    """One worker per available core, at most ``MAX_WORKERS`` (``FASTMLIP_COMPILE_WORKERS`` overrides)."""
    from .launch import settings  # here, not at the top: the worker processes run this module without torch

    if settings().compile_workers is not None:
        return settings().compile_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cores))


def kernel_job(spec, entry: Path, target: Target) -> dict:
    """The job that compiles ``spec`` (a :class:`fastmlip.kernels.precompile.KernelSpec`) into ``entry``."""
    module = sys.modules[spec.function.module]
    generated = spec.function.module.startswith("fastmlip_generated_")
    return {"module": spec.function.module, "file": module.__file__ if generated else None,
            "function": spec.function.__name__, "specialization": spec.specialization,
            "target": [target.backend, target.arch, target.warp_size], "entry": str(entry)}


class Worker:
    """One compile process: a job per line on its stdin, a result per line on its stdout."""

    def __init__(self):
        from triton import knobs

        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), TRITON_INTERPRET="0",
                   TRITON_CACHE_DIR=knobs.cache.dir)  # launch stubs built here must land where this process looks
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, "-m", "fastmlip.kernels.compile_workers"], env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)

    def run(self, job: dict) -> dict:
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            self.log.seek(0)
            tail = " ".join(self.log.read().split()[-40:])
            raise RuntimeError(f"compile worker exited ({self.process.wait()}): {tail}")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.process.stdout.close()
        self.log.close()


class Pool:
    """Worker processes started together (their imports overlap), each serving one job at a time."""

    def __init__(self, count: int):
        self.idle: queue.SimpleQueue = queue.SimpleQueue()
        self.all = [Worker() for _ in range(count)]
        for worker in self.all:
            self.idle.put(worker)

    def run(self, job: dict) -> dict:
        worker = self.idle.get()
        try:
            return worker.run(job)
        except (OSError, RuntimeError, ValueError):
            worker.close()
            worker = Worker()
            self.all.append(worker)
            raise
        finally:
            self.idle.put(worker)

    def close(self) -> None:
        for worker in self.all:
            worker.close()


def cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()


def launcher_jobs(specs) -> tuple:
    """(jobs for the C launch stubs the kernels need that neither cache has, how many were copied from
    fastmlip's cache into Triton's); no jobs for Tritons without such stubs.

    Triton 3.6 compiles one stub per kernel signature with the system C compiler at that kernel's first launch,
    ~0.3-0.5 s each and one after another, in the process that launches; the workers build them beside the
    kernels instead, and keep a copy in fastmlip's cache. A stub found there is copied into Triton's cache: 12
    stubs for SevenNet-0 took 1.7 s of a warm start on 12 processes of an H200 machine whose Triton cache was empty.
    """
    from triton.runtime.cache import get_cache_manager

    jobs, copied, name = [], 0, _launcher_name()
    for key, source, label in _launch_stubs(specs):
        triton_cache = get_cache_manager(key)
        if triton_cache.get_file(name) is not None:
            if not launcher_path(key, name).is_dir():
                keep_launcher(key)
            continue
        stored = read_launcher(key, name)
        if stored is not None:
            with contextlib.suppress(OSError):  # else a worker tries, and its failure is reported, not raised
                triton_cache.put(stored, name, binary=True)
                copied += 1
                continue
        jobs.append({"launcher": source, "key": key, "label": f"launch stub of {label}"})
    return jobs, copied


def _launcher_name() -> str:
    import sysconfig

    return "__triton_launcher" + sysconfig.get_config_var("EXT_SUFFIX")


def _launch_stubs(specs) -> list:
    """(Triton's cache key, C source, a kernel's label) of each distinct launch stub; empty for a Triton without
    C stubs. The source is Triton's ``make_launcher`` text, the key the one Triton uses."""
    try:
        from triton.backends.nvidia import driver as nvidia
        from triton.runtime.build import platform_key

        make_launcher = nvidia.make_launcher
        sources = {}
        for spec in specs:
            names = spec.function.arg_names
            constants = {(names.index(k),) if isinstance(k, str) else k: v for k, v in spec.constants.items()}
            sources.setdefault(make_launcher(constants, dict(spec.signature), None), spec.label)
        return [(hashlib.sha256((source + platform_key()).encode()).hexdigest(), source, label)
                for source, label in sources.items()]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


# --- the worker side -------------------------------------------------------------------------------------------

def _function(module_name: str, file: Optional[str], name: str):
    import importlib
    import importlib.util

    module = sys.modules.get(module_name)
    if module is None and file:
        spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    elif module is None:
        module = importlib.import_module(module_name)
    return getattr(module, name)


def _compile_job(job: dict) -> None:
    entry = Path(job["entry"])
    function = _function(job["module"], job["file"], job["function"])
    with entry_lock(entry):
        if read_entry(entry) is not None:  # another process compiled it while this one waited
            return
        write_entry(entry, function.preload(job["specialization"]))


def _build_launcher(source: str, key: str) -> None:
    """Compile one C launch stub into Triton's cache, exactly as Triton's CudaLauncher would at first launch,
    and keep a copy in fastmlip's."""
    from triton.backends.nvidia import driver as nvidia
    from triton.runtime.build import compile_module_from_src

    compile_module_from_src(src=source, name="__triton_launcher", library_dirs=nvidia.library_dirs(),
                            include_dirs=nvidia.include_dirs, libraries=nvidia.libraries)
    keep_launcher(key)


def keep_launcher(key: str) -> None:
    """Copy the launch stub Triton's cache holds under ``key`` into fastmlip's cache; a cache that cannot be
    written (read-only, full) keeps no copy and the run goes on: the stub in Triton's cache serves it."""
    from triton.runtime.cache import get_cache_manager

    name = _launcher_name()
    built = get_cache_manager(key).get_file(name)
    if built is None:
        raise RuntimeError(f"Triton's cache has no launch stub {name} under {key}")
    with contextlib.suppress(OSError):
        write_launcher(key, name, Path(built).read_bytes())


def _serve() -> None:
    """Worker main loop. Results go to a private copy of stdout; anything else printed goes to stderr."""
    from triton import knobs

    from .compile_passes import StagesHook

    results = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    knobs.runtime.add_stages_inspection_hook = StagesHook()  # this process compiles fastmlip's kernels only
    active = None
    for line in sys.stdin:
        job = json.loads(line)
        start = time.perf_counter()
        try:
            if "launcher" in job:
                _build_launcher(job["launcher"], job["key"])
            else:
                target = Target(*job["target"])
                if target != active:
                    from triton.runtime import driver

                    driver.set_active(TargetOnlyDriver(target.triton()))
                    active = target
                _compile_job(job)
            result = {"ok": True, "seconds": round(time.perf_counter() - start, 3)}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which falls back to a lazy compile
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results.write(json.dumps(result) + "\n")
        results.flush()


if __name__ == "__main__":
    _serve()
