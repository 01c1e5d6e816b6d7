"""Smoke test of the benchmark command (issue 7): ``--quick`` runs on tiny shapes and fills every section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_produces_every_section(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    sections = result["sections"]
    assert set(sections) == {"optimizer_step", "targets", "msign_accuracy", "inner_solvers", "training_loop",
                             "callbacks", "memory"}
    for model in ("mlp", "resnet18"):
        rows = sections["optimizer_step"][model]["rows"]
        for name in ("Muon", "torch.optim.Muon", "torch AdamW", "floor: NS-5 float32 bmm", "ManifoldMuon amortized",
                     "SpectralBall inner", "MuonSGD admm +tangent"):
            assert rows[name]["median_s"] > 0 and rows[name]["over_floor"] > 0, (model, name)
        assert rows["Muon"]["state_bytes_per_param"] == 4.0  # one float32 momentum buffer
    assert len(sections["msign_accuracy"]["rows"]) == 4 * 8
    assert {r["solver"] for r in sections["inner_solvers"]["budgeted"]["rows"]} == {
        "spectral_clip", "frank_wolfe", "dual_ascent", "quasi_newton", "admm"}
    assert all(r["duality_gap"] >= -1e-4 for r in sections["inner_solvers"]["directions"]["rows"])
    assert len(sections["training_loop"]["workloads"]) == 2
    assert all(w["ratio"] > 0 for w in sections["training_loop"]["workloads"].values())
    assert {"SpectralNormMonitor", "SharpnessMonitor", "GradientNoiseScaleMonitor", "ConstraintMonitor"} <= set(
        sections["callbacks"]["rows"])
    for heading in ("### 1.", "### 2.", "### 3.", "### 4.", "### 5.", "### 6."):
        assert heading in proc.stdout


def test_quick_distributed_benchmark_times_split_and_repeated_work(tmp_path: Path) -> None:
    """``benchmarks.distributed --quick``: two gloo processes time every optimizer with its matrix
    work split across the ranks and repeated on both."""
    out = tmp_path / "distributed.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.distributed", "--quick", "--repeats", "1",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {"Muon", "ManifoldMuon amortized", "SpectralBall amortized"} <= set(rows)
    for name, row in rows.items():
        assert row["split_s"] > 0 and row["repeated_s"] > 0, name
        assert row["ratio"] == row["split_s"] / row["repeated_s"]
