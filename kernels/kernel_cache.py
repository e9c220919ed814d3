"""The on-disk cache of compiled kernels, and the GPU targets they are compiled for.

``<cache_root>/compiled/<backend>_<arch>/<digest>/`` holds Triton's metadata (json) and binary (cubin) of one
kernel and a manifest with their SHA-256. The digest covers the function's code (:func:`code_digest`), its
specialisation, the target, the Triton and fastmlip versions and Triton's compile-affecting
environment. An entry is written into a temporary folder and renamed into place (atomic: when several processes
of an MPI job or job array compile the same kernel, one rename wins and the others discard theirs); a file lock
per entry lets one process compile while the others wait for its result; an entry whose files do not match its
manifest is moved aside, to be compiled again.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import codegen

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Target:
    """A GPU to compile for: Triton's (backend, arch, warp size), e.g. ``Target("cuda", 90, 32)`` for H100/H200."""

    backend: str
    arch: int
    warp_size: int

    @classmethod
    def parse(cls, text: str) -> "Target":
        """``sm_90`` / ``90`` / ``cuda:90`` -> the CUDA target of that compute capability."""
        name = text.strip().lower().removeprefix("cuda:").removeprefix("sm_").removeprefix("sm")
        if not name.isdigit():
            raise ValueError(f"unknown GPU architecture {text!r}: give a CUDA compute capability like sm_90")
        return cls("cuda", int(name), 32)

    @classmethod
    def current(cls) -> "Target":
        from triton.runtime import driver

        target = driver.active.get_current_target()
        return cls(target.backend, int(target.arch), int(target.warp_size))

    def triton(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(self.backend, self.arch, self.warp_size)

    def __str__(self) -> str:
        return f"sm_{self.arch}" if self.backend == "cuda" else f"{self.backend}_{self.arch}"


class TargetOnlyDriver:
    """Enough of a Triton driver to compile for ``target``: no device, no stream, nothing launches."""

    def __init__(self, target):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")


@contextlib.contextmanager
def target_only(target: Target):
    """Make Triton compile for ``target`` without a GPU (for a dry run on the CPU, or a worker process).

    Triton's active driver is process-wide: use this only in processes that launch nothing else meanwhile.
    """
    from triton.runtime import driver

    previous = driver._active  # None until first use; reset_active() would create (and need) a real driver
    driver.set_active(TargetOnlyDriver(target.triton()))
    try:
        yield
    finally:
        driver._active = previous


def compiled_dir(target: Target) -> Path:
    return codegen.cache_root() / "compiled" / f"{target.backend}_{target.arch}"


def _compile_environment() -> str:
    try:
        from triton._C.libtriton import get_cache_invalidating_env_vars

        return repr(sorted(get_cache_invalidating_env_vars().items()))
    except ImportError:
        return repr(sorted((k, v) for k, v in os.environ.items() if k.startswith("TRITON_")))


def _portable_specialization(specialization: str) -> str:
    """Triton's specialisation JSON without where Triton is installed: its options name the libdevice file by
    absolute path, which differs between a login node's venv and a compute node's, though the file does not."""
    data = json.loads(specialization)
    options = data.get("options", {})
    if "extern_libs" in options:
        options["extern_libs"] = [[name, Path(path).name] for name, path in options["extern_libs"]]
    return json.dumps(data, sort_keys=True)


PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=None)
def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _package_digest() -> str:
    return hashlib.sha256("".join(_file_digest(p) for p in sorted(PACKAGE_DIR.glob("*.py"))).encode()).hexdigest()


def code_digest(function) -> str:
    """What a kernel's code is: the file that defines it and fastmlip's kernel package, where every helper a
    kernel calls lives, hashed once per process.

    Triton's own ``cache_key`` walks the function's syntax tree and every function it calls: ~10 ms a kernel,
    half a second of a warm start on an H200. A generated file is named by its content and never changes; the
    package changes only with fastmlip. A function defined anywhere else keeps Triton's key.
    """
    path = Path(function.fn.__code__.co_filename).resolve()
    if path.parent not in (PACKAGE_DIR, (codegen.cache_root() / "generated").resolve()):
        return function.cache_key
    return f"{_file_digest(path)}:{function.fn.__name__}:{_package_digest()}"


