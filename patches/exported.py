"""Models written by ``fastmlip convert --to exported``: an accelerated model as a ``torch.export`` program, loaded
without its framework.

Why: importing a framework costs most of a warm start (sevenn pulls e3nn and, through it, torch._dynamo; mace
pulls cuequivariance when it is installed: 4-16 s on the lent H200s), and rebuilding its e3nn modules costs more.
The program holds the accelerated model's per-atom energies as a function of the edges given as vectors
(``energy_module`` of the framework's patch), the operators it calls are fastmlip's own, and the problems those
operators name travel beside it as JSON (:mod:`fastmlip.descriptors.serialize`). Forces, stress and the edge
gradient come from differentiating the program here, as :mod:`fastmlip.patches.mace_forward` does for MACE.

The program is read from the archive's graph file (:mod:`fastmlip.patches.exported_graph`: milliseconds, where
``torch.export.load`` takes seconds); files without one load through ``torch.export``. The archive holds pickled
tensors (``torch.export.load`` unpickles them), so a file is read only when trusted, as a MACE ``.model`` file is.
This module is a framework patch (:class:`fastmlip.patches.framework.Framework`) whose models come accelerated:
there is nothing to swap, restore or check against.
"""
from __future__ import annotations

import json
import os
import time
import warnings
import zipfile
from typing import Optional

import torch

from fastmlip.graph import SortedEdges, edge_stress, edge_vectors, sort_edges
from fastmlip.memo import derived_with
from fastmlip.ops.derivatives import gradient_or_zeros
from fastmlip.ops.node_sums import node_difference

from . import e3nn_modules, exported_graph, files, self_check

FRAMEWORK = "exported"
META_FILE = "fastmlip.json"  # an extra file of the torch.export archive
GRAPH_FILE = "fastmlip_graph.json"  # another: the program as exported_graph reads it (absent: torch.export.load)
FORMAT = "fastmlip-exported"
# 2: the program also returns the edges its convolutions sorted (forces reuse them); 3: where its file names a
# species table (MACE), its first input is each atom's index into that table instead of the atomic number
VERSION = 3
READS = (1, 2, 3)
MIN_SIZE = 2  # the program's smallest atom and edge counts (torch.export specialises sizes 0 and 1)
# The program's largest atom count: its edge sorts' keys (2 x atom + absent) then fit int32, half the radix passes
# of int64 keys (16 sort launches a 216-atom step with int64, on an H200).
MAX_ATOMS = (torch.iinfo(torch.int32).max - 1) // 2


class ExportedModel(torch.nn.Module):
    """The loaded program on ``device`` and what the file says about it (``meta``: source framework, cutoff,
    species, dtype, modal, message-passing layers)."""

    def __init__(self, program: torch.nn.Module, meta: dict, device: torch.device):
        super().__init__()
        self.program = program
        self.meta = meta
        self.device = device
        table = meta.get("species_table")  # on the device once: looked up without a copy (a captured step has none)
        self.species_table = None if table is None else torch.tensor(table, device=device)

    @property
    def cutoff(self) -> float:
        return float(self.meta["cutoff"])

    def to(self, *args, **kwargs):
        """Itself where nothing changes; the program's device and dtype are fixed where it was loaded (its graph
        names them), so another one is refused: load the file again with ``fastmlip.load(path, device=...)``."""
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        here, exported_dtype = _placement(self)
        if (device is not None and torch.device(device).type != here.type) or \
                (dtype is not None and dtype != exported_dtype):
            raise ValueError(f"an exported model stays on {here} in {self.meta['dtype']}: load the file again "
                             "with fastmlip.load(path, device=...) (another dtype: export it again)")
        return self

    def train(self, mode: bool = True):
        """An exported program has no training mode (torch.export refuses to switch one): eval() and train()
        leave it as it is."""
        self.training = bool(mode)
        return self


