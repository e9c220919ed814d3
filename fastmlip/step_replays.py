"""How a calculator's steps run on CUDA: the one owner of capture, replay, capture again and falling back.

:mod:`fastmlip.cuda_graph` says what one captured step is, :mod:`fastmlip.replayed_steps` what a graph of many
MD steps is; this module decides when each is used:

* **whether to capture at all**: the request ("auto", True, False) against the framework's
  ``capture_obstacle`` and the device;
* **what a replay evaluates**: the exact pairs, rebuilt inside the graph at every step, where
  :func:`fastmlip.graph_pairs.applies` (and ``pairs="graph"``), else the Verlet list's candidates, loaded
  into the static buffers at each list rebuild;
* **when to capture again**: other atoms, cell, periodicity or stress flag, or pairs that outgrew the capacity
  (then with ``REGROWTH`` room);
* **when to run eager steps from now on**: chunked convolutions (chunks read the host), a failed capture, or
  "auto" timing an eager step faster than a replay; :attr:`StepReplays.obstacle` says why;
* **the engine's replays of many steps** kept for later runs that fit them (:meth:`StepReplays.many_steps`).
"""
from __future__ import annotations

import os
import time
import traceback
import warnings

import torch

from . import graph_pairs
from .cuda_graph import GROWTH, REGROWTH, CapturedStep
from .replayed_steps import ReplayedSteps

REQUESTS = ("auto", True, False)
OUTGROWN = "pairs outgrew the room"  # a capture reason (see StepReplays.capture_reasons)


