"""No code from a model file runs unless the user trusts the file (fastmlip.load, Calculator, md, convert, warmup).

The hostile files here are pickles whose ``__reduce__`` creates a marker file when unpickled: one dressed as a
MACE model file (its pickle names ``mace.modules.models``), one as a SevenNet checkpoint (a config and a state
dict, plus the hostile object).
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from fastmlip import api
from fastmlip.calculator import Calculator
from fastmlip.patches.files import UntrustedFileError, file_sha256

pytest.importorskip("sevenn")


class Hostile:
    """Unpickling this creates ``marker``: proof that loading ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "code-ran"
    mace_like = tmp_path / "evil.model"
    torch.save({"class": "mace.modules.models.ScaleShiftMACE", "payload": Hostile(marker)}, mace_like)
    sevenn_like = tmp_path / "evil.pth"
    torch.save({"config": {"version": "0.9.0"}, "model_state_dict": {}, "payload": Hostile(marker)}, sevenn_like)
    assert not marker.exists()
    return marker, mace_like, sevenn_like


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fastmlip.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_untrusted_files_are_refused_without_running_code(hostile):
    marker, mace_like, sevenn_like = hostile
    for path in (mace_like, sevenn_like):
        with pytest.raises(UntrustedFileError) as refused:
            api.load(path)
        message = str(refused.value)
        assert "\n" not in message and "trusted=True" in message and "--trust" in message
        assert file_sha256(path) in message  # what to pin with sha256=
        with pytest.raises(UntrustedFileError):
            Calculator(str(path), device="cpu")
        with pytest.raises(UntrustedFileError, match="SHA-256 is"):
            api.load(path, sha256="0" * 64)
    assert not marker.exists()


def test_commands_refuse_untrusted_files_in_one_line(hostile, tmp_path):
    marker, mace_like, sevenn_like = hostile
    for path in (mace_like, sevenn_like):
        for args in (("md", "--model", path, "--steps", "1"), ("convert", path, "-o", tmp_path / "out", "--to", "fast"),
                     ("warmup", path, "--arch", "sm_90")):
            result = cli(*args, cwd=tmp_path)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1 and "--trust" in lines[0], result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_trusting_a_file_is_the_users_decision(hostile):
    """With trusted=True (or the file's own sha256) the pickle is opened: the marker proves these files would
    have run code, and they are then refused as not being models."""
    marker, mace_like, sevenn_like = hostile
    with pytest.raises(ValueError, match="not a MACE model"):
        api.load(mace_like, sha256=file_sha256(mace_like))
    assert marker.exists()
    os.remove(marker)
    with pytest.raises(Exception):
        api.load(sevenn_like, trusted=True)
    assert marker.exists()


def test_sevenn_checkpoints_load_without_a_full_unpickle(monkeypatch):
    """Shipped and user SevenNet checkpoints are read with weights_only=True, once per load."""
    loads = []
    original = torch.load

    def counting(*args, **kwargs):
        loads.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", counting)
    model = api.load("7net-0")
    assert api.framework_of(model).__name__.endswith("sevenn")
    assert loads == [True]


def test_a_trusted_mace_file_is_unpickled_once(tmp_path, monkeypatch):
    pytest.importorskip("mace.modules")
    from fastmlip.patches import e3nn_compat
    from helpers import mace_models

    path = tmp_path / "small.model"
    torch.save(mace_models.build_model("mp0_small"), path)
    with pytest.raises(UntrustedFileError, match="a MACE model file is a whole pickled model"):
        api.load(path)
    opened = []
    original = e3nn_compat.load
    monkeypatch.setattr(e3nn_compat, "load", lambda *a, **k: opened.append(a) or original(*a, **k))
    api.load(path, trusted=True)
    api.load(path, sha256=file_sha256(path))
    assert len(opened) == 2
