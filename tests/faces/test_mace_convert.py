"""``fastmlip convert`` on MACE files, end to end through the CLI (subprocesses), and what the files hold.

A small random MACE (float64, readouts scaled so forces are O(1) eV/A) goes ``--to fast`` and back ``--to e3nn``;
the e3nn-0.4.4 fixture goes ``--to e3nn``. The converted files are opened by mace's own ``MACECalculator`` in a
process where fastmlip cannot be imported, and compared with the original at float64 tolerance (the fixture
with the reference values MACECalculator gave under e3nn 0.4.4). CPU cost: ~60-80 s on 2 cores, mostly the
interpreter start-ups (torch + mace imports) of six subprocesses, run two at a time where independent
(measured 58 s wall, 75 s CPU).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import ase
import numpy as np
import pytest
import torch

pytest.importorskip("mace.modules")

from e3nn import o3  # noqa: E402
from mace.modules import (RealAgnosticInteractionBlock, RealAgnosticResidualInteractionBlock,  # noqa: E402
                          ScaleShiftMACE)

import fastmlip.api as api  # noqa: E402
from fastmlip import convert  # noqa: E402
from fastmlip.patches import self_check  # noqa: E402
from fastmlip.patches import mace as patch  # noqa: E402

FIXTURES = Path(__file__).parent.parent / "fixtures"
FIXTURE_MODEL = FIXTURES / "mace_e3nn044.model"
FIXTURE_REFERENCE = json.loads((FIXTURES / "mace_e3nn044_reference.json").read_text())
R_MAX = 4.0
ELEMENTS = [1, 8]
FP64_ENERGY_PER_ATOM, FP64_FORCE, _ = self_check.tolerances(torch.float64)

# Runs in a process where ``import fastmlip`` fails: prints MACECalculator's energy/forces for each (file, atoms).
CALCULATOR_SCRIPT = """
import json, sys
sys.modules["fastmlip"] = None
import ase
from mace.calculators import MACECalculator
jobs = json.load(open(sys.argv[1]))
results = []
for job in jobs:
    atoms = ase.Atoms(numbers=job["numbers"], positions=job["positions"], cell=job["cell"], pbc=job["pbc"])
    atoms.calc = MACECalculator(model_paths=job["model"], device="cpu", default_dtype="float64")
    results.append({"energy": atoms.get_potential_energy(), "forces": atoms.get_forces().tolist()})
print(json.dumps(results))
"""


def start_cli(*args, cwd) -> subprocess.Popen:
    """``fastmlip convert ARGS --trust`` (the test's own MACE files) started in the background (CI has 2 cores;
    most of a run is imports)."""
    return subprocess.Popen([sys.executable, "-m", "fastmlip.cli", "convert", *map(str, args), "--trust"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """The finished run, with mace's import-time notice about cuequivariance taken out of its output."""
    out, err = process.communicate(timeout=300)
    drop_notice = lambda text: "".join(line for line in text.splitlines(True) if "cuequivariance" not in line)
    return subprocess.CompletedProcess(process.args, process.returncode, drop_notice(out), drop_notice(err))


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_line_failure(result, *fragments):
    assert result.returncode == convert.EXIT_BAD_INPUT, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastmlip convert: error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def structure(seed=0):
    """7 atoms of H and O in a small rattled triclinic cell (periodic images inside the cutoff)."""
    rng = np.random.default_rng(seed)
    cell = np.array([[4.6, 0.0, 0.0], [0.5, 4.4, 0.0], [0.3, 0.4, 4.5]])
    frac = rng.random((7, 3))
    atoms = ase.Atoms(numbers=[8, 1, 1, 8, 1, 1, 8], scaled_positions=frac, cell=cell, pbc=True)
    atoms.positions += rng.normal(scale=0.1, size=atoms.positions.shape)
    return atoms


def fixture_structures():
    return [ase.Atoms(numbers=s["numbers"], positions=s["positions"], cell=s["cell"], pbc=s["pbc"])
            for s in FIXTURE_REFERENCE["structures"]]


