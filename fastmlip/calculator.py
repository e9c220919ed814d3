"""ASE calculator that keeps the whole step on the model's device.

Per step: positions (and the cell, when it changed) go to the device once, a
Verlet-skin neighbour list on the device either reuses its cached edges (a
filter, no rebuild) or rebuilds, the framework patch's ``compute`` runs the
model and autograd, and energy, per-atom energies, forces and stress come
back to the host in one transfer.
"""
from __future__ import annotations

import math
import os
import time
import traceback
import warnings

import numpy as np
import torch
from ase.calculators.calculator import Calculator as AseCalculator
from ase.calculators.calculator import CalculatorError, PropertyNotImplementedError, all_changes
from ase.data import chemical_symbols

from . import cuda_context, graph_pairs, memory
from .cuda_graph import GROWTH, REGROWTH, CapturedStep, pack_results, unpack_results
from .neighbors import VerletList, compact_positions, wrap_basis

# 0.5 A: a rebuild is needed once any atom moved skin/2 = 0.25 A, i.e. every
# ~10-50 steps of 1 fs MD at room temperature, while the cached list holds only
# ((r + 0.5) / r)^3 ~ 1.3x the edges at r = 5-6 A, so the per-step filter stays cheap.
DEFAULT_SKIN = 0.5
CLOSE_CONTACT = 0.5  # A: pairs closer than this are named when a result is not finite


class StructureError(ValueError, CalculatorError):
    """The structure cannot be evaluated (unknown element, non-finite positions, bad cell)."""


