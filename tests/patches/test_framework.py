"""Every framework patch module provides every member of :class:`fastmlip.patches.framework.Framework`, with the
right kind, so the faces can call them without probing; and the faces find the patches through it."""
import inspect
import typing

import pytest

from fastmlip import api
from fastmlip.patches.framework import Framework

FUNCTIONS = sorted(name for name, member in vars(Framework).items()
                   if not name.startswith("_") and inspect.isfunction(member))
ATTRIBUTES = typing.get_type_hints(Framework)


@pytest.fixture(params=["sevenn", "mace"])
def patch(request):
    pytest.importorskip({"sevenn": "sevenn", "mace": "mace.modules"}[request.param])
    return __import__(f"fastmlip.patches.{request.param}", fromlist=["_"])


def test_the_protocol_states_the_contract():
    assert {"handles", "can_load", "resolve", "load", "compute", "accelerate", "restore"} <= set(FUNCTIONS)
    assert ATTRIBUTES == {"FRAMEWORK": str}
    assert all(inspect.getdoc(getattr(Framework, name)) for name in FUNCTIONS), "every member says its contract"


def test_patch_provides_every_member(patch):
    for name in FUNCTIONS:
        assert callable(getattr(patch, name, None)), f"{patch.__name__} lacks the function {name}"
        wanted = list(inspect.signature(getattr(Framework, name)).parameters)[1:]  # without self
        given = inspect.signature(getattr(patch, name)).parameters
        assert set(wanted) <= set(given), f"{patch.__name__}.{name} takes {list(given)}, the protocol {wanted}"
    for name, kind in ATTRIBUTES.items():
        assert isinstance(getattr(patch, name, None), kind), f"{patch.__name__}.{name} is not a {kind.__name__}"
    assert isinstance(patch, Framework)
    assert patch.FRAMEWORK == patch.__name__.rsplit(".", 1)[-1]


def test_files_and_names_without_a_model(patch, tmp_path):
    missing = str(tmp_path / "missing.model")
    assert patch.resolve(missing) is None and not patch.can_load(missing)
    assert isinstance(patch.pretrained_checkpoints(), dict)
    with pytest.raises(ValueError, match="missing.model: "):
        patch.read_checkpoint(missing)
    assert not patch.handles(object())


def test_api_offers_the_installed_patches():
    assert all(isinstance(patch, Framework) for patch in api._patch_modules())
