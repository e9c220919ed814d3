"""Kernels compiled before the first step (fastmlip.kernels.precompile), checked on the CPU.

Triton kernels are only *specialised* (and compiled) where the interpreter is off, so the checks that need real
specialisations run in a child process with ``TRITON_INTERPRET=0`` and Triton's driver replaced by a stand-in
for an sm_90 GPU (:func:`precompile.target_only`): dry runs record what would compile, and a few small kernels
really are compiled for sm_90 by the worker processes (Triton ships ptxas). The child is this file run as a
script; it prints one JSON line the tests read.
"""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)


def child(mode: str, cache, *args, timeout=600) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0", FASTMLIP_CACHE=str(cache), FASTMLIP_BACKEND="auto",
               FASTMLIP_COMPILE_WORKERS="2")
    done = subprocess.run([sys.executable, HERE, mode, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- what the child runs ---------------------------------------------------------------------------------------

def _keys(specs) -> list:
    return sorted({f"{s.function.module}:{s.function.__name__}:{s.specialization}" for s in specs})


def steps_against_dry_run() -> dict:
    """Kernels that a Calculator's steps would compile (first step, later steps with other edge counts, a
    Verlet rebuild, a masked CUDA-graph-style step, one that rebuilds its exact pairs) against those accelerate's
    dry run records."""
    import numpy as np
    import torch
    from ase.build import bulk

    import fastmlip
    from fastmlip.cuda_graph import CapturedStep
    from fastmlip.graph_pairs import ExactPairs
    from fastmlip.kernels import precompile
    from fastmlip.neighbors import wrap_basis
    from fastmlip.ops import dispatch
    from fastmlip.patches import self_check
    from fastmlip.warmup import _frozen_model

    model = _frozen_model("7net-0", "cpu", "float32")
    patch = fastmlip.api.framework_of(model)
    patch.accelerate(model)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))
    rng = np.random.default_rng(0)
    steps = []
    with precompile.target_only(precompile.Target.parse("sm_90")), dispatch.kernels_on_cpu():
        dry = self_check.record_kernels(model, patch)
        calc = fastmlip.Calculator(model, device="cpu")
        calc.bind(atoms)  # evaluate(), not calculate(): the skipped kernels leave outputs uninitialised
        cell = torch.as_tensor(atoms.cell.array)
        for step in range(4):
            atoms.positions += rng.normal(scale=0.15 if step == 2 else 0.02, size=atoms.positions.shape)
            with precompile.recording() as launched:
                calc.evaluate(torch.as_tensor(atoms.positions), cell, (True,) * 3, True)
            steps.append((launched, calc.neighbors.rebuilds))
        positions = torch.as_tensor(atoms.positions)
        i, j, shifts, _ = calc.neighbors.candidates(positions, cell, (True,) * 3)
        captured = CapturedStep(patch, model, calc._numbers, cell, (True,) * 3, calc.cutoff, None, True, i.numel())
        captured.load_pairs(i, j, shifts)
        captured.positions.copy_(positions)
        with precompile.recording() as masked:
            captured.evaluate()
        # a step with its exact pairs in the graph launches the masked step's kernels after these (the model part
        # is not run here: the skipped pair kernels would leave it garbage indices)
        with precompile.recording() as rebuilding:
            ExactPairs(len(atoms), "cpu")(positions, cell, wrap_basis(cell, (True,) * 3), calc.cutoff, i.numel())
    return {"dry": _keys(dry), "steps": [_keys(s) for s, _ in steps], "rebuilds": [r for _, r in steps],
            "masked": _keys(masked), "exact_pairs": _keys(rebuilding), "edges": [len(s) for s, _ in steps]}


def small_specs():
    """Specs of two small kernels (spherical harmonics forward and backward), by a dry run of the op."""
    import torch

    from fastmlip.kernels import precompile
    from fastmlip.ops import dispatch
    from fastmlip.ops.spherical_harmonics import spherical_harmonics

    vectors = torch.randn(10, 3, requires_grad=True)
    with precompile.target_only(precompile.Target.parse("sm_90")), dispatch.kernels_on_cpu():
        with precompile.recording() as specs:
            out = spherical_harmonics([0, 1, 2], vectors, True, "component")
            torch.autograd.grad(out.sum(), vectors)
    return specs


