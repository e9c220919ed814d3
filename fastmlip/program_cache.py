"""Exported copies of models in fastmlip's cache: how ``fastmlip md`` starts in seconds from a framework's file.

Why: a warm start through the framework spends most of its time in the framework, not in fastmlip (on an H200,
2026-12-04: sevenn's imports and model build 3.3 s of SevenNet-0's 7.0 s to the first step; mace's imports 7.4 s
of MACE-medium-like's 11.4 s, cuEquivariance installed). The same model as ``fastmlip convert --to exported``
writes it starts without the framework (3.4-4.2 s) and steps at the framework's pace (SevenNet-0 Si 216 1.37 against
1.33 ms; MACE-medium-like 1.51 against 1.36). So ``fastmlip warmup`` and a first ``fastmlip md`` run keep such a
copy here (``programs/``), and later runs of the same file, dtype and modal load it.

A copy is keyed by the source file's SHA-256, the dtype, the modal, torch's version and a digest of fastmlip's own
code, so another model file, another fastmlip or another torch never meets it; each is written atomically beside
a manifest holding its SHA-256, checked before it is loaded (a damaged copy is removed and the framework's file
used). Only sources that load without asking for trust (checkpoints shipped with their package) or that the user
trusted (``--trust``, ``--sha256``) get or use a copy: the copy never lets a run skip a trust decision.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Optional

DIRECTORY = "programs"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 of every Python file of fastmlip, its kernels and its patches: what an exported program holds
    comes from all of them."""
    import fastmlip
    import fastmlip.kernels
    import fastmlip.patches

    folders = sorted({Path(module.__file__).resolve().parent for module in (fastmlip, fastmlip.kernels,
                                                                                fastmlip.patches)})
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def count() -> int:
    """How many exported copies the cache holds (for ``fastmlip info``)."""
    from fastmlip.kernels.codegen import cache_root

    return len(list((cache_root() / DIRECTORY).glob("*/manifest.json")))


def _entry(source_sha256: str, dtype: str, modal: Optional[str], device) -> Path:
    import torch

    from fastmlip.kernels.codegen import cache_root
    from fastmlip.kernels.launch import settings
    from fastmlip.patches import exported

    # a copy holds radial tables or MLPs as FASTMLIP_RADIAL_TABLE said on its device when it was written
    parts = (source_sha256, dtype, modal or "", torch.__version__, exported.VERSION, code_digest(),
             settings().radial_table, torch.device(device).type)
    return cache_root() / DIRECTORY / hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:40]


def source_of(model, trusted: bool, sha256=None) -> Optional[str]:
    """The file behind ``model`` (a path or a pretrained name) when its copy may be kept or used: a framework's
    file that loads without trust (shipped with its package) or that the caller trusts; else None."""
    from fastmlip import api

    try:
        patch = api.patch_for_file(model)
    except ValueError:
        return None
    path = patch.resolve(model)
    if patch.FRAMEWORK == "exported" or path is None:
        return None
    shipped = {os.path.realpath(p) for p in patch.pretrained_checkpoints().values()}
    return path if api.trust(path, trusted, sha256) or os.path.realpath(path) in shipped else None


def lookup(source: str, dtype: str, modal: Optional[str], device) -> tuple:
    """(path, manifest) of the kept copy of ``source`` for ``dtype``/``modal`` on ``device`` (its type); (None,
    manifest) where an earlier run found the model cannot be exported (``manifest["unexportable"]`` says why);
    (None, None) where there is no copy whose SHA-256 matches its manifest."""
    from fastmlip.patches.files import file_sha256

    entry = _entry(file_sha256(source), dtype, modal, device)
    program, manifest_path = entry / "model.pt2", entry / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        if "unexportable" in manifest:
            return None, manifest
        if file_sha256(program) == manifest["sha256"]:
            return program, manifest
    except (OSError, ValueError, KeyError, TypeError):
        if not manifest_path.exists():
            return None, None
    for damaged in (manifest_path, program):  # rewritten by the next run that makes a copy
        damaged.unlink(missing_ok=True)
    return None, None


