"""Many MD steps per CUDA graph replay: the integrator, the pair list, the edge vectors, the model and its forces
of ``length`` steps captured as one graph (``fastmlip.simulate(..., steps_per_replay=length)``).

Pairs, two ways:

* **Rebuilt in the graph** (:mod:`fastmlip.graph_pairs`: up to 4096 atoms in cells wider than twice the cutoff,
  unless the calculator was asked for ``pairs="verlet"``):
  every step packs the exact pairs within the cutoff into buffers of fixed capacity, so no list goes stale and
  the model sees no skin's extra pairs. Each step leaves a device flag when its pairs outgrew the capacity.
* **Verlet candidates** (elsewhere): the steps evaluate the list's candidates, masked, and each step's flag says
  whether some atom moved more than skin/2 since the list was built.

The host reads the flags once per replay. All clear: the steps stand. A flag at step k: the replay is undone
(state and generator go back to before it) and the engine runs the next k + 1 steps through the calculator's
checked path, which rebuilds the list where it must; the next replay first loads the new candidates (or, with
pairs in the graph, is captured again with room for the pairs there are now).

On a CPU the same program runs eagerly (that is how CI tests it). Steps of both paths evaluate the model on the
same pairs; random numbers come from the same generator state, in the same order: the graph draws from a
generator of its own, which each replay starts from the caller's state and hands back advanced.

The engine keeps a ReplayedSteps on its calculator for later runs that fit it (:meth:`ReplayedSteps.fits`): a run
resumed from a restart file, or MD run in chunks, replays the graph captured before instead of capturing again.
"""
from __future__ import annotations

import torch

from . import graph_pairs, integrators
from .cuda_graph import GROWTH, REGROWTH, WARMUP_RUNS, collector_paused, unpack_results

MOVING = ("positions", "momenta", "energy", "forces")  # what a step changes (masses and the cell stay)


class CaptureFailed(RuntimeError):
    """The steps could not be captured as a CUDA graph (the message says why). The caller's generator is as it
    was: only the ReplayedSteps' own generator was registered with the failed capture (and is unusable now)."""


