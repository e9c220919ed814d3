"""scripts/bench_linear.py --quick on the CPU (Triton interpreter): o3.Linear shapes and, with --mlp, radial-MLP
layers as 0e linears; every tile variant checked against e3nn in float64 before any timing."""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "scripts", "bench_linear.py")


@pytest.mark.parametrize("mode", [[], ["--mlp"]])
def test_quick_run_checks_every_variant(tmp_path, mode):
    out = tmp_path / "bl"
    done = subprocess.run([sys.executable, SCRIPT, "--quick", *mode, "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads(out.with_suffix(".json").read_text())["records"]
    tiles = [r for r in records if r["impl"] == "fastmlip"]
    assert len(tiles) == 2 and [r["impl"] for r in records].count("e3nn") == 1
    for record in tiles:
        assert "error" not in record, record
        assert record["out_err"] < 1e-6 and record["grad_err"] < 1e-6
    assert ("->" in records[0]["irreps"]) == bool(mode)
