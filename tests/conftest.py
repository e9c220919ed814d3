import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    """Tests choose their backend explicitly; an outer FASTMLIP_BACKEND must not leak in."""
    if "FASTMLIP_BACKEND" in os.environ:
        monkeypatch.delenv("FASTMLIP_BACKEND")
