"""What the framework patches share: in-place module swaps that can be undone exactly, and the self-check.

A swap records (parent, attribute name, original module) on the model itself, so :func:`restore_swaps` puts the
very same module objects back: the restored state_dict has the same keys and the same tensors. Replacement
modules share their trainable submodules (radial MLPs, denominators) with the originals instead of copying them.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

SWAPS_ATTRIBUTE = "_fastmlip_swaps"

# Accelerated models must reproduce the originals within these (energy per atom in eV, forces in eV/A).
FP32_ENERGY_PER_ATOM_TOL = 1e-5
FP32_FORCE_TOL = 1e-4
FP64_ENERGY_PER_ATOM_TOL = 1e-9
FP64_FORCE_TOL = 1e-8


def tolerances(dtype: torch.dtype) -> tuple:
    """(energy per atom, force) tolerances for a model computing in ``dtype``."""
    if dtype == torch.float64:
        return FP64_ENERGY_PER_ATOM_TOL, FP64_FORCE_TOL
    return FP32_ENERGY_PER_ATOM_TOL, FP32_FORCE_TOL


class AccelerationCheckError(ValueError):
    """The accelerated model disagreed with the original; the model has been restored."""


class UntrustedFileError(ValueError):
    """Loading the file would run code it holds (a full unpickle), and the caller did not say it trusts it."""


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_untrusted(path, what: str) -> None:
    """Raise the one-line :class:`UntrustedFileError` that says how to trust ``path``."""
    raise UntrustedFileError(
        f"{path}: {what}, and loading it runs any code it holds; if you trust where it came from, pass "
        f"trusted=True (fastmlip.load, Calculator) or --trust (fastmlip md/convert/warmup), or pin this file with "
        f"sha256={file_sha256(path)!r} (--sha256)")


def pickle_names(path, marker: bytes) -> bool:
    """Whether ``path`` is a ``torch.save`` zip archive whose pickle mentions ``marker``; nothing is unpickled."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("data.pkl")]
        return bool(names) and marker in archive.read(names[0])


@dataclass
class Swap:
    parent: nn.Module
    name: str
    original: nn.Module
    replacement: nn.Module
    qualified_name: str


def swaps_of(model: nn.Module) -> list:
    return model.__dict__.get(SWAPS_ATTRIBUTE, [])


def resolve_parent(model: nn.Module, qualified_name: str) -> tuple:
    """(parent module, attribute name) of the submodule called ``qualified_name``."""
    parent_name, _, name = qualified_name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), name


def swap_in_place(model: nn.Module, plan: Iterable) -> list:
    """Replace modules per ``plan`` = [(qualified name, factory(original) -> replacement)], all or nothing.

    Replacements are all built before the first one is put in, and if putting them in fails midway the ones
    already put in are taken out again, so the model is either fully swapped or exactly as before.
    """
    staged = []
    for qualified_name, factory in plan:
        parent, name = resolve_parent(model, qualified_name)
        original = parent._modules[name]
        staged.append(Swap(parent, name, original, factory(original), qualified_name))
    done = []
    try:
        for swap in staged:
            swap.parent._modules[swap.name] = swap.replacement
            done.append(swap)
    except BaseException:
        for swap in reversed(done):
            swap.parent._modules[swap.name] = swap.original
        raise
    model.__dict__[SWAPS_ATTRIBUTE] = swaps_of(model) + done
    return done


def apply_plan(model, swaps, skipped: dict, *, strict: bool) -> list:
    """Carry out a patch's plan in place; with ``strict`` refuse (model untouched) if anything would be skipped."""
    if strict and skipped:
        details = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise ValueError(f"cannot accelerate every module (strict=True), model left unchanged: {details}")
    swap_in_place(model, swaps)
    return list(skipped)


def is_accelerated(model) -> bool:
    return bool(swaps_of(model))


