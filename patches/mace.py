"""MACE (mace-torch ``MACE``/``ScaleShiftMACE``, any number of heads): loading, evaluation, in-place acceleration;
the :class:`~fastmlip.patches.framework.Framework` the faces use.

MACE's conventions (mace/data/neighborhood.py, mace/modules/utils.py): ``edge_index = [i, j]`` straight from the
"ijS" neighbour list, sender = ``edge_index[0]``, receiver = ``edge_index[1]``,
``vectors = pos[receiver] - pos[sender] + unit_shifts @ cell``; an interaction gathers from the sender and
scatter-sums into the receiver, then divides by ``avg_num_neighbors``. Stress is ``(1/V) dE/d(strain)``.

Acceleration (:mod:`.mace_modules`) swaps, keeping every parameter and buffer object (and so the state_dict keys
and values): interaction blocks (``RealAgnosticInteractionBlock``, ``RealAgnosticResidualInteractionBlock``) for
``FastInteraction`` (radial MLP and conv_tp + scatter_sum fused; linears and the one-hot ``skip_tp`` through
fastmlip's node ops), ``SymmetricContraction`` (the model's own U buffers), the radial embedding, ``o3.Linear``
and the spherical harmonics. Constants always come from the loaded modules (see :mod:`fastmlip.descriptors`).

Files written by ``fastmlip convert`` (:func:`save_converted`) are ordinary mace files: the whole model pickled
with ``torch.save`` under the installed e3nn, holding only torch/e3nn/mace classes, so a plain
``torch.load(weights_only=False)`` (what ``MACECalculator`` does) opens them without fastmlip. Accelerated modules
are never pickled (they hold op descriptors and edge caches that only fastmlip can rebuild); ``--to fast`` adds a
marker dict on the model object (attribute ``_fastmlip_file``, ignored by mace) and :func:`fastmlip.load`
accelerates such a file again after loading it. Files from e3nn-0.4 pickles become e3nn (>= 0.5) files.
The file stores the model in the dtype the conversion checked (``--dtype``, default the model's own): under
e3nn >= 0.5, torch.fx re-traces e3nn's generated code when it unpickles it and folds "coupling block x path
weight" into one constant in the file's dtype, so a float32 file evaluated in float64 differs from float64
arithmetic by ~1e-9 relative; ``--dtype float64`` keeps float64 predictions exact.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
import time
import types
import zipfile
from typing import Optional

import torch

from fastmlip import memo
from fastmlip.graph import edge_vectors
from fastmlip.ops.derivatives import gradient_or_zeros

from . import e3nn_compat, files, mace_forward, self_check, swaps
from .mace_modules import (EDGE_MASK, SPECIES, SUPPORTED_INTERACTIONS, FastInteraction,  # noqa: F401 (API)
                           FastRadialEmbedding, FastSpeciesLinear, FastSymmetricContraction, accelerate, plan,
                           sorted_edges, species_of)

FRAMEWORK = "mace"
# Attribute of a pickled model written by ``fastmlip convert --to fast`` (and of every model :func:`load` returns).
FILE_FORMAT_ATTRIBUTE = "_fastmlip_file"
FILE_FORMATS = ("fast", "e3nn")
# Buffers torch.fx adds when it re-traces an e3nn GraphModule on unpickling: arithmetic on constant buffers (an
# e3nn coupling block times its path weight) is folded into one new buffer, in the dtype the file stores.
_FOLDED_CONSTANT = re.compile(r"(^|\.)_tensor_constant\d+$")


def _mace_available() -> bool:
    try:
        import mace.modules  # noqa: F401
    except ImportError:
        return False
    return True


def handles(model) -> bool:
    if not any(c.__module__.startswith("mace.") for c in type(model).__mro__) or not _mace_available():
        return False  # checked before importing mace, which is slow to import
    from mace.modules.models import MACE

    return isinstance(model, MACE)


def read_checkpoint(path) -> None:
    """Cheap look inside ``path`` without unpickling; ValueError saying why it is not a MACE model file."""
    text = os.fspath(path)
    if not os.path.isfile(text):
        raise ValueError(f"{text}: no such file")
    if not zipfile.is_zipfile(text):
        raise ValueError(f"{text}: not a torch.save archive, so not a MACE model file")
    if not files.pickle_names(text, b"mace.modules.models"):
        raise ValueError(f"{text}: its pickle names no mace model class")


def pretrained_checkpoints() -> dict:
    """Empty: mace ships no checkpoints (it downloads its foundation models itself)."""
    return {}


def resolve(path_or_name) -> Optional[str]:
    """``path_or_name`` when it is a file, else None (MACE models are only ever files)."""
    text = os.fspath(path_or_name)
    return text if os.path.isfile(text) else None


def can_load(path) -> bool:
    """A ``torch.save``-d whole model whose pickle names a mace model class (read without unpickling)."""
    try:
        read_checkpoint(path)
    except (ValueError, OSError, zipfile.BadZipFile):
        return False
    return True


def _unpickle(path: str):
    """The whole pickled MACE model on the CPU (e3nn-0.4 pickles upgraded); ValueError with a one-line reason."""
    try:
        model = e3nn_compat.load(path, map_location="cpu")
    except Exception as exc:  # corrupt archives, missing classes, old e3nn state: all "cannot open this file"
        raise ValueError(f"{path}: could not unpickle the MACE model ({type(exc).__name__}: "
                         f"{files.one_line(exc)[:200]})") from None
    if not handles(model):
        raise ValueError(f"{path}: holds a {type(model).__name__}, not a MACE model")
    pickled_fast = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("fastmlip.")})
    if pickled_fast:
        raise ValueError(f"{path}: an accelerated model was pickled ({', '.join(pickled_fast)}); save it after "
                         f"fastmlip.restore(model), or write files with `fastmlip convert --to fast`")
    return model


def load(path, device=None, dtype=None, trusted: bool = False):
    """The MACE model in eval mode, parameters frozen (as MACECalculator uses it); e3nn-0.4 pickles upgraded.

    A MACE ``.model`` file is the whole model pickled, so it is unpickled (once) only when ``trusted``; else
    :class:`files.UntrustedFileError` says how to trust it. The file's fastmlip marker (if ``fastmlip convert
    --to fast`` wrote it) moves to ``model.__dict__["_fastmlip_file"]`` with the path added; its dtype is the
    default for ``dtype``.
    """
    text = os.fspath(path)
    read_checkpoint(text)
    if not trusted:
        files.refuse_untrusted(text, "a MACE model file is a whole pickled model")
    start = time.perf_counter()
    with contextlib.suppress(ImportError):  # timed apart from the unpickling (a missing mace: reported there)
        import mace.modules  # noqa: F401
    imported = time.perf_counter()
    model = _unpickle(text)
    stored = model.__dict__.pop(FILE_FORMAT_ATTRIBUTE, None)
    marker = {k: v for k, v in stored.items() if k != "path"} if isinstance(stored, dict) else {}
    if dtype is None and marker.get("dtype") in ("float32", "float64"):
        dtype = getattr(torch, marker["dtype"])
    built = time.perf_counter()
    model.to(device=device, dtype=dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    model.__dict__[FILE_FORMAT_ATTRIBUTE] = dict(marker, path=os.path.abspath(text))
    model.__dict__[files.LOAD_TIMING_ATTRIBUTE] = files.load_timing(start, imported, built)
    return model.eval()


def save_converted(source_path, target_path, *, to: str, dtype: str, check: Optional[dict], reference,
                   trusted: bool = False) -> dict:
    """Write ``reference`` (the model loaded from ``source_path`` and checked, with its original modules), in
    ``dtype``, as a plain mace file (to="fast": with the fastmlip marker).

    The model is pickled whole (``torch.save``) under the installed e3nn; e3nn-0.4 pickles were upgraded when
    they were loaded, with their original coupling constants. The written file is then opened with a plain
    ``torch.load`` (no fastmlip shims) and must hold no fastmlip class, the same weights and buffers as
    ``reference`` and give the same energies and forces on a probe structure, for every head. Returns that
    comparison in the form of :func:`self_check.check`'s report. The source is not read again (``trusted`` is
    unused here: it was decided when ``reference`` was loaded).
    """
    if to not in FILE_FORMATS:
        raise ValueError(f"unknown target format {to!r}; expected 'fast' or 'e3nn'")
    import copy

    import e3nn

    import fastmlip

    if swaps.is_accelerated(reference):
        raise ValueError("save_converted needs the model with its original modules (fastmlip.restore it)")
    model = copy.deepcopy(reference).to(device="cpu", dtype=getattr(torch, dtype))
    for name in [key for key in model.__dict__ if key.startswith("_fastmlip")]:
        model.__dict__.pop(name)
    for parameter in model.parameters():  # as mace saves models; load() froze them for evaluation
        parameter.requires_grad_(True)
    marker = None
    if to == "fast":
        marker = {"format": "fast", "dtype": dtype, "fastmlip_version": fastmlip.__version__,
                  "e3nn_version": e3nn.__version__, "check": check}
        model.__dict__[FILE_FORMAT_ATTRIBUTE] = marker
    try:
        torch.save(model, os.fspath(target_path))
    except Exception as exc:  # e.g. a module holding TorchScript functions, which pickle cannot store
        raise ValueError(f"cannot pickle this MACE model under e3nn {e3nn.__version__} ({type(exc).__name__}: "
                         f"{files.one_line(exc)[:200]})") from None
    return verify_written(target_path, marker, reference)


def _load_recording_modules(path: str) -> tuple:
    """Plain ``torch.load`` (no e3nn-0.4 shims) of ``path``, and the set of modules its pickle imports from."""
    imported = set()

    class RecordingUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            imported.add(module)
            return super().find_class(module, name)

    recorder = types.ModuleType("fastmlip_recording_pickle")
    recorder.Unpickler = RecordingUnpickler
    recorder.load = lambda file, **kwargs: RecordingUnpickler(file, **kwargs).load()
    try:
        model = torch.load(path, map_location="cpu", weights_only=False, pickle_module=recorder)
    except Exception as exc:
        raise ValueError(f"{path}: the written file does not open with a plain torch.load ({type(exc).__name__}: "
                         f"{files.one_line(exc)[:200]})") from None
    return model, imported


def _compare_weights(path: str, written, reference) -> None:
    """Same tensors under the same names (any order); only e3nn's folded constants may be new."""
    ours = written.state_dict()
    theirs = {k: v.detach().cpu() for k, v in reference.state_dict().items()}
    missing = sorted(set(theirs) - set(ours))
    extra = sorted(k for k in set(ours) - set(theirs) if not _FOLDED_CONSTANT.search(k))
    changed = sorted(k for k in theirs if k in ours and not (ours[k].dtype == theirs[k].dtype
                                                             and torch.equal(ours[k], theirs[k])))
    if missing or extra or changed:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}" for what, keys in
                           (("missing", missing), ("unexpected", extra), ("changed", changed)) if keys)
        raise ValueError(f"{path}: the written model's tensors differ from the checked model ({detail})")


