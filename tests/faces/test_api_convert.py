"""fastmlip.load/accelerate/restore by name and path, and the ``fastmlip convert`` CLI end to end (subprocesses).

CPU cost (~1.3 min of CPU time on 2 cores): two real conversions of 7net-0 (each loads, accelerates, checks and re-reads the
model), a handful of CLI calls that fail fast, and three in-process model builds.
"""
import hashlib
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("sevenn")

from ase.build import bulk  # noqa: E402

import fastmlip.api as api  # noqa: E402
from fastmlip import convert  # noqa: E402
from fastmlip.patches import self_check  # noqa: E402
from fastmlip.patches import sevenn as patch  # noqa: E402

NAME = "7net-0"


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastmlip.cli", "convert", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def digest(path):
    with open(path, "rb") as stream:
        return hashlib.sha256(stream.read()).hexdigest()


def assert_one_line_failure(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[0].startswith("fastmlip convert: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""


def silicon():
    atoms = bulk("Si", "diamond", a=5.43)
    atoms.rattle(0.03, seed=3)
    return atoms


def predict(model, atoms):
    return self_check.compute_on_atoms(patch, model, atoms, self_check.neighbor_edges(atoms, model.cutoff))


@pytest.fixture(scope="module")
def reference():
    if NAME not in patch.pretrained_checkpoints():
        pytest.skip(f"{NAME} is not installed with sevenn")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = api.load(NAME)
    return model, predict(model, silicon())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """7net-0 converted --to fast, and that file converted back --to e3nn (checked in float64)."""
    if NAME not in patch.pretrained_checkpoints():
        pytest.skip(f"{NAME} is not installed with sevenn")
    work = tmp_path_factory.mktemp("convert")
    fast = cli(NAME, "-o", "fast.pth", "--to", "fast", cwd=work)
    e3nn = cli("fast.pth", "-o", "e3nn.pth", "--to", "e3nn", "--dtype", "float64", cwd=work)
    return work, fast, e3nn


def test_load_by_name_and_path(reference):
    model, _ = reference
    assert patch.handles(model) and not patch.is_accelerated(model) and not model.training
    by_path = patch.resolve(NAME)
    assert os.path.isfile(by_path) and api.patch_for_file(by_path) is patch
    assert api.patch_for_file("SevenNet-0") is patch  # sevenn's own spelling, case-insensitive


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"not a known model name \(known: .*7net-0.*7net-mf-0"):
        api.load("7net-does-not-exist")


def test_accelerate_returns_same_object_and_restore(reference):
    model, expected = reference
    assert api.accelerate(model) is model
    try:
        assert patch.is_accelerated(model) and api.last_check(model)["deviation"]["forces"] <= 1e-4
        fast = predict(model, silicon())
        assert self_check.deviation(expected, fast, 2)["forces"] <= 1e-4
    finally:
        assert api.restore(model) is model
    assert not patch.is_accelerated(model) and api.last_check(model) is None


def test_convert_to_fast_reports_check_and_loads_accelerated(converted, reference):
    work, fast, _ = converted
    assert fast.returncode == 0, fast.stderr
    assert "check (sevenn, accelerated vs original): float32" in fast.stdout
    assert "|dE|/atom" in fast.stdout and "max|dF|" in fast.stdout
    raw = torch.load(work / "fast.pth", weights_only=False)
    assert raw["fastmlip"]["format"] == "fast" and raw["fastmlip"]["dtype"] == "float32"
    assert raw["fastmlip"]["check"]["deviation"]["forces"] <= 1e-4
    original = torch.load(patch.resolve(NAME), weights_only=False, map_location="cpu")
    assert all(torch.equal(raw["model_state_dict"][k], v) for k, v in original["model_state_dict"].items())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = api.load(work / "fast.pth")
    assert patch.is_accelerated(model)
    _, expected = reference
    dev = self_check.deviation(expected, predict(model, silicon()), 2)
    assert dev["energy_per_atom"] <= 1e-5 and dev["forces"] <= 1e-4


def test_converted_file_still_runs_in_sevennet_calculator(converted, reference):
    from sevenn.calculator import SevenNetCalculator

    work, fast, _ = converted
    assert fast.returncode == 0, fast.stderr
    atoms = silicon()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        atoms.calc = SevenNetCalculator(str(work / "fast.pth"), device="cpu")
    _, expected = reference
    assert abs(atoms.get_potential_energy() - float(expected["energy"])) / len(atoms) <= 1e-5
    assert np.abs(atoms.get_forces() - expected["forces"].numpy()).max() <= 1e-4


def test_convert_back_to_e3nn(converted, reference):
    work, _, e3nn = converted
    assert e3nn.returncode == 0, e3nn.stderr
    assert "float64" in e3nn.stdout and "(tol 1e-08)" in e3nn.stdout
    raw = torch.load(work / "e3nn.pth", weights_only=False)
    assert "fastmlip" not in raw
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = api.load(work / "e3nn.pth")
    assert not patch.is_accelerated(model)
    model_state, reference_state = model.state_dict(), reference[0].state_dict()
    assert list(model_state) == list(reference_state)
    assert all(torch.equal(model_state[k], reference_state[k]) for k in reference_state)


def test_convert_refuses_to_overwrite_input(converted):
    work, fast, _ = converted
    assert fast.returncode == 0, fast.stderr
    before = digest(work / "fast.pth")
    assert_one_line_failure(cli("fast.pth", "-o", "fast.pth", "--to", "e3nn", cwd=work), "refusing to overwrite")
    os.symlink(work / "fast.pth", work / "alias.pth")
    os.link(work / "fast.pth", work / "hardlink.pth")
    assert_one_line_failure(cli("fast.pth", "-o", "alias.pth", "--to", "e3nn", cwd=work), "refusing")
    assert_one_line_failure(cli("alias.pth", "-o", "hardlink.pth", "--to", "e3nn", cwd=work), "refusing")
    assert digest(work / "fast.pth") == before


def test_bad_inputs_fail_in_one_line(tmp_path):
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pth")
    (tmp_path / "notes.txt").write_text("not a model\n")
    cases = {"random.pth": "not a torch.save archive", "foreign.pth": "with a config and a model_state_dict",
             "notes.txt": "not a torch.save archive"}  # told apart without unpickling
    for name, reason in cases.items():
        assert_one_line_failure(cli(name, "-o", "out.pth", "--to", "fast", cwd=tmp_path), name, reason)
    assert_one_line_failure(cli(NAME, "-o", "out.pth", "--to", "fast", "--device", "bogus", cwd=tmp_path),
                            "unknown device 'bogus'")
    assert not (tmp_path / "out.pth").exists()
    assert sorted(os.listdir(tmp_path)) == ["foreign.pth", "notes.txt", "random.pth"]


def test_api_load_bad_files_raise_one_line(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list.pth: not a model fastmlip can load \(not a SevenNet checkpoint"):
        api.load(tmp_path / "list.pth")
    with pytest.raises(ValueError, match="is a directory"):
        api.load(tmp_path)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.pth"
    target.write_bytes(b"previous contents")

    def failing_writer(temp_path):
        with open(temp_path, "wb") as stream:
            stream.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        convert.write_atomically(str(target), failing_writer)
    assert target.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["out.pth"]
    convert.write_atomically(str(target), lambda temp: open(temp, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.pth"]
    umask = os.umask(0o022)
    try:
        convert.write_atomically(str(target), lambda temp: open(temp, "wb").write(b"newer"))
    finally:
        os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o644  # an ordinary file, not mkstemp's private 0600


def test_mace_files_without_mace_patch_get_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "model.model").write_bytes(b"\x80\x04not really")
    monkeypatch.setattr(api, "FRAMEWORK_MODULES", ("fastmlip.patches.sevenn", "fastmlip.patches.no_such_mace"))
    with pytest.raises(ValueError, match="looks like a MACE model, but fastmlip.patches.mace is not installed"):
        api.patch_for_file(tmp_path / "model.model")
