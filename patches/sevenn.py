"""SevenNet (``sevenn.nn.sequential.AtomGraphSequential``): loading, evaluation and in-place acceleration; the
:class:`~fastmlip.patches.framework.Framework` the faces use.

Models always come from ``sevenn``'s own checkpoint loader (``SevenNetCheckpoint.build_model``), which sorts the
convolution instructions of old checkpoints and flips the radial-MLP columns and ``_w3j`` buffers of paths with
odd l1+l2+l3; fastmlip then reads every constant from the loaded modules, never from the raw state dict.

SevenNet's conventions (sevenn/train/dataload.py, sevenn/nn/convolution.py): ``edge_index = [i, j]`` and
``edge_vec = pos[j] - pos[i] + S @ cell`` exactly as ASE's "ijS"; a convolution gathers from
``edge_index[1]`` (sender j) and scatters into ``edge_index[0]`` (receiver i), then divides by its denominator.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pickle
import time
from typing import Optional

import torch

from fastmlip import memo
from fastmlip.graph import edge_vectors
from fastmlip.ops.derivatives import gradient_or_zeros
from fastmlip.ops.node_sums import node_difference

from . import files, swaps
from .sevenn_modules import (EDGE_MASK_KEY, FastEdgeEmbedding, FastEquivariantGate,  # noqa: F401 (API)
                             FastIrrepsConvolution, accelerate, plan, sorted_edges_of)

FRAMEWORK = "sevenn"
# Key in a checkpoint dict written by ``fastmlip convert --to fast``; sevenn ignores unknown keys.
MARKER_KEY = "fastmlip"
FILE_FORMAT_ATTRIBUTE = "_fastmlip_file"

# Checkpoints shipped inside the sevenn package, by the names sevenn resolves (sevenn.util.pretrained_name_to_path).
_PRETRAINED = {
    "7net-0": "SEVENNET_0_11Jul2024",
    "7net-0_11Jul2024": "SEVENNET_0_11Jul2024",
    "7net-0_22May2024": "SEVENNET_0_22May2024",
    "7net-l3i5": "SEVENNET_l3i5",
    "7net-mf-0": "SEVENNET_MF_0",
}


def _sevenn_available() -> bool:
    """Whether sevenn is installed, told without importing it (its import takes seconds: e3nn.o3, torch._dynamo)."""
    return importlib.util.find_spec("sevenn") is not None


def pretrained_checkpoints() -> dict:
    """{name: path} of the pretrained checkpoints present in this installation (nothing is downloaded)."""
    if not _sevenn_available():
        return {}
    import sevenn._const as const

    found = {}
    for name, attribute in _PRETRAINED.items():
        path = getattr(const, attribute, None)
        if path is None:
            continue
        for candidate in (path, path.replace(const._prefix, os.path.expanduser("~/.cache/sevennet"))):
            if os.path.isfile(candidate):
                found[name] = candidate
                break
    return found


def resolve(path_or_name) -> Optional[str]:
    """A checkpoint path for a file path or a pretrained name (case-insensitive), None if neither."""
    text = os.fspath(path_or_name)
    if os.path.isfile(text):
        return text
    lowered = {name.lower(): path for name, path in pretrained_checkpoints().items()}
    return lowered.get(text.lower().replace("sevennet-", "7net-"))


def _safe_globals() -> list:
    """What a SevenNet checkpoint may hold besides tensors: numpy arrays (its config's shift/scale tables)."""
    import codecs

    import numpy as np

    reconstruct = getattr(np, "_core", getattr(np, "core", None)).multiarray._reconstruct
    dtypes = {type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}
    return [reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype, codecs.encode,
            *dtypes]  # numpy 2 writes numpy._core, numpy 1 numpy.core


def looks_like_checkpoint(path) -> bool:
    """A ``torch.save`` archive whose pickle names a config and a model state dict (nothing is unpickled)."""
    return os.path.isfile(path) and files.pickle_names(path, b"model_state_dict") and \
        files.pickle_names(path, b"config")


def read_checkpoint(path, trusted: bool = False) -> dict:
    """The raw checkpoint dict; ValueError with a one-line reason for anything that is not a SevenNet checkpoint.

    Read with ``weights_only=True`` and numpy arrays allowed, which runs no code from the file; a checkpoint that
    needs more is unpickled in full only when ``trusted`` (else :class:`files.UntrustedFileError`).
    """
    text = os.fspath(path)
    if not looks_like_checkpoint(text):
        raise ValueError(f"{text}: not a SevenNet checkpoint (no torch.save archive with a config and a "
                         f"model_state_dict)")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            raw = torch.load(text, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trusted:
            files.refuse_untrusted(text, "this checkpoint holds Python objects beyond tensors and arrays")
        raw = _load_in_full(text)
    except Exception as exc:  # torch raises many types for corrupt files; all mean "not a checkpoint"
        raise ValueError(f"{text}: not a readable torch checkpoint ({type(exc).__name__}: "
                         f"{files.one_line(exc)[:200]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{text}: holds a {type(raw).__name__}, not a SevenNet checkpoint dict")
    missing = [key for key in ("config", "model_state_dict") if key not in raw]
    if missing:
        raise ValueError(f"{text}: not a SevenNet checkpoint (no {', '.join(missing)} entry)")
    if not isinstance(raw["config"], dict) or "version" not in raw["config"]:
        raise ValueError(f"{text}: SevenNet checkpoint config without a version")
    return raw


def _load_in_full(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: "
                         f"{files.one_line(exc)[:200]})") from None


def _build(path: str, raw: dict):
    """The model sevenn's own loader builds from the checkpoint dict ``raw`` (read from ``path``), so sevenn's
    compatibility fixes for old checkpoints apply; sevenn itself would unpickle the file in full."""
    from sevenn.checkpoint import SevenNetCheckpoint, _config_cp_routine

    class Checkpoint(SevenNetCheckpoint):
        def _load(self) -> None:  # sevenn's _load, on the dict read safely above
            self._config_original = raw.get("config", {})
            self._model_state_dict = raw.get("model_state_dict", {})
            self._optimizer_state_dict = raw.get("optimizer_state_dict", {})
            self._scheduler_state_dict = raw.get("scheduler_state_dict", {})
            self._epoch = raw.get("epoch")
            self._time = raw.get("time", "Not found")
            self._hash = raw.get("hash", "Not found")
            self._config = _config_cp_routine(self._config_original)
            self._loaded = True

    return Checkpoint(path).build_model()


def is_shipped(path) -> bool:
    """A checkpoint that came with the installed sevenn package (trusted like the package itself)."""
    return os.path.realpath(os.fspath(path)) in {os.path.realpath(p) for p in pretrained_checkpoints().values()}


def save_converted(source_path, target_path, *, to: str, dtype: str, check: Optional[dict], reference,
                   trusted: bool = False) -> None:
    """Write ``source_path``'s checkpoint dict to ``target_path`` with (to="fast") or without the fastmlip marker.

    Weights, config and version stay as they are, so sevenn applies the same compatibility patches when it reads
    the file. The written file is rebuilt with sevenn's own loader (the one SevenNetCalculator uses) and its
    state_dict compared with ``reference``, tensor by tensor.
    """
    import fastmlip

    raw = read_checkpoint(source_path, trusted=trusted)
    raw.pop(MARKER_KEY, None)
    if to == "fast":
        raw[MARKER_KEY] = {"format": "fast", "dtype": dtype, "fastmlip_version": fastmlip.__version__,
                           "check": check}
    elif to != "e3nn":
        raise ValueError(f"unknown target format {to!r}; expected 'fast' or 'e3nn'")
    torch.save(raw, os.fspath(target_path))
    from sevenn.checkpoint import SevenNetCheckpoint  # sevenn's own loader reads back the file just written

    rebuilt = SevenNetCheckpoint(os.fspath(target_path)).build_model().state_dict()
    expected = reference.state_dict()
    if list(rebuilt) != list(expected) or not all(
            torch.equal(rebuilt[k].to(expected[k]), expected[k]) for k in expected):
        raise ValueError(f"{target_path}: sevenn rebuilds a different model from the written file")


def handles(model) -> bool:
    if not any(c.__module__.startswith("sevenn.") for c in type(model).__mro__) or not _sevenn_available():
        return False  # checked before importing sevenn, which is slow to import
    from sevenn.nn.sequential import AtomGraphSequential

    return isinstance(model, AtomGraphSequential)


def can_load(path) -> bool:
    """A pretrained name or a file that looks like a SevenNet checkpoint (told apart without unpickling)."""
    if not _sevenn_available():
        return False
    resolved = resolve(path)
    return resolved is not None and looks_like_checkpoint(resolved)


def _cast_onehot_to_model_dtype(module, args, data):
    """Forward hook: sevenn's ``OnehotEmbedding`` casts to float32 (``.float()``); follow the model's dtype.

    The dtype travels in an empty non-persistent buffer, so ``model.double()``/``.to()`` update it and the
    state_dict is unchanged. One-hot values are exact in every float dtype.
    """
    dtype = module._dtype_reference.dtype
    for key in (module.key_output, module.key_additional_output):
        if key is not None and data[key].dtype != dtype:
            data[key] = data[key].to(dtype)
    return data


def _make_onehots_follow_dtype(model) -> None:
    """Also keeps the model's atomic-number lookup table (a plain attribute, not a buffer, so ``model.to``
    leaves it on the CPU) on the model's device: sevenn copies it there on every forward otherwise."""
    from sevenn.nn.node_embedding import OnehotEmbedding

    device, dtype = swaps.first_tensor_placement(model)
    table = getattr(model, "z_to_onehot_tensor", None)
    if isinstance(table, torch.Tensor) and table.device != device:
        model.z_to_onehot_tensor = table.to(device)
    for module in model.modules():
        if isinstance(module, OnehotEmbedding) and "_dtype_reference" not in module._buffers:
            module.register_buffer("_dtype_reference", torch.zeros(0, dtype=dtype, device=device), persistent=False)
            module.register_forward_hook(_cast_onehot_to_model_dtype)


def load(path, device=None, dtype=None, trusted: bool = False):
    """A SevenNet model in eval mode, single-structure mode (as SevenNetCalculator uses it), any float dtype,
    parameters frozen (as :func:`fastmlip.patches.mace.load`): a step then differentiates by the edge vectors
    only, where weights that require grad would make every custom op's backward compute their gradients too.

    The checkpoint is read once, without running code from it (see :func:`read_checkpoint`)."""
    resolved = resolve(path)
    if resolved is None:
        known = ", ".join(pretrained_checkpoints()) or "none installed"
        raise ValueError(f"{path}: no such file and not a known SevenNet checkpoint name (known: {known})")
    raw = read_checkpoint(resolved, trusted=trusted or is_shipped(resolved))
    marker = raw.get(MARKER_KEY) or {}
    start = time.perf_counter()
    with contextlib.suppress(ImportError):  # timed apart from the build (a missing sevenn: reported below)
        import sevenn.checkpoint  # noqa: F401
    imported = time.perf_counter()
    try:
        model = _build(resolved, raw)
    except Exception as exc:  # a checkpoint sevenn cannot build is bad input, reported in one line
        raise ValueError(f"{path}: sevenn could not build a model from it ({type(exc).__name__}: "
                         f"{files.one_line(exc)[:200]})") from None
    model.set_is_batch_data(False)
    model.eval()
    _make_onehots_follow_dtype(model)
    if dtype is None and marker.get("dtype"):
        dtype = getattr(torch, marker["dtype"])
    built = time.perf_counter()
    model.to(device=device, dtype=dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    model.__dict__[FILE_FORMAT_ATTRIBUTE] = dict(marker, path=os.path.abspath(resolved))
    model.__dict__[files.LOAD_TIMING_ATTRIBUTE] = files.load_timing(start, imported, built)
    return model


def model_info(model) -> dict:
    device, dtype = swaps.first_tensor_placement(model)
    return {
        "framework": FRAMEWORK,
        "cutoff": float(model.cutoff),
        "atomic_numbers": sorted(int(z) for z in (model.type_map or {})),
        "modals": list(model.modal_map or {}),
        "dtype": dtype,
        "device": device,
    }


def message_passing_layers(model) -> int:
    """One per convolution (SevenNet names them ``{layer}_convolution``)."""
    return sum(1 for name, _ in model.named_children() if name.endswith("_convolution"))


def _check_species(model, numbers: torch.Tensor) -> None:
    from ase.data import chemical_symbols

    known = set(model.type_map or {})
    unknown = sorted(set(int(z) for z in torch.unique(numbers).tolist()) - known)
    if unknown:
        names = ", ".join(chemical_symbols[z] if 0 <= z < len(chemical_symbols) else str(z) for z in unknown)
        elements = " ".join(chemical_symbols[z] for z in sorted(known))
        raise ValueError(f"element(s) {names} unknown to this SevenNet model; it knows: {elements}")


def select_modal(model, modal: Optional[str]) -> Optional[str]:
    """The modal to feed the model: required (and checked) for multi-fidelity models, None otherwise."""
    available = list(model.modal_map or {})
    if not available or not getattr(model, "eval_modal_map", False):
        if modal is not None and not available:
            raise ValueError(f"modal {modal!r} given, but this SevenNet model has no modals")
        return None
    if modal is None:
        raise ValueError(f"this multi-fidelity SevenNet model needs a modal; choose one of {available}")
    matches = [name for name in available if name.lower() == str(modal).lower()]
    if not matches:
        raise ValueError(f"unknown modal {modal!r}; this SevenNet model has {available}")
    return matches[0]


def build_graph(model, positions, cell, pbc, numbers, edge_i, edge_j, shifts, modal=None, edge_mask=None):
    """SevenNet's input data for one structure, as SevenNetCalculator builds it but from tensors.

    Edge vectors are formed in float64 (as ASE does) and then cast to the model's dtype. Nothing here reads
    from the device (CUDA graphs). ``edge_mask`` (bool per edge) marks the edges that exist; the others are
    placeholders the fused convolutions weigh with zero (see :func:`compute`).
    """
    device, dtype = swaps.first_tensor_placement(model)
    numbers = torch.as_tensor(numbers, device=device).long()
    positions = torch.as_tensor(positions, device=device).detach()
    cell64 = torch.as_tensor(cell, device=device).detach().to(torch.float64).reshape(3, 3)
    edge_i = torch.as_tensor(edge_i, device=device).long()
    edge_j = torch.as_tensor(edge_j, device=device).long()
    shifts = torch.as_tensor(shifts, device=device).reshape(-1, 3)
    edge_vec = edge_vectors(positions, cell64, edge_i, edge_j, shifts)
    volume = _volume(cell, cell64, dtype)
    return _graph_data(model, numbers, edge_i, edge_j, edge_vec.to(dtype), positions.to(dtype), volume, modal,
                       edge_mask)


def _volume(cell, cell64: torch.Tensor, dtype) -> torch.Tensor:
    """|det cell| in ``dtype``: the same every step of a cell, so kept on the caller's cell tensor
    (:mod:`fastmlip.memo`) and a captured step launches none of it."""
    def volume():
        return torch.dot(cell64[0], torch.linalg.cross(cell64[1], cell64[2])).abs().to(dtype)

    if not isinstance(cell, torch.Tensor):
        return volume()
    return memo.derived(cell, ("sevenn_volume", dtype, str(cell64.device)), volume)


class GraphData(dict):
    """What sevenn's ``AtomGraphData`` holds for one structure, under the same keys, as a dict that also reads
    keys as attributes (sevenn reads ``data.x`` for multi-modal models; its modules only index the data
    otherwise). ``AtomGraphData`` is a torch_geometric ``Data``: importing it imports torch_geometric, which
    imports transformers where installed, 2-3.6 s of the first step on the H200."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _graph_data(model, numbers, edge_i, edge_j, edge_vec, positions, volume, modal, edge_mask=None):
    import sevenn._keys as KEY

    num_atoms = torch.full((), numbers.numel(), dtype=torch.long, device=numbers.device)
    batched = bool(getattr(model, "is_batch_data", False))
    fields = {
        KEY.ATOMIC_NUMBERS: numbers,
        KEY.EDGE_VEC: edge_vec,
        KEY.CELL_VOLUME: volume.reshape(1) if batched else volume,
        KEY.NUM_ATOMS: num_atoms.reshape(1) if batched else num_atoms,
    }
    if batched:
        fields[KEY.BATCH] = torch.zeros_like(numbers)
    if modal is not None:
        fields[KEY.DATA_MODALITY] = [modal] if batched else modal
    node_features = numbers.clone()  # AtomGraphData's x, and its node_attr is the same tensor
    data = GraphData({KEY.NODE_FEATURE: node_features, KEY.EDGE_IDX: torch.stack([edge_i, edge_j]),
                      KEY.POS: positions, KEY.NODE_ATTR: node_features, **fields})
    if edge_mask is not None:
        data[EDGE_MASK_KEY] = edge_mask
    return data


def mask_obstacle(model) -> Optional[str]:
    """Why placeholder edges (``edge_mask``) cannot be used with this model, None if they can.

    Masked edges are weighed with zero inside fastmlip's fused convolutions, so every convolution must be one.
    """
    from sevenn.nn.convolution import IrrepsConvolution

    plain = [name for name, module in model.named_modules() if isinstance(module, IrrepsConvolution)]
    if plain:
        return f"convolution(s) {', '.join(plain)} are not accelerated"
    return None


def capture_obstacle(model) -> Optional[str]:
    """Why the model cannot run as a captured CUDA graph (fastmlip.cuda_graph), None if it can."""
    if getattr(model, "eval_modal_map", False) and model.modal_map:
        return "multi-fidelity models pick their modal with a host->device copy inside the model"
    return mask_obstacle(model)


def _edge_forces_and_stress(head, data, num_atoms: int, with_stress: bool = True):
    """sevenn's ``ForceStressOutputFromEdge`` term for term, without reading the atom count or the cell volume
    back to the host (its forward does both: two syncs per step, and a CUDA graph cannot wait for the host), and
    with every sum in a fixed order (its scatters add with atomics on a GPU): forces by
    :func:`fastmlip.ops.node_sums.node_difference`, the stress as one sum over the edges. ``with_stress`` False
    leaves the virial and stress out (MD without a barostat: ~11 launches a step)."""
    from sevenn.nn.util import broadcast

    rij = data[head.key_edge]
    energy = data[head.key_energy].sum()
    (fij,) = torch.autograd.grad([energy], [rij], create_graph=head.training, allow_unused=True)
    if fij is None:
        return data
    edge_idx = data[head.key_edge_idx]
    edges = sorted_edges_of(data, edge_idx, num_atoms)
    data[head.key_force] = node_difference(fij, edges, edge_idx[1], edge_idx[0], plus="dst")
    if not with_stress:
        return data
    virial = torch.cat([rij * fij, (rij[..., 0] * fij[..., 1]).unsqueeze(-1),
                        (rij[..., 1] * fij[..., 2]).unsqueeze(-1), (rij[..., 2] * fij[..., 0]).unsqueeze(-1)], dim=-1)
    if head.use_atomic_virial:
        per_atom = torch.zeros(num_atoms, 6, dtype=virial.dtype, device=virial.device)
        per_atom.scatter_reduce_(0, broadcast(edge_idx[1], virial, 0), virial, reduce="sum")
        data[head.key_atomic_virial] = torch.neg(per_atom)
    volume = data[head.key_cell_volume]
    volume = torch.where(volume < 1e-3, torch.full_like(volume, 1e-3), volume)  # sevenn's floor for molecules
    data[head.key_stress] = torch.neg(virial.sum(0)) / volume.unsqueeze(-1)
    return data


def _edge_force_head(model):
    """The model's final ``ForceStressOutputFromEdge`` (forces from edge vectors), None when it has another."""
    from sevenn.nn.force_output import ForceStressOutputFromEdge

    modules = list(model)
    return modules[-1] if modules and type(modules[-1]) is ForceStressOutputFromEdge else None


def _until_head(model, data):
    """``model(data)`` without its final force/stress module: the per-atom energies and the graph behind them.

    The species lookup, the one-hot embedding and the per-species energy scale and shift are the same every step
    of a structure, so they are kept on its atomic-numbers tensor (:mod:`fastmlip.memo`): a captured step
    launches none of them (7 launches)."""
    from sevenn.nn.linear import IrrepsLinear
    from sevenn.nn.node_embedding import OnehotEmbedding
    from sevenn.nn.scale import SpeciesWiseRescale

    data = _preprocess(model, data)
    for module in list(model)[:-1]:
        if type(module) is OnehotEmbedding:
            data = _embedded(module, data)
        elif type(module) is SpeciesWiseRescale:
            data = _rescaled(module, data)
        elif isinstance(module, IrrepsLinear) and module.num_modalities > 1 and not module._is_batch_data:
            data = _modal_linear(module, data)  # isinstance: torch.export traces modules through proxy subclasses
        else:
            data = module(data)
    return data


def _modal_linear(module, data):
    """sevenn's ``IrrepsLinear`` of a multi-modal model on one structure: the modality's one-hot appended to each
    node's input, then the linear, as sevenn computes it, with the nodes counted by the input's shape (sevenn's
    ``len()`` of the tensor fixes the atom count of an exported program)."""
    x = data[module.key_input]
    modality = data[module.key_modal_attr].expand(x.shape[0], -1).type(x.dtype)
    data[module.key_input] = torch.cat([x, modality], dim=1)
    data[module.key_output] = module.linear(data[module.key_input])
    return data


def _preprocess(model, data):
    """``model._preprocess(data)`` (sevenn's AtomGraphSequential) with its species lookup kept per structure."""
    if model.eval_type_map:
        numbers = data[model.key_atomic_numbers]
        data[model.key_node_feature] = memo.derived_with(numbers, "sevenn_type_index", (model.z_to_onehot_tensor,),
                                                         lambda: model._atomic_numbers_to_onehot(numbers))
    if model.eval_modal_map:
        model._eval_modal_map(data)
    if model.key_grad is not None:
        data[model.key_grad].requires_grad_(True)
    return data


def _rescaled(module, data):
    """sevenn's ``SpeciesWiseRescale``: x * scale[species] + shift[species], the gathered factors kept on the
    species index and the rest one fused operation."""
    index, scale, shift = data[module.key_indices], module.scale, module.shift
    scales, shifts = memo.derived_with(index, "sevenn_rescale", (scale, shift),
                                       lambda: (scale[index].view(-1, 1), shift[index].view(-1, 1)))
    data[module.key_output] = torch.addcmul(shifts, data[module.key_input], scales)
    return data


def _embedded(module, data):
    """A one-hot embedding module's outputs, kept on the species index they come from."""
    index = data[module.key_x]
    reference = module._buffers.get("_dtype_reference")  # the dtype it casts to (_make_onehots_follow_dtype)
    key = ("sevenn_onehot", module.num_classes, module.key_output, module.key_save, module.key_additional_output,
           None if reference is None else reference.dtype)
    data.update(memo.derived(index, key, lambda: dict(module(GraphData({module.key_x: index})))))
    return data


def _run(model, data, num_atoms: int, with_stress: bool = True):
    """``model(data)``, with a single-structure edge force/stress head evaluated by fastmlip (no host syncs;
    ``with_stress`` False: no virial)."""
    head = _edge_force_head(model)
    if head is None or getattr(model, "is_batch_data", True):
        return model(data)
    return _edge_forces_and_stress(head, _until_head(model, data), num_atoms, with_stress)


def compute(model, positions, cell, pbc, numbers, edge_i, edge_j, shifts, *, compute_stress=True, modal=None,
            edge_mask=None, validated=False):
    """Energy, per-atom energies, forces and (periodic only) stress through the model's own force/stress math.

    ``validated``: the caller checked the species on the host, so nothing here waits for the device.
    ``edge_mask``: which edges exist; the others (pairs beyond the cutoff, padding) contribute exactly zero,
    which lets a CUDA graph keep one edge count while the Verlet list is reused (needs :func:`mask_obstacle`
    to be None).
    """
    import sevenn._keys as KEY

    numbers = torch.as_tensor(numbers)
    if not validated:
        _check_species(model, numbers)
    if edge_mask is not None and mask_obstacle(model):
        raise ValueError(f"edge_mask needs an accelerated model: {mask_obstacle(model)}")
    modal = select_modal(model, modal)
    _make_onehots_follow_dtype(model)
    device, dtype = swaps.first_tensor_placement(model)
    data = build_graph(model, positions, cell, pbc, numbers, edge_i, edge_j, shifts, modal, edge_mask)
    n = numbers.numel()
    want_stress = bool(compute_stress) and any(bool(p) for p in torch.as_tensor(pbc).flatten().tolist())
    output = _run(model, data, n, want_stress)
    forces = output[KEY.PRED_FORCE].detach() if KEY.PRED_FORCE in output else torch.zeros(n, 3, dtype=dtype,
                                                                                          device=device)
    stress = None
    if want_stress:
        if KEY.PRED_STRESS in output:
            xx, yy, zz, xy, yz, zx = (-output[KEY.PRED_STRESS].detach().reshape(6)).unbind()
            stress = torch.stack([xx, xy, zx, xy, yy, yz, zx, yz, zz]).reshape(3, 3)
        else:  # no edges: sevenn leaves stress out, it is zero
            stress = torch.zeros(3, 3, dtype=dtype, device=device)
    return {
        "energy": output[KEY.PRED_TOTAL_ENERGY].detach().reshape(()),
        "energies": output[KEY.ATOMIC_ENERGY].detach().reshape(-1),
        "forces": forces.reshape(n, 3),
        "stress": stress,
    }


def compute_edges(model, numbers, edge_i, edge_j, vectors, *, modal=None, num_local=None) -> dict:
    """Per-atom energies [N] and the gradient [E, 3] of the first ``num_local`` atoms' energy (all atoms by
    default) by the edge vectors ``vectors`` (``pos[j] - pos[i] + shift`` of edge i -> j), for callers that hold
    edges as vectors (LAMMPS ML-IAP: local atoms then ghosts; forces and virial follow from the gradient)."""
    import sevenn._keys as KEY

    device, dtype = swaps.first_tensor_placement(model)
    numbers = torch.as_tensor(numbers, device=device).long()
    _check_species(model, numbers)
    if _edge_force_head(model) is None:
        raise ValueError("this SevenNet model does not take its forces from edge vectors")
    _make_onehots_follow_dtype(model)
    vectors = torch.as_tensor(vectors, device=device).detach().to(dtype).requires_grad_(True)
    data = _graph_data(model, numbers, torch.as_tensor(edge_i, device=device).long(),
                       torch.as_tensor(edge_j, device=device).long(), vectors,
                       torch.zeros(numbers.numel(), 3, dtype=dtype, device=device),
                       torch.zeros((), dtype=dtype, device=device), select_modal(model, modal))
    with torch.enable_grad():
        energies = _until_head(model, data)[KEY.ATOMIC_ENERGY].reshape(-1)
        local = energies[:numbers.numel() if num_local is None else num_local].sum()
        gradient = gradient_or_zeros(local, vectors)
    return {"energies": energies.detach(), "energy": local.detach(), "edge_gradient": gradient}


class NodeEnergies(torch.nn.Module):
    """``(energies, energies)`` [N] of one structure from its edges as vectors (ASE "ijS" edges, vectors
    ``pos[j] - pos[i] + shift``) and an edge mask, then the six tensors of the edges'
    :class:`fastmlip.graph.SortedEdges` its convolutions sorted (sevenn's receivers: ``edge_i``,
    :attr:`RECEIVERS`), which forces reuse: the function :mod:`fastmlip.patches.exported` exports. The second output
    is what forces differentiate (for SevenNet the same)."""

    RECEIVERS = "edge_i"

    def __init__(self, model, modal: Optional[str]):
        super().__init__()
        self.model, self.modal = model, modal

    def forward(self, numbers, edge_i, edge_j, vectors, edge_mask):
        import sevenn._keys as KEY

        zeros = vectors.new_zeros(numbers.shape[0], 3)
        data = _graph_data(self.model, numbers, edge_i, edge_j, vectors, zeros, vectors.new_zeros(()), self.modal,
                           edge_mask)
        data = _until_head(self.model, data)
        energies = data[KEY.ATOMIC_ENERGY].reshape(-1)
        return energies, energies, *sorted_edges_of(data, data[KEY.EDGE_IDX], numbers.shape[0]).tensors()


def energy_module(model, modal=None) -> torch.nn.Module:
    """:class:`NodeEnergies` of an accelerated model whose forces come from edge vectors."""
    if _edge_force_head(model) is None:
        raise ValueError("this SevenNet model does not take its forces from edge vectors")
    if mask_obstacle(model):
        raise ValueError(f"this SevenNet model cannot be exported: {mask_obstacle(model)}")
    _make_onehots_follow_dtype(model)
    return NodeEnergies(model, select_modal(model, modal))


restore = swaps.restore_swaps
is_accelerated = swaps.is_accelerated
