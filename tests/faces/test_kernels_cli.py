"""``fastmlip kernels``: the kernels a model launches, found by a dry run on the CPU, and their source.

The dry run needs real specialisations, which the interpreter never makes, so the command runs in a child process
with ``TRITON_INTERPRET=0`` (as ``fastmlip warmup --arch`` would on a login node): no GPU is used.
"""
import os
import subprocess
import sys

import pytest


def test_lists_and_shows_the_kernels_of_sevennet0(tmp_path):
    pytest.importorskip("sevenn")
    env = dict(os.environ, TRITON_INTERPRET="0", FASTMLIP_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "fastmlip.cli", "kernels", "7net-0", "--show"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    count = int(lines[0].split(": ")[1].split()[0])
    assert lines[0].startswith("7net-0 float32: ") and count > 10
    listed = lines[1:1 + count]
    for kernel in ("sh_forward", "gate_forward", "gate_backward", "aggregate", "linear"):
        assert any(line.split()[0] == kernel for line in listed), kernel
    # the GPU's default reads the radial MLPs from tables inside the convolution: no MLP kernel
    assert any("_fwdt_csr_" in line for line in listed) and any("_sendert_" in line for line in listed)
    assert not any(line.split()[0].startswith("radial_mlp") for line in listed)
    assert done.stdout.count("\n# ===== ") == count
    assert "def sh_forward(vectors, out, num_edges, DT: tl.constexpr):" in done.stdout
    assert done.stdout.count("@triton.jit") >= count


def test_refuses_the_interpreter(capsys, monkeypatch):
    """The interpreter runs kernels instead of compiling them, so a dry run there would record none."""
    from fastmlip.cli import main

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["kernels", "7net-0"]) == 2
    err = capsys.readouterr().err
    assert "TRITON_INTERPRET" in err and err.count("\n") == 1


def test_mace_files_need_trust(tmp_path):
    """A MACE .model file is a whole pickle: like every command, this one opens it only with --trust."""
    import torch

    path = tmp_path / "some.model"
    torch.save({"class": "mace.modules.models.ScaleShiftMACE"}, path)
    env = dict(os.environ, TRITON_INTERPRET="0", FASTMLIP_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-m", "fastmlip.cli", "kernels", str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "--trust" in lines[0], done.stderr
