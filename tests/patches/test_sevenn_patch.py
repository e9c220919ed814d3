"""SevenNet acceleration: accelerated vs original on the shipped checkpoints, restore, strict mode, self-check.

CPU cost (~2 min of CPU time on 2 cores): each checkpoint is built once per dtype (a few seconds each) and evaluated on three
tiny structures (2-atom Si, a water molecule, a 1-atom Cu cell smaller than the cutoff); 8-atom Si against
SevenNetCalculator. fp64 models are built in fp64 (not deep-copied from fp32: a deep-copied e3nn TensorProduct
keeps fp32-rounded constants in its compiled code after ``.double()``, ~2e-9 eV/atom off a fresh fp64 build).
"""
import copy
import dataclasses
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")

from ase import Atoms  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402

import fastmlip.api as api  # noqa: E402
from fastmlip import descriptors  # noqa: E402
from fastmlip.patches import self_check, swaps  # noqa: E402
from fastmlip.patches import sevenn as patch  # noqa: E402

CHECKPOINTS = ["7net-0", "7net-0_22May2024", "7net-l3i5", "7net-mf-0"]
_MODELS = {}


def model_for(name, dtype=torch.float32):
    """One e3nn model per checkpoint and dtype for the whole module; tests must leave it as they found it."""
    if (name, dtype) not in _MODELS:
        if name not in patch.pretrained_checkpoints():
            pytest.skip(f"{name} is not installed with sevenn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _MODELS[name, dtype] = patch.load(name, dtype=dtype)
    model = _MODELS[name, dtype]
    assert not patch.is_accelerated(model)
    return model


def structures(si_atoms=2):
    si = bulk("Si", "diamond", a=5.43, cubic=si_atoms == 8)
    si.rattle(0.03, seed=1)
    water = molecule("H2O")
    water.rattle(0.02, seed=2)
    cu = bulk("Cu", "fcc", a=3.6)  # one atom, cell edges ~2.5 A: every neighbour is a periodic image
    cu.set_cell(cu.cell.array @ np.diag([1.0, 1.02, 0.99]), scale_atoms=True)
    return {f"si{si_atoms}": si, "water": water, "cu1": cu}


def evaluate(model, atoms, modal=None, edges=None):
    edges = edges if edges is not None else self_check.neighbor_edges(atoms, model.cutoff)
    return self_check.compute_on_atoms(patch, model, atoms, edges, modal=modal)


def assert_close(reference, candidate, num_atoms, dtype):
    e_tol, f_tol, s_tol = self_check.tolerances(dtype)
    dev = self_check.deviation(reference, candidate, num_atoms)
    assert dev["energy_per_atom"] <= e_tol, dev
    assert dev["forces"] <= f_tol, dev
    assert (reference["stress"] is None) == (candidate["stress"] is None)
    if reference["stress"] is not None:
        assert dev["stress"] <= s_tol, dev
    assert torch.allclose(reference["energies"], candidate["energies"], atol=e_tol * 10, rtol=0)
    return dev


def compare_accelerated(model, modals, only=None):
    """Original (shuffled edges) vs accelerated (neighbour-list order) on every structure and modal."""
    dtype = patch.model_info(model)["dtype"]
    cases = [(label, atoms, modal) for label, atoms in structures().items() for modal in modals
             if only is None or label in only]
    originals = {}
    for label, atoms, modal in cases:
        edges = self_check.neighbor_edges(atoms, model.cutoff)
        order = torch.randperm(edges[0].numel(), generator=torch.Generator().manual_seed(7))
        originals[label, modal] = evaluate(model, atoms, modal, tuple(t[order] for t in edges))
    assert patch.accelerate(model) == []
    try:
        worst = {}
        for label, atoms, modal in cases:
            fast = evaluate(model, atoms, modal)
            assert fast["energy"].dtype == dtype and fast["forces"].shape == (len(atoms), 3)
            dev = assert_close(originals[label, modal], fast, len(atoms), dtype)
            worst = {k: max(worst.get(k, 0.0), v) for k, v in dev.items()}
    finally:
        patch.restore(model)
    return worst


# 22May2024 shares 7net-0's architecture: fp32 covers its own constants. In fp64 the larger l3i5 and MF-0 skip
# the 2-atom Si crystal (the 1-atom Cu cell stays: periodic, and smaller than the cutoff) to keep CI time modest.
CASES = [(name, torch.float32, None) for name in CHECKPOINTS] + [
    ("7net-0", torch.float64, None), ("7net-l3i5", torch.float64, ("cu1", "water")),
    ("7net-mf-0", torch.float64, ("cu1", "water"))]


@pytest.mark.parametrize("name, dtype, only", CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_accelerated_matches_original(name, dtype, only):
    model = model_for(name, dtype)
    modals = patch.model_info(model)["modals"] or [None]
    worst = compare_accelerated(model, modals, only)
    assert set(worst) == {"energy_per_atom", "forces", "stress"}


def test_accelerated_modules_use_loaded_constants():
    model = model_for("7net-l3i5")
    patch.accelerate(model)
    try:
        fast = model._modules["1_convolution"]
        assert isinstance(fast, patch.FastIrrepsConvolution)
        original = swaps.originals_in_place
        with original(model):
            module = model._modules["1_convolution"]
            reference = descriptors.tensor_product_problem(module.convolution)
            denominator = float(module.denominator)
        assert fast.folded and denominator > 1  # sevenn's fixed average neighbour count, folded into the paths
        assert fast.problem == descriptors.scaled_problem(reference, 1 / denominator)
        assert any(p.cg.shape == (7, 7, 7) for p in fast.problem.paths)  # l=3 x l=3 -> l=3: odd l1+l2+l3
    finally:
        patch.restore(model)


def test_trained_denominator_stays_a_division():
    """A denominator that trains (sevenn's train_denominator) is not folded into the kernels: it stays a division
    whose gradient flows, with the original's results."""
    model = model_for("7net-0", torch.float64)
    convolutions = [m for m in model.modules() if hasattr(m, "denominator")]
    for conv in convolutions:
        conv.denominator.requires_grad_(True)
    try:
        compare_accelerated(model, [None], only=("water",))
        patch.accelerate(model)
        try:
            fast = [m for m in model.modules() if isinstance(m, patch.FastIrrepsConvolution)]
            assert fast and not any(m.folded for m in fast)
            assert all(m.denominator is conv.denominator for m, conv in zip(fast, convolutions))
        finally:
            patch.restore(model)
    finally:
        for conv in convolutions:
            conv.denominator.requires_grad_(False)


def test_compute_matches_sevennet_calculator():
    from sevenn.calculator import SevenNetCalculator

    model = model_for("7net-0")
    calc = SevenNetCalculator(model, file_type="model_instance", device="cpu")
    for label, atoms in structures().items():
        atoms = atoms.copy()
        atoms.calc = calc
        ours = evaluate(model, atoms)
        n = len(atoms)
        assert abs(atoms.get_potential_energy() - float(ours["energy"])) / n <= 1e-5, label
        assert np.abs(atoms.get_forces() - ours["forces"].numpy()).max() <= 1e-4, label
        assert np.allclose(atoms.get_potential_energies(), ours["energies"].numpy(), atol=1e-5), label
        if atoms.pbc.any():
            assert np.abs(atoms.get_stress(voigt=False) - ours["stress"].numpy()).max() <= 1e-6, label
        else:
            assert ours["stress"] is None


def test_compute_matches_calculator_modal():
    from sevenn.calculator import SevenNetCalculator

    model = model_for("7net-mf-0")
    atoms = structures(si_atoms=8)["si8"]
    energies = {}
    for modal in ("PBE", "R2SCAN"):
        calc = SevenNetCalculator(model, file_type="model_instance", device="cpu", modal=modal)
        atoms.calc = calc
        ours = evaluate(model, atoms, modal=modal)
        assert abs(atoms.get_potential_energy() - float(ours["energy"])) / len(atoms) <= 1e-5
        assert np.abs(atoms.get_forces() - ours["forces"].numpy()).max() <= 1e-4
        energies[modal] = float(ours["energy"])
    assert abs(energies["PBE"] - energies["R2SCAN"]) > 1e-3  # the modal really changes the model


def test_compute_rejects_bad_modal_and_unknown_elements():
    model = model_for("7net-mf-0")
    atoms = structures()["water"]
    with pytest.raises(ValueError, match="R2SCAN"):
        evaluate(model, atoms)
    with pytest.raises(ValueError, match="unknown modal 'HSE'.*PBE"):
        evaluate(model, atoms, modal="HSE")
    exotic = Atoms("Og", positions=[[0, 0, 0]])
    with pytest.raises(ValueError, match="Og.*H He Li"):
        evaluate(model_for("7net-0"), exotic)
    with pytest.raises(ValueError, match="has no modals"):
        evaluate(model_for("7net-0"), atoms, modal="PBE")


def test_isolated_atom_without_edges():
    model = model_for("7net-0")
    atoms = Atoms("Si", positions=[[0, 0, 0]])
    original = evaluate(model, atoms)
    patch.accelerate(model)
    try:
        fast = evaluate(model, atoms)
    finally:
        patch.restore(model)
    assert torch.equal(fast["forces"], torch.zeros(1, 3))
    assert abs(float(fast["energy"]) - float(original["energy"])) <= 1e-5


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, dict(model.named_modules())


def assert_unchanged(model, before):
    state, modules = before
    after = model.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[k], state[k]) and after[k].dtype == state[k].dtype for k in state)
    assert dict(model.named_modules()) == modules  # the very same module objects, in the same places
    assert not patch.is_accelerated(model)