def coalescing_skipped() -> dict:
    """PTX of small kernels compiled for sm_90 with and without the workers' stage hook, and how many compiles the
    hook ran without the coalescing pass: the spherical harmonics' lane tiles (one element per thread) and the
    node sums' [nodes, columns] tiles (two-dimensional: coalesced as ever)."""
    import hashlib
    import tempfile

    import torch
    from triton import knobs

    from fastmlip.graph import sort_edges
    from fastmlip.kernels import compile_passes, precompile
    from fastmlip.ops import dispatch
    from fastmlip.ops.node_sums import node_difference

    src, dst = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 2, 0, 1])
    with precompile.target_only(precompile.Target.parse("sm_90")), dispatch.kernels_on_cpu():
        with precompile.recording() as sums:
            node_difference(torch.randn(4, 3), sort_edges(src, dst, 3), src, dst, "dst")
        specs = precompile.unique(small_specs() + sums)
        ptx, skipped = {}, None
        for hook in (None, compile_passes.StagesHook()):
            knobs.runtime.add_stages_inspection_hook = hook
            os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
            for spec in specs:
                spec.function.device_caches.clear()
                kernel = spec.function.preload(spec.specialization)
                ptx.setdefault(spec.label, []).append(hashlib.sha256(kernel.asm["ptx"].encode()).hexdigest())
            skipped = None if hook is None else hook.skipped
        knobs.runtime.add_stages_inspection_hook = None
    return {"labels": sorted(ptx), "same": all(a == b for a, b in ptx.values()), "skipped": skipped}


def compile_small(install: str) -> dict:
    from fastmlip.kernels import precompile

    specs = precompile.unique(small_specs())
    target = precompile.Target.parse("sm_90")
    report = precompile.prepare(specs, target=target, install=install == "install", progress=False)
    installed = []
    if install == "install":
        installed = [type(spec.function.device_caches[spec.device][0].get(spec.key)).__name__ for spec in specs]
    entries = [str(precompile.entry_path(spec, target)) for spec in specs]
    return {"kernels": report.kernels, "cached": report.cached, "compiled": len(report.compiled),
            "failed": report.failed, "entries": entries, "installed": installed}


def code_digests() -> dict:
    """Entry keys of a generated kernel with Triton's cache_key made to fail, and of a function defined elsewhere."""
    from pathlib import Path
    from types import SimpleNamespace

    from triton.runtime.jit import JITFunction

    from fastmlip.kernels import kernel_cache, precompile

    spec = precompile.unique(small_specs())[0]
    target = precompile.Target.parse("sm_90")

    def no_walk(self):
        raise AssertionError("Triton's cache_key was computed")

    triton_key, JITFunction.cache_key = JITFunction.cache_key, property(no_walk)
    try:
        key = kernel_cache.code_digest(spec.function)
        same_entry = precompile.entry_path(spec, target) == precompile.entry_path(spec, target)
    finally:
        JITFunction.cache_key = triton_key
    path = Path(spec.function.fn.__code__.co_filename).resolve()
    return {"generated": spec.function.module.startswith("fastmlip_generated_"), "key": key,
            "same_entry": same_entry, "file_digest": kernel_cache._file_digest(path),
            "package_digest": kernel_cache._package_digest(),
            "elsewhere": kernel_cache.code_digest(SimpleNamespace(cache_key="triton's", fn=code_digests))}


# --- the tests -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_no_kernel_compiles_after_the_dry_run(tmp_path):
    """Every kernel a step launches was recorded by accelerate's dry run on its 4-atom probe, and no step after
    the first needs a kernel the first did not: sizes are never specialised."""
    result = child("steps", tmp_path / "cache")
    assert result["dry"] and all(result["steps"])
    assert result["rebuilds"][-1] > result["rebuilds"][0]  # the list was rebuilt: edge counts changed
    first = set(result["steps"][0])
    for later in result["steps"][1:]:
        assert set(later) <= first
    assert first <= set(result["dry"])
    assert set(result["masked"]) <= set(result["dry"])
    # a step that rebuilds its exact pairs (pairs="graph") launches the pair list's kernels, recorded too
    assert {"count_pairs", "write_pairs"} <= {key.split(":")[1] for key in result["exact_pairs"]}
    assert set(result["exact_pairs"]) <= set(result["dry"])


