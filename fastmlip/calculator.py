"""ASE calculator that keeps the whole step on the model's device.

Per step: positions (and the cell, when it changed) go to the device once, a
Verlet-skin neighbour list on the device either reuses its cached edges (a
filter, no rebuild) or rebuilds, the framework patch's ``compute`` runs the
model and autograd, and energy, per-atom energies, forces and stress come
back to the host in one transfer.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import CalculatorError, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols

from . import cuda_context, memory
from .cuda_graph import pack_results, unpack_results
from .neighbors import VerletList, compact_positions, wrap_basis
from .step_replays import StepReplays

# 0.5 A: a rebuild is needed once any atom moved skin/2 = 0.25 A, i.e. every
# ~10-50 steps of 1 fs MD at room temperature, while the cached list holds only
# ((r + 0.5) / r)^3 ~ 1.3x the edges at r = 5-6 A, so the per-step filter stays cheap.
DEFAULT_SKIN = 0.5
CLOSE_CONTACT = 0.5  # A: pairs closer than this are named when a result is not finite


class StructureError(ValueError, CalculatorError):
    """The structure cannot be evaluated (unknown element, non-finite positions, bad cell)."""


def element_name(number: int) -> str:
    if 0 < number < len(chemical_symbols):
        return f"{chemical_symbols[number]} (Z={number})"
    return f"Z={number}"


class Calculator(AseCalculator):
    """Energy, forces, stress and per-atom energies of a MACE or SevenNet model.

    ``model``: a name (``"7net-0"``), a path (MACE ``.model``, SevenNet
    checkpoint, converted file) or a loaded model. ``accelerate=True`` swaps in
    fastmlip's modules (a loaded model is changed in place; one that is already
    accelerated is used as is); ``accelerate=False`` leaves the model as given.
    ``modal``/``head`` pick a SevenNet modal or MACE head (the same thing to
    fastmlip; give one). ``skin`` (A) is the Verlet-list skin. ``cuda_graph``: replay each step as a captured
    CUDA graph (:mod:`fastmlip.cuda_graph`; :mod:`fastmlip.step_replays` decides when); "auto" does so on CUDA
    when the model allows it, True insists (ValueError when it cannot), False never does. "auto" also times a replay against an eager step after the
    first capture and keeps the faster; a capture that fails falls back to eager steps with a warning.
    ``trusted``/``sha256``: for model files that only load by running code they hold (see :func:`fastmlip.load`).
    ``chunk_edges``: "auto" makes the convolutions recompute their radial weights in chunks of receivers when
    keeping them would not fit the device's free memory (:mod:`fastmlip.memory`; :attr:`chunk_edges` says what a
    step used), an integer always does with chunks of at most that many edges, None never does.
    ``pairs``: what a CUDA graph replay evaluates: "graph" the exact pairs, rebuilt inside the graph at every step
    where :func:`fastmlip.graph_pairs.applies` (up to 4096 atoms, cells wider than twice the cutoff), the Verlet
    list's candidates elsewhere; "verlet" the Verlet list's candidates (cutoff + skin), masked, everywhere. "graph"
    measured 1.2-2.2x faster per MD step on an H200 at 216 and 4000 atoms (docs/md.md).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model="7net-0", device="auto", dtype=None, accelerate=True, modal=None,
                 head=None, skin=DEFAULT_SKIN, check=True, cuda_graph="auto", trusted=False, sha256=None,
                 chunk_edges="auto", pairs="graph", **kwargs):
        super().__init__(**kwargs)
        from . import api  # the face above patches; imported late to keep `import fastmlip` light

        if not isinstance(model, torch.nn.Module):
            cuda_context.create_in_background(device)  # while the model is read and built
        self.device = api.resolve_device(device)
        dtype = api.resolve_dtype(dtype)
        start = time.perf_counter()
        if isinstance(model, torch.nn.Module):
            self.framework = api.framework_of(model)
            model = model.to(device=self.device, dtype=dtype) if dtype else model.to(self.device)
        else:
            model = api.load(model, device=self.device, dtype=dtype, trusted=trusted, sha256=sha256)
            self.framework = api.framework_of(model)
            for parameter in model.parameters():  # the calculator's own model: no weight gradients per step
                parameter.requires_grad_(False)
        model.eval()
        self.setup_seconds = {"load": time.perf_counter() - start}  # and "accelerate" when this one did
        if accelerate and not self.framework.is_accelerated(model):
            start = time.perf_counter()
            api.accelerate(model, check=check)
            self.setup_seconds["accelerate"] = time.perf_counter() - start
        self.model = model

        info = self.framework.model_info(model)
        self.cutoff = float(info["cutoff"])
        self.dtype = info["dtype"]
        self.species = sorted(int(z) for z in info["atomic_numbers"])
        self.modal = self._select_modal(modal, head, list(info.get("modals") or []))
        self.neighbors = VerletList(self.cutoff, skin)
        self._numbers = None  # device tensor of the last structure's atomic numbers
        self._cell = None  # (host array, device float64 tensor, pbc, wrap basis) of the last cell
        self.replays = StepReplays(self, cuda_graph, pairs)  # capture, replay, capture again, or eager steps
        if chunk_edges != "auto" and chunk_edges is not None and (isinstance(chunk_edges, bool) or
                                                                   int(chunk_edges) < 1):
            raise ValueError(f"chunk_edges must be 'auto', a positive integer or None, got {chunk_edges!r}")
        self._chunk_request = chunk_edges
        self._conv_widths = memory.conv_weight_widths(model)
        api.chunk_convolutions(model, None)
        self.chunk_edges = None  # edges per convolution chunk in the last eager step (None: not chunked)

    @staticmethod
    def _select_modal(modal, head, available):
        if modal is not None and head is not None and modal != head:
            raise ValueError(f"modal={modal!r} and head={head!r} disagree; give one of them")
        chosen = modal if modal is not None else head
        if chosen is None:
            return None
        if not available:
            raise ValueError(f"modal/head {chosen!r} given, but the model has none")
        matches = [name for name in available if name.lower() == str(chosen).lower()]
        if not matches:
            raise ValueError(f"unknown modal/head {chosen!r}; the model has {available}")
        return matches[0]

    @property
    def cuda_graph(self) -> bool:
        """Whether steps replay as captured CUDA graphs now (:attr:`cuda_graph_obstacle`: why not)."""
        return self.replays.enabled

    @property
    def cuda_graph_obstacle(self):
        return self.replays.obstacle

    @property
    def cuda_graph_timing(self):
        """{"replay_ms", "eager_ms"} measured at the first capture ("auto"), else None."""
        return self.replays.timing

    @property
    def graph_captures(self) -> int:
        """CUDA graphs captured so far (pairs that outgrow their capacity capture again)."""
        return self.replays.captures

    @property
    def kept_replay(self):
        """fastmlip.simulate's replays of many steps, kept for later runs that fit them."""
        return self.replays.kept

    @property
    def replays_exact_pairs(self) -> bool:
        """Whether the captured step rebuilds its exact pairs in the graph (then no list goes stale)."""
        return self.replays.exact_pairs

    @property
    def numbers(self):
        """The atomic numbers (a device tensor) of the structure last checked."""
        return self._numbers

    @property
    def neighbor_list_rebuilds(self) -> int:
        """How many times the Verlet list was built from scratch so far."""
        return self.neighbors.rebuilds

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if len(atoms) == 0:
            raise StructureError("the structure has no atoms")
        if "numbers" in system_changes or self._numbers is None:
            self._numbers = self._checked_numbers(atoms.numbers)
        positions = self._checked_positions(atoms.positions)
        pbc = tuple(bool(p) for p in atoms.pbc)
        cell_host = np.asarray(atoms.cell.array, dtype=np.float64)
        with_stress = self._check_cell(cell_host, pbc) and any(pbc)
        if "stress" in properties and not with_stress:
            raise PropertyNotImplementedError(
                "stress needs a periodic structure with a cell of non-zero volume; "
                f"this one has pbc={list(pbc)} and cell {cell_host.tolist()}")
        cell = self.device_cell(cell_host, pbc)

        positions = torch.as_tensor(positions, device=self.device)  # the one host->device copy
        flat = self.replays.replay(positions, cell, pbc, with_stress)
        if flat is None:
            flat, with_stress = self.eager(positions, cell, pbc, with_stress)
        results = self._to_host(flat, len(atoms), with_stress)
        self._check_finite(results, atoms)
        self.results = results

    def bind(self, atoms) -> None:
        """Check ``atoms``' species, cell and positions once, for a run of :meth:`evaluate` calls on them. The
        same atomic numbers keep their device tensor (captured steps are matched to it by identity), so a later
        run on them replays what an earlier one captured."""
        numbers = self.check(atoms)
        if self._numbers is None or not torch.equal(numbers, self._numbers):
            self._numbers = numbers

    def device_cell(self, cell, pbc) -> torch.Tensor:
        """``cell`` (3x3, A) as the float64 device tensor to pass to :meth:`evaluate`: the same tensor while the
        cell and ``pbc`` stay (captured steps are matched to it by identity)."""
        cell_host = np.asarray(cell, dtype=np.float64)
        if self._cell is None or self._cell[0] is None or not np.array_equal(self._cell[0], cell_host) or \
                self._cell[2] != pbc:
            self._cell = (cell_host.copy(), torch.as_tensor(cell_host, device=self.device), pbc,
                          wrap_basis(cell_host, pbc).to(self.device))
        return self._cell[1]

    def check(self, atoms) -> torch.Tensor:
        """The atomic numbers of ``atoms`` on the device; :class:`StructureError` for no atoms, elements the model
        does not know, NaN positions or a periodic axis without a cell vector."""
        if len(atoms) == 0:
            raise StructureError("the structure has no atoms")
        numbers = self._checked_numbers(atoms.numbers)
        self._checked_positions(atoms.positions)
        self._check_cell(np.asarray(atoms.cell.array, dtype=np.float64), tuple(bool(p) for p in atoms.pbc))
        return numbers

    def evaluate(self, positions, cell, pbc, with_stress: bool) -> tuple:
        """(energy [], forces [N, 3], stress [3, 3] or None) as device tensors, for float64 ``positions`` and
        ``cell`` on the device of the structure :meth:`bind` checked: what :meth:`calculate` computes (CUDA graph
        replays included), without the host. The cell is matched by identity: pass the same tensor while it
        stays the same. The results are the caller's (copies where a replay would overwrite them)."""
        if self._cell is None or self._cell[1] is not cell or self._cell[2] != pbc:
            self._cell = (None, cell, pbc, wrap_basis(cell, pbc).to(cell.device))
        flat = self.replays.replay(positions, cell, pbc, with_stress)
        if flat is None:
            flat, with_stress = self.eager(positions, cell, pbc, with_stress)
        else:
            flat = flat.clone()  # the graph's output buffer is overwritten by the next replay
        return unpack_results(flat, positions.shape[0], with_stress)

    def evaluate_unchecked(self, positions, cell, pbc, with_stress: bool):
        """:meth:`evaluate` as a replay of the captured step on the current Verlet list, without asking whether
        the list still holds every pair (that question reads the device): ``(energy, forces, stress, stale)``,
        ``stale`` a device bool saying the list was out of date, so the result must be discarded and the step
        redone with :meth:`evaluate`. None when no captured step fits (call :meth:`evaluate`). The results are
        copies: they survive the next replay."""
        replayed = self.replays.replay_unchecked(positions, cell, pbc, with_stress)
        if replayed is None:
            return None
        flat, stale = replayed
        return (*unpack_results(flat.clone(), positions.shape[0], with_stress), stale)

    def _check_finite(self, results, atoms) -> None:
        """Raise :class:`StructureError` for NaN or infinite results, naming atoms that sit on top of each other
        (the usual cause: a model's radial terms divide by the distance)."""
        if all(np.isfinite(value).all() for value in results.values()):
            return
        from ase.neighborlist import neighbor_list

        first, second, distance = neighbor_list("ijd", atoms, CLOSE_CONTACT)
        pairs = sorted({(min(a, b), max(a, b), round(float(d), 4)) for a, b, d in zip(first, second, distance)},
                       key=lambda pair: pair[2])
        if not pairs:
            raise StructureError("the model returned NaN or infinite energies/forces for this structure")
        shown = ", ".join(f"{a} and {b} ({d:.3f} A apart)" for a, b, d in pairs[:5])
        raise StructureError(f"the model returned NaN or infinite energies/forces: atoms too close together: "
                             f"{shown}{' ...' if len(pairs) > 5 else ''}")

    def chunking(self, num_edges: int):
        """Edges per convolution chunk for a step over ``num_edges`` edges (None: keep the weights whole)."""
        if self._chunk_request != "auto":
            return None if self._chunk_request is None else int(self._chunk_request)
        if self.device.type != "cuda" or not self._conv_widths:  # no need to ask the device for its free memory
            return None
        itemsize, available = torch.finfo(self.dtype).bits // 8, memory.free_bytes(self.device)
        chunk = memory.chunk_edges_for(self._conv_widths, num_edges, itemsize, available)
        if chunk is not None or not all(self._conv_widths):  # tables made since the count, or one gone stale
            self._conv_widths = memory.conv_weight_widths(self.model)
            chunk = memory.chunk_edges_for(self._conv_widths, num_edges, itemsize, available)
        return chunk

    def eager(self, positions, cell, pbc, with_stress):
        """One step without a graph: the Verlet list's exact edges, the model, autograd; (flat results, with_stress)."""
        edge_i, edge_j, shifts = self.neighbors.update(positions, cell, pbc)
        chunk_edges = self.chunking(edge_i.numel())
        if chunk_edges != self.chunk_edges:
            from .api import chunk_convolutions

            chunk_convolutions(self.model, chunk_edges)
            self.chunk_edges = chunk_edges
        positions, shifts = compact_positions(positions, cell, self._cell[3], edge_i, edge_j, shifts)
        output = self.framework.compute(  # float64 positions: the patch casts after forming edge vectors
            self.model, positions, cell, pbc, self._numbers, edge_i, edge_j, shifts, compute_stress=with_stress,
            modal=self.modal)
        with_stress = with_stress and output.get("stress") is not None
        return pack_results(output, with_stress), with_stress

    @staticmethod
    def _to_host(flat, n_atoms, with_stress):
        """All results in one device->host copy, as float64 numpy in ASE conventions."""
        flat = flat.cpu().numpy()
        energy = float(flat[0])
        results = {
            "energy": energy,
            "free_energy": energy,
            "energies": flat[1:1 + n_atoms].copy(),
            "forces": flat[1 + n_atoms:1 + 4 * n_atoms].reshape(n_atoms, 3).copy(),
        }
        if with_stress:
            stress = flat[1 + 4 * n_atoms:].reshape(3, 3)
            stress = 0.5 * (stress + stress.T)
            results["stress"] = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]  # Voigt xx yy zz yz xz xy
        return results

    def _checked_numbers(self, numbers):
        unknown = sorted(set(int(z) for z in numbers) - set(self.species))
        if unknown:
            raise StructureError(
                f"the model does not know element(s) {', '.join(element_name(z) for z in unknown)}; "
                f"it knows {', '.join(chemical_symbols[z] for z in self.species)}")
        return torch.as_tensor(np.asarray(numbers, dtype=np.int64), device=self.device)

    @staticmethod
    def _checked_positions(positions):
        positions = np.asarray(positions, dtype=np.float64)
        finite = np.isfinite(positions).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            shown = ", ".join(str(k) for k in bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise StructureError(f"positions contain NaN or inf at {len(bad)} atom(s): index {shown}")
        return positions

    @staticmethod
    def _check_cell(cell, pbc):
        """Raise on periodic axes without a usable cell vector; return whether the cell has volume."""
        if not np.isfinite(cell).all():
            raise StructureError("cell contains NaN or inf")
        lengths = np.linalg.norm(cell, axis=1)
        empty_periodic = [axis for axis in range(3) if pbc[axis] and lengths[axis] == 0]
        if empty_periodic:
            raise StructureError(
                f"pbc is {list(pbc)} but cell vector(s) {empty_periodic} are zero: "
                "give a cell for every periodic axis (atoms.cell) or set pbc=False")
        volume = abs(float(np.linalg.det(cell)))
        return math.isfinite(volume) and volume > 1e-12 * max(1.0, float(lengths.max()) ** 3)

