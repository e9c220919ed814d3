"""scripts/bench_md.py's md-loop rows on the CPU: their own kind, table and ratio, and clean failures."""
import json
import os
import sys
from types import SimpleNamespace

import pytest
from ase.build import bulk

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "scripts"))
import bench_md  # noqa: E402
import bench_md_loops  # noqa: E402


def test_step_and_md_loop_rows_get_separate_ratios_and_tables():
    case = {"model": "mace-medium", "system": "Cu4000", "natoms": 4000}
    rows = [dict(case, backend="e3nn", kind="step", step_ms=100.0), dict(case, backend="fastmlip", kind="step",
                                                                        step_ms=50.0),
            dict(case, backend="fastmlip-md", kind="md-loop", step_ms=40.0),
            dict(case, backend="fastmace", kind="md-loop", step_ms=10.0)]
    bench_md.add_ratios(rows)
    assert rows[1]["speedup_vs_e3nn"] == 2.0
    assert (rows[2]["x_best_md"], rows[2]["best_md"]) == (4.0, "fastmace")
    assert rows[3]["x_best_md"] == 1.0
    assert all("speedup_vs_e3nn" not in r for r in rows[2:]) and all("x_best_md" not in r for r in rows[:2])
    for r in rows:
        r.update(us_per_atom=r["step_ms"] * 0.25, peak_MiB=None, setup_s=1.0, engine="graph",
                 timed_events={"neighbour_rebuilds": 0})
    table = bench_md.format_table(rows)
    step_part, md_part = table.split("\n\n")
    assert "fastmlip-md" not in step_part and "e3nn" not in md_part
    assert "4.00 (of fastmace)" in md_part and "1.00 (best)" in md_part


def test_quick_cpu_run_times_fastmlip_md_and_skips_fastmace_for_sevenn(tmp_path):
    out = tmp_path / "bm"
    bench_md.main(["--quick", "--device", "cpu", "--models", "sevenn", "--backends",
                   "fastmlip-md,fastmlip-md-replay,fastmlip-md-verlet,fastmace", "--md-steps", "12", "--md-warmup",
                   "1", "--no-sweep", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["anchors"]
    md, replay, verlet, fastmace = rows
    assert md["kind"] == replay["kind"] == verlet["kind"] == fastmace["kind"] == "md-loop"
    for row in (md, replay, verlet):
        assert row["parity"] == "ok" and row["md_steps"] == 12 and row["step_ms"] > 0
    assert md["replays"] is None and replay["replays"].startswith("10 steps per replay: 1 replays")
    assert fastmace["error"].startswith("NotApplicable: FastMACE runs MACE models only")


def test_a_failing_fastmace_child_is_an_error_not_a_crash():
    args = SimpleNamespace(device="cpu", dtype="float32", md_steps=2, md_warmup=0, fastmace_timeout=120,
                           verbose=False)
    atoms = bench_md_loops.thermalised(bulk("Cu", "fcc", a=3.61, cubic=True))
    with pytest.raises(RuntimeError, match="fastmace child"):  # no fastmace here, or no such model file
        bench_md_loops.fastmace(atoms, "/nonexistent/mace.model", args)
