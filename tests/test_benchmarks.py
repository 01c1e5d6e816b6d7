"""Smoke test of the benchmark command (issue 7): ``--quick`` runs on tiny shapes and fills every section."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def _ns_flops(m: int, n: int, steps: int = 5) -> int:
    s, l = min(m, n), max(m, n)
    return steps * (4 * s * s * l + 2 * s**3)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_quick_distributed_benchmark_counts_exactly(tmp_path: Path, world: int, capsys) -> None:
    """``benchmarks.distributed --quick`` on 2 (and 4: slow) gloo ranks (GPT 2×32: 12 matrices): the
    counts of every rank against the exact ones. Repeated: every matrix on every rank, nothing
    sent. Split: each rank orthogonalises the matrices ``deal`` gives it and sends, in one
    all-gather, its padded share (the largest rank's matrices) to each other rank. Chosen: the
    recorded latency model's batches split, the rest repeated. FSDP2: every matrix on exactly one
    rank, and the all-to-alls carry each matrix's other shards to its owner and back."""
    from benchmarks._common import model_shapes
    from lightning_spectral.optim.distributed import deal
    from lightning_spectral.optim.split_cost import LatencyModel

    from benchmarks import distributed

    out = tmp_path / "distributed.json"  # in this process (the ranks are spawned): one interpreter start fewer
    distributed.main(["--quick", "--repeats", "1", "--model", "gpt", "--world", str(world), "--out", str(out)])
    stdout = capsys.readouterr().out
    shapes = model_shapes("gpt", quick=True)
    keys = [(s, "torch.float32", "cpu") for s in shapes]
    numel = [m * n for m, n in shapes]
    flops = [_ns_flops(m, n) for m, n in shapes]
    for world, result in json.loads(out.read_text()).items():
        world = int(world)
        rows = {row["mode"]: row for row in result["rows"].values()}
        assert set(rows) == {"repeated", "split", "chosen", "fsdp2"} and all(r["step_s"] > 0 for r in rows.values())
        for rank in rows["repeated"]["per_rank"]:
            assert (rank["matrices"], rank["flops"], rank["sent_bytes"], rank["collectives"]) == (12, sum(flops), 0, 0)
        for mode in ("split", "chosen"):
            split = LatencyModel(**result["latency"]).choose(keys, world) if mode == "chosen" else dict.fromkeys(keys, True)
            chosen = [i for i, k in enumerate(keys) if split[k]]
            owners = [-1] * len(keys)
            for i, o in zip(chosen, deal([keys[i] for i in chosen], world)):
                owners[i] = o
            share = max(sum(numel[i] for i in chosen if owners[i] == r) for r in range(world))
            for r, rank in enumerate(rows[mode]["per_rank"]):
                mine = [i for i in range(len(keys)) if owners[i] in (r, -1)]
                assert rank["matrices"] == len(mine) and rank["flops"] == sum(flops[i] for i in mine), (world, mode, r)
                assert rank["sent_bytes"] == 4 * share * (world - 1), (world, mode, r, rank)
                assert rank["by_op"] == ({"_allgather_base_": [1, 4 * share * (world - 1)]} if share else {})
        assert 0 < rows["split"]["sent_bytes"] <= rows["split"]["param_bytes"]
        fsdp = rows["fsdp2"]["per_rank"]
        assert sum(r["matrices"] for r in fsdp) == 12 and sum(r["flops"] for r in fsdp) == sum(flops)
        assert max(r["matrices"] for r in fsdp) == 12 // world  # the shapes' counts divide by the world
        # every row count divides by the world: each shard is numel/world, (world − 1) of them go each way
        assert sum(r["by_op"]["alltoall_base_"][1] for r in fsdp) == 2 * 4 * sum(numel) * (world - 1) // world
        assert f"{world} gloo ranks" in stdout


def test_gpu_script_dry_run_on_cpu(tmp_path: Path) -> None:
    """``benchmarks.gpu --dry-run --device cpu``: the GPU script's every part runs on tiny shapes
    and writes its table; a row that fails is reported in the table, not raised."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--device", "cpu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert (tmp_path / "gpu.md").read_text().strip() == result["markdown"].strip()
    for part in ("ResNet-18 shapes", "GPT-2 small shapes"):
        rows = result["optimizers"][part]["rows"]
        for name in ("torch.optim.Muon (bf16 NS)", "Muon bf16", "Muon float32", "standard chain float32 (floor)",
                     "ManifoldMuon amortized", "SpectralBall amortized"):
            assert rows[name]["ms"] > 0, (part, name, rows[name])
        assert rows["Muon bf16"]["over_torch_muon"] == rows["Muon bf16"]["ms"] / rows["torch.optim.Muon (bf16 NS)"]["ms"]
        # the chains beside their deviation from the float64 iteration: float32 round-off, a multiple of bf16's ε
        for name, tol in (("standard chain float32 (floor)", 1e3 * torch.finfo(torch.float32).eps),
                          ("auto chain float32 (Gram form where n >= 2m)", 1e3 * torch.finfo(torch.float32).eps),
                          ("standard chain bfloat16", 100 * torch.finfo(torch.bfloat16).eps),
                          ("auto chain bfloat16 (Gram form where n >= 2m)", 100 * torch.finfo(torch.bfloat16).eps)):
            assert rows[name]["ms"] > 0 and rows[name]["deviation"] < tol, (part, name, rows[name])
    for name, r in result["training_loop"].items():
        assert r["images_per_s"] > 0 and r["steps"] == 3, name
    assert "| Muon bf16 |" in proc.stdout and "images/s" in proc.stdout
    inputs = result["distributed_inputs"]  # the cost model's msign times: 6 shapes × 2 stacks × 2 dtypes, fitted
    assert len(inputs["rows"]) == 24 and all(r["ms"] > 0 for r in inputs["rows"].values())
    assert all(fit["tflop_s"] > 0 for fit in inputs["fit"].values()) and "msign per matrix" in proc.stdout


def test_gpu_script_refuses_a_missing_device(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--device cpu" in proc.stderr


def test_real_gradient_benchmark_quick(tmp_path: Path) -> None:
    """``benchmarks.real_gradients --quick``: captures gradients of tiny networks into the cache,
    times every optimizer on them and on Gaussian matrices, the cost growth with its exponent and
    the many-small-matrices case with GEMM kernel counts (Muon batched, a per-matrix loop not)."""
    out = tmp_path / "real.json"
    cmd = [sys.executable, "-m", "benchmarks.real_gradients", "--quick", "--no-compile", "--models", "mlp,gpt",
           "--cache", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["gpt-quick.pt", "mlp-quick.pt"]
    for model in ("mlp", "gpt"):
        for column in ("real", "gaussian"):
            rows = result["models"][model]["columns"][column]
            for name in ("floor: standard float32 chain", "Muon", "torch.optim.Muon", "ManifoldMuon amortized",
                         "SpectralBall amortized"):
                assert rows[name]["median_s"] > 0, (model, column, name, rows[name])
    growth = result["growth"]
    assert set(growth["exponent"]) >= {"floor: standard float32 chain", "Muon"}
    small = result["many_small"]["rows"]
    assert small["Muon"]["batched"] and not small["per-matrix msign loop"]["batched"]
    assert small["per-matrix msign loop"]["gemm_calls"] == small["floor: standard float32 chain"]["gemm_calls"] * 20
    assert "÷ torch Muon" in proc.stdout and "fitted exponent" in proc.stdout


@pytest.mark.slow
def test_real_gradient_benchmark_chains_and_budgeted_sections(tmp_path: Path) -> None:
    """``--sections chains,budgeted --quick``: every chain's time beside its deviation from the
    float64 iteration (float32 at round-off, bfloat16 far above it; the bfloat16 Gram form within
    twice the standard bfloat16 chain's), the square matrices' schedules against the SVD, and every budgeted solver's
    ratio to Muon for two repeats beside its certified gap (at most the default tol 1e-3)."""
    out = tmp_path / "sections.json"
    cmd = [sys.executable, "-m", "benchmarks.real_gradients", "--quick", "--models", "", "--sections",
           "chains,budgeted", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for rows in result["chains"]["models"].values():
        assert rows["ours float32 auto"]["deviation"] < 1e3 * torch.finfo(torch.float32).eps
        assert rows["ours bfloat16 standard"]["deviation"] > 10 * rows["ours float32 auto"]["deviation"]
        assert rows["ours bfloat16 auto"]["deviation"] <= (2 * rows["ours bfloat16 standard"]["deviation"]
                                                           + 8 * torch.finfo(torch.bfloat16).eps)
        assert all(len(r["ratio"]) == 2 for r in rows.values())
    squares = result["chains"]["squares"]["gpt"]["rows"]  # the square matrices: schedules against the SVD
    assert squares["jordan 5 float32"]["ratio"] == 1.0
    for label, r in squares.items():  # ⟨G, O⟩ ≤ ‖G‖_* ‖O‖₂ (duality), with equality at O = U Vᵀ
        assert 0 < r["steepest_share"] <= 1 + 1e-6 and 0 < r["polar_distance"] < 1, (label, r)
    repeats = result["budgeted"]["repeats"]
    assert len(repeats) == 2
    for rows in repeats:
        for name in ("dual_ascent", "quasi_newton", "admm"):
            assert rows[name]["ratio_to_muon"] > 0 and rows[name]["gap_max"] <= 1e-3 * (1 + 1e-6), rows[name]


@pytest.mark.slow
def test_real_gradient_benchmark_amortized_section(tmp_path: Path) -> None:
    """``--sections amortized --quick``: Muon, ManifoldMuon and SpectralBall amortized on both
    models, two repeats of ratios to Muon, the host reads of a steady step (no more than Muon's:
    its finite check), kernel counts, and each direction's certified gap and constraint error
    beside them (measured ~65 s on the loaded 2-core machine)."""
    out = tmp_path / "amortized.json"
    cmd = [sys.executable, "-m", "benchmarks.real_gradients", "--quick", "--models", "", "--sections", "amortized",
           "--cache", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    models = json.loads(out.read_text())["amortized"]["models"]
    assert set(models) == {"resnet18", "gpt"}
    for res in models.values():
        rows = res["rows"]
        assert set(rows) == {"Muon", "ManifoldMuon amortized", "SpectralBall amortized"}
        for name, row in rows.items():
            assert len(row["ratio"]) == 2 and all(r > 0 for r in row["ratio"]), name
            assert row["host_reads"] <= rows["Muon"]["host_reads"], name
            assert row["ops"]["GEMM (mm/bmm/addmm/baddbmm)"] > 0 and 0 <= row["gap_median"] <= row["gap_max"] <= 1
            assert row["ops"]["GEMM GFLOP"] > 0 and 0 <= row["ops"]["eigh share"] < 1
        assert rows["ManifoldMuon amortized"]["constraint_max"] <= 1e-5
        assert rows["ManifoldMuon amortized"]["ops"]["eigh"] > 0
    assert "host reads" in proc.stdout


@pytest.mark.slow
def test_real_gradient_benchmark_inner_section(tmp_path: Path) -> None:
    """``--sections inner --quick``: ManifoldMuon and SpectralBall inner modes against Muon on
    both models, two repeats, each beside its certified duality gap (weak duality: ≥ 0 up to
    round-off) and its evaluations per matrix."""
    out = tmp_path / "inner.json"
    cmd = [sys.executable, "-m", "benchmarks.real_gradients", "--quick", "--models", "", "--sections", "inner",
           "--cache", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["inner"]["models"]) == {"resnet18", "gpt"}
    for rows in result["inner"]["models"].values():
        for name, row in rows.items():
            assert len(row["ratio_to_muon"]) == 2 and all(r > 0 for r in row["ratio_to_muon"]), (name, row)
            if name != "Muon":
                assert row["gap_median"] >= -1e-5 and row["gap_max"] < 0.1 and row["evaluations_per_matrix"] >= 1, row


@pytest.mark.slow
def test_compiled_step_benchmark_quick(tmp_path: Path) -> None:
    """``benchmarks.compiled_step --quick --backend eager``: every row compiles, times and matches eager."""
    out = tmp_path / "compiled.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compiled_step", "--quick", "--backend", "eager",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {"Muon", "MuonSGD (spectral_clip)", "MuonAdamW (spectral_clip)", "ManifoldMuon amortized",
            "SpectralBall amortized"} <= set(rows)
    for name, row in rows.items():
        assert row["compile_s"] > 0 and abs(row["ratio"] - row["compiled_ms"] / row["eager_ms"]) <= 1e-9, name
        assert row["max_weight_diff"] <= 1e-5, name  # the eager backend runs the same kernels