def verify_written(path, marker: Optional[dict], reference) -> dict:
    """Open a written file as mace users do and compare it with ``reference``; ValueError on any difference."""
    text = os.fspath(path)
    written, imported = _load_recording_modules(text)
    needs_fastmlip = sorted(m for m in imported if m == "fastmlip" or m.startswith("fastmlip."))
    if needs_fastmlip:
        raise ValueError(f"{text}: the written file needs fastmlip to open ({', '.join(needs_fastmlip)})")
    if not handles(written):
        raise ValueError(f"{text}: the written file holds a {type(written).__name__}, not a MACE model")
    if written.__dict__.get(FILE_FORMAT_ATTRIBUTE) != marker:
        raise ValueError(f"{text}: the written file's fastmlip marker is not the one written")
    _compare_weights(text, written, reference)
    info = model_info(reference)
    written.to(device=info["device"], dtype=info["dtype"])
    for param in written.parameters():
        param.requires_grad_(False)
    written.eval()
    atoms = self_check.probe_structure(info["atomic_numbers"], info["cutoff"])
    edges = self_check.neighbor_edges(atoms, info["cutoff"])
    tolerance = self_check.tolerances(info["dtype"])
    per_head, worst = {}, {"energy_per_atom": 0.0, "forces": 0.0}
    for head in info["modals"] or [None]:
        expected = self_check.compute_on_atoms(sys.modules[__name__], reference, atoms, edges, modal=head)
        got = self_check.compute_on_atoms(sys.modules[__name__], written, atoms, edges, modal=head)
        per_head[head or "default"] = dev = self_check.deviation(expected, got, len(atoms))
        worst = {k: max(worst.get(k, 0.0), v) for k, v in dev.items()}
    report = {"dtype": str(info["dtype"]).replace("torch.", ""), "tolerance": tolerance, "deviation": worst,
              "per_modal": per_head, "num_atoms": len(atoms), "num_edges": int(edges[0].numel())}
    if not self_check.within(worst, tolerance):
        raise ValueError(f"{text}: the written file predicts differently from the checked model "
                         f"({self_check.describe(report)})")
    return report