def entry_path(spec, target: Target) -> Path:
    """The cache entry of ``spec`` (a :class:`fastmlip.kernels.precompile.KernelSpec`) compiled for ``target``
    (it may not exist yet); the same on every machine with the same versions."""
    import triton

    from fastmlip import __version__

    parts = (__version__, triton.__version__, target, code_digest(spec.function),
             _portable_specialization(spec.specialization), _compile_environment())
    return compiled_dir(target) / hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:40]


@dataclass
class Entry:
    hash: str
    files: dict  # file name -> path, as Triton's CompiledKernel reads them


def _set_aside(entry: Path) -> None:
    aside = entry.parent / f".{entry.name}.damaged.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
        os.rename(entry, aside)
    except OSError:
        return  # another process moved or replaced it already
    shutil.rmtree(aside, ignore_errors=True)


def read_entry(entry: Path) -> Optional["Entry"]:
    """The cache entry if it is whole (every file matches the manifest); a damaged one is moved aside -> None."""
    if not entry.is_dir():
        return None
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        files = {}
        for name, digest in manifest["files"].items():
            path = entry / name
            if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                raise ValueError(f"{path} does not match its manifest")
            files[name] = str(path)
        return Entry(manifest["hash"], files)
    except (OSError, ValueError, KeyError, TypeError):
        _set_aside(entry)
        return None


def write_entry(entry: Path, kernel) -> None:
    """Store a CompiledKernel's metadata and binary as ``entry``."""
    from triton.compiler.compiler import make_backend

    binary = "." + make_backend(kernel.metadata.target).binary_ext
    chosen = {Path(p).name: Path(p).read_bytes() for name, p in kernel.metadata_group.items()
              if name.endswith(".json") or name.endswith(binary)}
    _write_files(entry, chosen, {"hash": kernel.hash, "name": kernel.name})


def launcher_path(key: str, name: str) -> Path:
    """The cache entry of a C launch stub: Triton's key for it (its source and the platform) and its file name
    (which names the Python ABI)."""
    return codegen.cache_root() / "launchers" / f"{key}_{name}"


def write_launcher(key: str, name: str, data: bytes) -> None:
    """Keep a launch stub Triton built (a shared library of this platform) beside the kernels, so that a machine
    with this cache but an empty Triton cache (a job on another node) copies it instead of running the C compiler."""
    _write_files(launcher_path(key, name), {name: data}, {"hash": key, "name": name})


def read_launcher(key: str, name: str) -> Optional[bytes]:
    entry = read_entry(launcher_path(key, name))
    return None if entry is None or name not in entry.files else Path(entry.files[name]).read_bytes()


def _write_files(entry: Path, files: dict, manifest: dict) -> None:
    """``files`` (name -> bytes) and a manifest of their SHA-256 as ``entry``: written aside, then renamed."""
    staging = entry.parent / f".{entry.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        digests = {}
        for name, data in files.items():
            (staging / name).write_bytes(data)
            digests[name] = hashlib.sha256(data).hexdigest()
        (staging / MANIFEST).write_text(json.dumps({**manifest, "files": digests}))
        try:
            os.rename(staging, entry)
        except OSError:
            if read_entry(entry) is None:  # not another process's whole entry: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def entry_lock(entry: Path):
    """One process compiles an entry while the others wait for it (POSIX advisory lock beside the entry)."""
    import fcntl

    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{entry.name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _entry_count(directory: Path) -> int:
    """Whole entries in ``directory`` (not the staging folders and locks, whose names start with a dot)."""
    return sum(p.is_dir() and not p.name.startswith(".") for p in directory.iterdir()) if directory.is_dir() else 0


def cache_summary() -> dict:
    """For ``fastmlip info``: the cache's location, size and entries per target."""
    root = codegen.cache_root()
    size = 0
    compiled = root / "compiled"
    targets = {directory.name: _entry_count(directory)
               for directory in (sorted(compiled.iterdir()) if compiled.is_dir() else ())}
    for path in root.rglob("*") if root.is_dir() else ():
        with contextlib.suppress(OSError):
            size += path.stat().st_size if path.is_file() else 0
    sources = len(list((root / "generated").glob("*.py"))) if (root / "generated").is_dir() else 0
    return {"location": str(root), "bytes": size, "compiled": targets, "generated_sources": sources,
            "launch_stubs": _entry_count(root / "launchers")}