def fits_whole(manifest: dict, atoms, skin: float, dtype, device) -> bool:
    """Whether a step over ``atoms`` keeps every layer's radial weights whole within the device's memory, judged
    from a generous count of the pairs the Verlet list will hold (``dtype``: a torch dtype). A copy cannot cut
    its convolutions into chunks as the framework's model does when they would not fit
    (:mod:`fastmlip.memory`), so a larger system runs from the framework's file."""
    import math

    import torch

    from fastmlip import memory

    if device.type != "cuda":
        return True
    n, reach = len(atoms), manifest["cutoff"] + skin
    if all(atoms.pbc) and atoms.get_volume() > 0:  # twice the density within reach, at most 27 images of each atom
        neighbours = min(27 * n, 2 * n / atoms.get_volume() * 4 / 3 * math.pi * reach ** 3)
    else:  # a molecule or a slab: every other atom
        neighbours = n - 1
    edges = int(n * neighbours)
    return memory.chunk_edges_for(manifest["conv_widths"], edges, torch.finfo(dtype).bits // 8,
                                  memory.free_bytes(device)) is None


def store(source: str, model, dtype: str, modal: Optional[str]) -> tuple:
    """Keep an exported copy of the accelerated ``model`` loaded from ``source``: (path, seconds), or (None, the
    reason in one line) where it cannot be exported or written (nothing fails: the run had what it needed). A
    model that cannot be exported is remembered as such (:func:`lookup` returns its manifest without a copy), so
    later runs do not try again; a cache that cannot be written is tried again by the next run."""
    import torch

    from fastmlip.api import framework_of
    from fastmlip.convert import export_checked, write_atomically
    from fastmlip.memory import conv_weight_widths
    from fastmlip.patches.files import file_sha256, one_line

    start = time.perf_counter()
    patch = framework_of(model)
    source_sha256 = file_sha256(source)
    entry = _entry(source_sha256, dtype, modal, next(model.parameters()).device)
    facts = {"source": os.path.abspath(source), "source_sha256": source_sha256, "dtype": dtype, "modal": modal}
    try:
        entry.mkdir(parents=True, exist_ok=True)
        program = entry / "model.pt2"
        try:
            write_atomically(str(program), lambda temp: export_checked(patch, model, temp, modal))
        except torch.OutOfMemoryError as exc:  # this time only: the next run tries again
            return None, one_line(exc)
        except (ValueError, RuntimeError, TypeError) as exc:  # this model cannot be exported (e.g. a size fixed)
            facts["unexportable"] = one_line(exc)[:300]
        else:
            facts.update(sha256=file_sha256(program), cutoff=patch.model_info(model)["cutoff"],
                         conv_widths=conv_weight_widths(model))
        facts["written"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_atomically(str(entry / "manifest.json"), lambda temp: Path(temp).write_text(json.dumps(facts)))
    except OSError as exc:
        return None, one_line(exc)
    _remove_replaced(entry, facts)
    if "unexportable" in facts:
        return None, facts["unexportable"]
    return program, time.perf_counter() - start


def _remove_replaced(kept: Path, facts: dict) -> None:
    """Remove the copies of an earlier content of the same file (same path, dtype and modal, another SHA-256):
    nothing can use them unless the file goes back. Copies made by another fastmlip or torch (another
    environment sharing the cache) stay."""
    import shutil

    same = ("source", "dtype", "modal")
    for manifest_path in kept.parent.glob("*/manifest.json"):
        if manifest_path.parent == kept:
            continue
        try:
            other = json.loads(manifest_path.read_text())
        except (OSError, ValueError):
            continue
        if all(other.get(key) == facts[key] for key in same) and other.get("source_sha256") != facts["source_sha256"]:
            shutil.rmtree(manifest_path.parent, ignore_errors=True)
