"""Kernels ready before the first step on a real GPU: compiled ahead in worker processes, or found in a cache that
was filled on a machine without a GPU; no step compiles anything."""
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


def test_no_step_compiles_after_accelerate(tmp_path, monkeypatch):
    import fastmlip
    from fastmlip.api import kernel_report

    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path / "cache"))
    calc = fastmlip.Calculator("7net-0", device="cuda")
    report = kernel_report(calc.model)
    assert report is not None and report.kernels > 20 and not report.failed
    assert len(report.compiled) == report.kernels  # an empty cache: all compiled by the workers
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    rng = np.random.default_rng(0)
    compiled, stop = _count_compiles()
    try:
        for step in range(5):  # first step, moves, a Verlet rebuild (other edge counts), graph capture + replays
            atoms.positions += rng.normal(scale=0.2 if step == 3 else 0.02, size=atoms.positions.shape)
            atoms.calc = calc
            forces = atoms.get_forces()
            assert np.isfinite(forces).all()
    finally:
        stop()
    assert calc.neighbor_list_rebuilds >= 2
    assert compiled == []


def test_cache_filled_without_a_gpu_serves_the_gpu(tmp_path, monkeypatch):
    """``fastmlip warmup --arch`` on a machine without a GPU (a login node) fills the cache a GPU job then uses."""
    import fastmlip
    from fastmlip.api import kernel_report

    major, minor = torch.cuda.get_device_capability()
    cache = str(tmp_path / "cache")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", FASTMLIP_CACHE=cache)
    done = subprocess.run([sys.executable, "-m", "fastmlip.cli", "warmup", "7net-0", "--arch", f"sm_{major}{minor}",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.setenv("FASTMLIP_CACHE", cache)
    calc = fastmlip.Calculator("7net-0", device="cuda")
    report = kernel_report(calc.model)
    assert report.cached == report.kernels and not report.compiled, report.summary()