def _describe_failure(exc: BaseException) -> str:
    """The error's first line and the innermost frame outside torch, which names the code that cannot be captured."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}torch{os.sep}" not in f.filename]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}{where}"


class StepReplays:
    """The capture policy of one :class:`fastmlip.Calculator` (``request``: its ``cuda_graph``; ``pairs``: its
    ``pairs``). :attr:`enabled` says whether steps replay at all now, :attr:`obstacle` why not; :attr:`timing`
    holds the replay and eager times "auto" compared; :attr:`captures` counts captures; :attr:`kept` is the
    engine's :class:`ReplayedSteps` for later runs."""

    def __init__(self, calculator, request, pairs: str):
        if request not in REQUESTS:
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {request!r}")
        if pairs not in ("verlet", "graph"):
            raise ValueError(f"pairs must be 'verlet' or 'graph', got {pairs!r}")
        self.calculator, self.request, self.pairs = calculator, request, pairs
        if calculator.device.type == "cuda":
            reason = calculator.framework.capture_obstacle(calculator.model)
        else:
            reason = f"the model runs on {calculator.device}, not CUDA"
        if reason and request is True:
            raise ValueError(f"cuda_graph=True, but this model cannot be captured: {reason}")
        self.enabled, self.obstacle = request is not False and reason is None, reason
        self.timing = None  # {"replay_ms", "eager_ms"} measured at the first capture ("auto")
        self.step = None  # the CapturedStep being replayed
        self.captures = 0
        self.capture_reasons = []  # why each capture was made, in order (the engine's summary names them)
        self.kept = None
        self._pairs_in_graph_for = None  # (cell tensor, (pbc, atoms), whether its pairs are rebuilt in the graph)

    def turn_off(self, reason: str) -> None:
        """Eager steps from now on, for ``reason``."""
        self.enabled, self.obstacle, self.step = False, reason, None

    @property
    def exact_pairs(self) -> bool:
        """Whether the captured step rebuilds its exact pairs in the graph (then no list goes stale)."""
        return self.step is not None and self.step.exact_pairs is not None

    def pairs_in_graph(self, positions, cell, pbc) -> bool:
        """Whether replays (single steps and the engine's many) rebuild the exact pairs in the graph, asked once
        per cell tensor (the answer reads the cell on the host)."""
        if self.pairs != "graph":
            return False
        known = self._pairs_in_graph_for
        if known is None or known[0] is not cell or known[1] != (pbc, positions.shape[0]):
            known = (cell, (pbc, positions.shape[0]),
                     graph_pairs.applies(cell, pbc, self.calculator.cutoff, positions.shape[0],
                                         graph_pairs.kernels_for(positions.device)))
            self._pairs_in_graph_for = known
        return known[2]

    def captured_step(self, cell, pbc, with_stress: bool, num_pairs: int, pairs_in_graph=False,
                      growth=GROWTH) -> CapturedStep:
        """Static buffers (not yet captured) for steps of the structure the calculator bound, room for ``growth``
        x ``num_pairs`` pairs. ``pairs_in_graph``: see :class:`CapturedStep`."""
        calc = self.calculator
        return CapturedStep(calc.framework, calc.model, calc.numbers, cell, pbc, calc.cutoff, calc.modal,
                            with_stress, num_pairs, pairs_in_graph, growth)

    def replay(self, positions, cell, pbc, with_stress):
        """The step as a replay (captured first when none fits): its flat output, or None for an eager step."""
        if not self.enabled:
            return None
        if self.pairs_in_graph(positions, cell, pbc):
            return self._replay_exact_pairs(positions, cell, pbc, with_stress)
        edge_i, edge_j, shifts, rebuilt = self.calculator.neighbors.candidates(positions, cell, pbc)
        if edge_i.numel() == 0:  # nothing to pad with: no pairs within cutoff + skin
            return None
        step = self.step
        usable = self._fits(step, cell, pbc, with_stress) and step.exact_pairs is None
        outgrown = usable and rebuilt and not step.load_pairs(edge_i, edge_j, shifts)
        if not usable or outgrown:
            reason = OUTGROWN if outgrown else self._mismatch(step, cell, pbc, with_stress)
            step = self._new_step(positions, cell, pbc, with_stress, edge_i.numel(), (edge_i, edge_j, shifts),
                                  reason, REGROWTH if outgrown else GROWTH)
            if step is None:
                return None
        return step.replay(positions)

    def replay_unchecked(self, positions, cell, pbc, with_stress):
        """A replay of the captured step as it is, without asking on the host whether its pairs still hold:
        ``(flat output, stale)`` with ``stale`` a device bool (the Verlet list out of date, or the pairs in the
        graph outgrew the capacity), or None when no captured step fits."""
        step = self.step
        if not self.enabled or not self._fits(step, cell, pbc, with_stress):
            return None
        flat = step.replay(positions)
        stale = self.calculator.neighbors.stale(positions) if step.exact_pairs is None else step.outgrown.clone()
        return flat, stale

    def many_steps(self, atoms, settings, state, pbc, length, make_integrator) -> ReplayedSteps:
        """The engine's ``length`` steps per replay: the kept ones where they fit this run (the same integrator
        settings but the seed, atoms, cell, masses and length), else new ones, kept from now on. A run resumed from
        a restart file, or MD in chunks, then replays the graph captured before instead of capturing again."""
        built_for = ({key: value for key, value in settings.items() if key != "seed"}, tuple(atoms.numbers.tolist()))
        if self.kept is None or not self.kept.fits(state, pbc, length, built_for):
            self.kept = ReplayedSteps(self.calculator, make_integrator, state, pbc, length, built_for)
        return self.kept

    def _mismatch(self, step, cell, pbc, with_stress) -> str:
        """Why ``step`` cannot be replayed for this call (it is about to be captured again)."""
        if step is None:
            return "first"
        if step.numbers is not self.calculator.numbers:
            return "other atoms"
        if step.cell_source is not cell or step.pbc != pbc:
            return "other cell tensor"
        if step.with_stress != with_stress:
            return "stress wanted" if with_stress else "stress not wanted"
        return "pairs now rebuilt in the graph" if step.exact_pairs is None else "pairs now from the Verlet list"

    def _fits(self, step, cell, pbc, with_stress) -> bool:
        return step is not None and step.matches(self.calculator.numbers, cell, pbc, with_stress)

    def _replay_exact_pairs(self, positions, cell, pbc, with_stress):
        """A replay that builds its own exact pairs; captured again with more room when they outgrew the
        capacity (one small device read per checked step)."""
        step = self.step
        if not self._fits(step, cell, pbc, with_stress) or step.exact_pairs is None:
            step = self._new_exact_pairs_step(positions, cell, pbc, with_stress,
                                              self._mismatch(step, cell, pbc, with_stress))
            if step is None:
                return None
        flat = step.replay(positions)
        if bool(step.outgrown):
            step = self._new_exact_pairs_step(positions, cell, pbc, with_stress, OUTGROWN, REGROWTH)
            flat = None if step is None else step.replay(positions)
        return flat

    def _new_exact_pairs_step(self, positions, cell, pbc, with_stress, reason: str, growth=GROWTH):
        count = graph_pairs.pair_count(positions, cell, pbc, self.calculator.cutoff)
        if count == 0:  # nothing to pad with
            return None
        return self._new_step(positions, cell, pbc, with_stress, count, None, reason, growth)

    def _new_step(self, positions, cell, pbc, with_stress, num_pairs, pairs, reason: str, growth=GROWTH):
        """Capture a step with room for ``growth`` x ``num_pairs``: the Verlet candidates ``pairs`` loaded, or
        (None) pairs rebuilt in the graph; None when this structure runs eagerly from now on. ``reason``: why
        (:attr:`capture_reasons`)."""
        self.step = None  # frees the old graph's memory before the new capture
        if self.calculator.chunking(num_pairs) is not None:
            self.turn_off("the convolutions run in chunks to fit memory (chunks read the host)")
            return None
        step = self.captured_step(cell, pbc, with_stress, num_pairs, pairs_in_graph=pairs is None, growth=growth)
        if pairs is not None:
            step.load_pairs(*pairs)
        try:
            self.captures += 1
            self.capture_reasons.append(reason)
            step.capture(positions)
        except Exception as exc:  # capture limits differ across models and torch versions: run eagerly
            warnings.warn(f"fastmlip: CUDA graph capture failed, running eager steps instead "
                          f"({_describe_failure(exc)})", RuntimeWarning, stacklevel=5)
            self.turn_off(f"capture failed: {type(exc).__name__}")
            return None
        if self.request == "auto" and not self._replay_is_faster(step, positions, cell, pbc, with_stress):
            self.turn_off(f"eager steps measured faster ({self.timing['eager_ms']:.2f} ms) than graph replays "
                          f"({self.timing['replay_ms']:.2f} ms)")
            return None
        self.step = step
        return step

    def _replay_is_faster(self, step, positions, cell, pbc, with_stress) -> bool:
        """Time a replay against an eager step (best of two each). A replay processes every candidate pair of
        the Verlet list plus padding, so on large systems, where the GPU and not the host sets the pace, an
        eager step over the exact edges can win; "auto" keeps whichever is faster."""
        device = self.calculator.device

        def best_ms(run):
            times = []
            for _ in range(2):
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                run()
                torch.cuda.synchronize(device)
                times.append(1e3 * (time.perf_counter() - start))
            return min(times)

        replay = best_ms(lambda: step.replay(positions))
        eager = best_ms(lambda: self.calculator.eager(positions, cell, pbc, with_stress))
        self.timing = {"replay_ms": replay, "eager_ms": eager}
        return replay < eager
