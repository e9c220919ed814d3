"""``fastmlip convert IN -o OUT --to fast|e3nn|exported``: mark a checkpoint to load accelerated, take the mark
off, or export the accelerated model.

Acceleration swaps modules, not weights, so a converted file keeps the framework's own checkpoint format and
its own loader still reads it (a SevenNet file still runs in ``SevenNetCalculator``); ``--to fast`` adds a
``fastmlip`` entry (format, dtype, the self-check it passed) that makes :func:`fastmlip.load` return the model
accelerated, ``--to e3nn`` removes it. ``--to exported`` writes the accelerated model as a ``torch.export``
program that :func:`fastmlip.load` reads without importing the framework (:mod:`fastmlip.patches.exported`; for
one dtype and, for multi-fidelity models, one modal). Before anything is written the model is accelerated and
checked against its original; the file is written to a temporary name next to OUT, re-read and compared, then
renamed over OUT.
"""
from __future__ import annotations

import os
import sys
import tempfile

from .cli import add_trust_arguments

FORMATS = ("fast", "e3nn", "exported")
DTYPES = ("float32", "float64")
EXIT_BAD_INPUT = 2
EXIT_CHECK_FAILED = 3


class ConvertError(ValueError):
    """A reason to stop, shown as one line."""


def add_arguments(parser) -> None:
    parser.add_argument("input", metavar="IN", help="checkpoint file (or a pretrained name such as 7net-0)")
    parser.add_argument("-o", "--output", metavar="OUT", required=True, help="file to write (never IN itself)")
    parser.add_argument("--to", choices=FORMATS, required=True,
                        help="fast: load accelerated by fastmlip.load; e3nn: plain framework checkpoint; exported: "
                             "the accelerated model as a program fastmlip.load reads without the framework")
    parser.add_argument("--modal", default=None, help="--to exported: the modal/head to export (multi-fidelity)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype the check runs in and fastmlip.load defaults to (default: the model's)")
    parser.add_argument("--device", default="cpu", help="device for the check, e.g. cpu or cuda (default: cpu)")
    add_trust_arguments(parser)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _refuse_bad_output(input_path: str, output: str) -> None:
    if os.path.isdir(output):
        raise ConvertError(f"{output}: is a directory; give a file name")
    if os.path.exists(output) and _same_file(input_path, output):
        raise ConvertError(f"refusing to overwrite the input {input_path} (OUT is the same file)")
    if os.path.realpath(output) == os.path.realpath(input_path):
        raise ConvertError(f"refusing to overwrite the input {input_path}")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise ConvertError(f"{output}: directory {parent} does not exist")


def write_atomically(output: str, write) -> None:
    """``write(temp_path)`` next to OUT, then rename over OUT; on any failure no partial file is left."""
    directory = os.path.dirname(os.path.abspath(output))
    handle, temp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(output)}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temp_path)
        with open(temp_path, "rb") as stream:
            os.fsync(stream.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_path, 0o666 & ~umask)  # mkstemp makes files private; a checkpoint is an ordinary file
        os.replace(temp_path, output)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


def convert(input_name: str, output: str, to: str, dtype=None, device="cpu", progress=None, trusted=False,
            sha256=None, modal=None) -> dict:
    """Convert and return {"check": report or None, "framework": name}; ConvertError/ValueError on bad input.

    ``trusted``/``sha256``: as for :func:`fastmlip.load`; the input is read once. ``modal``: ``to="exported"``'s
    modal or head."""
    import torch

    from . import api
    from .patches import swaps

    step = progress.update if progress is not None else (lambda n=1: None)
    patch = api.patch_for_file(input_name)
    input_path = patch.resolve(input_name) or input_name
    _refuse_bad_output(input_path, output)
    device = api.resolve_device(device)
    torch_dtype = getattr(torch, dtype) if dtype else None
    trusted = api.trust(input_path, trusted, sha256)
    model = patch.load(input_path, device=device, dtype=torch_dtype, trusted=trusted)
    step()
    api.accelerate(model, check=True)
    report = api.last_check(model)
    if to == "exported":
        write_atomically(output, lambda temp: export_checked(patch, model, temp, modal))
        step(2)
        return {"check": report, "framework": patch.FRAMEWORK}
    if modal is not None:
        raise ConvertError("--modal is for --to exported")
    api.restore(model)
    step()
    fmt_dtype = dtype or str(swaps.first_tensor_placement(model)[1]).replace("torch.", "")
    write_atomically(output, lambda temp: patch.save_converted(input_path, temp, to=to, dtype=fmt_dtype,
                                                                check=report, reference=model, trusted=trusted))
    step()
    return {"check": report, "framework": patch.FRAMEWORK}


def export_checked(patch, model, path, modal) -> None:
    """Export the accelerated ``model`` to ``path``, read it back and compare it with the model on the
    self-check's probe structures; ValueError when they differ beyond the model dtype's tolerances."""
    from .patches import exported, self_check

    info = patch.model_info(model)
    exported.export(patch, model, path, modal=modal)
    program = exported.load(path, device=info["device"], trusted=True)
    tolerance = self_check.tolerances(info["dtype"])
    for atoms in self_check.probe_structures(info["atomic_numbers"], info["cutoff"]):
        edges = self_check.neighbor_edges(atoms, info["cutoff"])
        want = self_check.compute_on_atoms(patch, model, atoms, edges, modal=modal)
        got = self_check.compute_on_atoms(exported, program, atoms, edges)
        deviation = self_check.deviation(want, got, len(atoms))
        if not self_check.within(deviation, tolerance):
            raise ValueError(f"the exported program disagrees with the accelerated model: {deviation}")


def run(args) -> int:
    from tqdm import tqdm

    try:
        with tqdm(total=3, desc="convert", unit="step", file=sys.stderr, leave=False,
                  disable=not sys.stderr.isatty()) as progress:
            result = convert(args.input, args.output, args.to, args.dtype, args.device, progress, args.trust,
                             args.sha256, args.modal)
    except ValueError as exc:  # bad input, refused output, or a failed self-check (AccelerationCheckError)
        from .patches.self_check import AccelerationCheckError
        from .patches.files import one_line

        print(f"fastmlip convert: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_CHECK_FAILED if isinstance(exc, AccelerationCheckError) else EXIT_BAD_INPUT
    except (OSError, TypeError) as exc:
        from .patches.files import one_line

        print(f"fastmlip convert: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .patches.self_check import describe

    if result["check"] is None:
        print(f"check ({result['framework']}): nothing to accelerate in this model, no check needed")
    else:
        print(f"check ({result['framework']}, accelerated vs original): {describe(result['check'])}")
    print(f"wrote {args.output} (--to {args.to})")
    if args.to == "exported":
        from .patches.files import file_sha256

        print(f"it holds pickled tensors: load it with trusted=True, or pin it: sha256={file_sha256(args.output)}")
    return 0
