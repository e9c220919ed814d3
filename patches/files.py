"""Model files: telling formats apart without unpickling, and refusing to run code from a file nobody trusted."""
from __future__ import annotations

import hashlib
import zipfile


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
