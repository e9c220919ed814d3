"""Kernels ready before the first step on a real GPU: compiled ahead in worker processes, or found in a cache that
was filled on a machine without a GPU; no step compiles anything.

Each case runs in a fresh process, as a user's first run does: kernels another test already compiled stay in this
process's memory, where a recording never sees them (a report of zero kernels would pass for the wrong reason)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ase.build import bulk

pytestmark = pytest.mark.gpu


def _count_compiles():
    """A jit_cache_hook in front of the present one that lists every kernel Triton is about to compile."""
    from triton import knobs

    previous, compiled = knobs.runtime.jit_cache_hook, []

    def hook(**kwargs):
        compiled.append(kwargs["fn"].name)
        return previous(**kwargs) if previous is not None else None

    knobs.runtime.jit_cache_hook = hook
    return compiled, lambda: setattr(knobs.runtime, "jit_cache_hook", previous)


def first_steps():
    """SevenNet-0 on the GPU: what accelerate's kernel preparation reported, and what five steps compiled after it
    (first step, moves, graph captures that rebuild their exact pairs, with other pair counts after a large move;
    the Verlet path's rebuilds are checked against the dry run on the CPU, tests/kernels/test_precompile.py)."""
    import fastmlip
    from fastmlip.api import kernel_report

    calc = fastmlip.Calculator("7net-0", device="cuda")
    report = kernel_report(calc.model)
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    rng = np.random.default_rng(0)
    compiled, stop = _count_compiles()
    try:
        for step in range(5):
            atoms.positions += rng.normal(scale=0.2 if step == 3 else 0.02, size=atoms.positions.shape)
            atoms.calc = calc
            assert np.isfinite(atoms.get_forces()).all()
    finally:
        stop()
    return {"kernels": report.kernels, "cached": report.cached, "compiled": len(report.compiled),
            "failed": [str(f) for f in report.failed], "summary": report.summary(),
            "exact_pairs": calc.replays_exact_pairs, "captures": calc.graph_captures, "compiled_in_steps": compiled}


def _in_fresh_process(cache, **env):
    done = subprocess.run([sys.executable, __file__], env=dict(os.environ, FASTMLIP_CACHE=cache, **env),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_step_compiles_after_accelerate(tmp_path):
    result = _in_fresh_process(str(tmp_path / "cache"))
    assert result["kernels"] > 20 and not result["failed"], result["summary"]
    assert result["compiled"] == result["kernels"]  # an empty cache: all compiled by the workers
    assert result["exact_pairs"] and result["captures"] >= 1  # the pair list's kernels launched too
    assert result["compiled_in_steps"] == []


def test_cache_filled_without_a_gpu_serves_the_gpu(tmp_path):
    """``fastmlip warmup --arch`` on a machine without a GPU (a login node) fills the cache a GPU job then uses."""
    major, minor = torch.cuda.get_device_capability()
    cache = str(tmp_path / "cache")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", FASTMLIP_CACHE=cache)
    done = subprocess.run([sys.executable, "-m", "fastmlip.cli", "warmup", "7net-0", "--arch", f"sm_{major}{minor}",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _in_fresh_process(cache)
    assert result["kernels"] > 20 and result["cached"] == result["kernels"] and not result["compiled"], \
        result["summary"]
    assert result["compiled_in_steps"] == []


def test_warmup_keeps_the_exported_copy_md_starts_from(tmp_path):
    """``fastmlip warmup`` on a GPU also keeps the exported copy of the model, and ``fastmlip md`` on that model
    then starts from it (no framework import) and keeps nothing more."""
    env = dict(os.environ, FASTMLIP_CACHE=str(tmp_path / "cache"))
    warmup = subprocess.run([sys.executable, "-m", "fastmlip.cli", "warmup", "7net-0", "--no-progress"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert warmup.returncode == 0, warmup.stderr[-3000:]
    assert "exported copy for fastmlip md in" in warmup.stdout, warmup.stdout
    md = subprocess.run([sys.executable, "-m", "fastmlip.cli", "md", "--steps", "10", "--no-progress"], env=env,
                        capture_output=True, text=True, timeout=600)
    assert md.returncode == 0, md.stderr[-3000:]
    assert "sevenn, its exported copy in fastmlip's cache" in md.stdout and "kept" not in md.stdout, md.stdout


if __name__ == "__main__":
    print(json.dumps(first_steps()))
