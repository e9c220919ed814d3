"""``fastmlip md`` end to end in subprocesses on CPU (~1 min: each run loads SevenNet-0 once)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sevenn")


def run_md(*arguments, cwd, env=None):
    command = [sys.executable, "-m", "fastmlip.cli", "md", "--no-progress", "--threads", "1", *arguments]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_nve_writes_trajectory_and_plot_with_small_drift(tmp_path):
    from ase.io import read

    result = run_md("--demo", "si", "--repeat", "1", "--steps", "12", "--interval", "4", "--timestep", "1",
                    "--traj", "out.extxyz", "--plot", "out.png", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frames = read(tmp_path / "out.extxyz", index=":")
    assert len(frames) == 4  # steps 0, 4, 8, 12
    assert all(len(frame) == 8 and frame.get_chemical_formula() == "Si8" for frame in frames)
    assert not np.allclose(frames[0].positions, frames[-1].positions)
    assert np.isfinite(frames[-1].get_forces()).all()
    assert (tmp_path / "out.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    drift_line = next(line for line in result.stdout.splitlines() if line.startswith("energy drift:"))
    excursion = float(drift_line.split("max |E(t) - E(0)| ")[1].split()[0])
    assert excursion < 1e-3  # eV/atom over 12 fs of velocity Verlet at 1 fs
    timing_line = next(line for line in result.stdout.splitlines() if line.startswith("timing:"))
    assert "12 steps" in timing_line and "ns/day" in timing_line
    setup_line = next(line for line in result.stdout.splitlines() if line.startswith("setup "))
    assert re.search(r"model [\d.]+ s \(imports [\d.]+, build [\d.]+, to cpu [\d.]+\)", setup_line), setup_line


def test_nvt_langevin_with_traj_format(tmp_path):
    from ase.io import read

    result = run_md("--demo", "cu", "--repeat", "1", "--steps", "4", "--interval", "2", "--ensemble", "nvt",
                    "--temperature", "500", "--traj", "out.traj", "--dtype", "float64", "--accelerate", "yes",
                    "--steps-per-replay", "2", "--pairs", "graph", "--no-program-cache", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frames = read(tmp_path / "out.traj", index=":")
    assert len(frames) == 3 and frames[0].get_chemical_formula() == "Cu4"
    assert "temperature: mean" in result.stdout and "float64" in result.stdout
    assert "replays: 2 steps per replay: 2 replays" in result.stdout, result.stdout


def test_npt_with_csvr_and_a_restart_then_the_ase_engine(tmp_path):
    """The device engine's NPT (stochastic cell rescaling around CSVR) resumed from its restart file; then the
    ASE loop, which --engine ase keeps."""
    from ase.io import read

    first = run_md("--demo", "si", "--steps", "4", "--interval", "2", "--ensemble", "npt", "--pressure", "1.0",
                   "--thermostat", "csvr", "--restart", "run.restart", "--traj", "out.extxyz", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run_md("--demo", "si", "--steps", "8", "--interval", "2", "--ensemble", "npt", "--pressure", "1.0",
                     "--thermostat", "csvr", "--restart", "run.restart", "--traj", "out.extxyz", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "pressure: mean" in resumed.stdout and "4 steps" in resumed.stdout
    frames = read(tmp_path / "out.extxyz", index=":")
    assert len(frames) == 5 and frames[0].cell.volume != frames[-1].cell.volume  # steps 0..8, the cell moved
    ase_loop = run_md("--demo", "si", "--steps", "3", "--engine", "ase", cwd=tmp_path)
    assert ase_loop.returncode == 0 and "median" in ase_loop.stdout, ase_loop.stderr


def final_energy(result) -> float:
    return float(re.search(r"^final: E_pot (\S+) eV/atom", result.stdout, re.M).group(1))


def test_a_second_run_starts_from_the_exported_copy_the_first_kept(tmp_path):
    """An accelerated run keeps an exported copy of its model in fastmlip's cache; the next run of the same model,
    dtype and modal starts from it (no framework) and computes the same trajectory; a damaged copy is passed
    over and written again; --no-program-cache neither uses nor keeps one."""
    env = dict(os.environ, FASTMLIP_CACHE=str(tmp_path / "cache"))
    arguments = ("--demo", "si", "--repeat", "1", "--steps", "4", "--dtype", "float64", "--accelerate", "yes")
    first = run_md(*arguments, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "kept an exported copy for faster starts" in first.stdout, first.stdout
    copies = list((tmp_path / "cache" / "programs").glob("*/model.pt2"))
    assert len(copies) == 1 and (copies[0].parent / "manifest.json").is_file()
    info = subprocess.run([sys.executable, "-m", "fastmlip.cli", "info", "--json"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert json.loads(info.stdout)["cache"]["exported_copies"] == 1, info.stderr
    second = run_md(*arguments, cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert "sevenn, its exported copy in fastmlip's cache" in second.stdout and "kept" not in second.stdout
    assert abs(final_energy(second) - final_energy(first)) < 1e-9

    copies[0].write_bytes(copies[0].read_bytes()[:1000])
    third = run_md(*arguments, cwd=tmp_path, env=env)
    assert third.returncode == 0, third.stderr
    assert "exported copy in fastmlip's cache" not in third.stdout and "kept an exported copy" in third.stdout
    assert abs(final_energy(third) - final_energy(first)) < 1e-9
    opted_out = run_md(*arguments, "--no-program-cache", cwd=tmp_path, env=env)
    assert opted_out.returncode == 0 and "exported copy" not in opted_out.stdout, opted_out.stderr


def test_a_cache_that_cannot_be_written_keeps_no_copy_and_fails_nothing(tmp_path, monkeypatch):
    """Keeping the copy comes after the run's last step: where the cache cannot take it, the run says why in one
    line and ends as it would have."""
    import torch

    from fastmlip import api, program_cache
    from fastmlip.patches import sevenn as sevenn_patch

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache would be")
    monkeypatch.setenv("FASTMLIP_CACHE", str(blocker))
    model = api.accelerate(sevenn_patch.load("7net-0", dtype=torch.float64), check=False)
    path, reason = program_cache.store(sevenn_patch.resolve("7net-0"), model, "float64", None)
    assert path is None and "\n" not in reason and "not-a-folder" in reason
    assert program_cache.count() == 0


def test_a_model_that_cannot_be_exported_is_remembered(tmp_path, monkeypatch):
    """An export that fails (say, a framework's module that fixes the atom count) is tried once: the cache
    remembers why, so later runs go through the framework without trying again; an out-of-memory failure is not
    remembered."""
    import argparse

    import torch
    from ase.build import bulk

    from fastmlip import api, convert, md, program_cache
    from fastmlip.kernels.launch import use_settings
    from fastmlip.patches import sevenn as sevenn_patch

    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path / "cache"))
    source = sevenn_patch.resolve("7net-0")
    model = api.accelerate(sevenn_patch.load(source, dtype=torch.float64), check=False)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(convert, "export_checked", out_of_memory)
    assert program_cache.store(source, model, "float64", None)[0] is None
    assert program_cache.lookup(source, "float64", None, "cpu") == (None, None)

    def specialised(*args):
        raise ValueError("Constraints violated (atoms)! ... specialized it to be a constant (8)")

    monkeypatch.setattr(convert, "export_checked", specialised)
    path, reason = program_cache.store(source, model, "float64", None)
    assert path is None and reason.startswith("Constraints violated")
    copy, manifest = program_cache.lookup(source, "float64", None, "cpu")
    assert copy is None and manifest["unexportable"] == reason
    assert program_cache.lookup(source, "float64", None, "cuda") == (None, None)  # a copy per device type
    parser = argparse.ArgumentParser()
    md.add_arguments(parser)
    args = parser.parse_args(["--dtype", "float64"])
    assert md.kept_program(args, bulk("Si", "diamond", a=5.43), torch.device("cpu"), 0.5) == (None, None)
    with use_settings(radial_table="lengths"):  # a copy with radial tables is another copy
        assert program_cache.lookup(source, "float64", None, "cpu") == (None, None)


def test_a_new_copy_replaces_those_of_the_file_s_earlier_content(tmp_path):
    """Copies of the same file, dtype and modal made from another content of the file go when a new one is kept;
    a copy another fastmlip made of the same content (another environment sharing the cache) stays."""
    import json

    from fastmlip import program_cache

    def entry(name, **facts):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "manifest.json").write_text(json.dumps({"source": "/m.model", "dtype": "float32", "modal": None,
                                                          **facts}))
        return folder

    kept = entry("new", source_sha256="b")
    earlier = entry("earlier", source_sha256="a")
    elsewhere = entry("elsewhere", source_sha256="b")
    other_dtype = entry("float64", source_sha256="a", dtype="float64")
    program_cache._remove_replaced(kept, json.loads((kept / "manifest.json").read_text()))
    assert kept.is_dir() and not earlier.exists() and elsewhere.is_dir() and other_dtype.is_dir()


def test_copies_follow_the_trust_the_source_needs(tmp_path, monkeypatch):
    """A copy is kept or used for checkpoints shipped with their package or files the user trusts, never for an
    exported file itself; a system whose radial weights would not fit whole runs from the framework's file."""
    import shutil

    import torch
    from ase.build import bulk

    from fastmlip import memory, program_cache
    from fastmlip.patches import sevenn as sevenn_patch
    from fastmlip.patches.files import UntrustedFileError, file_sha256

    shipped = sevenn_patch.resolve("7net-0")
    assert program_cache.source_of("7net-0", trusted=False) == shipped
    mine = tmp_path / "mine.pth"
    shutil.copy(shipped, mine)
    assert program_cache.source_of(str(mine), trusted=False) is None
    assert program_cache.source_of(str(mine), trusted=True) == str(mine)
    assert program_cache.source_of(str(mine), trusted=False, sha256=file_sha256(mine)) == str(mine)
    with pytest.raises(UntrustedFileError):
        program_cache.source_of(str(mine), trusted=False, sha256="0" * 64)
    assert program_cache.source_of(str(tmp_path / "missing.pth"), trusted=True) is None

    manifest = {"cutoff": 5.0, "conv_widths": [1000, 3000]}
    crystal = bulk("Si", "diamond", a=5.43, cubic=True).repeat(3)
    gpu = torch.device("cuda")
    monkeypatch.setattr(memory, "free_bytes", lambda device: 80 * 2 ** 30)
    assert program_cache.fits_whole(manifest, crystal, 0.5, torch.float32, gpu)
    monkeypatch.setattr(memory, "free_bytes", lambda device: 2 ** 20)
    assert not program_cache.fits_whole(manifest, crystal, 0.5, torch.float32, gpu)
    assert program_cache.fits_whole(manifest, crystal, 0.5, torch.float32, torch.device("cpu"))


FILES = {"notes.txt": "not a structure\n", "unknown.xyz": "2\n\nSi 0 0 0\nXx 1 1 1\n", "empty.xyz": ""}


@pytest.mark.parametrize("arguments, message", [
    (["missing.xyz"], "fastmlip md: error: structure file 'missing.xyz' not found"),
    (["--steps", "-1"], "fastmlip md: error: --steps must be >= 0, got -1"),
    (["--traj", "out.pdb"], "fastmlip md: error: --traj must end in one of .extxyz, .xyz, .traj, got 'out.pdb'"),
    (["--device", "bogus"], "fastmlip md: error: unknown device 'bogus': use auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:7"], "fastmlip md: error: device 'cuda:7' asked for, but this machine has"),
    (["notes.txt"], "fastmlip md: error: notes.txt: cannot read a structure from it"),
    (["unknown.xyz"], "fastmlip md: error: unknown.xyz: unknown chemical symbol 'Xx'"),
    (["empty.xyz"], "fastmlip md: error: empty.xyz: cannot read a structure from it"),
    (["--ensemble", "npx"], "fastmlip md: error: argument --ensemble: invalid choice: 'npx'"),
    (["--ensemble", "npt"], "fastmlip md: error: --ensemble npt needs --pressure (GPa)"),
    (["--engine", "ase", "--thermostat", "csvr"], "fastmlip md: error: --engine ase runs NVE and Langevin NVT"),
    (["--ensemble", "npt", "--pressure", "1", "--steps-per-replay", "4"],
     "fastmlip md: error: --steps-per-replay must be >= 1, and > 1 only with the device engine under NVE or NVT"),
])
def test_errors_exit_nonzero_with_one_line(tmp_path, arguments, message):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    result = run_md(*arguments, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert not (tmp_path / "out.pdb").exists()


@pytest.mark.parametrize("demo, formula, lattice", [("si", "Si", "diamond"), ("cu", "Cu", "fcc"), ("c", "C", "diamond"),
                                                    ("nacl", "NaCl", "rocksalt")])
def test_demo_crystals_are_ase_bulk_cells(demo, formula, lattice):
    """The demo cells are written out (ase.build is slow to import) and must stay ase.build.bulk's cubic cells."""
    from types import SimpleNamespace

    from ase.build import bulk

    from fastmlip.md import DEMOS, build_structure

    args = SimpleNamespace(structure=None, demo=demo, repeat=2, seed=3)
    expected = bulk(formula, lattice, a=DEMOS[demo][1], cubic=True).repeat((2, 2, 2))
    expected.rattle(0.02, seed=3)
    atoms = build_structure(args, device=None)
    assert list(atoms.symbols) == list(expected.symbols) and atoms.pbc.all()
    np.testing.assert_array_equal(atoms.cell[:], expected.cell[:])
    np.testing.assert_allclose(atoms.positions, expected.positions, rtol=0, atol=1e-12)


@pytest.mark.parametrize("temperature_K", [0.0, 300.0])
def test_thermalize_draws_what_ase_draws(temperature_K):
    """Written out (ase.md is slow to import), it must give ASE's momenta for the same generator, constraints
    included."""
    from ase.build import bulk
    from ase.constraints import FixAtoms
    from ase.md.velocitydistribution import Stationary, thermalize_momenta

    from fastmlip.md import thermalize

    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True).repeat((2, 2, 2))
    atoms.set_constraint(FixAtoms(indices=[0, 5]))
    expected = atoms.copy()
    thermalize_momenta(expected, temperature_K, rng=np.random.default_rng(7))
    Stationary(expected)
    thermalize(atoms, temperature_K, np.random.default_rng(7))
    np.testing.assert_allclose(atoms.get_momenta(), expected.get_momenta(), rtol=1e-14, atol=1e-15)