def _placement_of(module: nn.Module) -> tuple:
    """(device, floating dtype) of a module's tensors; (None, None) when it holds none."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return None, None


def _put_back(swap: Swap) -> None:
    """Reinstate an original, moved to where the model went meanwhile (``.to()``/``.double()`` after swapping)."""
    device, dtype = _placement_of(swap.replacement)
    if device is not None:
        swap.original.to(device=device, dtype=dtype)
    swap.parent._modules[swap.name] = swap.original


def restore_swaps(model: nn.Module) -> int:
    """Put every original module back (latest swap first); returns how many were restored."""
    swaps = swaps_of(model)
    for swap in reversed(swaps):
        _put_back(swap)
    model.__dict__.pop(SWAPS_ATTRIBUTE, None)
    return len(swaps)


@contextlib.contextmanager
def originals_in_place(model: nn.Module):
    """Run the original modules for a while (the exact original model, at no copying cost)."""
    swaps = swaps_of(model)
    for swap in reversed(swaps):
        _put_back(swap)
    try:
        yield model
    finally:
        for swap in swaps:
            swap.parent._modules[swap.name] = swap.replacement


def probe_structure(atomic_numbers, cutoff: float, *, num_atoms: int = 4, seed: int = 0):
    """A small rattled triclinic periodic cell of the model's own species, denser than its cutoff.

    Species are spread over the model's list so a universal model is probed beyond its first elements.
    """
    from ase import Atoms

    if cutoff <= 0:
        raise ValueError(f"model cutoff must be positive, got {cutoff}")
    numbers = sorted(int(z) for z in atomic_numbers)
    picks = np.linspace(0, len(numbers) - 1, num=min(num_atoms, len(numbers))).round().astype(int)
    species = [numbers[k] for k in picks]
    rng = np.random.default_rng(seed)
    a = 4.2
    fractional = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5], [0.0, 0.5, 0.5]])[:num_atoms]
    cell = a * np.array([[1.0, 0.0, 0.0], [0.08, 1.0, 0.0], [0.05, 0.11, 1.0]])
    atoms = Atoms(numbers=[species[k % len(species)] for k in range(len(fractional))],
                  scaled_positions=fractional, cell=cell, pbc=True)
    atoms.positions += rng.normal(scale=0.08, size=atoms.positions.shape)
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
    """Run ``patch.compute`` on an ASE structure with given edges, in the model's dtype and device
    (``options``: ``edge_mask``, ``validated``)."""
    info = patch.model_info(model)
    dtype, device = info["dtype"], info["device"]
    i, j, shifts = (t.to(device) for t in edges)
    return patch.compute(model, torch.as_tensor(atoms.positions, dtype=dtype, device=device),
                         torch.as_tensor(atoms.cell.array, dtype=dtype, device=device),
                         torch.as_tensor(atoms.pbc, device=device),
                         torch.as_tensor(atoms.numbers, dtype=torch.long, device=device), i, j,
                         shifts.to(dtype=dtype), modal=modal, compute_stress=compute_stress, **options)


def record_kernels(model, patch) -> list:
    """Every Triton kernel the accelerated model launches in a step, recorded by a dry run (nothing compiles).

    The dry run evaluates the probe structure the way the calculator does: with and without stress, and with
    an edge mask as a captured CUDA-graph step does (when the model allows masks), for every modal/head.
    Kernels are specialised on types and alignment, never on sizes, so these are every structure's kernels.
    """
    from fastmlip.kernels import precompile

    info = patch.model_info(model)
    atoms = probe_structure(info["atomic_numbers"], info["cutoff"])
    edges = neighbor_edges(atoms, info["cutoff"])
    mask = torch.ones(edges[0].numel(), dtype=torch.bool, device=info["device"])
    masked = patch.mask_obstacle(model) is None
    with precompile.recording(info["device"]) as specs:
        for modal in info["modals"] or [None]:
            for stress in (True, False):
                compute_on_atoms(patch, model, atoms, edges, modal=modal, compute_stress=stress)
            if masked:
                compute_on_atoms(patch, model, atoms, edges, modal=modal, edge_mask=mask, validated=True)
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

    return precompile.prepare(record_kernels(model, patch), progress=progress)


def deviation(reference: dict, candidate: dict, num_atoms: int) -> dict:
    """Largest differences: energy per atom, forces (max abs component) and stress when both have one."""
    dev = {
        "energy_per_atom": abs(float(reference["energy"]) - float(candidate["energy"])) / num_atoms,
        "forces": float((reference["forces"] - candidate["forces"]).abs().max()) if num_atoms else 0.0,
    }
    if reference.get("stress") is not None and candidate.get("stress") is not None:
        dev["stress"] = float((reference["stress"] - candidate["stress"]).abs().max())
    return dev


def check(model, patch, *, atoms=None, modals: Optional[list] = None, seed: int = 0) -> dict:
    """Compare the accelerated ``model`` with its originals on a probe structure; restore and raise on failure.

    The original modules see the edges in a shuffled order, the accelerated ones in neighbour-list order, so an
    accelerated module that depends on edge order (or mixes up sender and receiver) cannot pass by accident.
    Returns {"dtype", "tolerance": (energy, force), "deviation": worst over modals, "per_modal": {...}}.
    """
    info = patch.model_info(model)
    if atoms is None:
        atoms = probe_structure(info["atomic_numbers"], info["cutoff"], seed=seed)
    edges = neighbor_edges(atoms, info["cutoff"])
    order = torch.randperm(edges[0].numel(), generator=torch.Generator().manual_seed(seed + 1))
    shuffled = tuple(t[order] for t in edges)
    modals = modals if modals is not None else (info["modals"] or [None])
    e_tol, f_tol = tolerances(info["dtype"])
    per_modal, worst = {}, {"energy_per_atom": 0.0, "forces": 0.0}
    try:
        for modal in modals:
            accelerated = compute_on_atoms(patch, model, atoms, edges, modal=modal)
            with originals_in_place(model):
                original = compute_on_atoms(patch, model, atoms, shuffled, modal=modal)
            dev = deviation(original, accelerated, len(atoms))
            per_modal[modal or "default"] = dev
            worst = {k: max(worst.get(k, 0.0), v) for k, v in dev.items()}
    except BaseException:
        patch.restore(model)
        raise
    report = {"dtype": str(info["dtype"]).replace("torch.", ""), "tolerance": (e_tol, f_tol), "deviation": worst,
              "per_modal": per_modal, "num_atoms": len(atoms), "num_edges": int(edges[0].numel())}
    if not (worst["energy_per_atom"] <= e_tol and worst["forces"] <= f_tol):
        patch.restore(model)
        raise AccelerationCheckError(
            f"accelerated model disagrees with the original ({describe(report)}); the original modules are back")
    return report


def describe(report: dict) -> str:
    """One line for humans: measured deviations against tolerances."""
    dev, (e_tol, f_tol) = report["deviation"], report["tolerance"]
    text = (f"{report['dtype']}, {report['num_atoms']} atoms, {report['num_edges']} edges: "
            f"|dE|/atom = {dev['energy_per_atom']:.2e} eV (tol {e_tol:.0e}), "
            f"max|dF| = {dev['forces']:.2e} eV/A (tol {f_tol:.0e})")
    if "stress" in dev:
        text += f", max|dstress| = {dev['stress']:.2e} eV/A^3"
    return text


def one_line(exc: BaseException) -> str:
    """An exception as a single line, for CLI error messages."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def first_tensor_placement(model: nn.Module) -> tuple:
    """(device, dtype) of the model's first floating parameter, defaulting to CPU float32."""
    device, dtype = _placement_of(model)
    return device or torch.device("cpu"), dtype or torch.float32


