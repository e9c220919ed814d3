"""accelerate()'s self-check: every species, stress, and edge orders the fast path must sort for itself."""
import pytest
import torch

import fastmlip
from fastmlip.patches import self_check, swaps

sevenn_patch = pytest.importorskip("fastmlip.patches.sevenn")


@pytest.fixture(scope="module")
def sevennet0():
    return fastmlip.load("7net-0", device="cpu", dtype=torch.float64)


def test_probes_hold_every_species_of_a_universal_model(sevennet0):
    species = sevenn_patch.model_info(sevennet0)["atomic_numbers"]
    probes = self_check.probe_structures(species, 5.0)
    assert len(species) == 89 and len(probes) == 3
    assert sorted(set().union(*(set(p.numbers.tolist()) for p in probes))) == sorted(species)
    assert all(len(p) <= self_check.PROBE_ATOMS and p.pbc.all() and p.cell.volume > 0 for p in probes)


def test_check_compares_stress_on_every_species_and_feeds_shuffled_edges(sevennet0, monkeypatch):
    seen = []
    original = self_check.compute_on_atoms

    def spy(patch, model, atoms, edges, **kwargs):
        accelerated = all(isinstance(s.replacement, type(model.get_submodule(s.qualified_name)))
                          for s in swaps.swaps_of(model))
        i, j = edges[0].tolist(), edges[1].tolist()
        seen.append((accelerated, list(zip(i, j)) == sorted(zip(i, j))))
        return original(patch, model, atoms, edges, **kwargs)

    monkeypatch.setattr(self_check, "compute_on_atoms", spy)
    model = fastmlip.accelerate(sevennet0, check=False)
    try:
        report = self_check.check(model, sevenn_patch)
    finally:
        fastmlip.restore(model)
    assert report["species"] == 89 and report["probes"] == 3
    assert "stress" in report["deviation"] and report["deviation"]["stress"] <= report["tolerance"][2]
    assert (True, False) in seen  # the accelerated model saw unsorted edges
    assert (True, True) in seen  # ... and neighbour-list order
    assert "max|dstress|" in self_check.describe(report)


def test_stress_beyond_its_tolerance_fails_the_check():
    tolerance = self_check.tolerances(torch.float32)
    good = {"energy_per_atom": 0.0, "forces": 0.0, "stress": tolerance[2] / 2}
    assert self_check.within(good, tolerance)
    assert not self_check.within(dict(good, stress=tolerance[2] * 2), tolerance)