def model_info(model) -> dict:
    device, dtype = swaps.first_tensor_placement(model)
    heads = [str(h) for h in getattr(model, "heads", None) or []]
    return {
        "framework": FRAMEWORK,
        "cutoff": float(model.r_max),
        "atomic_numbers": [int(z) for z in model.atomic_numbers.tolist()],
        "modals": heads if len(heads) > 1 else [],
        "dtype": dtype,
        "device": device,
    }


def message_passing_layers(model) -> int:
    """One per interaction block."""
    return len(model.interactions)


def select_head(model, head: Optional[str]) -> int:
    """Index of ``head`` in ``model.heads``; None picks the only head or one called 'default' (as MACECalculator)."""
    heads = [str(h) for h in getattr(model, "heads", None) or ["Default"]]
    if head is None:
        if len(heads) == 1:
            return 0
        defaults = [k for k, h in enumerate(heads) if h.lower() == "default"]
        if defaults:
            return defaults[0]
        raise ValueError(f"this MACE model has several heads and none is 'default'; choose one of {heads}")
    if str(head) not in heads:
        raise ValueError(f"head {head!r} unknown to this MACE model; its heads are {heads}")
    return heads.index(str(head))


def _matches(model, numbers: torch.Tensor) -> torch.Tensor:
    """[N, species] whether each atom is each of ``model.atomic_numbers`` (argmax: its species index)."""
    return numbers.long().unsqueeze(-1) == model.atomic_numbers.to(numbers.device).unsqueeze(0)


