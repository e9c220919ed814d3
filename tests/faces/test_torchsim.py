"""fastmlip.torchsim.Model, TorchSim's ModelInterface on fastmlip's batched path: a SimState of several systems
gives what fastmlip.evaluate gives (float64), and TorchSim's own batched MD and relaxation run with it. TorchSim
needs Python >= 3.12: elsewhere these tests skip with that reason."""
from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from ase.build import bulk

if sys.version_info < (3, 12):
    pytest.skip("TorchSim (torch-sim-atomistic) needs Python >= 3.12", allow_module_level=True)
ts = pytest.importorskip("torch_sim")
pytest.importorskip("sevenn")

import fastmlip  # noqa: E402
from fastmlip.calculator import Calculator  # noqa: E402
from fastmlip.torchsim import Model  # noqa: E402


@pytest.fixture(scope="module")
def sevenn64():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Calculator("7net-0", device="cpu", dtype="float64")


def systems():
    structures = [bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.61, cubic=True),
                  bulk("SiO", "zincblende", a=4.6).repeat((2, 1, 1))]
    for k, atoms in enumerate(structures):
        atoms.rattle(0.05, seed=k)
    return structures


def test_model_equals_fastmlip_evaluate(sevenn64):
    structures = systems()
    model = Model(sevenn64)
    assert model.device == torch.device("cpu") and model.dtype == torch.float64
    out = model(ts.io.atoms_to_state(structures, device="cpu", dtype=torch.float64))
    expected = fastmlip.evaluate(structures, sevenn64)
    np.testing.assert_allclose(out["energy"].numpy(), [r["energy"] for r in expected], rtol=0, atol=1e-9)
    np.testing.assert_allclose(out["forces"].numpy(), np.concatenate([r["forces"] for r in expected]), rtol=0,
                               atol=1e-9)
    voigt = out["stress"].numpy()[:, [0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    np.testing.assert_allclose(voigt, [r["stress"] for r in expected], rtol=0, atol=1e-12)
    assert float(out["forces"].abs().max()) > 0.1


def test_torchsim_runs_batched_md_and_relaxation(sevenn64):
    model = Model(sevenn64)
    final = ts.integrate(system=systems(), model=model, integrator=ts.Integrator.nvt_langevin, n_steps=5,
                         temperature=300, timestep=0.001)
    assert final.n_systems == 3 and torch.isfinite(final.positions).all()
    relaxed = ts.optimize(system=systems(), model=model, optimizer=ts.Optimizer.fire, max_steps=20)
    start = model(ts.io.atoms_to_state(systems(), device="cpu", dtype=torch.float64))["energy"]
    assert (model(relaxed)["energy"] <= start + 1e-9).all()