def test_compiled_kernels_are_cached_checked_and_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    cold = child("compile", cache, "store")
    assert cold["kernels"] == 2 and cold["compiled"] == 2 and cold["cached"] == 0 and not cold["failed"]
    for entry in cold["entries"]:
        names = sorted(os.listdir(entry))
        assert names[0] == "manifest.json" and any(n.endswith(".cubin") for n in names), names

    warm = child("compile", cache, "install")
    assert warm["cached"] == 2 and warm["compiled"] == 0
    assert warm["installed"] == ["CompiledKernel", "CompiledKernel"]  # in Triton's in-memory cache: no compile

    cubin = next(os.path.join(cold["entries"][0], n) for n in os.listdir(cold["entries"][0]) if n.endswith(".cubin"))
    with open(cubin, "r+b") as handle:  # a truncated binary must be noticed and rebuilt, not loaded
        handle.truncate(100)
    rebuilt = child("compile", cache, "store")
    assert rebuilt["cached"] == 1 and rebuilt["compiled"] == 1 and not rebuilt["failed"]
    os.remove(os.path.join(cold["entries"][1], "manifest.json"))  # an entry without its manifest too
    again = child("compile", cache, "store")
    assert again["cached"] == 1 and again["compiled"] == 1


def test_processes_starting_at_once_share_the_cache(tmp_path):
    """Several processes (an MPI job's ranks) filling one cache together all end with every kernel."""
    cache = tmp_path / "cache"
    env = dict(os.environ, TRITON_INTERPRET="0", FASTMLIP_CACHE=str(cache), FASTMLIP_COMPILE_WORKERS="1")
    ranks = [subprocess.Popen([sys.executable, HERE, "compile", "store"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = []
    for rank in ranks:
        out, err = rank.communicate(timeout=600)
        assert rank.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["kernels"] == 2 and not r["failed"] for r in results)
    assert sum(r["compiled"] for r in results) >= 2  # each kernel compiled at least once...
    leftovers = [n for n in os.listdir(results[0]["entries"][0] + "/..") if ".tmp" in n or "damaged" in n]
    assert not leftovers
    final = child("compile", cache, "store")
    assert final["cached"] == 2 and final["compiled"] == 0  # ...and every entry whole afterwards


def test_workers_skip_coalescing_only_where_it_changes_nothing(tmp_path):
    """The workers' stage hook leaves Triton's coalescing pass out for kernels of one-dimensional lane tiles
    (seconds of the long convolution kernels' compiles) and the PTX stays the same; two-dimensional tiles keep it."""
    result = child("coalescing", tmp_path / "cache")
    assert len(result["labels"]) == 3 and any("node_difference" in label for label in result["labels"])
    assert result["same"]
    assert result["skipped"] == 2  # the two spherical-harmonics kernels, not the node sums


def test_launch_stubs_are_kept_and_copied_into_an_empty_triton_cache(tmp_path, monkeypatch):
    """A node whose Triton cache is empty takes Triton's C launch stubs from fastmlip's cache instead of
    running the C compiler; a damaged copy is built again, not loaded. (Triton 3.6 has such stubs; here a stand-in
    stub and key, since the CPU's Triton may have none.)"""
    import shutil

    from triton.runtime.cache import get_cache_manager

    from fastmlip.kernels import compile_workers

    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path / "fastmlip"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    key, name = "ab" * 32, compile_workers._launcher_name()
    monkeypatch.setattr(compile_workers, "_launch_stubs", lambda specs: [(key, "/* stub */", "a kernel")])

    jobs, copied = compile_workers.launcher_jobs([])
    assert copied == 0 and [job["key"] for job in jobs] == [key]  # in neither cache: a worker builds it
    get_cache_manager(key).put(b"built stub", name, binary=True)  # what the worker's C compile leaves there
    compile_workers.keep_launcher(key)

    shutil.rmtree(tmp_path / "triton")
    assert compile_workers.launcher_jobs([]) == ([], 1)
    with open(get_cache_manager(key).get_file(name), "rb") as handle:
        assert handle.read() == b"built stub"

    shutil.rmtree(tmp_path / "triton")
    kept = tmp_path / "fastmlip" / "launchers" / f"{key}_{name}" / name
    kept.write_bytes(b"built stu")
    jobs, copied = compile_workers.launcher_jobs([])
    assert copied == 0 and len(jobs) == 1 and get_cache_manager(key).get_file(name) is None

    shutil.rmtree(tmp_path / "fastmlip")  # Triton's cache has it, fastmlip's not (filled before this): kept
    get_cache_manager(key).put(b"built stub", name, binary=True)
    assert compile_workers.launcher_jobs([]) == ([], 0)
    assert kept.read_bytes() == b"built stub"

    def unwritable(*args):
        raise PermissionError("read-only file system")

    shutil.rmtree(tmp_path / "fastmlip")  # a cache nobody may write: no copy kept, nothing fails
    monkeypatch.setattr(compile_workers, "write_launcher", unwritable)
    assert compile_workers.launcher_jobs([]) == ([], 0)
    assert not kept.exists()


def test_target_names():
    from fastmlip.kernels.precompile import Target

    assert Target.parse("sm_90") == Target.parse("90") == Target("cuda", 90, 32)
    assert str(Target.parse("sm_80")) == "sm_80"
    with pytest.raises(ValueError, match="compute capability"):
        Target.parse("hopper")


def test_cache_entries_do_not_depend_on_where_triton_is_installed(tmp_path, monkeypatch):
    """A cache filled on a login node serves a compute node whose venv lies elsewhere: Triton's options name the
    libdevice file by absolute path, the entry's key by file name only."""
    from types import SimpleNamespace

    from fastmlip.kernels import precompile

    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path))
    target = precompile.Target.parse("sm_90")

    def spec(triton_dir, num_warps=4):
        options = {"num_warps": num_warps, "extern_libs": [["libdevice", f"{triton_dir}/lib/libdevice.10.bc"]]}
        return SimpleNamespace(function=SimpleNamespace(cache_key="abc", fn=test_target_names),
                               specialization=json.dumps({"name": "k", "options": options}))

    here = precompile.entry_path(spec("/home/me/venv/triton/backends/nvidia"), target)
    there = precompile.entry_path(spec("/opt/site/triton/backends/nvidia"), target)
    assert here == there
    assert precompile.entry_path(spec("/opt/site/triton/backends/nvidia", num_warps=8), target) != here