def _describe_failure(exc: BaseException) -> str:
    """The error's first line and the innermost frame outside torch, which names the code that cannot be captured."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}{where}"


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
    CUDA graph (see :mod:`fastmlip.cuda_graph`); "auto" does so on CUDA when the model allows it, True insists
    (ValueError when it cannot), False never does. "auto" also times a replay against an eager step after the
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
        if pairs not in ("verlet", "graph"):
            raise ValueError(f"pairs must be 'verlet' or 'graph', got {pairs!r}")
        self.pairs = pairs
        self._pairs_in_graph_for = None  # (cell tensor, (pbc, atoms), whether its pairs are rebuilt in the graph)
        self._cuda_graph_request = cuda_graph
        self.cuda_graph = self._select_cuda_graph(cuda_graph)
        self.cuda_graph_timing = None  # {"replay_ms", "eager_ms"} measured at the first capture ("auto")
        self._step = None  # the CapturedStep being replayed
        self.graph_captures = 0  # CUDA graphs captured so far (a list that outgrows its capacity captures again)
        self.kept_replay = None  # fastmlip.simulate's ReplayedSteps (steps_per_replay > 1), reused by later runs
        if chunk_edges != "auto" and chunk_edges is not None and (isinstance(chunk_edges, bool) or
                                                                   int(chunk_edges) < 1):
            raise ValueError(f"chunk_edges must be 'auto', a positive integer or None, got {chunk_edges!r}")
        self._chunk_request = chunk_edges
        self._conv_widths = memory.conv_weight_widths(model)
        api.chunk_convolutions(model, None)
        self.chunk_edges = None  # edges per convolution chunk in the last eager step (None: not chunked)

    def _select_cuda_graph(self, wanted) -> bool:
        if wanted not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {wanted!r}")
        if self.device.type == "cuda":
            reason = self.framework.capture_obstacle(self.model)
        else:
            reason = f"the model runs on {self.device}, not CUDA"
        if reason and wanted is True:
            raise ValueError(f"cuda_graph=True, but this model cannot be captured: {reason}")
        self.cuda_graph_obstacle = reason
        return wanted is not False and reason is None

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
    def replays_exact_pairs(self) -> bool:
        """Whether the captured step rebuilds its exact pairs in the graph (then no list goes stale)."""
        return self._step is not None and self._step.exact_pairs is not None

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
        if self._cell is None or self._cell[0] is None or not np.array_equal(self._cell[0], cell_host) or \
                self._cell[2] != pbc:
            self._cell = (cell_host.copy(), torch.as_tensor(cell_host, device=self.device), pbc,
                          wrap_basis(cell_host, pbc).to(self.device))
        cell = self._cell[1]

        positions = torch.as_tensor(positions, device=self.device)  # the one host->device copy
        flat = self._replay(positions, cell, pbc, with_stress) if self.cuda_graph else None
        if flat is None:
            flat, with_stress = self._eager(positions, cell, pbc, with_stress)
        results = self._to_host(flat, len(atoms), with_stress)
        self._check_finite(results, atoms)
        self.results = results

    def bind(self, atoms) -> None:
        """Check ``atoms``' species, cell and positions once, for a run of :meth:`evaluate` calls on them."""
        self._numbers = self.check(atoms)

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
        flat = self._replay(positions, cell, pbc, with_stress) if self.cuda_graph else None
        if flat is None:
            flat, with_stress = self._eager(positions, cell, pbc, with_stress)
        else:
            flat = flat.clone()  # the graph's output buffer is overwritten by the next replay
        return unpack_results(flat, positions.shape[0], with_stress)

    def evaluate_unchecked(self, positions, cell, pbc, with_stress: bool):
        """:meth:`evaluate` as a replay of the captured step on the current Verlet list, without asking whether
        the list still holds every pair (that question reads the device): ``(energy, forces, stress, stale)``,
        ``stale`` a device bool saying the list was out of date, so the result must be discarded and the step
        redone with :meth:`evaluate`. None when no captured step fits (call :meth:`evaluate`). The results are
        copies: they survive the next replay."""
        step = self._step
        if not self.cuda_graph or step is None or not step.matches(self._numbers, cell, pbc, with_stress):
            return None
        flat = step.replay(positions).clone()
        # with pairs in the graph no list goes stale, but the pairs may have outgrown the capacity
        stale = self.neighbors.stale(positions) if step.exact_pairs is None else step.outgrown.clone()
        return (*unpack_results(flat, positions.shape[0], with_stress), stale)

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

    def _chunking(self, num_edges: int):
        """Edges per convolution chunk for a step over ``num_edges`` edges (None: keep the weights whole)."""
        if self._chunk_request != "auto":
            return None if self._chunk_request is None else int(self._chunk_request)
        if self.device.type != "cuda" or not self._conv_widths:  # no need to ask the device for its free memory
            return None
        return memory.chunk_edges_for(self._conv_widths, num_edges, torch.finfo(self.dtype).bits // 8,
                                      memory.free_bytes(self.device))

    def _eager(self, positions, cell, pbc, with_stress):
        edge_i, edge_j, shifts = self.neighbors.update(positions, cell, pbc)
        chunk_edges = self._chunking(edge_i.numel())
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

    def captured_step(self, cell, pbc, with_stress: bool, num_pairs: int, pairs_in_graph=False,
                      growth=GROWTH) -> CapturedStep:
        """Static buffers (not yet captured) for steps of the structure :meth:`bind` checked, room for ``growth``
        x ``num_pairs`` pairs: what this calculator's replays and the engine's replays of many steps
        (:mod:`fastmlip.replayed_steps`) evaluate. ``pairs_in_graph``: see :class:`CapturedStep`."""
        return CapturedStep(self.framework, self.model, self._numbers, cell, pbc, self.cutoff, self.modal,
                            with_stress, num_pairs, pairs_in_graph, growth)

    def _replay_is_faster(self, step, positions, cell, pbc, with_stress) -> bool:
        """Time a replay against an eager step (best of two each). A replay processes every candidate pair of
        the Verlet list plus padding, so on large systems, where the GPU and not the host sets the pace, an
        eager step over the exact edges can win; "auto" keeps whichever is faster."""
        def best_ms(run):
            times = []
            for _ in range(2):
                torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                run()
                torch.cuda.synchronize(self.device)
                times.append(1e3 * (time.perf_counter() - start))
            return min(times)

        replay = best_ms(lambda: step.replay(positions))
        eager = best_ms(lambda: self._eager(positions, cell, pbc, with_stress))
        self.cuda_graph_timing = {"replay_ms": replay, "eager_ms": eager}
        return replay < eager

    def _replay(self, positions, cell, pbc, with_stress):
        """The step as a CUDA graph replay (captured when needed); None when this structure runs eagerly."""
        if self.pairs_in_graph(positions, cell, pbc):
            return self._replay_exact_pairs(positions, cell, pbc, with_stress)
        edge_i, edge_j, shifts, rebuilt = self.neighbors.candidates(positions, cell, pbc)
        if edge_i.numel() == 0:  # nothing to pad with: no pairs within cutoff + skin
            return None
        step = self._step
        usable = step is not None and step.matches(self._numbers, cell, pbc, with_stress) and step.exact_pairs is None
        outgrown = usable and rebuilt and not step.load_pairs(edge_i, edge_j, shifts)
        if not usable or outgrown:
            step = self._new_step(positions, cell, pbc, with_stress, edge_i.numel(), (edge_i, edge_j, shifts),
                                  REGROWTH if outgrown else GROWTH)
            if step is None:
                return None
        return step.replay(positions)

    def pairs_in_graph(self, positions, cell, pbc) -> bool:
        """Whether replays (this calculator's and the engine's replays of many steps) rebuild the exact pairs in the
        graph (``pairs="graph"`` and where that applies), asked once per cell tensor (the answer reads the cell on
        the host)."""
        if self.pairs != "graph":
            return False
        known = self._pairs_in_graph_for
        if known is None or known[0] is not cell or known[1] != (pbc, positions.shape[0]):
            known = (cell, (pbc, positions.shape[0]), graph_pairs.applies(cell, pbc, self.cutoff, positions.shape[0]))
            self._pairs_in_graph_for = known
        return known[2]

    def _replay_exact_pairs(self, positions, cell, pbc, with_stress):
        """A replay that builds its own exact pairs (:mod:`fastmlip.graph_pairs`); captured again with more room
        when they outgrew the capacity (one small device read per checked step)."""
        step = self._step
        if step is None or not step.matches(self._numbers, cell, pbc, with_stress) or step.exact_pairs is None:
            step = self._new_exact_pairs_step(positions, cell, pbc, with_stress)
            if step is None:
                return None
        flat = step.replay(positions)
        if bool(step.outgrown):
            step = self._new_exact_pairs_step(positions, cell, pbc, with_stress, REGROWTH)
            flat = None if step is None else step.replay(positions)
        return flat

    def _new_exact_pairs_step(self, positions, cell, pbc, with_stress, growth=GROWTH):
        count = graph_pairs.pair_count(positions, cell, pbc, self.cutoff)
        if count == 0:  # nothing to pad with
            return None
        return self._new_step(positions, cell, pbc, with_stress, count, None, growth)

    def _new_step(self, positions, cell, pbc, with_stress, num_pairs, pairs, growth=GROWTH):
        """Capture a step with room for ``growth`` x ``num_pairs``: the Verlet candidates ``pairs`` loaded, or
        (None) pairs rebuilt in the graph; None when this structure runs eagerly from now on (chunked
        convolutions, a failed capture, or "auto" timing eager steps faster)."""
        self._step = None  # frees the old graph's memory before the new capture
        if self._chunking(num_pairs) is not None:  # chunks read the host: eager steps only
            self.cuda_graph = False
            self.cuda_graph_obstacle = "the convolutions run in chunks to fit memory (chunks read the host)"
            return None
        step = self.captured_step(cell, pbc, with_stress, num_pairs, pairs_in_graph=pairs is None, growth=growth)
        if pairs is not None:
            step.load_pairs(*pairs)
        try:
            self.graph_captures += 1
            step.capture(positions)
        except Exception as exc:  # capture limits differ across models and torch versions: run eagerly
            warnings.warn(f"fastmlip: CUDA graph capture failed, running eager steps instead "
                          f"({_describe_failure(exc)})", RuntimeWarning, stacklevel=4)
            self.cuda_graph, self.cuda_graph_obstacle = False, f"capture failed: {type(exc).__name__}"
            return None
        if self._cuda_graph_request == "auto" and not self._replay_is_faster(step, positions, cell, pbc,
                                                                             with_stress):
            timing = self.cuda_graph_timing
            self.cuda_graph = False
            self.cuda_graph_obstacle = (f"eager steps measured faster ({timing['eager_ms']:.2f} ms) than "
                                        f"graph replays ({timing['replay_ms']:.2f} ms)")
            return None
        self._step = step
        return step

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