def share_tensors(target: nn.Module, original: nn.Module) -> None:
    """Hold the original's own parameters and buffers (the same objects): state_dict keys and tensors stay."""
    for name, param in original.named_parameters(recurse=False):
        setattr(target, name, param)
    for name, buffer in original.named_buffers(recurse=False):
        target.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)


class FastLinear(nn.Module):
    """e3nn ``o3.Linear`` through ``fastmlip.ops.linear``, holding the module's own weight, bias and buffers."""

    def __init__(self, original: nn.Module):
        super().__init__()
        from fastmlip.descriptors import linear_problem

        self.problem = linear_problem(original)
        share_tensors(self, original)
        self.irreps_in, self.irreps_out = original.irreps_in, original.irreps_out

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, x):
        from fastmlip.ops.linear import linear

        return linear(self.problem, x, self.weight, self.bias if self.problem.bias_numel else None)


class FastSphericalHarmonics(nn.Module):
    """e3nn ``o3.SphericalHarmonics`` through ``fastmlip.ops.spherical_harmonics`` (same degrees, normalisation)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        from fastmlip.descriptors import spherical_harmonics_problem

        self.problem = spherical_harmonics_problem(original)
        share_tensors(self, original)
        self.irreps_in, self.irreps_out = original.irreps_in, original.irreps_out

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, vectors):
        from fastmlip.ops.spherical_harmonics import spherical_harmonics

        return spherical_harmonics(list(self.problem.ls), vectors, self.problem.normalize, self.problem.normalization)


class FastFullyConnectedNet(nn.Module):
    """e3nn ``nn.FullyConnectedNet`` (a radial MLP) through ``fastmlip.ops.radial_mlp``.

    Holds the original layers under their own names, so parameters and state_dict keys are unchanged. Takes an
    optional per-row scale (cutoff envelope, padding mask) that the kernels multiply in at no extra launch.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        from fastmlip.reference.radial_mlp import radial_mlp_problem

        self.problem = radial_mlp_problem(original)
        if not self.problem.has_kernel:
            raise ValueError(f"{self.problem}: an activation the kernels do not know")
        for name, layer in original.named_children():
            self.add_module(name, layer)
        self.hs = original.hs

    def extra_repr(self) -> str:
        return f"problem={self.problem}"

    def forward(self, x, row_scale=None):
        from fastmlip.ops.radial_mlp import radial_mlp

        if x.is_cuda and x.shape[0] > fused_mlp_max_rows():  # cuBLAS wins on many edges (docs/kernels.md)
            for layer in self.children():
                x = layer(x)
            return x if row_scale is None else x * row_scale.reshape(-1, 1)
        return radial_mlp(self.problem, x, [layer.weight for layer in self.children()], row_scale)


