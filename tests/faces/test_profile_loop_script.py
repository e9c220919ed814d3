"""scripts/profile_loop.py: the GPU's busy time is the union of kernel intervals, and a CPU run reports a loop."""
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "scripts"))
import profile_loop  # noqa: E402


def test_busy_time_counts_overlapping_kernels_once():
    # us: [0, 10] and [5, 20] overlap (20 us busy), [30, 35] apart (5), [31, 33] inside it (0)
    assert profile_loop.busy_ms([(30, 35), (0, 10), (5, 20), (31, 33)]) == pytest.approx(0.025)
    assert profile_loop.busy_ms([]) == 0.0


def test_cpu_run_reports_the_loop(tmp_path):
    pytest.importorskip("sevenn")
    assert profile_loop.main(["--cases", "sevenn:Si:1", "--device", "cpu", "--steps", "3", "--warmup", "1",
                              "--interval", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "profile_loop.json").read_text())
    (row,) = data["rows"]
    assert (row["model"], row["natoms"], row["steps"]) == ("sevenn", 8, 3)
    assert math.isfinite(row["wall_ms_per_step"]) and row["wall_ms_per_step"] > 0
    assert row["kernels_per_step"] == 0 and row["gpu_busy_ms_per_step"] == 0  # no GPU: no kernels seen
    assert row["gpu_idle_ms_per_step"] == pytest.approx(row["wall_ms_per_step"])
