import contextlib
import os

import torch

if not torch.cuda.is_available():
    # Triton decides at decoration time whether kernels are interpreted, so this must precede any triton import.
    # The dispatch never picks the interpreter by itself; tests that want the kernels force FASTMLIP_BACKEND=triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if "FASTMLIP_CACHE" not in os.environ:
    # What the tests compile, generate and export (``fastmlip md`` keeps exported copies of models) stays out of the
    # user's cache; a cache named from outside (the GPU machine's carried kernels) is kept.
    import tempfile

    os.environ["FASTMLIP_CACHE"] = tempfile.mkdtemp(prefix="fastmlip-tests-")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kernel_settings():
    """``kernel_settings(conv_block=2)``: kernel settings (:func:`fastmlip.kernels.launch.use_settings`) changed for
    the rest of the test, restored after it (they are read once per process, so setting the variable is too late)."""
    from fastmlip.kernels.launch import use_settings

    with contextlib.ExitStack() as changes:
        yield lambda **values: changes.enter_context(use_settings(**values))


@pytest.fixture
def triton_poisoned(monkeypatch, tmp_path_factory):
    """The Triton backend (interpreted without CUDA), a cache of this run's own, and outputs the kernels must fully
    write starting as NaN (:data:`fastmlip.kernels.launch.POISON_OUTPUTS`)."""
    from fastmlip.kernels import launch

    monkeypatch.setenv("FASTMLIP_BACKEND", "triton")
    monkeypatch.setenv("FASTMLIP_CACHE", str(tmp_path_factory.getbasetemp() / "fastmlip-cache"))
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Tests choose their backend explicitly; an outer FASTMLIP_BACKEND must not leak in."""
    if "FASTMLIP_BACKEND" in os.environ:
        monkeypatch.delenv("FASTMLIP_BACKEND")
