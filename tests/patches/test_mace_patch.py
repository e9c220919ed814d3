"""MACE patch: accelerated vs original, compute() vs MACECalculator, heads, restore, strict mode, e3nn-0.4.4 files.

Models: :mod:`helpers.mace_models` (the published MACE-MP-0 and MACE-OFF23 hyperparameters at full width, forces
scaled to O(1) eV/A, so agreement is checked on real numbers, not on rounding noise).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import ase
import numpy as np
import pytest
import torch

pytest.importorskip("mace.modules")

from mace.calculators import MACECalculator  # noqa: E402
from mace.modules import RealAgnosticResidualNonLinearInteractionBlock  # noqa: E402

from fastmlip.patches import e3nn_compat, self_check  # noqa: E402
from fastmlip.patches import mace as patch  # noqa: E402
from helpers.mace_models import CONFIGS, R_MAX, build_model, periodic_structure  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures"
FIXTURE_MODEL = FIXTURES / "mace_e3nn044.model"
FIXTURE_REFERENCE = FIXTURES / "mace_e3nn044_reference.json"


@pytest.fixture(autouse=True)
def _float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def molecule():
    return ase.Atoms("CH2O", positions=[[0, 0, 0], [1.09, 0, 0], [-0.3, 1.0, 0.1], [-0.5, -0.8, 0.6]], pbc=False)


def run(model, atoms, *, shuffle_seed=None, modal=None):
    edges = self_check.neighbor_edges(atoms, R_MAX)
    if shuffle_seed is not None:
        order = torch.randperm(edges[0].numel(), generator=torch.Generator().manual_seed(shuffle_seed))
        edges = tuple(t[order] for t in edges)
    return self_check.compute_on_atoms(patch, model, atoms, edges, modal=modal)


def assert_agree(reference, candidate, num_atoms, dtype):
    e_tol, f_tol, _ = self_check.tolerances(dtype)
    dev = self_check.deviation(reference, candidate, num_atoms)
    assert dev["energy_per_atom"] <= e_tol and dev["forces"] <= f_tol, dev
    if reference["stress"] is not None:
        assert dev["stress"] <= f_tol, dev
    assert torch.allclose(reference["energies"], candidate["energies"], atol=e_tol * 10, rtol=0)
    return dev


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_accelerated_matches_original(config, dtype):
    model = build_model(config).to(dtype)
    atoms = periodic_structure(seed=1)
    original = run(model, atoms, shuffle_seed=3)
    assert 0.3 < float(original["forces"].abs().max()) < 30.0
    assert patch.accelerate(model) == []
    assert patch.is_accelerated(model)
    fast_types = {type(m).__name__ for m in model.modules()}
    assert {"FastInteraction", "FastSymmetricContraction", "FastLinear", "FastSphericalHarmonics"} <= fast_types
    accelerated = run(model, atoms)
    assert accelerated["energy"].dtype == dtype and accelerated["forces"].dtype == dtype
    dev = assert_agree(original, accelerated, len(atoms), dtype)
    print(f"{config} {dtype}: {dev}")


def test_average_neighbour_count_folded_only_when_constant():
    """A float avg_num_neighbors goes into the conv's path weights; one held as a tensor stays a division. Both
    reproduce the original."""
    for as_tensor in (False, True):
        model = build_model("mp0_medium")
        if as_tensor:
            for block in model.interactions:
                block.avg_num_neighbors = torch.tensor(block.avg_num_neighbors, dtype=torch.float64)
        atoms = periodic_structure(seed=4)
        original = run(model, atoms)
        assert patch.accelerate(model) == []
        blocks = [m for m in model.modules() if type(m).__name__ == "FastInteraction"]
        assert blocks and all(block.folded_average != as_tensor for block in blocks)
        assert_agree(original, run(model, atoms), len(atoms), torch.float64)


def test_unsorted_edges_give_the_same_result():
    """Edge order must not matter (a past bug elsewhere: unsorted edges gave energies off 2.5x)."""
    model = build_model("mp0_medium")
    atoms = periodic_structure(seed=2)
    original = run(model, atoms)
    patch.accelerate(model)
    for seed in (0, 1, 2):
        assert_agree(original, run(model, atoms, shuffle_seed=seed), len(atoms), torch.float64)
    reversed_edges = tuple(t.flip(0) for t in self_check.neighbor_edges(atoms, R_MAX))
    assert_agree(original, self_check.compute_on_atoms(patch, model, atoms, reversed_edges), len(atoms), torch.float64)


@pytest.mark.parametrize("config, dtype", [("off_like", "float64"), ("off_like", "float32"), ("mp0_small", "float64")])
def test_compute_matches_mace_calculator(config, dtype):
    """fastmlip's forward (e0 and ScaleShiftMACE's scale and shift kept per structure) against MACE's own."""
    model = build_model(config).to(getattr(torch, dtype))
    calc = MACECalculator(models=model, device="cpu", default_dtype=dtype)
    tol = 1e-10 if dtype == "float64" else 2e-5
    for atoms in (periodic_structure(seed=4), molecule()):
        ours = run(model, atoms, shuffle_seed=5)
        theirs = atoms.copy()
        theirs.calc = calc
        assert abs(float(ours["energy"]) - theirs.get_potential_energy()) <= tol * len(atoms)
        np.testing.assert_allclose(ours["forces"].numpy(), theirs.get_forces(), atol=tol, rtol=0)
        np.testing.assert_allclose(ours["energies"].numpy(), theirs.get_potential_energies(), atol=tol, rtol=0)
        if atoms.pbc.any():
            voigt = ase.stress.full_3x3_to_voigt_6_stress(ours["stress"].numpy())
            np.testing.assert_allclose(voigt, theirs.get_stress(), atol=tol, rtol=0)
        else:
            assert ours["stress"] is None