def predict(model, atoms):
    return self_check.compute_on_atoms(patch, model, atoms, self_check.neighbor_edges(atoms, patch.model_info(model)["cutoff"]))


def build_small_model():
    """ScaleShiftMACE (plain first block, residual second), max_ell 2, correlation 2, float64, forces ~2 eV/A."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = ScaleShiftMACE(
            r_max=R_MAX, num_bessel=6, num_polynomial_cutoff=5, max_ell=2,
            interaction_cls=RealAgnosticResidualInteractionBlock, interaction_cls_first=RealAgnosticInteractionBlock,
            num_interactions=2, num_elements=len(ELEMENTS), hidden_irreps=o3.Irreps("8x0e+8x1o"),
            MLP_irreps=o3.Irreps("8x0e"), atomic_energies=np.array([-1.5, -4.0]), avg_num_neighbors=8.0,
            atomic_numbers=ELEMENTS, correlation=2, gate=torch.nn.functional.silu, radial_MLP=[16, 16],
            atomic_inter_scale=1.0, atomic_inter_shift=0.1).eval()
    finally:
        torch.set_default_dtype(previous)
    factor = 2.0 / float(predict(model, structure()).get("forces").abs().max())
    with torch.no_grad():
        for readout in model.readouts:
            (readout.linear if hasattr(readout, "linear") else readout.linear_2).weight.mul_(factor)
    return model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """small.model (the original), fast.model (--to fast), e3nn.model (fast.model --to e3nn), fixture_e3nn.model."""
    work = tmp_path_factory.mktemp("mace_convert")
    original = build_small_model()
    torch.save(original, work / "small.model")
    fixture_run = start_cli(FIXTURE_MODEL, "-o", "fixture_e3nn.model", "--to", "e3nn", "--dtype", "float64", cwd=work)
    runs = {"fast": finish(start_cli("small.model", "-o", "fast.model", "--to", "fast", cwd=work))}
    runs["e3nn"] = finish(start_cli("fast.model", "-o", "e3nn.model", "--to", "e3nn", cwd=work))
    runs["fixture"] = finish(fixture_run)
    return work, original, runs


@pytest.fixture(scope="module")
def refusals(work):
    """Two conversions that must fail, run side by side: OUT is a symlink to IN, and IN is a corrupt MACE file."""
    path, _, runs = work
    assert runs["fast"].returncode == 0, runs["fast"].stderr
    before = digest(path / "fast.model")
    os.symlink(path / "fast.model", path / "alias.model")
    bad = path / "bad"
    bad.mkdir()
    _mangled_pickle(path / "small.model", bad / "corrupt.model")
    try:
        started = {"overwrite": start_cli("fast.model", "-o", "alias.model", "--to", "e3nn", cwd=path),
                   "corrupt": start_cli("corrupt.model", "-o", "out.model", "--to", "fast", cwd=bad)}
        results = {name: finish(process) for name, process in started.items()}
    finally:
        os.remove(path / "alias.model")
    return results, before, sorted(os.listdir(bad))


def test_to_fast_prints_its_check_and_writes_a_plain_mace_file(work):
    path, original, runs = work
    assert runs["fast"].returncode == 0, runs["fast"].stderr
    check_line, wrote_line = runs["fast"].stdout.strip().splitlines()
    assert check_line.startswith("check (mace, accelerated vs original): float64")
    assert "|dE|/atom" in check_line and "max|dF|" in check_line and wrote_line == "wrote fast.model (--to fast)"
    written = torch.load(path / "fast.model", weights_only=False)
    assert type(written) is ScaleShiftMACE
    assert not any(type(m).__module__.startswith("fastmlip") for m in written.modules())
    marker = written.__dict__["_fastmlip_file"]
    assert marker["format"] == "fast" and marker["dtype"] == "float64"
    assert marker["check"]["deviation"]["forces"] <= FP64_FORCE
    assert not [name for name in os.listdir(path) if name.startswith(".")]  # no temporary file left behind


def test_fastmlip_load_returns_fast_file_accelerated(work):
    path, original, runs = work
    assert runs["fast"].returncode == 0, runs["fast"].stderr
    model = api.load(path / "fast.model", trusted=True)
    assert patch.is_accelerated(model) and api.last_check(model)["deviation"]["forces"] <= FP64_FORCE
    assert model.__dict__["_fastmlip_file"]["path"] == str(path / "fast.model")
    atoms = structure(seed=1)
    expected, got = predict(original, atoms), predict(model, atoms)
    assert 0.3 < float(expected["forces"].abs().max()) < 30.0
    dev = self_check.deviation(expected, got, len(atoms))
    assert dev["energy_per_atom"] <= FP64_ENERGY_PER_ATOM and dev["forces"] <= FP64_FORCE, dev


def test_back_to_e3nn_gives_the_original_model(work):
    path, original, runs = work
    assert runs["e3nn"].returncode == 0, runs["e3nn"].stderr
    assert runs["e3nn"].stdout.startswith("check (mace, accelerated vs original): float64")
    written = torch.load(path / "e3nn.model", weights_only=False)
    assert "_fastmlip_file" not in written.__dict__
    ours, theirs = written.state_dict(), original.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert not patch.is_accelerated(api.load(path / "e3nn.model", trusted=True))


def test_e3nn044_fixture_becomes_a_plain_e3nn06_file(work):
    path, _, runs = work
    assert runs["fixture"].returncode == 0, runs["fixture"].stderr
    assert "float64" in runs["fixture"].stdout and "(tol 1e-08)" in runs["fixture"].stdout
    with pytest.raises(ValueError):  # the original needs fastmlip's e3nn-0.4 shims
        torch.load(FIXTURE_MODEL, weights_only=False)
    model = torch.load(path / "fixture_e3nn.model", weights_only=False)
    assert next(model.parameters()).dtype == torch.float64
    for atoms, reference in zip(fixture_structures(), FIXTURE_REFERENCE["structures"]):
        got = predict(model, atoms)
        assert abs(float(got["energy"]) - reference["energy"]) / len(atoms) <= FP64_ENERGY_PER_ATOM
        assert np.abs(got["forces"].numpy() - np.array(reference["forces"])).max() <= FP64_FORCE


def test_mace_calculator_runs_converted_files_without_fastmlip(work):
    path, original, runs = work
    assert all(run.returncode == 0 for run in runs.values()), {k: r.stderr for k, r in runs.items()}
    atoms = structure(seed=2)
    jobs = [dict(model=str(path / name), numbers=atoms.numbers.tolist(), positions=atoms.positions.tolist(),
                 cell=atoms.cell.array.tolist(), pbc=atoms.pbc.tolist()) for name in ("fast.model", "e3nn.model")]
    jobs += [dict(model=str(path / "fixture_e3nn.model"), **{k: s[k] for k in ("numbers", "positions", "cell", "pbc")})
             for s in FIXTURE_REFERENCE["structures"]]
    (path / "jobs.json").write_text(json.dumps(jobs))
    result = subprocess.run([sys.executable, "-c", CALCULATOR_SCRIPT, str(path / "jobs.json")], capture_output=True,
                            text=True, timeout=300)
    os.remove(path / "jobs.json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout.strip().splitlines()[-1])
    expected = predict(original, atoms)
    references = [{"energy": expected["energy"], "forces": expected["forces"].numpy()}] * 2
    references += [{"energy": s["energy"], "forces": np.array(s["forces"])} for s in FIXTURE_REFERENCE["structures"]]
    for job, got, reference in zip(jobs, results, references):
        num_atoms = len(job["numbers"])
        assert abs(got["energy"] - float(reference["energy"])) / num_atoms <= FP64_ENERGY_PER_ATOM, job["model"]
        assert np.abs(np.array(got["forces"]) - reference["forces"]).max() <= FP64_FORCE, job["model"]


def test_refuses_to_overwrite_its_input(work, refusals):
    path, _, _ = work
    results, before, _ = refusals
    assert_one_line_failure(results["overwrite"], "refusing to overwrite the input")
    assert digest(path / "fast.model") == before


def _mangled_pickle(source: Path, target: Path) -> None:
    """A zip that still names mace classes but whose data.pkl is cut short: a corrupt MACE file."""
    with zipfile.ZipFile(source) as inside, zipfile.ZipFile(target, "w") as outside:
        for item in inside.infolist():
            data = inside.read(item)
            outside.writestr(item, data[: len(data) // 2] if item.filename.endswith("data.pkl") else data)


def test_corrupt_and_foreign_files_fail_in_one_line(work, refusals, tmp_path):
    results, _, left_in_directory = refusals
    assert_one_line_failure(results["corrupt"], "corrupt.model: could not unpickle the MACE model")
    assert left_in_directory == ["corrupt.model"]
    (tmp_path / "random.model").write_bytes(os.urandom(4096))
    torch.save(torch.nn.Linear(2, 2), tmp_path / "foreign.model")
    reasons = {"random.model": "not a torch.save archive, so not a MACE model file",
               "foreign.model": "not a SevenNet checkpoint .*; its pickle names no mace model class"}
    for name, reason in reasons.items():
        with pytest.raises(ValueError, match=f"{name}: not a model fastmlip can load .*{reason}"):
            convert.convert(str(tmp_path / name), str(tmp_path / "out.model"), "fast", trusted=True)
    assert sorted(os.listdir(tmp_path)) == ["foreign.model", "random.model"]


def test_pickled_accelerated_model_is_refused(work, tmp_path):
    path, _, _ = work
    model = patch.load(path / "small.model", trusted=True)
    patch.accelerate(model)
    torch.save(model, tmp_path / "accelerated.model")
    with pytest.raises(ValueError, match=r"an accelerated model was pickled \(.*FastInteraction.*fastmlip.restore"):
        patch.load(tmp_path / "accelerated.model", trusted=True)
    patch.restore(model)
    with pytest.raises(ValueError, match="the written file needs fastmlip to open"):
        patch.verify_written(tmp_path / "accelerated.model", None, model)


def test_written_file_is_compared_with_the_checked_model(work, tmp_path):
    path, original, _ = work
    reference = patch.load(path / "small.model", trusted=True)
    report = patch.save_converted(path / "small.model", tmp_path / "copy.model", to="e3nn", dtype="float64",
                                  check=None, reference=reference)
    assert report["deviation"] == {"energy_per_atom": 0.0, "forces": 0.0, "stress": 0.0}
    with torch.no_grad():
        reference.interactions[1].linear.weight.mul_(1.0 + 1e-12)
    with pytest.raises(ValueError, match=r"tensors differ from the checked model \(changed: interactions.1.linear"):
        patch.verify_written(tmp_path / "copy.model", None, reference)


def test_failed_write_keeps_the_previous_output_and_leaves_no_temporary(work, tmp_path, monkeypatch):
    path, _, _ = work
    target = tmp_path / "out.model"
    target.write_bytes(b"previous contents")

    def verification_fails(*args, **kwargs):
        raise ValueError("simulated: the written file predicts differently")

    monkeypatch.setattr(patch, "verify_written", verification_fails)
    with pytest.raises(ValueError, match="simulated"):
        convert.convert(str(path / "small.model"), str(target), "fast", trusted=True)
    assert target.read_bytes() == b"previous contents" and os.listdir(tmp_path) == ["out.model"]


def test_fixture_to_fast_in_float32_loads_accelerated_in_float32(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = convert.convert(str(FIXTURE_MODEL), str(tmp_path / "fast.model"), "fast", dtype="float32",
                                 trusted=True)
    assert result["framework"] == "mace" and result["check"]["dtype"] == "float32"
    model = api.load(tmp_path / "fast.model", trusted=True)
    assert patch.is_accelerated(model) and patch.model_info(model)["dtype"] == torch.float32
    e_tol, f_tol, _ = self_check.tolerances(torch.float32)
    for atoms, reference in zip(fixture_structures(), FIXTURE_REFERENCE["structures"]):
        got = predict(model, atoms)
        assert abs(float(got["energy"]) - reference["energy"]) / len(atoms) <= e_tol
        assert np.abs(got["forces"].numpy() - np.array(reference["forces"])).max() <= f_tol