# --- writing -------------------------------------------------------------------------------------------------------


def export(patch, model, path, *, modal=None) -> dict:
    """Write the accelerated ``model`` (of ``patch``'s framework) to ``path``; returns the metadata written."""
    from torch.export import Dim

    from fastmlip.descriptors.serialize import problems_to_json
    from fastmlip.ops import registry

    info = patch.model_info(model)
    module = patch.energy_module(model, modal)
    atoms = self_check.probe_structure(info["atomic_numbers"], info["cutoff"], num_atoms=8)
    i, j, shifts = (t.to(info["device"]) for t in self_check.neighbor_edges(atoms, info["cutoff"]))
    positions = torch.as_tensor(atoms.positions, device=info["device"])
    vectors = edge_vectors(positions, torch.as_tensor(atoms.cell.array, device=info["device"]), i, j, shifts)
    numbers = torch.as_tensor(atoms.numbers, dtype=torch.long, device=info["device"])
    table = module.species_table() if hasattr(module, "species_table") else None
    first = numbers if table is None else _species_index(numbers, torch.tensor(table))
    example = (first, i, j, vectors.to(info["dtype"]), torch.ones(i.numel(), dtype=info["dtype"], device=i.device))
    atoms_dim = Dim("atoms", min=MIN_SIZE, max=MAX_ATOMS)
    edges_dim = Dim("edges", min=MIN_SIZE)
    shapes = ({0: atoms_dim}, {0: edges_dim}, {0: edges_dim}, {0: edges_dim}, {0: edges_dim})
    with e3nn_modules.tables_for_tracing():  # radial tables (FASTMLIP_RADIAL_TABLE) become the program's constants
        module(*(t.clone() for t in example))  # clones: what a pass keeps on its inputs must not be saved with them
        program = torch.export.export(module, example, dynamic_shapes=shapes, strict=False)
    calls = [node for node in program.graph.nodes if node.op == "call_function"]
    keys = sorted({arg for node in calls if str(node.target).startswith("fastmlip.")
                   for arg in node.args if isinstance(arg, str)})
    tables = sum(str(node.target) in ("fastmlip.radial_table.default", "fastmlip.table_conv.default")
                 for node in calls)
    meta = {"format": FORMAT, "version": VERSION, "framework": info["framework"], "cutoff": info["cutoff"],
            "atomic_numbers": list(info["atomic_numbers"]), "dtype": str(info["dtype"]).replace("torch.", ""),
            "modal": modal, "message_passing_layers": patch.message_passing_layers(model),
            "receivers": module.RECEIVERS, **({} if table is None else {"species_table": table}),
            "radial_tables": tables,
            "torch": torch.__version__, "problems": problems_to_json([registry.lookup(key) for key in keys])}
    extra = {META_FILE: json.dumps(meta)}
    try:
        extra[GRAPH_FILE] = exported_graph.to_json(program)
    except exported_graph.Unsupported as exc:
        warnings.warn(f"the exported program loads through torch.export only (seconds slower): {exc}", stacklevel=2)
    with open(path, "wb") as stream:  # a stream: torch.export names files by their .pt2 suffix, temp files have none
        torch.export.save(program, stream, extra_files=extra)
    return meta


# --- files ---------------------------------------------------------------------------------------------------------


def _archive_entry(archive: zipfile.ZipFile, name: str) -> Optional[str]:
    return next((entry for entry in archive.namelist() if entry.rsplit("/", 1)[-1] == name), None)


def _read_program(path: str, device: torch.device) -> torch.nn.Module:
    """The program on ``device``: from its graph file when the archive has one (a fraction of a second), else
    through ``torch.export.load`` (it imports torch._dynamo and sympy: seconds)."""
    with zipfile.ZipFile(path) as archive:
        entry = _archive_entry(archive, GRAPH_FILE)
        text = archive.read(entry).decode() if entry is not None else None
    if text is not None:
        try:
            return exported_graph.from_json(text, device)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
    from torch.export.passes import move_to_device_pass

    with open(path, "rb") as stream:
        program = torch.export.load(stream)
    if device.type != "cpu":
        program = move_to_device_pass(program, device)
    return program.module()


