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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mace_on_gpu(dtype):
    import fastmlip
    from mace import modules
    from e3nn import o3

    torch.manual_seed(0)
    model = modules.ScaleShiftMACE(
        r_max=5.0, num_bessel=8, num_polynomial_cutoff=5, max_ell=3,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps("32x0e+32x1o"), MLP_irreps=o3.Irreps("16x0e"),
        atomic_energies=np.array([-1.0, -2.0]), avg_num_neighbors=30.0, atomic_numbers=[14, 29], correlation=3,
        gate=torch.nn.functional.silu, radial_MLP=[32, 32], atomic_inter_scale=1.0, atomic_inter_shift=0.0,
    ).to(device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        for readout in model.readouts:
            (readout.linear if hasattr(readout, "linear") else readout.linear_2).weight.mul_(30.0)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.numbers[::3] = 14
    atoms.rattle(0.05, seed=2)
    accelerated = fastmlip.accelerate(copy.deepcopy(model))
    _assert_close(_evaluate(model, atoms), _evaluate(accelerated, atoms), len(atoms), dtype)