def test_restore_is_exact():
    model = model_for("7net-mf-0")
    before = snapshot(model)
    patch.accelerate(model)
    assert patch.is_accelerated(model)
    accelerated_keys = set(model.state_dict())
    assert accelerated_keys < set(before[0])  # e3nn's constant buffers are gone, every parameter is shared
    assert not any(".convolution._compiled_main" in k for k in accelerated_keys)
    patch.restore(model)
    assert_unchanged(model, before)


def test_restore_follows_dtype_changes_after_acceleration():
    model = copy.deepcopy(model_for("7net-0"))
    patch.accelerate(model)
    model.double()
    patch.restore(model)
    assert {t.dtype for t in model.state_dict().values() if t.is_floating_point()} == {torch.float64}
    assert evaluate(model, structures()["si2"])["energy"].dtype == torch.float64


def test_replacements_take_the_models_mode_and_restore_follows_mode_changes():
    model = copy.deepcopy(model_for("7net-0"))  # loaded in eval mode
    patch.accelerate(model)
    assert not any(module.training for module in model.modules())  # a new module starts in train mode
    model.train()
    patch.restore(model)
    assert all(module.training for module in model.modules())


def test_strict_refuses_unsupported_module_and_changes_nothing():
    model = copy.deepcopy(model_for("7net-0"))
    model._modules["2_convolution"].is_parallel = True  # a LAMMPS-parallel convolution: not supported
    before = snapshot(model)
    with pytest.raises(ValueError, match="2_convolution.*parallel"):
        api.accelerate(model, strict=True)
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match=r"left 1 module\(s\) as e3nn: 2_convolution") as record:
        api.accelerate(model, check=False)
    assert len([w for w in record if "fastmlip" in str(w.message)]) == 1
    assert type(model._modules["2_convolution"]).__name__ == "IrrepsConvolution"
    assert isinstance(model._modules["3_convolution"], patch.FastIrrepsConvolution)
    api.restore(model)
    assert_unchanged(model, before)


