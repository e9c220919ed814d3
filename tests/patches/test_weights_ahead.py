"""The later convolutions' radial weights launched ahead on a second stream (``FASTMLIP_RADIAL_AHEAD``) give the
same energy bit for bit and the same forces and stress to rounding (autograd adds the MLPs' input gradients in
another order), and every later convolution takes its weights from there.

On the CPU the CUDA stream calls are stand-ins that log what the real ones would do (which stream an MLP runs on,
what the main stream waits for); the GPU run of the same path is in test_gpu_models.py.
"""
import contextlib

import numpy as np
import pytest
import torch
from ase.build import bulk

from fastmlip.calculator import Calculator
from fastmlip.kernels.launch import use_settings
from fastmlip.patches import e3nn_modules


class Streams:
    """Stand-ins for torch.cuda's streams and events, logging their use."""

    def __init__(self, monkeypatch):
        self.log, self.current = [], "main"
        streams = self

        class Event:
            def record(self, stream):
                self.stream = stream
                streams.log.append(("record", stream))

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                streams.log.append(("wait_stream", self.name, other.name))

            def wait_event(self, event):
                streams.log.append(("wait_event", self.name, event.stream.name))

        @contextlib.contextmanager
        def stream(chosen):
            previous, self.current = self.current, chosen.name
            try:
                yield
            finally:
                self.current = previous

        made = []
        monkeypatch.setattr(e3nn_modules, "_has_streams", lambda tensor: True)
        monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: made.append(Stream("side")) or made[-1])
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(self.current))
        monkeypatch.setattr(torch.cuda, "stream", stream)
        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda tensor, stream: None)
        original = e3nn_modules.radial_weights
        monkeypatch.setattr(e3nn_modules, "radial_weights", lambda *args: (
            self.log.append(("mlp", self.current)), original(*args))[1])


def results(calc, atoms):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


@pytest.fixture(scope="module")
def sevenn_model():
    pytest.importorskip("sevenn")
    return Calculator("7net-0", device="cpu", dtype="float64").model  # loaded and accelerated once


def test_sevenn_0_weights_ahead_equal_in_place(sevenn_model, monkeypatch):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    atoms.rattle(0.05, seed=3)
    expected = results(Calculator(sevenn_model, device="cpu", cuda_graph=False), atoms)
    streams = Streams(monkeypatch)
    with use_settings(radial_ahead=1):
        got = results(Calculator(sevenn_model, device="cpu", cuda_graph=False), atoms)
    assert got[0] == expected[0]
    assert np.abs(got[1] - expected[1]).max() <= 1e-12 and np.abs(got[2] - expected[2]).max() <= 1e-12
    # SevenNet-0 has 5 convolutions: the last 4 weights go to the side stream first, then the first layer computes
    # its own in place; the main stream waits for each just before its convolution (nothing is recomputed)
    mlps = [entry[1] for entry in streams.log if entry[0] == "mlp"]
    assert mlps == ["side"] * 4 + ["main"]
    assert ("wait_stream", "side", "main") in streams.log
    assert [entry for entry in streams.log if entry[0] == "wait_event"] == [("wait_event", "main", "side")] * 4


def test_no_weights_ahead_when_off_or_chunked(sevenn_model, monkeypatch):
    atoms = bulk("Si", "diamond", a=5.43, cubic=True)
    streams = Streams(monkeypatch)
    with use_settings(radial_ahead=0):
        results(Calculator(sevenn_model, device="cpu", cuda_graph=False), atoms)
    assert all(entry == ("mlp", "main") for entry in streams.log)
    streams.log.clear()
    with use_settings(radial_ahead=1):
        results(Calculator(sevenn_model, device="cpu", cuda_graph=False, chunk_edges=40), atoms)
    assert streams.log and all(entry == ("mlp", "main") for entry in streams.log)


def test_mace_weights_ahead_equal_in_place(monkeypatch):
    pytest.importorskip("mace.modules")
    from helpers.mace_models import build_model, periodic_structure

    model = Calculator(build_model("mp0_medium"), device="cpu", dtype="float64").model
    atoms = periodic_structure()
    expected = results(Calculator(model, device="cpu", cuda_graph=False), atoms)
    streams = Streams(monkeypatch)
    with use_settings(radial_ahead=1):
        got = results(Calculator(model, device="cpu", cuda_graph=False), atoms)
    assert got[0] == expected[0]
    assert np.abs(got[1] - expected[1]).max() <= 1e-12 and np.abs(got[2] - expected[2]).max() <= 1e-12
    # two interaction blocks: the second's weights on the side stream, then the first's in place
    assert [entry[1] for entry in streams.log if entry[0] == "mlp"] == ["side", "main"]
    assert [entry for entry in streams.log if entry[0] == "wait_event"] == [("wait_event", "main", "side")]


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["sevenn", "mace"])
def test_weights_ahead_on_the_gpu_in_graph_replays(which):
    """Real streams, eager and captured: float32 steps within the fp32 tolerances of the in-place weights (the
    captured graph then holds the side stream's kernels as a branch), and every later convolution took its
    weights from the side stream."""
    if which == "sevenn":
        pytest.importorskip("sevenn")
        model, atoms = Calculator("7net-0", device="cuda").model, bulk("Si", "diamond", a=5.43, cubic=True) * 3
    else:
        pytest.importorskip("mace.modules")
        from helpers.mace_models import build_model, periodic_structure

        model = Calculator(build_model("mp0_medium"), device="cuda", dtype="float32").model
        atoms = periodic_structure()
    atoms.rattle(0.05, seed=1)
    taken = []
    original = e3nn_modules.WeightsAhead.take
    e3nn_modules.WeightsAhead.take = lambda self, key, *args: (lambda w: taken.append(
        (key in self.weights, w is not None)) or w)(original(self, key, *args))
    try:
        with use_settings(radial_ahead=0):
            expected = [results(Calculator(model, device="cuda", cuda_graph=graph), atoms) for graph in (False, True)]
        with use_settings(radial_ahead=1):
            got = [results(Calculator(model, device="cuda", cuda_graph=graph), atoms) for graph in (False, True)]
    finally:
        e3nn_modules.WeightsAhead.take = original
    assert any(launched for launched, _ in taken) and all(got == launched for launched, got in taken)
    for a, b in zip(got, expected):
        assert abs(a[0] - b[0]) / len(atoms) <= 1e-5
        assert np.abs(a[1] - b[1]).max() <= 1e-4 and np.abs(a[2] - b[2]).max() <= 1e-5
