"""``fastmlip convert --to exported`` and loading its file: the accelerated model as a torch.export program that
runs without its framework, with the accelerated model's results.

CPU cost (~1 min on 2 cores): one conversion of 7net-0 in float64 (load, accelerate, check, export, re-read,
compare), a MACE-medium-like export, a fresh interpreter that loads the file, and small structures.
"""
import os
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

pytest.importorskip("sevenn")

from ase import Atoms  # noqa: E402
from ase.build import bulk, molecule  # noqa: E402

import fastmlip  # noqa: E402
import fastmlip.api as api  # noqa: E402
from fastmlip import convert  # noqa: E402
from fastmlip.descriptors.serialize import problems_from_json, problems_to_json  # noqa: E402
from fastmlip.patches import exported, self_check  # noqa: E402
from fastmlip.patches import sevenn as sevenn_patch  # noqa: E402
from fastmlip.patches.files import UntrustedFileError, file_sha256  # noqa: E402

TOLERANCE = self_check.tolerances(torch.float64)


@pytest.fixture(scope="module")
def sevenn_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("exported") / "7net-0.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = convert.convert("7net-0", str(path), "exported", dtype="float64")
    assert result["framework"] == "sevenn" and result["check"] is not None
    return path


def structures():
    """Sizes other than the export's example (8 atoms): the program takes any atom and edge count."""
    si = bulk("Si", "diamond", a=5.43, cubic=True).repeat((2, 1, 1))
    si.rattle(0.05, seed=3)
    water = molecule("H2O")
    water.rattle(0.02, seed=4)
    lone = Atoms("O", positions=[[0, 0, 0]])  # one atom, no edges: the program gets a spare atom and edges
    apart = Atoms("OH", positions=[[0, 0, 0], [0, 0, 9.0]])  # two atoms beyond the cutoff
    return {"si16": si, "water": water, "lone": lone, "apart": apart}


def assert_same(want, got, num_atoms):
    deviation = self_check.deviation(want, got, num_atoms)
    assert self_check.within(deviation, TOLERANCE), deviation
    assert (want["stress"] is None) == (got["stress"] is None)


def test_exported_sevenn_equals_the_accelerated_model(sevenn_file):
    program = api.load(sevenn_file, trusted=True)
    assert exported.handles(program) and exported.model_info(program)["source_framework"] == "sevenn"
    model = api.accelerate(sevenn_patch.load("7net-0", dtype=torch.float64), check=False)
    for label, atoms in structures().items():
        edges = self_check.neighbor_edges(atoms, model.cutoff)
        want = self_check.compute_on_atoms(sevenn_patch, model, atoms, edges)
        got = self_check.compute_on_atoms(exported, program, atoms, edges)
        assert_same(want, got, len(atoms))
        assert got["forces"].shape == (len(atoms), 3), label


def test_a_fresh_process_runs_it_without_the_framework(sevenn_file):
    """The point of the format: the calculator in a new interpreter imports neither sevenn nor e3nn.o3, nor
    torch._dynamo and sympy (seconds each on a GPU node: torch.export.load and custom_op's guard import them)."""
    script = (
        "import sys, fastmlip\nfrom ase.build import bulk\n"
        f"calc = fastmlip.Calculator({str(sevenn_file)!r}, device='cpu', trusted=True)\n"
        "atoms = bulk('Si', 'diamond', a=5.43, cubic=True)\natoms.rattle(0.05, seed=1)\natoms.calc = calc\n"
        "print(repr(atoms.get_potential_energy()),\n"
        "      [m for m in ('sevenn', 'e3nn.o3', 'mace', 'torch._dynamo', 'sympy') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=sevenn_file.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    energy, loaded = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert loaded == "[]"
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=1)
    atoms.calc = fastmlip.Calculator(str(sevenn_file), device="cpu", trusted=True)
    assert float(energy) == atoms.get_potential_energy()


def rewritten(path, target, graph_text=None):
    """A copy of the archive at ``target`` whose graph file is replaced by ``graph_text`` (None: left out)."""
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(target, "w") as copy:
        for entry in source.infolist():
            if entry.filename.endswith(exported.GRAPH_FILE):
                if graph_text is not None:
                    copy.writestr(entry, graph_text)
            else:
                copy.writestr(entry, source.read(entry))
    return target