def species_indices(model, numbers: torch.Tensor) -> torch.Tensor:
    """Index into ``model.atomic_numbers`` per atom; ValueError naming unknown elements."""
    from ase.data import chemical_symbols

    table = model.atomic_numbers.to(numbers.device)
    match = _matches(model, numbers)
    known = match.any(-1)
    if not bool(known.all()):
        unknown = sorted(set(int(z) for z in numbers[~known].tolist()))
        names = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in unknown)
        elements = " ".join(chemical_symbols[int(z)] for z in table.tolist())
        raise ValueError(f"element(s) {names} unknown to this MACE model; it knows: {elements}")
    return match.long().argmax(-1)


def _one_hot(model, numbers: torch.Tensor, device, dtype, validated: bool) -> torch.Tensor:
    on_device = numbers.to(device)
    species = _matches(model, on_device).long().argmax(-1) if validated else species_indices(model, on_device)
    return torch.nn.functional.one_hot(species, model.atomic_numbers.numel()).to(dtype)


def build_input(model, positions, cell, pbc, numbers, edge_i, edge_j, shifts, head: Optional[str] = None,
                validated: bool = False, whole: bool = True) -> dict:
    """MACE's input dict for one structure from ASE "ijS" edges (any order), in the model's dtype and device.

    ``validated``: the caller checked the species on the host; nothing here then reads from the device.
    ``whole`` False: only what fastmlip's own forward reads (node attributes, edges, unit shifts, cell), not the
    batch, ptr, head, positions and shifts MACE's forward needs, and the one-hot species made once per numbers
    tensor (kept on it, :mod:`fastmlip.memo`): every step of a structure reuses it, so a captured step launches
    none of that.
    """
    device, dtype = swaps.first_tensor_placement(model)
    cell = (torch.zeros(3, 3) if cell is None else cell).to(device=device, dtype=dtype)
    unit_shifts = shifts.to(device=device, dtype=dtype).reshape(-1, 3)
    edge_index = torch.stack([edge_i.to(device).long(), edge_j.to(device).long()])
    if not whole:
        attrs = memo.derived(numbers, ("mace_node_attrs", model.atomic_numbers, dtype, str(device)),
                             lambda: _one_hot(model, numbers, device, dtype, validated))
        return {"node_attrs": attrs, "edge_index": edge_index, "unit_shifts": unit_shifts, "cell": cell}
    n = positions.shape[0]
    return {"positions": positions.detach().to(device=device, dtype=dtype).clone(),
            "node_attrs": _one_hot(model, numbers, device, dtype, validated), "edge_index": edge_index,
            "shifts": unit_shifts @ cell, "unit_shifts": unit_shifts, "cell": cell,
            "batch": torch.zeros(n, dtype=torch.long, device=device),
            "ptr": torch.arange(0, 2 * n, n, dtype=torch.long, device=device) if n else torch.zeros(
                2, dtype=torch.long, device=device),
            "head": torch.full((1,), select_head(model, head), dtype=torch.long, device=device)}