def can_load(path) -> bool:
    text = os.fspath(path)
    if not os.path.isfile(text) or not zipfile.is_zipfile(text):
        return False
    with zipfile.ZipFile(text) as archive:
        return _archive_entry(archive, META_FILE) is not None


def read_checkpoint(path) -> dict:
    """The file's metadata, read without unpickling; ValueError when it is not an exported model this version
    of fastmlip reads."""
    text = os.fspath(path)
    if not os.path.isfile(text) or not zipfile.is_zipfile(text):
        raise ValueError(f"{text}: not an exported fastmlip model (not a zip archive)")
    with zipfile.ZipFile(text) as archive:
        entry = _archive_entry(archive, META_FILE)
        if entry is None:
            raise ValueError(f"{text}: not an exported fastmlip model (no {META_FILE})")
        try:
            meta = json.loads(archive.read(entry))
        except (ValueError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{text}: unreadable {META_FILE} ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{text}: {META_FILE} does not describe an exported fastmlip model")
    if meta.get("version") not in READS:
        raise ValueError(f"{text}: exported model format version {meta.get('version')}, this fastmlip reads "
                         f"{', '.join(map(str, READS))}; export it again")
    return meta


def pretrained_checkpoints() -> dict:
    return {}


def resolve(path_or_name) -> Optional[str]:
    text = os.fspath(path_or_name)
    return text if os.path.isfile(text) else None


def _register_operators() -> None:
    """Import every module of :mod:`fastmlip.ops` (each ``fastmlip::`` operator is defined in one), so a program's
    calls resolve."""
    import importlib
    import pkgutil

    import fastmlip.ops

    for module in pkgutil.iter_modules(fastmlip.ops.__path__):
        importlib.import_module(f"fastmlip.ops.{module.name}")


def load(path, device=None, dtype=None, trusted: bool = False) -> ExportedModel:
    """The exported model on ``device`` (its problems registered for this process); ``dtype`` must be the one it
    was exported in. Read only when ``trusted`` (the archive holds pickles)."""
    from fastmlip.descriptors.serialize import problems_from_json
    from fastmlip.ops import registry

    text = os.fspath(path)
    meta = read_checkpoint(text)
    if not trusted:
        files.refuse_untrusted(text, "an exported model holds pickled tensors")
    if dtype is not None and str(dtype).replace("torch.", "") != meta["dtype"]:
        raise ValueError(f"{text}: exported in {meta['dtype']}; export it again for {dtype}")
    start = time.perf_counter()
    _register_operators()
    for problem in problems_from_json(meta.pop("problems")):
        registry.register(problem)
    imported = time.perf_counter()
    device = torch.device(device or "cpu")
    model = ExportedModel(_read_program(text, device), meta, device)
    built = time.perf_counter()
    for param in model.parameters():
        param.requires_grad_(False)
    model.__dict__["_fastmlip_file"] = {"format": FRAMEWORK, "dtype": meta["dtype"], "path": os.path.abspath(text)}
    model.__dict__[files.LOAD_TIMING_ATTRIBUTE] = files.load_timing(start, imported, built)
    return model


def save_converted(source_path, target_path, *, to: str, dtype: str, check: Optional[dict], reference,
                   trusted: bool = False):
    raise ValueError(f"{source_path}: an exported model is written from its framework's file, not converted again")


# --- models --------------------------------------------------------------------------------------------------------


def handles(model) -> bool:
    return isinstance(model, ExportedModel)


def _placement(model) -> tuple:
    return model.device, getattr(torch, model.meta["dtype"])


def model_info(model) -> dict:
    device, dtype = _placement(model)
    return {"framework": FRAMEWORK, "source_framework": model.meta["framework"], "cutoff": model.cutoff,
            "atomic_numbers": sorted(model.meta["atomic_numbers"]), "modals": [], "dtype": dtype, "device": device}


def message_passing_layers(model) -> int:
    return int(model.meta["message_passing_layers"])


def _check_species(model, numbers: torch.Tensor) -> None:
    from ase.data import chemical_symbols

    unknown = sorted(set(numbers.tolist()) - set(model.meta["atomic_numbers"]))
    if unknown:
        names = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in unknown)
        known = " ".join(chemical_symbols[z] for z in sorted(model.meta["atomic_numbers"]))
        raise ValueError(f"element(s) {names} unknown to this exported model; it knows: {known}")