class ReplayedSteps:
    """``length`` integrator steps on static buffers, captured once on CUDA and replayed. ``built_for``: what else
    the integrator and the graph depend on (the engine passes its settings but the seed, and the atomic numbers);
    :meth:`fits` compares it."""

    def __init__(self, calculator, make_integrator, state: integrators.State, pbc, length: int, built_for):
        if length < 2:
            raise ValueError(f"steps per replay must be >= 2, got {length}")
        obstacle = calculator.framework.mask_obstacle(calculator.model)
        if obstacle:  # a replay evaluates the padded Verlet candidates, masked
            raise ValueError(f"steps per replay need a model that takes an edge mask; this one does not: {obstacle}")
        self.calculator, self.length, self.pbc, self.built_for = calculator, length, pbc, built_for
        self.pairs_in_graph = calculator.replays.pairs_in_graph(state.positions, state.cell, pbc)
        self.integrator = make_integrator(self._evaluate)
        self.half_skin = calculator.neighbors.skin / 2
        self.rebuilds = None  # the neighbour list's rebuild count when its pairs were loaded
        self.step = None  # the CapturedStep whose static buffers the program evaluates
        self.graph = None
        self.generator = None  # the one the graph draws from, registered with it at capture
        self.state = integrators.State(state.positions.clone(), state.momenta.clone(), state.masses.clone(),
                                       state.cell.clone(), state.energy.clone(), state.forces.clone(), None, 0)
        self.reference = torch.empty_like(state.positions)
        self.flags = torch.zeros(length, dtype=torch.bool, device=state.positions.device)
        self._redo = []
        self.stale_at = None  # the step of the last undone replay that must be redone on the checked path
        self.replays = self.undone = self.captures = 0
        self._outgrown = False  # the last replay was undone with pairs in the graph: give them more room

    def fits(self, state: integrators.State, pbc, length: int, built_for) -> bool:
        """Whether these steps, captured graph included, serve a run from ``state`` too: the same length, pbc,
        ``built_for``, number of atoms, device and dtype, and equal cell and masses (the graph holds them)."""
        mine = self.state
        return (length == self.length and pbc == self.pbc and built_for == self.built_for
                and state.positions.shape == mine.positions.shape and state.positions.device == mine.positions.device
                and state.positions.dtype == mine.positions.dtype
                and torch.equal(state.cell, mine.cell) and torch.equal(state.masses, mine.masses))

    def _evaluate(self, positions, cell):
        self.step.positions.copy_(positions)
        energy, forces, _ = unpack_results(self.step.evaluate(), positions.shape[0], False)
        if self.pairs_in_graph:
            self._redo.append(self.step.outgrown.clone())
        else:
            moved = (positions - self.reference).norm(dim=1).amax()
            self._redo.append(~(moved <= self.half_skin))  # NaN counts as moved
        return energy, forces, None

    def _program(self, generator) -> None:
        """The captured region: ``length`` steps from the static state into the static state, flags alongside."""
        self._redo.clear()
        state = self.state
        for _ in range(self.length):
            state = self.integrator.step(state, generator)
        self.flags.copy_(torch.stack(self._redo))
        self._set_state(state)

    def _set_state(self, source: integrators.State) -> None:
        for name in MOVING:
            getattr(self.state, name).copy_(getattr(source, name))

    def _prepare(self, positions) -> None:
        """Static buffers with room for the pairs at ``positions``: rebuilt in the graph (a new step only at the
        start and after the pairs outgrew it) or the Verlet list's candidates loaded (a new step when they do not
        fit)."""
        if not self.pairs_in_graph:
            if self.rebuilds != self.calculator.neighbors.rebuilds or self.step is None:
                self._load_pairs(positions)
            return
        if self.step is not None and not self._outgrown:
            return
        count = graph_pairs.pair_count(positions, self.state.cell, self.pbc, self.calculator.cutoff)
        if count == 0:
            raise ValueError("no pairs within the cutoff: nothing for a captured step to pad with")
        self.step = self.calculator.replays.captured_step(self.state.cell, self.pbc, False, count,
                                                          pairs_in_graph=True,
                                                          growth=REGROWTH if self._outgrown else GROWTH)
        self.graph = None
        self._outgrown = False

    def _load_pairs(self, positions) -> None:
        """The Verlet list's current candidates into the static buffers; a new capture when they do not fit."""
        neighbors = self.calculator.neighbors
        edge_i, edge_j, shifts, _ = neighbors.candidates(positions, self.state.cell, self.pbc)
        outgrown = self.step is not None and not self.step.load_pairs(edge_i, edge_j, shifts)
        if self.step is None or outgrown:
            self.step = self.calculator.replays.captured_step(self.state.cell, self.pbc, False, edge_i.numel(),
                                                              growth=REGROWTH if outgrown else GROWTH)
            self.graph = None
            if not self.step.load_pairs(edge_i, edge_j, shifts):
                raise ValueError("no candidate pairs within cutoff + skin: nothing for a captured step to pad with")
        self.reference.copy_(neighbors.reference_positions())
        self.rebuilds = neighbors.rebuilds

    def _capture(self, state: integrators.State) -> None:
        """Warm up on a side stream, then capture the program with a generator of its own: one registered with a
        graph is the graph's for good (after a failed capture unusable outside graphs), so the caller's never is.
        The static state is put back to ``state`` after each."""
        generator = torch.Generator(device=self.state.positions.device)
        side = torch.cuda.Stream(device=self.state.positions.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self._program(generator)
        torch.cuda.current_stream().wait_stream(side)
        self._set_state(state)
        graph = torch.cuda.CUDAGraph()
        graph.register_generator_state(generator)
        with collector_paused(), torch.cuda.graph(graph):
            self._program(generator)
        self._set_state(state)  # capture records the kernels and runs none of them
        self.graph, self.generator = graph, generator
        self.captures += 1

    def advance(self, state: integrators.State, generator):
        """``length`` steps from ``state``: the new State, or None when a step must be redone on the checked path
        (the Verlet list went stale, or the pairs outgrew the capacity); then ``state`` and the generator are as
        they were, and :attr:`stale_at` says at which step. ``generator`` advances as if the steps drew from it:
        a replay starts the graph's own generator from its state and hands the advanced state back."""
        self._prepare(state.positions)
        self._set_state(state)
        saved = generator.get_state()
        if self.graph is None and self.state.positions.is_cuda:
            try:
                self._capture(state)
            except Exception as exc:  # capture limits differ across models and torch versions
                raise CaptureFailed(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}") \
                    from exc
        if self.graph is not None:
            self.generator.set_state(saved)
            self.graph.replay()
            generator.set_state(self.generator.get_state())
        else:
            self._program(generator)
        self.replays += 1
        flags = self.flags.cpu()  # the replay's one device read
        if bool(flags.any()):
            self.stale_at = int(flags.int().argmax())
            self.undone += 1
            self._outgrown = self.pairs_in_graph
            generator.set_state(saved)
            return None
        return integrators.State(self.state.positions.clone(), self.state.momenta.clone(), state.masses,
                                 state.cell, self.state.energy.clone(), self.state.forces.clone(), None,
                                 state.step + self.length)

    def counts(self) -> tuple:
        """``(replays, undone, captures)`` so far, all runs that used these steps together."""
        return self.replays, self.undone, self.captures

    def summary(self, since=(0, 0, 0)) -> str:
        """What the replays did since ``since`` (:meth:`counts` at a run's start: the run's own share)."""
        replays, undone, captures = (now - before for now, before in zip(self.counts(), since))
        why = "pairs outgrew the capacity" if self.pairs_in_graph else "at a list rebuild"
        return (f"{self.length} steps per replay: {replays} replays, {undone} undone ({why}), "
                f"{captures} captures, pairs {'rebuilt in the graph' if self.pairs_in_graph else 'Verlet'}")