def fused_mlp_max_rows() -> int:
    """Edges up to which a CUDA radial MLP runs as fastmlip's fused kernels (``FASTMLIP_MLP_FUSED_MAX_ROWS``).

    Measured on an H200 (float32, 160k edges): the fused forward 1.5x faster than e3nn's matmuls but forward +
    backward 0.6x; few edges are launch-bound, where two launches beat ~20. The crossover between 6k and 160k
    edges is not measured yet; 32768 is a guess on the safe side.
    """
    return int(os.environ.get("FASTMLIP_MLP_FUSED_MAX_ROWS", "32768"))


def radial_weights(net: nn.Module, x: torch.Tensor, row_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """``net(x)`` times ``row_scale`` [E] per row, fused when ``net`` is fastmlip's radial MLP."""
    if isinstance(net, FastFullyConnectedNet):
        return net(x, row_scale)
    out = net(x)
    return out if row_scale is None else out * row_scale.reshape(-1, 1)


def fast_replacement(module: nn.Module, factories: dict) -> Optional[type]:
    """The class in ``factories`` (keyed by exact module type) that can describe ``module``, else None."""
    factory = factories.get(type(module))
    if factory is None:
        return None
    try:
        factory(module)
    except ValueError:
        return None
    return factory


def e3nn_factories() -> dict:
    """Replacements for the e3nn node modules both frameworks use."""
    from e3nn.o3 import Linear, SphericalHarmonics

    return {Linear: FastLinear, SphericalHarmonics: FastSphericalHarmonics}


def maybe_fast(module: nn.Module, factory) -> nn.Module:
    """``factory(module)``, or ``module`` itself when the factory cannot describe it (ValueError)."""
    try:
        return factory(module)
    except ValueError:
        return module
