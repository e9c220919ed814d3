"""The self-check of an accelerated model against its original modules, and the probe structures it and the
kernel dry run evaluate."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from .swaps import originals_in_place


# Accelerated models must reproduce the originals within these: energy per atom (eV), forces (eV/A), stress
# (eV/A^3).
TOLERANCES = {torch.float32: (1e-5, 1e-4, 1e-5), torch.float64: (1e-9, 1e-8, 1e-9)}
PROBE_ATOMS = 32  # atoms per probe structure of the self-check: a universal model's species take a few probes


def tolerances(dtype: torch.dtype) -> tuple:
    """(energy per atom, force, stress) tolerances for a model computing in ``dtype``."""
    return TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]


class AccelerationCheckError(ValueError):
    """The accelerated model disagreed with the original; the model has been restored."""


def probe_structure(atomic_numbers, cutoff: float, *, num_atoms: int = 4, seed: int = 0):
    """A small rattled triclinic periodic cell of the model's own species, denser than its cutoff (the kernel dry
    run's structure). Species are spread over the model's list so a universal model is probed beyond its first
    elements.
    """
    numbers = sorted(int(z) for z in atomic_numbers)
    picks = np.linspace(0, len(numbers) - 1, num=min(num_atoms, len(numbers))).round().astype(int)
    return _rattled_cell([numbers[k] for k in picks], num_atoms, cutoff, seed)


def probe_structures(atomic_numbers, cutoff: float, *, seed: int = 0) -> list:
    """Rattled triclinic periodic cells of at most ``PROBE_ATOMS`` atoms that hold every species of the model:
    the self-check exercises each species' weights, not only a few."""
    numbers = sorted(set(int(z) for z in atomic_numbers))
    groups = -(-len(numbers) // PROBE_ATOMS)
    return [_rattled_cell(numbers[k::groups], max(4, len(numbers[k::groups])), cutoff, seed + k)
            for k in range(groups)]


def _rattled_cell(species: list, num_atoms: int, cutoff: float, seed: int):
    """``num_atoms`` atoms cycling through ``species`` on a simple cubic grid of 2.8 A spacing in a sheared cell,
    rattled by 0.08 A."""
    from ase import Atoms

    if cutoff <= 0:
        raise ValueError(f"model cutoff must be positive, got {cutoff}")
    side = max(2, int(np.ceil(num_atoms ** (1 / 3) - 1e-9)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:num_atoms]
    cell = 2.8 * side * np.array([[1.0, 0.0, 0.0], [0.08, 1.0, 0.0], [0.05, 0.11, 1.0]])
    atoms = Atoms(numbers=[species[k % len(species)] for k in range(num_atoms)], scaled_positions=grid / side,
                  cell=cell, pbc=True)
    atoms.positions += np.random.default_rng(seed).normal(scale=0.08, size=atoms.positions.shape)
    return atoms


def neighbor_edges(atoms, cutoff: float) -> tuple:
    """(i, j, S) with ASE "ijS" meaning, from fastmlip's own neighbour list when it is installed."""
    try:
        from fastmlip.neighbors import neighbor_list
    except ImportError:
        neighbor_list = None
    if neighbor_list is not None:
        i, j, shifts = neighbor_list(torch.as_tensor(atoms.positions), torch.as_tensor(atoms.cell.array),
                                     torch.as_tensor(atoms.pbc), float(cutoff))
        return i.long(), j.long(), shifts.to(torch.float64)
    from ase.neighborlist import neighbor_list as ase_neighbor_list

    i, j, shifts = ase_neighbor_list("ijS", atoms, float(cutoff))
    return torch.as_tensor(i, dtype=torch.long), torch.as_tensor(j, dtype=torch.long), torch.as_tensor(
        shifts, dtype=torch.float64)


def compute_on_atoms(patch, model, atoms, edges, *, modal=None, compute_stress=True, **options) -> dict:
    """Run ``patch.compute`` on an ASE structure with given edges on the model's device (positions in float64,
    as the calculator passes them; ``options``: ``edge_mask``, ``validated``)."""
    device = patch.model_info(model)["device"]
    i, j, shifts = (t.to(device) for t in edges)
    return patch.compute(model, torch.as_tensor(atoms.positions, dtype=torch.float64, device=device),
                         torch.as_tensor(atoms.cell.array, dtype=torch.float64, device=device),
                         torch.as_tensor(atoms.pbc, device=device),
                         torch.as_tensor(atoms.numbers, dtype=torch.long, device=device), i, j,
                         shifts.to(dtype=torch.float64), modal=modal, compute_stress=compute_stress, **options)


def record_kernels(model, patch, pass_seconds: list = None) -> list:
    """Every Triton kernel the accelerated model launches in a step, recorded by a dry run (nothing compiles).

    The dry run evaluates the probe structure the way the calculator does: with and without stress, and with
    an edge mask as a captured CUDA-graph step does (when the model allows masks, then also the exact pair list
    such a step rebuilds), for every modal/head. Kernels are specialised on types and alignment, never on sizes,
    so these are every structure's kernels. ``pass_seconds``: a list that gets each pass's wall time (the first
    pays what any first evaluation pays).
    """
    from fastmlip.kernels import pair_list, precompile

    info = patch.model_info(model)
    atoms = probe_structure(info["atomic_numbers"], info["cutoff"])
    edges = neighbor_edges(atoms, info["cutoff"])
    mask = torch.ones(edges[0].numel(), dtype=torch.bool, device=info["device"])
    masked = patch.mask_obstacle(model) is None
    passes = []
    for modal in info["modals"] or [None]:
        passes += [dict(modal=modal, compute_stress=True), dict(modal=modal, compute_stress=False)]
        if masked:
            passes.append(dict(modal=modal, edge_mask=mask, validated=True))
    timings = pass_seconds if pass_seconds is not None else []
    with precompile.recording(info["device"]) as specs:
        for options in passes:
            start = time.perf_counter()
            compute_on_atoms(patch, model, atoms, edges, **options)
            timings.append(time.perf_counter() - start)
        if masked:
            start = time.perf_counter()
            pair_list.dry_run(info["device"])
            timings.append(time.perf_counter() - start)
    return specs


def prepare_kernels(model, patch, *, progress=None):
    """Compile (or load from the cache) every kernel the accelerated model will launch, before its first step.

    Returns :class:`fastmlip.kernels.precompile.Report`, or None where the model runs no Triton kernels
    (CPU, the reference backend, the interpreter).
    """
    from fastmlip.ops import dispatch

    device = patch.model_info(model)["device"]
    if device.type != "cuda" or dispatch.backend_for(torch.empty(0, device=device)) != "triton":
        return None
    from fastmlip.kernels import precompile

    passes = []
    report = precompile.prepare(record_kernels(model, patch, passes), progress=progress)
    report.dry_run_passes = passes
    return report


def deviation(reference: dict, candidate: dict, num_atoms: int) -> dict:
    """Largest differences: energy per atom, forces (max abs component) and stress when both have one."""
    dev = {
        "energy_per_atom": abs(float(reference["energy"]) - float(candidate["energy"])) / num_atoms,
        "forces": float((reference["forces"] - candidate["forces"]).abs().max()) if num_atoms else 0.0,
    }
    if reference.get("stress") is not None and candidate.get("stress") is not None:
        dev["stress"] = float((reference["stress"] - candidate["stress"]).abs().max())
    return dev


def _shuffled(edges, seed: int) -> tuple:
    order = torch.randperm(edges[0].numel(), generator=torch.Generator().manual_seed(seed))
    return tuple(t[order] for t in edges)


def check(model, patch, *, probes=None, modals: Optional[list] = None, seed: int = 0) -> dict:
    """Compare the accelerated ``model`` with its originals; restore it and raise on failure.

    Energies, forces and stress, on probe structures that hold every species of the model
    (:func:`probe_structures`), for every modal/head. Edges reach the accelerated modules in a shuffled order on
    every probe (and in neighbour-list order on the first): fast paths sort edges for themselves, and one that
    silently relied on their order would pass a check fed sorted edges. The originals see another shuffle.
    Returns {"dtype", "tolerance": (energy, force, stress), "deviation": worst, "per_modal": {...}, "probes",
    "num_atoms", "num_edges", "species"}.
    """
    info = patch.model_info(model)
    if probes is None:
        probes = probe_structures(info["atomic_numbers"], info["cutoff"], seed=seed)
    modals = modals if modals is not None else (info["modals"] or [None])
    tolerance = tolerances(info["dtype"])
    per_modal, worst, atoms_total, edges_total = {}, {"energy_per_atom": 0.0, "forces": 0.0}, 0, 0
    try:
        for k, atoms in enumerate(probes):
            edges = neighbor_edges(atoms, info["cutoff"])
            atoms_total, edges_total = atoms_total + len(atoms), edges_total + int(edges[0].numel())
            orders = [_shuffled(edges, seed + 2 * k + 1)] + ([edges] if k == 0 else [])
            for modal in modals:
                with originals_in_place(model):
                    original = compute_on_atoms(patch, model, atoms, _shuffled(edges, seed + 2 * k + 2), modal=modal)
                for order in orders:
                    dev = deviation(original, compute_on_atoms(patch, model, atoms, order, modal=modal), len(atoms))
                    name = modal or "default"
                    per_modal[name] = {key: max(per_modal.get(name, {}).get(key, 0.0), v) for key, v in dev.items()}
                    worst = {key: max(worst.get(key, 0.0), v) for key, v in dev.items()}
    except BaseException:
        patch.restore(model)
        raise
    report = {"dtype": str(info["dtype"]).replace("torch.", ""), "tolerance": tolerance, "deviation": worst,
              "per_modal": per_modal, "probes": len(probes), "num_atoms": atoms_total, "num_edges": edges_total,
              "species": len(set().union(*(set(a.numbers.tolist()) for a in probes)))}
    if not within(worst, tolerance):
        patch.restore(model)
        raise AccelerationCheckError(
            f"accelerated model disagrees with the original ({describe(report)}); the original modules are back")
    return report


def within(deviation_: dict, tolerance: tuple) -> bool:
    """Whether energy, forces and (where compared) stress are within (energy, force, stress) tolerances."""
    return (deviation_["energy_per_atom"] <= tolerance[0] and deviation_["forces"] <= tolerance[1]
            and deviation_.get("stress", 0.0) <= tolerance[2])


def describe(report: dict) -> str:
    """One line for humans: measured deviations against tolerances."""
    dev, (e_tol, f_tol, s_tol) = report["deviation"], report["tolerance"]
    probes = f"{report['probes']} probe structures, " if report.get("probes", 1) > 1 else ""
    species = f", {report['species']} species" if "species" in report else ""
    text = (f"{report['dtype']}, {probes}{report['num_atoms']} atoms{species}, {report['num_edges']} edges: "
            f"|dE|/atom = {dev['energy_per_atom']:.2e} eV (tol {e_tol:.0e}), "
            f"max|dF| = {dev['forces']:.2e} eV/A (tol {f_tol:.0e})")
    if "stress" in dev:
        text += f", max|dstress| = {dev['stress']:.2e} eV/A^3 (tol {s_tol:.0e})"
    return text
