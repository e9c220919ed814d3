"""Accelerated real models on the GPU (Triton kernels through the auto backend) against the originals there."""
import copy

import numpy as np
import pytest
import torch
from ase.build import bulk

pytestmark = pytest.mark.gpu

TOLERANCES = {torch.float32: (1e-5, 1e-4), torch.float64: (1e-9, 1e-8)}  # eV/atom, eV/A


def _evaluate(model, atoms):
    import fastmlip

    atoms = atoms.copy()
    atoms.calc = fastmlip.Calculator(model, device="cuda", accelerate=False)
    return atoms.get_potential_energy(), atoms.get_forces()


def _assert_close(reference, candidate, n_atoms, dtype):
    tol_e, tol_f = TOLERANCES[dtype]
    assert abs(reference[0] - candidate[0]) / n_atoms <= tol_e
    assert np.abs(reference[1] - candidate[1]).max() <= tol_f
    assert 0.05 < np.abs(reference[1]).max() < 100.0  # forces are O(1): a sign error could not hide


@pytest.mark.parametrize("name", ["7net-0", "7net-l3i5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sevenn_on_gpu(name, dtype):
    import fastmlip
    from fastmlip.kernels import conv

    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    original = fastmlip.load(name, device="cuda", dtype=dtype)
    accelerated = fastmlip.accelerate(copy.deepcopy(original))
    _assert_close(_evaluate(original, atoms), _evaluate(accelerated, atoms), len(atoms), dtype)
    assert any(label.endswith(str(dtype).split(".")[-1]) for label in conv.compile_report())


@pytest.mark.parametrize("config", ["mp0_small", "mp0_medium", "mp0_large", "off_like"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mace_on_gpu(config, dtype):
    """Full-width MACE-MP-0 / OFF hyperparameters (tests/helpers/mace_models.py), forces scaled to O(1) eV/A."""
    pytest.importorskip("mace.modules")
    import fastmlip
    from helpers import mace_models

    model = mace_models.build_model(config).to(device="cuda", dtype=dtype)
    atoms = mace_models.periodic_structure(seed=3).repeat(2)
    accelerated = fastmlip.accelerate(copy.deepcopy(model))
    _assert_close(_evaluate(model, atoms), _evaluate(accelerated, atoms), len(atoms), dtype)


@pytest.mark.parametrize("name", ["7net-0", "7net-l3i5"])
def test_sevenn_tf32x3_dots_on_gpu(name, kernel_settings):
    """FASTMLIP_DOT_PRECISION=tf32x3 (tensor-core float32 emulation in the radial MLP) must keep the fp32
    tolerances on a whole model before it can become a default."""
    import fastmlip

    kernel_settings(dot_precision="tf32x3")
    atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(2)
    atoms.rattle(0.05, seed=1)
    original = fastmlip.load(name, device="cuda", dtype=torch.float32)
    accelerated = fastmlip.accelerate(copy.deepcopy(original))
    _assert_close(_evaluate(original, atoms), _evaluate(accelerated, atoms), len(atoms), torch.float32)