def _has_volume(cell, pbc) -> bool:
    if cell is None or pbc is None or not bool(torch.as_tensor(pbc).any()):
        return False
    return abs(float(torch.linalg.det(cell.double()))) > 1e-12


def mask_obstacle(model) -> Optional[str]:
    """Why placeholder edges (``edge_mask``) cannot be used with this model, None if they can.

    Masked edges are weighed with zero inside fastmlip's fused convolutions, so every interaction must be one
    and nothing else may sum over edges (MACE's pair repulsion does).
    """
    if hasattr(model, "pair_repulsion"):
        return "its pair repulsion (ZBL) sums over edges outside the convolutions"
    plain = [f"interactions.{k}" for k, m in enumerate(model.interactions) if not isinstance(m, FastInteraction)]
    if plain:
        return f"interaction(s) {', '.join(plain)} are not accelerated"
    return None


def capture_obstacle(model) -> Optional[str]:
    """Why the model cannot run as a captured CUDA graph (fastmlip.cuda_graph), None if it can."""
    return mask_obstacle(model)


def compute(model, positions, cell, pbc, numbers, edge_i, edge_j, shifts, *, compute_stress=True, modal=None,
            edge_mask=None, validated=False):
    """Energy, per-atom energies, forces and (periodic cells) stress, exactly as MACECalculator computes them.

    Stress is None unless ``compute_stress`` and some direction is periodic with a cell of non-zero volume
    (with ``validated`` the caller has checked the species and the cell, and nothing waits for the device).
    ``edge_mask``: which edges exist; the others contribute exactly zero (see :func:`mask_obstacle`).
    """
    fast = swaps.is_accelerated(model) and mace_forward.obstacle(model) is None
    data = build_input(model, positions, cell, pbc, numbers, edge_i, edge_j, shifts, head=modal, validated=validated,
                       whole=not fast)
    want_stress = bool(compute_stress) and (validated or _has_volume(cell, pbc))
    if edge_mask is not None:
        obstacle = mask_obstacle(model)
        if obstacle:
            raise ValueError(f"edge_mask needs an accelerated model: {obstacle}")
        memo.attach(data["edge_index"], EDGE_MASK, edge_mask)  # read by every FastInteraction of this call
    if fast:
        device = data["cell"].device
        exact_cell = data["cell"] if cell is None else torch.as_tensor(cell, device=device).reshape(3, 3)
        edge_index = data["edge_index"]
        vectors = edge_vectors(torch.as_tensor(positions, device=device), exact_cell, edge_index[0], edge_index[1],
                               data["unit_shifts"]).to(data["cell"].dtype)
        with torch.enable_grad():
            out = mace_forward.forward(model, data, vectors, select_head(model, modal), want_stress)
    else:
        with torch.enable_grad():
            out = model(data, training=False, compute_force=True, compute_stress=want_stress)
    dtype = data["cell"].dtype
    return {
        "energy": out["energy"].reshape(()).detach(),
        "energies": out["node_energy"].detach().to(dtype),
        "forces": out["forces"].detach(),
        "stress": out["stress"].reshape(3, 3).detach() if want_stress else None,
    }