def test_setup_line_names_an_exported_files_kernels():
    """An exported file comes accelerated: the setup line says what loading it spent on its kernels (the cold
    start's largest part on a GPU), inside the model's share; an accelerated one lists them after the surgery."""
    from types import SimpleNamespace

    from fastmlip.kernels.precompile import Report
    from fastmlip.md import describe_setup
    from fastmlip.patches import files

    report = Report("sm_90", kernels=42, cached=42, launchers_cached=12, seconds=0.1)
    model = SimpleNamespace()
    model.__dict__.update({files.LOAD_TIMING_ATTRIBUTE: {"imports": 0.0, "build": 0.1, "to_device": 0.0},
                           "_fastmlip_kernels": report, "_fastmlip_timing": {"kernels": 0.9}})
    exported = SimpleNamespace(model=model, setup_seconds={"load": 1.2}, device=SimpleNamespace(type="cuda"))
    assert describe_setup(exported, 0.2) == (
        "model 1.2 s (imports 0.0, build 0.1, to cuda 0.0; kernels 0.9 s (42 kernels for sm_90: 42 from the cache, "
        "12 launch stubs from the cache in 0.1 s)); first step 0.2 s")

    model.__dict__["_fastmlip_timing"] = {"surgery": 0.0, "kernels": 0.9, "check": 0.4}
    accelerated = SimpleNamespace(model=model, setup_seconds={"load": 1.2, "accelerate": 1.3},
                                  device=SimpleNamespace(type="cuda"))
    assert describe_setup(accelerated, 0.2).endswith(
        "surgery 0.0 s; kernels 0.9 s (42 kernels for sm_90: 42 from the cache, 12 launch stubs from the cache in "
        "0.1 s); self-check 0.4 s; first step 0.2 s")
