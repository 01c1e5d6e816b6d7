"""Smoke test of ``benchmarks.sharded_memory --quick``: two gloo processes count each rank's
optimizer state with the network sharded by FSDP2 and replicated; Muon's counts must equal the
bytes computed here from the parameter shapes (momentum for the matrices, AdamW's two moments
and its step scalar for the rest; FSDP2 gives rank ``r`` the ``r``-th ``torch.chunk`` of dim 0)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_spectral.optim import build_param_groups

ROOT = Path(__file__).resolve().parents[1]
FLOAT = 4  # float32


def _rows_on_rank(rows: int, rank: int, world: int = 2) -> int:
    """Rows of a dim-0 ``torch.chunk`` into ``world`` pieces that land on ``rank``."""
    size = math.ceil(rows / world)
    return max(0, min(size, rows - rank * size))


def _expected_muon_bytes(model, rank: int | None) -> int:
    """Muon's state on one rank: ``rank=None`` for the replicated model (every tensor whole)."""
    total = 0
    for group in build_param_groups(model):
        for p in group["params"]:
            elements = p.numel() if rank is None else _rows_on_rank(p.shape[0], rank) * (p.numel() // p.shape[0])
            # matrices: one momentum buffer; the rest (AdamW fallback): exp_avg, exp_avg_sq and a 0-d step
            total += FLOAT * (elements if group["matrix"] else 2 * elements + 1)
    return total


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sharded_memory") / "sharded_memory.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.sharded_memory", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| gpt | Muon | 0 |" in proc.stdout and "| mlp | ManifoldMuon | 1 |" in proc.stdout
    assert out.with_suffix(".md").read_text().strip() == proc.stdout.strip()
    return json.loads(out.read_text())


@pytest.mark.parametrize("model_name", ["gpt", "mlp"])
def test_muon_sharded_state_is_each_ranks_chunk_of_the_replicated_state(result, model_name):
    from benchmarks.sharded_memory import build_model

    model = build_model(model_name, quick=True)
    replicated = _expected_muon_bytes(model, None)
    for rank in (0, 1):
        row = result["ranks"][str(rank)][f"{model_name} Muon"]
        assert row["replicated_bytes"] == replicated, row
        assert row["sharded_bytes"] == _expected_muon_bytes(model, rank), row
        assert 0.45 < row["sharded_bytes"] / row["replicated_bytes"] < 0.55, row
        # One gathered matrix: its full weight, gradient and momentum.
        largest = max((p for g in build_param_groups(model) if g["matrix"] for p in g["params"]), key=lambda p: p.numel())
        assert row["largest_matrix"] == list(largest.shape)
        assert row["gathered_bytes"] == 3 * FLOAT * largest.numel()


def test_every_optimizer_holds_less_state_sharded(result):
    for rank in ("0", "1"):
        rows = result["ranks"][rank]
        assert set(rows) == {f"{m} {o}" for m in ("gpt", "mlp") for o in ("Muon", "MuonAdamW", "ManifoldMuon")}
        for name, row in rows.items():
            assert 0 < row["sharded_bytes"] < row["replicated_bytes"], (name, row)
        # MuonAdamW's Adam moments shard as Muon's momentum does: twice the matrix state.
        for model in ("gpt", "mlp"):
            assert rows[f"{model} MuonAdamW"]["sharded_bytes"] / rows[f"{model} MuonAdamW"]["replicated_bytes"] < 0.55