def test_compile_workers_import_kernel_modules_without_torch():
    """A worker imports the module that defines its kernel; a module that imports torch costs that worker
    torch's import (3.2 s on the H200 machine, whose torch has no bytecode), and the slowest worker bounds a cold
    start. Every hand-written kernel module, and the tiles the generated ones import, must load without it."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "kernels"
    modules = sorted(f"fastmlip.kernels.{path.stem}" for path in package.glob("*.py")
                     if "@triton.jit" in path.read_text() or path.stem == "tiles")
    assert "fastmlip.kernels.pair_list" in modules and "fastmlip.kernels.node_sums" in modules
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    assert 'torch' not in sys.modules, name\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_cache_entries_key_generated_kernels_by_their_file(tmp_path):
    """A generated kernel's entry is keyed by its file and the kernel package, without Triton's cache_key (an AST
    walk of each kernel, half a second of a warm start); a kernel defined elsewhere keeps Triton's key."""
    result = child("digest", tmp_path / "cache")
    assert result["generated"] and result["same_entry"]
    assert result["file_digest"] in result["key"] and result["package_digest"] in result["key"]
    assert result["elsewhere"] == "triton's"


def test_generated_modules_import_from_bytecode_written_once(tmp_path, monkeypatch):
    """A generated module's bytecode is written beside it even under PYTHONDONTWRITEBYTECODE (its imports are part
    of every warm start); damaged bytecode is removed and the source imported instead."""
    import importlib.util
    from pathlib import Path

    from fastmlip.kernels import codegen

    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    module = codegen.load_module("bytecode-check", lambda: "VALUE = 42\n")
    bytecode = Path(importlib.util.cache_from_source(module.__file__))
    assert module.VALUE == 42 and bytecode.is_file() and bytecode.parent.parent == tmp_path / "generated"
    bytecode.write_bytes(bytecode.read_bytes()[:20])  # its header, then nothing
    again = codegen._import("fastmlip_generated_bytecode_check_again", Path(module.__file__))
    assert again.VALUE == 42 and not bytecode.exists()


def test_warmup_command_errors(capsys, monkeypatch):
    from fastmlip.cli import main

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["warmup", "7net-0"]) == 2
    assert "--arch" in capsys.readouterr().err
    assert main(["warmup", "7net-0", "--arch", "hopper"]) == 2
    assert main(["warmup", "7net-0", "--arch", "sm_90", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "Traceback" not in err


def test_info_shows_the_cache(tmp_path, monkeypatch, capsys):
    from fastmlip.cli import main

    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path / "somewhere"))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "somewhere") in out and "launch_stubs" in out and "'exported_copies': 0" in out


if __name__ == "__main__":
    mode = sys.argv[1]
    result = {"steps": steps_against_dry_run, "digest": code_digests, "coalescing": coalescing_skipped}.get(
        mode, lambda: compile_small(sys.argv[2]))()
    print(json.dumps(result))
