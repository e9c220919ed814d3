"""Model files: telling formats apart without unpickling, refusing to run code from a file nobody trusted, and
where loading one spent its time."""
from __future__ import annotations

import hashlib
import time
import zipfile

LOAD_TIMING_ATTRIBUTE = "_fastmlip_load_timing"  # in model.__dict__: what :func:`load_timing` returned


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


def one_line(exc: BaseException) -> str:
    """An exception as a single line, for CLI error messages."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def load_timing(start: float, imported: float, built: float) -> dict:
    """Seconds a framework's model load spent importing the framework, building (or unpickling) the model, and
    moving it to its device (on a GPU also whatever CUDA set-up was still pending), from perf_counter marks
    taken at the start, after the imports and after the build; the move ends now."""
    return {"imports": imported - start, "build": built - imported, "to_device": time.perf_counter() - built}
