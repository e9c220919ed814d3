"""The CUDA context made on a thread ahead of torch: started for CUDA names only, harmless where CUDA is absent."""
import pytest

from fastmlip import cuda_context


@pytest.mark.parametrize("device", ["cpu", "cuda:x", "mps"])
def test_nothing_starts_for_devices_that_are_not_cuda(device):
    assert cuda_context.create_in_background(device) is None


def test_hidden_gpus_start_nothing(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert cuda_context.create_in_background("auto") is None


def test_one_thread_per_device_that_ends_quietly_without_a_driver(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    thread = cuda_context.create_in_background("cuda:0")
    assert thread is cuda_context.create_in_background("auto")  # the same device, started once
    thread.join(timeout=60)
    assert not thread.is_alive()
