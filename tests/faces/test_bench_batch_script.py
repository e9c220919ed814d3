"""scripts/bench_batch.py on the CPU: --quick times the Calculator loop and fastmlip.evaluate (and TorchSim's FIRE
where torch_sim imports, else says why not), all in parity with the loop; a row beyond tolerance is no speed."""
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "scripts"))
import bench_batch  # noqa: E402


def test_quick_cpu_run_writes_timed_rows_in_parity(tmp_path):
    pytest.importorskip("sevenn")
    out = tmp_path / "bb"
    threads = torch.get_num_threads()
    try:
        bench_batch.main(["--quick", "--device", "cpu", "--species", "Si,Cu", "--no-self-check", "--torchsim",
                          "--fire-steps", "2", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # --quick on the CPU runs on one thread
    data = json.loads(out.with_suffix(".json").read_text())
    meta, rows = data["meta"], data["rows"]
    assert (meta["cells"], meta["atoms_per_cell"], meta["species"]) == (6, 8, ["Si", "Cu"])
    assert meta["fastmlip"] and meta["torch"] and "--quick" in meta["command"]
    with_torchsim = importlib.util.find_spec("torch_sim") is not None and sys.version_info >= (3, 12)
    assert [(r["method"], r.get("batch_atoms")) for r in rows] == [
        ("calculator-loop", None), ("evaluate", 16), ("evaluate", 4096)] + [("torchsim-fire", None)] * with_torchsim
    if not with_torchsim:
        assert meta["torchsim"].startswith("skipped: torch_sim does not import")
    for row in rows:
        assert "error" not in row and math.isfinite(row["ms_per_structure"]) and row["ms_per_structure"] > 0
    assert rows[0]["parity"] == "reference"
    for row in rows[1:]:
        assert row["parity"] == "ok" and row["max_dF"] <= 1e-4 and math.isfinite(row["speedup_vs_loop"])
    assert all(row["max_dS"] <= 1e-6 for row in rows[1:3])
    if with_torchsim:
        assert rows[3]["fire_steps"] == 2 and rows[3]["fmax_end"] < rows[3]["fmax_start"]


def test_a_row_beyond_tolerance_is_failed_and_not_a_speed():
    reference = [{"energy": -10.0, "forces": np.zeros((8, 3)), "stress": np.zeros(6)}]
    results = [{"energy": -10.0, "forces": np.full((8, 3), 1e-3), "stress": np.zeros(6)}]
    row = {"method": "evaluate", "ms_per_structure": 1.0}
    bench_batch.check_parity(row, results, reference, "float32")
    assert row["parity"] == "failed" and row["failed_ms_per_structure"] == 1.0 and "ms_per_structure" not in row
    assert "max_dF 1.0e-03" in row["error"]
    bench_batch.add_speedups([{"method": "calculator-loop", "ms_per_structure": 5.0}, row])
    assert "speedup_vs_loop" not in row
