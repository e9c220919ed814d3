"""What the kernels share at launch (fastmlip.kernels.launch): the tuning settings, read once from the environment,
documented, listed by ``fastmlip info`` and switched for a block; the outputs kernels fill."""
import pytest
import torch

from fastmlip.kernels import launch


def test_settings_come_from_the_environment_with_documented_defaults():
    defaults = launch.read_settings({})
    assert defaults == launch.Settings()
    tuned = launch.read_settings({"FASTMLIP_CONV_BLOCK": " 64 ", "FASTMLIP_DOT_PRECISION": "TF32x3",
                                  "FASTMLIP_GATE_ROWS": ""})
    assert (tuned.conv_block, tuned.dot_precision, tuned.gate_rows) == (64, "tf32x3", defaults.gate_rows)
    with pytest.raises(ValueError, match="FASTMLIP_SH_BLOCK='big': expected an integer"):
        launch.read_settings({"FASTMLIP_SH_BLOCK": "big"})
    with pytest.raises(ValueError, match="FASTMLIP_COMPILE_WORKERS=0"):
        launch.read_settings({"FASTMLIP_COMPILE_WORKERS": "0"})
    described = launch.describe_settings()
    names = [name for name, _, _, _ in described]
    assert len(set(names)) == len(names) == len(launch.Settings.__dataclass_fields__)
    assert all(name.startswith("FASTMLIP_") and tunes for name, _, _, tunes in described)


def test_settings_are_read_once_and_switched_for_a_block(monkeypatch):
    before = launch.settings()
    monkeypatch.setenv("FASTMLIP_CONV_BLOCK", str(before.conv_block + 1))
    assert launch.settings() is before  # read once: launches never look at the environment again
    with launch.use_settings(conv_block=2) as inside:
        assert launch.settings() is inside
        assert inside.conv_block == 2 and inside.gate_rows == before.gate_rows
    assert launch.settings() is before
    with pytest.raises(ValueError, match="FASTMLIP_DOT_PRECISION"), launch.use_settings(dot_precision="bf16"):
        pass
    assert launch.settings() is before


def test_info_lists_the_settings(capsys):
    from fastmlip.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}=" in out for name, _, _, _ in launch.describe_settings())


def test_one_poison_switch_for_every_output(monkeypatch):
    like = torch.zeros(2, dtype=torch.float64)
    assert torch.equal(launch.new_output((2, 3), like, written_everywhere=False), torch.zeros(2, 3, dtype=like.dtype))
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)
    assert launch.new_output((2, 3), like).isnan().all()
    with pytest.raises(TypeError, match="float32 and float64"):
        launch.tl_dtype(torch.float16)
