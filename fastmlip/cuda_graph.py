"""One energy/forces/stress evaluation captured as a CUDA graph and replayed with new positions.

A step's host cost (the framework's Python module graph, autograd, a few hundred kernel launches) is paid once
at capture; a replay is one launch. Capture needs fixed shapes and no device->host reads, so:

* edges are the Verlet list's candidate pairs (``cutoff + skin``), padded to a capacity with copies of pairs; a mask computed inside the graph (``|D| < cutoff`` and not padding) tells the fused convolutions
  which edges exist, and the others are weighed with zero, so results equal those of the exact edge list;
* a Verlet rebuild only copies the new pairs into the static buffers; the graph is captured again only when
  they outgrow the capacity (``GROWTH`` x the pairs at the first capture, ``REGROWTH`` x at later ones) or the
  atoms, cell or periodicity change;
* the framework's ``compute`` runs with ``validated=True`` (species and cell were checked on the host); its
  ``capture_obstacle(model)`` says when a model cannot be captured.
"""
from __future__ import annotations

import contextlib
import gc
import math

import torch

from . import graph_pairs
from .neighbors import compact_positions, within_cutoff, wrap_basis

GROWTH = 1.05  # capacity = GROWTH x the pairs at capture: room for the list to grow before a new capture
# A list that outgrew its capacity is still growing (a crystal warming up): its next capture gets more room, as
# each capture costs a few steps' time.
REGROWTH = 1.2
WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS handles, Triton compiles, autograd state)


@contextlib.contextmanager
def collector_paused():
    """No garbage collection until the block ends: a capture that frees an unreferenced graph of an earlier run
    (kept alive by a reference cycle) fails with "operation failed due to a previous error during capture", and
    collections come when the captured Python code allocates, not when we choose. Such garbage is freed by the
    first collection after the block; collecting it first (gc.collect) took 0.15 s per capture on the H200 with a
    model loaded, 0.29 s of a 2.1 s warm start."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def pack_results(output: dict, with_stress: bool) -> torch.Tensor:
    """Energy, per-atom energies, forces (and stress) of ``compute`` as one float64 vector: one copy to the host."""
    parts = [output["energy"].reshape(1), output["energies"].reshape(-1), output["forces"].reshape(-1)]
    if with_stress:
        parts.append(output["stress"].reshape(-1))
    # one cat (it promotes mixed dtypes) and at most one cast: at a few hundred atoms every launch counts
    return torch.cat([p.detach() for p in parts]).to(torch.float64)


def unpack_results(flat: torch.Tensor, n: int, with_stress: bool) -> tuple:
    """(energy, forces [N, 3], symmetric stress [3, 3] or None) from :func:`pack_results`' flat vector."""
    stress = flat[1 + 4 * n:].reshape(3, 3) if with_stress else None
    return flat[0], flat[1 + n:1 + 4 * n].reshape(n, 3), None if stress is None else 0.5 * (stress + stress.T)


class CapturedStep:
    """Static input buffers, the captured graph, and its flat output (energy, per-atom energies, forces, stress).

    ``key`` is what a replay must share with the capture: atomic numbers, cell, periodicity, the stress flag.
    ``pairs_in_graph``: each evaluation first rebuilds the exact pair list from its positions
    (:mod:`fastmlip.graph_pairs`, where that applies) instead of using loaded Verlet candidates; then
    :attr:`outgrown` says on the device whether the pairs did not fit the capacity (or there were none).
    """

    def __init__(self, framework, model, numbers, cell, pbc, cutoff, modal, with_stress, num_pairs,
                 pairs_in_graph=False, growth=GROWTH):
        self.framework, self.model, self.modal = framework, model, modal
        self.pbc, self.cutoff, self.with_stress = pbc, float(cutoff), with_stress
        self.numbers = numbers
        self.cell_source, self.cell = cell, cell.clone()
        self.basis = wrap_basis(cell, pbc).to(cell.device)
        device = numbers.device
        n = numbers.numel()
        self.capacity = max(1, math.ceil(growth * num_pairs))
        self.positions = torch.zeros(n, 3, dtype=torch.float64, device=device)
        self.edge_i = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self.edge_j = torch.zeros(self.capacity, dtype=torch.long, device=device)
        self.shifts = torch.zeros(self.capacity, 3, dtype=torch.long, device=device)
        self.num_pairs = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.arange(self.capacity, device=device)
        self.exact_pairs = graph_pairs.ExactPairs(n, device, cell, pbc, cutoff) if pairs_in_graph else None
        self.outgrown = torch.zeros((), dtype=torch.bool, device=device)
        self.graph = None
        self.output = None

    def matches(self, numbers, cell, pbc, with_stress) -> bool:
        """Whether a replay fits: same numbers and cell tensors (callers make new ones when they change)."""
        return (numbers is self.numbers and cell is self.cell_source and pbc == self.pbc
                and with_stress == self.with_stress)

    def load_pairs(self, edge_i, edge_j, shifts) -> bool:
        """Copy the candidate pairs into the static buffers; False if they do not fit."""
        count = edge_i.numel()
        if count == 0 or count > self.capacity:
            return False
        # Padding repeats the pairs in turn: spread over all atoms, no receiver walks a long run of padding.
        repeat = torch.arange(self.capacity - count, device=edge_i.device) % count
        for static, new in ((self.edge_i, edge_i), (self.edge_j, edge_j), (self.shifts, shifts)):
            static[:count].copy_(new)
            static[count:].copy_(new[repeat])
        self.num_pairs.fill_(count)
        return True

    def evaluate(self) -> torch.Tensor:
        """One eager step on the static buffers (what the capture records); also runs on the CPU."""
        cell = self.cell.to(torch.float64)
        if self.exact_pairs is not None:
            self._rebuild_pairs(cell)
        mask = (self.slots < self.num_pairs) & within_cutoff(
            self.positions, cell, self.edge_i, self.edge_j, self.shifts, self.cutoff)
        positions, shifts = compact_positions(self.positions, cell, self.basis, self.edge_i, self.edge_j,
                                              self.shifts)
        out = self.framework.compute(
            self.model, positions, cell, self.pbc, self.numbers, self.edge_i, self.edge_j, shifts,
            compute_stress=self.with_stress, modal=self.modal, edge_mask=mask, validated=True)
        return pack_results(out, self.with_stress)

    def _rebuild_pairs(self, cell) -> None:
        edge_i, edge_j, shifts, count = self.exact_pairs(self.positions, cell, self.basis, self.cutoff,
                                                         self.capacity)
        for static, new in ((self.edge_i, edge_i), (self.edge_j, edge_j), (self.shifts, shifts)):
            static.copy_(new)
        self.num_pairs.copy_(count.clamp(max=self.capacity))
        self.outgrown.copy_((count > self.capacity) | (count == 0))

    def capture(self, positions) -> None:
        self.positions.copy_(positions)
        side = torch.cuda.Stream(device=self.positions.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                self.evaluate()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with collector_paused(), torch.cuda.graph(self.graph):
            self.output = self.evaluate()

    def replay(self, positions) -> torch.Tensor:
        self.positions.copy_(positions)
        self.graph.replay()
        return self.output