def _check_modal(model, modal) -> None:
    if modal is not None and modal != model.meta["modal"]:
        raise ValueError(f"this model was exported for modal {model.meta['modal']!r}, not {modal!r}")


def _padded(model, numbers, edge_i, edge_j, vectors, mask):
    """The program's inputs with at least ``MIN_SIZE`` atoms and edges: a spare atom (of a known species, sliced
    off the energies) and placeholder self-edges of unit length (masked: they contribute exactly zero)."""
    extra_atoms = max(0, MIN_SIZE - numbers.numel())
    if extra_atoms:
        spare = torch.full((extra_atoms,), model.meta["atomic_numbers"][0], dtype=numbers.dtype, device=numbers.device)
        numbers = torch.cat([numbers, spare])
    extra_edges = max(0, MIN_SIZE - edge_i.numel())
    if extra_edges:
        none = torch.zeros(extra_edges, dtype=edge_i.dtype, device=edge_i.device)
        unit = vectors.new_zeros(extra_edges, 3)
        unit[:, 0] = 1.0
        edge_i, edge_j = torch.cat([edge_i, none]), torch.cat([edge_j, none])
        vectors, mask = torch.cat([vectors, unit]), torch.cat([mask, mask.new_zeros(extra_edges)])
    return numbers, edge_i, edge_j, vectors, mask