def compute_edges(model, numbers, edge_i, edge_j, vectors, *, modal=None, num_local=None) -> dict:
    """Per-atom energies [N] and the gradient [E, 3] of the first ``num_local`` atoms' energy (all atoms by
    default) by the edge vectors ``vectors`` (``pos[j] - pos[i] + shift`` of edge i -> j, MACE's sender i and
    receiver j), for callers that hold edges as vectors (LAMMPS ML-IAP: local atoms then ghosts)."""
    obstacle = mace_forward.obstacle(model)
    if obstacle:
        raise ValueError(f"fastmlip cannot evaluate this MACE model from edge vectors: {obstacle}")
    device, dtype = swaps.first_tensor_placement(model)
    species = species_indices(model, torch.as_tensor(numbers, device=device))
    data = {"node_attrs": torch.nn.functional.one_hot(species, model.atomic_numbers.numel()).to(dtype),
            "edge_index": torch.stack([torch.as_tensor(edge_i, device=device).long(),
                                       torch.as_tensor(edge_j, device=device).long()])}
    vectors = torch.as_tensor(vectors, device=device).detach().to(dtype).requires_grad_(True)
    with torch.enable_grad():
        node_energy, differentiated = mace_forward.node_energies(model, data, vectors, select_head(model, modal))
        local = slice(0, species.numel() if num_local is None else num_local)
        gradient = gradient_or_zeros(differentiated[local].sum(), vectors)
    return {"energies": node_energy.detach().to(dtype), "energy": node_energy[local].sum().to(dtype).detach(),
            "edge_gradient": gradient}


class NodeEnergies(torch.nn.Module):
    """``(energies, differentiated)`` [N] of one structure from each atom's species index (into
    :meth:`species_table`) and its edges as vectors (ASE "ijS" edges, MACE's sender i and receiver j, vectors
    ``pos[j] - pos[i] + shift``) and an edge mask, then the six tensors of the
    edges' :class:`fastmlip.graph.SortedEdges` its convolutions sorted (receivers: ``edge_j``, :attr:`RECEIVERS`),
    which forces reuse: the function :mod:`fastmlip.patches.exported` exports (species known to the model: the
    caller checks them)."""

    RECEIVERS = "edge_j"

    def __init__(self, model, head: int):
        super().__init__()
        self.model, self.head = model, head

    def species_table(self) -> list:
        """The atomic numbers in the order of the species index its first input holds per atom."""
        return self.model.atomic_numbers.tolist()

    def forward(self, species, edge_i, edge_j, vectors, edge_mask):
        node_attrs = torch.nn.functional.one_hot(species, self.model.atomic_numbers.numel()).to(vectors.dtype)
        # every block's species index is the input itself: the species-indexed kernels keep their sorting of it
        # (fastmlip.memo) from one step of a structure to the next
        memo.attach(node_attrs, SPECIES, species)
        data = {"node_attrs": node_attrs, "edge_index": torch.stack([edge_i, edge_j])}
        memo.attach(data["edge_index"], EDGE_MASK, edge_mask)  # read by every FastInteraction of this call
        energies, differentiated = mace_forward.node_energies(self.model, data, vectors, self.head)
        return energies, differentiated, *sorted_edges(data["edge_index"], species.shape[0]).tensors()


def energy_module(model, modal=None) -> torch.nn.Module:
    """:class:`NodeEnergies` of an accelerated model (see :func:`mask_obstacle`)."""
    obstacle = mace_forward.obstacle(model) or mask_obstacle(model)
    if obstacle:
        raise ValueError(f"this MACE model cannot be exported: {obstacle}")
    return NodeEnergies(model, select_head(model, modal))


restore = swaps.restore_swaps
is_accelerated = swaps.is_accelerated