def test_multi_head_model():
    heads = ["pbe", "r2scan", "Default"]
    model = build_model("mp0_small", heads=heads)
    assert patch.model_info(model)["modals"] == heads
    atoms = periodic_structure(seed=6)
    originals = {h: run(model, atoms, modal=h, shuffle_seed=7) for h in heads}
    assert abs(float(originals["pbe"]["energy"] - originals["r2scan"]["energy"])) > 1e-3
    assert torch.equal(run(model, atoms, modal=None)["energy"], run(model, atoms, modal="Default")["energy"])
    patch.accelerate(model)
    for head in heads:
        assert_agree(originals[head], run(model, atoms, modal=head), len(atoms), torch.float64)
    with pytest.raises(ValueError, match=r"head 'hse' unknown.*\['pbe', 'r2scan', 'Default'\]"):
        run(model, atoms, modal="hse")


def test_restore_is_bit_identical_and_state_dict_unchanged_while_accelerated():
    model = build_model("mp0_large")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = {name: type(m) for name, m in model.named_modules()}
    patch.accelerate(model)
    during = model.state_dict()
    assert list(during) == list(before)
    assert all(torch.equal(during[k], before[k]) for k in before)
    patch.restore(model)
    assert not patch.is_accelerated(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {name: type(m) for name, m in model.named_modules()} == modules_before


def test_strict_mode_and_unsupported_blocks():
    model = build_model("mp0_small", interaction=RealAgnosticResidualNonLinearInteractionBlock)
    atoms = periodic_structure(seed=8)
    original = run(model, atoms, shuffle_seed=9)
    types_before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"strict=True.*interactions\.1: RealAgnosticResidualNonLinear"):
        patch.accelerate(model, strict=True)
    assert {name: type(m) for name, m in model.named_modules()} == types_before
    assert not patch.is_accelerated(model)

    from fastmlip import api

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        api.accelerate(model, check=True)
    left = [w for w in caught if "fastmlip left" in str(w.message)]
    assert len(left) == 1 and "interactions.1 (RealAgnosticResidualNonLinearInteractionBlock)" in str(left[0].message)
    assert type(model.interactions[0]).__name__ == "FastInteraction"
    assert type(model.interactions[1]) is RealAgnosticResidualNonLinearInteractionBlock
    assert_agree(original, run(model, atoms), len(atoms), torch.float64)


def test_unknown_element_and_bad_files(tmp_path):
    model = build_model("mp0_small")
    atoms = periodic_structure()
    atoms.numbers[2] = 14
    with pytest.raises(ValueError, match=r"Si unknown to this MACE model; it knows: H C O"):
        run(model, atoms)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    assert not patch.can_load(junk)
    with pytest.raises(ValueError, match="not a MACE model file"):
        patch.load(junk, trusted=True)
    other = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2), other)
    assert not patch.can_load(other)


def _fixture_atoms(entry):
    return ase.Atoms(numbers=entry["numbers"], positions=entry["positions"], cell=entry["cell"], pbc=entry["pbc"])


def _check_reference(model, reference, tol_energy, tol_force):
    cutoff = patch.model_info(model)["cutoff"]
    worst = 0.0
    for entry in reference["structures"]:
        atoms = _fixture_atoms(entry)
        out = self_check.compute_on_atoms(patch, model, atoms, self_check.neighbor_edges(atoms, cutoff))
        worst = max(worst, abs(float(out["energy"]) - entry["energy"]) / len(atoms),
                    float(np.abs(out["forces"].numpy() - np.array(entry["forces"])).max()))
        assert abs(float(out["energy"]) - entry["energy"]) <= tol_energy * len(atoms), entry["name"]
        np.testing.assert_allclose(out["forces"].numpy(), entry["forces"], atol=tol_force, rtol=0)
        if entry["stress_voigt"] is not None:
            voigt = ase.stress.full_3x3_to_voigt_6_stress(out["stress"].numpy())
            np.testing.assert_allclose(voigt, entry["stress_voigt"], atol=tol_force, rtol=0)
    return worst