def test_the_graph_file_loads_what_torch_export_loads(sevenn_file, tmp_path, monkeypatch):
    """The archive's graph file (milliseconds to load) and torch.export's copy (seconds) are one program: the
    same results bit for bit; a file without the graph file (older fastmlip) loads through torch.export."""
    atoms = structures()["si16"]
    edges = self_check.neighbor_edges(atoms, 5.0)
    through_export = api.load(rewritten(sevenn_file, tmp_path / "plain.pt2"), trusted=True)
    want = self_check.compute_on_atoms(exported, through_export, atoms, edges)
    monkeypatch.setattr(torch.export, "load", lambda *args, **kwargs: pytest.fail("torch.export.load called"))
    program = api.load(sevenn_file, trusted=True)
    got = self_check.compute_on_atoms(exported, program, atoms, edges)
    for key in ("energy", "energies", "forces", "stress"):
        assert torch.equal(want[key], got[key]), key

    with zipfile.ZipFile(sevenn_file) as archive:
        text = archive.read(next(n for n in archive.namelist() if n.endswith(exported.GRAPH_FILE))).decode()
    assert '"target": "fastmlip.conv_fwd.default"' in text
    tampered = rewritten(sevenn_file, tmp_path / "tampered.pt2",
                         text.replace('"fastmlip.conv_fwd.default"', '"builtins.exec"', 1))
    with pytest.raises(ValueError, match="tampered.pt2: unreadable program graph.*unknown operator 'builtins.exec'"):
        api.load(tampered, trusted=True)
    truncated = rewritten(sevenn_file, tmp_path / "truncated.pt2", text[: len(text) // 2])
    with pytest.raises(ValueError, match="truncated.pt2: unreadable program graph"):
        api.load(truncated, trusted=True)


def sort_key_dtypes(graph) -> set:
    """The dtypes the edge sorts of a program's graph take their keys in (the casts a few nodes above each
    argsort)."""
    dtypes = set()
    for node in graph.nodes:
        if node.op == "call_function" and "argsort" in str(node.target):
            frontier = list(node.all_input_nodes)
            for _ in range(3):
                dtypes |= {n.args[1] for n in frontier if str(n.target) == "aten.to.dtype"}
                frontier = [parent for n in frontier for parent in n.all_input_nodes]
    return dtypes


def test_exported_edge_sorts_take_int32_keys(sevenn_file):
    """A symbolic atom count with a mask once took int64 keys: twice the radix passes of int32 (16 sort launches a
    216-atom step on an H200). The program's atom range keeps 2 x atoms + 1 within int32."""
    program = api.load(sevenn_file, trusted=True)
    assert sort_key_dtypes(program.program.graph) == {torch.int32}
    assert 2 * exported.MAX_ATOMS + 1 <= torch.iinfo(torch.int32).max


def test_a_format_this_fastmlip_does_not_read_is_refused(sevenn_file, tmp_path):
    import json

    target = tmp_path / "future.pt2"
    with zipfile.ZipFile(sevenn_file) as source, zipfile.ZipFile(target, "w") as copy:
        for entry in source.infolist():
            data = source.read(entry)
            if entry.filename.endswith(exported.META_FILE):
                data = json.dumps({**json.loads(data), "version": 99})
            copy.writestr(entry, data)
    with pytest.raises(ValueError, match=r"format version 99, this fastmlip reads 1, 2, 3; export it again"):
        api.load(target, trusted=True)


def test_forces_reuse_the_edges_the_program_sorted(sevenn_file, monkeypatch):
    """The program sorts the edges once (two argsorts, by receiver then sender) and returns them: the forces take
    those, with the same bits as from edges sorted again outside, which a step no longer does (4 radix-sort
    launches, 2 searchsorted and their gathers a step on a GPU)."""
    program = api.load(sevenn_file, trusted=True)
    assert program.meta["receivers"] == "edge_i" and program.meta["version"] == exported.VERSION
    argsorts = [n for n in program.program.graph.nodes if n.op == "call_function" and "argsort" in str(n.target)]
    assert len(argsorts) == 2
    atoms = structures()["si16"]
    edges = self_check.neighbor_edges(atoms, program.cutoff)
    reused = self_check.compute_on_atoms(exported, program, atoms, edges)["forces"]

    class FormatOne(torch.nn.Module):  # a program of format 1: energies only, the edges sorted outside
        def __init__(self, program):
            super().__init__()
            self.inner = program

        def forward(self, *inputs):
            return self.inner(*inputs)[:2]

    program.program = FormatOne(program.program)
    outside = self_check.compute_on_atoms(exported, program, atoms, edges)["forces"]
    program.program = program.program.inner
    monkeypatch.setattr(exported, "sort_edges", lambda *args: pytest.fail("edges sorted outside the program"))
    again = self_check.compute_on_atoms(exported, program, atoms, edges)["forces"]
    assert torch.equal(reused, outside) and torch.equal(again, reused) and reused.abs().max() > 0.05


def test_multi_fidelity_sevenn_exports_for_one_modal(tmp_path):
    """7net-MF-0 appends its modality to the nodes of its modal linears; sevenn sizes that by ``len()`` of a
    tensor, which fixed the program's atom count and failed the export. The patch's own version keeps it symbolic:
    the program equals the accelerated model on sizes other than the export's (convert checks on its probes)."""
    path = tmp_path / "mf.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert.convert("7net-mf-0", str(path), "exported", dtype="float64", modal="PBE")
    program = api.load(path, trusted=True)
    assert program.meta["modal"] == "PBE"
    model = api.accelerate(sevenn_patch.load("7net-mf-0", dtype=torch.float64), check=False)
    atoms = structures()["si16"]
    edges = self_check.neighbor_edges(atoms, model.cutoff)
    want = self_check.compute_on_atoms(sevenn_patch, model, atoms, edges, modal="PBE")
    assert_same(want, self_check.compute_on_atoms(exported, program, atoms, edges), len(atoms))


def test_exported_mace_equals_the_accelerated_model(tmp_path):
    from helpers.mace_models import build_model, periodic_structure

    from fastmlip.patches import mace as mace_patch

    model = api.accelerate(build_model("mp0_medium"), check=False)
    path = tmp_path / "mace.pt2"
    meta = exported.export(mace_patch, model, path)
    assert meta["framework"] == "mace" and meta["dtype"] == "float64"
    program = exported.load(path, trusted=True)
    for atoms in (periodic_structure(seed=5), molecule("CH3OH")):
        edges = self_check.neighbor_edges(atoms, model.r_max.item())
        want = self_check.compute_on_atoms(mace_patch, model, atoms, edges)
        got = self_check.compute_on_atoms(exported, program, atoms, edges)
        assert_same(want, got, len(atoms))
    # Its first input is the species index, found once per numbers tensor and handed to the species-indexed
    # operators as it is (casts to int64 return it), so the kernels' sorting kept on it serves every step.
    assert meta["species_table"] == model.atomic_numbers.tolist()
    numbers = torch.tensor(periodic_structure(seed=5).numbers)
    assert exported._program_atoms(program, numbers) is exported._program_atoms(program, numbers)
    graph = program.program.graph
    species_input = next(node for node in graph.nodes if node.op == "placeholder")
    species_args = [node.args[1] for node in graph.nodes if node.op == "call_function"
                    and str(node.target).startswith(("fastmlip.species_linear", "fastmlip.symmetric_contraction"))]
    assert species_args
    for arg in species_args:
        while arg is not species_input:
            assert str(arg.target) == "aten.to.dtype" and arg.args[1] == torch.int64, arg
            arg = arg.args[0]


def test_trust_dtype_species_and_foreign_files(sevenn_file, tmp_path):
    with pytest.raises(UntrustedFileError, match="pickled tensors"):
        api.load(sevenn_file)
    assert exported.handles(api.load(sevenn_file, sha256=file_sha256(sevenn_file)))
    with pytest.raises(ValueError, match="exported in float64; export it again for"):
        api.load(sevenn_file, dtype="float32", trusted=True)
    program = api.load(sevenn_file, trusted=True)
    assert program.to("cpu") is program and program.to(torch.float64) is program
    with pytest.raises(ValueError, match="an exported model stays on cpu in float64"):
        program.to(torch.float32)
    with pytest.raises(ValueError, match="element\\(s\\) Og unknown to this exported model"):
        atoms = Atoms("SiOg", positions=[[0, 0, 0], [0, 0, 2.0]])
        self_check.compute_on_atoms(exported, program, atoms, self_check.neighbor_edges(atoms, 5.0))
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("data/fastmlip.json", '{"format": "something else"}')
    with pytest.raises(ValueError, match="does not describe an exported fastmlip model"):
        exported.read_checkpoint(foreign)
    with pytest.raises(ValueError, match="not a model fastmlip can load|does not describe"):
        api.load(foreign, trusted=True)
    with pytest.raises(ValueError, match="already a program; export its framework's file instead"):
        convert.convert(str(sevenn_file), str(tmp_path / "again.pt2"), "exported", trusted=True)
    with pytest.raises(ValueError, match="written from its framework's file, not converted again"):
        convert.convert(str(sevenn_file), str(tmp_path / "again.pth"), "fast", trusted=True)
    assert not os.path.exists(tmp_path / "again.pt2") and not os.path.exists(tmp_path / "again.pth")


def test_problem_descriptions_round_trip_and_refuse_tampering():
    from fastmlip.ops import registry

    model = api.accelerate(sevenn_patch.load("7net-0"), check=False)
    self_check.compute_on_atoms(sevenn_patch, model, bulk("Si"), self_check.neighbor_edges(bulk("Si"), 5.0))
    problems = list(registry._PROBLEMS.values())
    back = problems_from_json(problems_to_json(problems))
    assert back == problems and [p.key for p in back] == [p.key for p in problems]
    activations = [r.act for p in back if hasattr(p, "scalar_runs") for r in p.scalar_runs]
    x = torch.linspace(-2, 2, 5, dtype=torch.float64)
    originals = [r.act for p in problems if hasattr(p, "scalar_runs") for r in p.scalar_runs]
    assert activations and all(torch.equal(a(x), b(x)) for a, b in zip(activations, originals))
    text = problems_to_json(problems[:1])
    key = problems[0].key
    with pytest.raises(ValueError, match="does not match its description"):
        problems_from_json(text.replace(key, key[:-1] + ("0" if key[-1] != "0" else "1")))
    with pytest.raises(ValueError, match="unknown problem part 'Popen'"):
        problems_from_json('{"k": {"type": "Popen", "fields": {}}}')


def test_simulate_runs_the_exported_model(sevenn_file):
    """The MD engine takes the exported model as it takes the framework's: the same trajectory."""
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.03, seed=6)
    runs = [fastmlip.simulate(atoms, model, ensemble="nvt", steps=4, temperature=300, dtype="float64",
                              device="cpu", interval=2)
            for model in (api.load(sevenn_file, trusted=True), sevenn_patch.load("7net-0", dtype=torch.float64))]
    assert runs[0].atoms.positions == pytest.approx(runs[1].atoms.positions, abs=1e-10)
    assert runs[0].thermo["epot"] == pytest.approx(runs[1].thermo["epot"], abs=1e-9)


@pytest.mark.gpu
@pytest.mark.parametrize("export_device", ["cpu", "cuda"])
def test_exported_model_on_the_gpu_in_graph_replays(tmp_path, export_device):
    """Exported in float32 on the CPU (the graph's device moved at loading) or on the GPU (its kernels' dispatch
    traced: no guard on the symbolic edge count): steps replayed as CUDA graphs give the accelerated framework
    model's eager energies and forces to the fp32 tolerances."""
    import numpy as np

    path = tmp_path / "7net-0-fp32.pt2"
    convert.convert("7net-0", str(path), "exported", dtype="float32", device=export_device)
    graphed = fastmlip.Calculator(str(path), device="cuda", trusted=True, cuda_graph=True)
    eager = fastmlip.Calculator("7net-0", device="cuda", dtype="float32", cuda_graph=False)
    results = []
    for calc in (graphed, eager):
        atoms = bulk("Si", "diamond", a=5.43, cubic=True).repeat(3)
        atoms.rattle(0.1, seed=1)
        atoms.calc = calc
        rng = np.random.default_rng(0)
        energies, forces = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a failed capture warns and falls back: not here
            for _ in range(8):
                atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
                energies.append(atoms.get_potential_energy())
                forces.append(atoms.get_forces())
        results.append((np.array(energies), np.array(forces)))
    assert graphed.cuda_graph and graphed.replays.step is not None and graphed.graph_captures >= 1
    energy_tolerance, force_tolerance, _ = self_check.tolerances(torch.float32)
    (e_graph, f_graph), (e_eager, f_eager) = results
    assert np.abs(e_graph - e_eager).max() / 216 <= energy_tolerance
    assert np.abs(f_graph - f_eager).max() <= force_tolerance
    assert np.abs(f_eager).max() > 0.05