def _perturbed(problem):
    first = dataclasses.replace(problem.paths[-1], path_weight=problem.paths[-1].path_weight * 1.01)
    broken = dataclasses.replace(problem, paths=problem.paths[:-1] + (first,), key="")
    return descriptors.with_key(broken)


def test_check_catches_broken_module_and_restores(monkeypatch):
    model = model_for("7net-0")
    before = snapshot(model)
    from fastmlip.patches import sevenn_modules

    real = sevenn_modules.tensor_product_problem
    monkeypatch.setattr(sevenn_modules, "tensor_product_problem", lambda tp: _perturbed(real(tp)))
    with pytest.raises(self_check.AccelerationCheckError, match=r"max\|dF\| = [0-9.e+-]+ eV/A \(tol 1e-04\)"):
        api.accelerate(model)
    assert_unchanged(model, before)


def test_check_reports_deviation_within_tolerance():
    model = model_for("7net-0")
    api.accelerate(model)
    try:
        report = api.last_check(model)
        assert report["dtype"] == "float32" and report["num_edges"] > 0
        assert 0 < report["deviation"]["forces"] <= self_check.tolerances(torch.float32)[1]
    finally:
        api.restore(model)


def test_model_info_and_handles():
    model = model_for("7net-mf-0")
    info = patch.model_info(model)
    assert info["framework"] == "sevenn" and info["cutoff"] == 5.0
    assert info["modals"] == ["R2SCAN", "PBE"] and 14 in info["atomic_numbers"]
    assert patch.handles(model) and not patch.handles(torch.nn.Linear(2, 2))
    assert api.framework_of(model) is patch
    with pytest.raises(TypeError, match="does not know models"):
        api.framework_of(torch.nn.Linear(2, 2))