def test_e3nn044_model_loads_and_reproduces_its_reference():
    reference = json.loads(FIXTURE_REFERENCE.read_text())
    assert reference["e3nn_version"].startswith("0.4")
    assert patch.can_load(FIXTURE_MODEL)
    model = patch.load(FIXTURE_MODEL, dtype=torch.float64, trusted=True)
    assert patch.handles(model) and type(model.interactions[1].conv_tp).__name__ == "TensorProduct"
    max_force = max(np.abs(np.array(s["forces"])).max() for s in reference["structures"])
    assert 0.3 < max_force < 30.0
    _check_reference(model, reference, 1e-9, 1e-9)
    patch.accelerate(model, strict=True)
    _check_reference(model, reference, 1e-9, 1e-8)
    patch.restore(model)
    _check_reference(model, reference, 1e-9, 1e-9)


def test_e3nn044_constants_are_what_keeps_predictions(monkeypatch):
    """The fixture has odd l1+l2+l3 paths: with the installed e3nn's wigner_3j instead of the saved ones the
    predictions move, so the reference test above really checks that the 0.4.4 constants were kept."""
    with pytest.raises(ValueError):
        torch.load(FIXTURE_MODEL, weights_only=False)
    reference = json.loads(FIXTURE_REFERENCE.read_text())
    model = patch.load(FIXTURE_MODEL, trusted=True)
    saved = dict(model.interactions[1].conv_tp._compiled_main_left_right.named_buffers())
    assert (1, 2, 2) in {tuple(int(s) for s in k.split("_")[2:]) for k in saved}
    monkeypatch.setattr(e3nn_compat, "_transplant_constants", lambda *args: None)
    rebuilt = patch.load(FIXTURE_MODEL, dtype=torch.float64, trusted=True)
    with pytest.raises(AssertionError):
        _check_reference(rebuilt, reference, 1e-6, 1e-6)


def test_fixture_through_the_api_with_self_check():
    from fastmlip import api

    model = api.load(str(FIXTURE_MODEL), dtype=torch.float64, trusted=True)
    assert api.framework_of(model) is patch and patch.model_info(model)["dtype"] == torch.float64
    api.accelerate(model, check=True, strict=True)
    report = api.last_check(model)
    assert report["deviation"]["forces"] <= self_check.tolerances(torch.float64)[1]
    api.restore(model)
    assert not patch.is_accelerated(model)


def test_two_models_in_two_threads_never_mix_their_results():
    """Accelerated models evaluated from two threads at once, switching threads every microsecond: each result
    equals the one computed alone (per-step caches live on each call's own tensors, not in module state)."""
    import sys
    import threading

    cases = []
    for seed, repeat in ((0, (1, 1, 1)), (1, (2, 1, 1))):
        model = build_model("mp0_small")
        patch.accelerate(model)
        atoms = periodic_structure(seed).repeat(repeat)  # 8 and 16 atoms: a mixed-up species index shows
        cases.append((model, atoms, float(run(model, atoms)["energy"])))
    failures = []

    def evaluate(model, atoms, expected):
        for _ in range(20):
            try:
                energy = float(run(model, atoms)["energy"])
            except Exception as exc:  # noqa: BLE001 - a mixed-up cache can also fail on shapes
                failures.append(repr(exc))
                continue
            if energy != expected:
                failures.append(f"{energy} instead of {expected}")

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=evaluate, args=case) for case in cases]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch)
    assert failures == []


def test_per_step_caches_belong_to_the_calls_tensors():
    """Species index, species chunks and sorted edges are kept on the input tensors: racing two threads through
    them never hands one thread the other's result, and nothing keeps a call's tensors alive after it."""
    import gc
    import sys
    import threading
    import weakref

    from fastmlip.kernels.launch import species_chunks
    from fastmlip.patches.mace_modules import sorted_edges, species_of

    def inputs(n, seed):
        generator = torch.Generator().manual_seed(seed)
        node_attrs = torch.eye(3)[torch.randint(0, 3, (n,), generator=generator)]
        edge_index = torch.randint(0, n, (2, 4 * n), generator=generator)
        return node_attrs, edge_index

    wrong = []

    def race(node_attrs, edge_index):
        expected = node_attrs.argmax(-1)
        for _ in range(1000):
            species = species_of(node_attrs)
            if not torch.equal(species, expected) or sorted_edges(edge_index, len(node_attrs)).src.numel() != \
                    edge_index.shape[1] or species_chunks(species, 3, 4)[0].numel() != len(node_attrs):
                wrong.append(1)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=race, args=inputs(n, n)) for n in (5, 9)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch)
    assert not wrong

    node_attrs, edge_index = inputs(6, 0)
    species_chunks(species_of(node_attrs), 3, 4)
    sorted_edges(edge_index, 6)
    alive = [weakref.ref(node_attrs), weakref.ref(edge_index)]
    del node_attrs, edge_index
    gc.collect()
    assert [ref() for ref in alive] == [None, None]