def _species_index(numbers: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Each atom's index into ``table`` (atomic numbers; the atoms' species are known to be in it)."""
    return (numbers.unsqueeze(-1) == table.to(numbers.device)).long().argmax(-1)


def _program_atoms(model, numbers: torch.Tensor) -> torch.Tensor:
    """The program's first input: the atomic numbers, or where its file names a species table each atom's index
    into it, made once per numbers tensor (:mod:`fastmlip.memo`): the same index tensor every step of a structure,
    on which the species-indexed kernels keep their sorting (8 launches a MACE step otherwise)."""
    if model.species_table is None:
        return numbers
    return derived_with(numbers, "species_index", (model.species_table,),
                        lambda: _species_index(numbers, model.species_table))


def _energies(model, numbers, edge_i, edge_j, vectors, edge_mask) -> tuple:
    """(energies [N], differentiated [N], the edges the program sorted or None) of the program for the real atoms;
    ``vectors`` requires grad. The sorted edges come from programs of format 2 on, for inputs they took unpadded."""
    n, e = numbers.numel(), edge_i.numel()
    mask = vectors.new_ones(e) if edge_mask is None else edge_mask.to(vectors.dtype)
    inputs = _padded(model, numbers, edge_i, edge_j, vectors, mask)
    energies, differentiated, *sorted_tensors = model.program(_program_atoms(model, inputs[0]), *inputs[1:])
    if inputs[0].numel() == n and inputs[1].numel() == e:  # no slice: its backward adds a zero fill and a copy
        return energies, differentiated, SortedEdges(*sorted_tensors) if sorted_tensors else None
    return energies[:n], differentiated[:n], None


def _forces(model, gradient, edges, numbers, edge_i, edge_j, edge_mask):
    """Forces by :func:`fastmlip.ops.node_difference` (sum of the gradient over a node's edges i -> j as i minus
    that as j, in a fixed order), on the edges the program sorted where it returned them, else sorted here."""
    if edges is None:
        edges = sort_edges(edge_i, edge_j, numbers.numel(), edge_mask)
    elif model.meta.get("receivers") == "edge_i":  # sorted by i: i is the side its "dst" lists
        return node_difference(gradient, edges, edge_j, edge_i, plus="dst")
    return node_difference(gradient, edges, edge_i, edge_j, plus="src")


def compute(model, positions, cell, pbc, numbers, edge_i, edge_j, shifts, *, compute_stress=True, modal=None,
            edge_mask=None, validated=False) -> dict:
    """Energy, per-atom energies, forces and (periodic cells) stress: the program's energies differentiated by
    the edge vectors (forces by :func:`fastmlip.ops.node_sums.node_difference`, stress ``sym(V^T g) / volume``)."""
    _check_modal(model, modal)
    device, dtype = _placement(model)
    numbers = torch.as_tensor(numbers, device=device).long()
    if not validated:
        _check_species(model, numbers)
    edge_i, edge_j = edge_i.to(device).long(), edge_j.to(device).long()
    cell64 = torch.zeros(3, 3, dtype=torch.float64, device=device) if cell is None else \
        torch.as_tensor(cell, device=device).reshape(3, 3)
    vectors = edge_vectors(torch.as_tensor(positions, device=device), cell64, edge_i, edge_j,
                           shifts.to(device)).to(dtype).requires_grad_(True)
    with torch.enable_grad():
        energies, differentiated, edges = _energies(model, numbers, edge_i, edge_j, vectors, edge_mask)
        gradient = gradient_or_zeros(differentiated.sum(), vectors)
    forces = _forces(model, gradient, edges, numbers, edge_i, edge_j, edge_mask)
    stress = None
    if compute_stress and pbc is not None and bool(torch.as_tensor(pbc).any()):
        volume = torch.linalg.det(cell64).abs()
        if validated or float(volume) > 1e-12:
            stress = edge_stress(vectors, gradient, volume).to(dtype)
    return {"energy": energies.sum().to(dtype).detach(), "energies": energies.detach().to(dtype),
            "forces": forces, "stress": stress}


def compute_edges(model, numbers, edge_i, edge_j, vectors, *, modal=None, num_local=None) -> dict:
    """Per-atom energies [N] and the gradient [E, 3] of the first ``num_local`` atoms' energy by the edge vectors
    (LAMMPS ML-IAP)."""
    _check_modal(model, modal)
    device, dtype = _placement(model)
    numbers = torch.as_tensor(numbers, device=device).long()
    _check_species(model, numbers)
    edge_i, edge_j = (torch.as_tensor(t, device=device).long() for t in (edge_i, edge_j))
    vectors = torch.as_tensor(vectors, device=device).detach().to(dtype).requires_grad_(True)
    with torch.enable_grad():
        energies, differentiated, _ = _energies(model, numbers, edge_i, edge_j, vectors, None)
        local = slice(0, numbers.numel() if num_local is None else num_local)
        gradient = gradient_or_zeros(differentiated[local].sum(), vectors)
    return {"energies": energies.detach().to(dtype), "energy": energies[local].sum().to(dtype).detach(),
            "edge_gradient": gradient}


def energy_module(model, modal=None) -> torch.nn.Module:
    raise ValueError("an exported model is already a program; export its framework's file instead")


# --- acceleration: an exported model comes accelerated ---------------------------------------------------------------


def plan(model) -> tuple:
    return [], {}


def accelerate(model, *, strict: bool = False) -> list:
    return []


def restore(model) -> int:
    return 0


def is_accelerated(model) -> bool:
    return True


def mask_obstacle(model) -> Optional[str]:
    return None


def capture_obstacle(model) -> Optional[str]:
    return None
