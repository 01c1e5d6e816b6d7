"""``study --jobs N`` (:mod:`lightning_spectral.experiments.parallel`): device hand-out and threads,
checked with a stand-in run command that records what each run process was given."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from lightning_spectral.experiments import parallel

# A run process: writes its environment's device, threads and the argv it got to <dir>/<run id>.json.
RECORDER = ("import json, os, sys, time; run = sys.argv[sys.argv.index('--run') + 1]; time.sleep(0.3); "
            "json.dump({'device': os.environ.get('CUDA_VISIBLE_DEVICES'), 'omp': os.environ.get('OMP_NUM_THREADS'), "
            "'threads': sys.argv[sys.argv.index('--threads') + 1]}, open(os.path.join(sys.argv[1], run + '.json'), 'w'))")


def _run(tmp_path: Path, jobs: int, runs: int, threads: int | None = None) -> dict[str, dict]:
    ids = [f"r{i}" for i in range(runs)]
    dirs = {i: tmp_path / "runs" / i for i in ids}
    done = parallel.run_parallel("t", ids, dirs, [sys.executable, "-c", RECORDER, str(tmp_path)], jobs,
                                 threads=threads, stream=io.StringIO(), poll_s=0.05)
    assert sorted(done["ran"]) == ids and done["failed"] == []
    return {i: json.loads((tmp_path / f"{i}.json").read_text()) for i in ids}


def test_each_slot_gets_its_own_listed_device_round_robin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert parallel.visible_devices() == ["3", "5"]
    seen = _run(tmp_path, jobs=2, runs=4, threads=3)
    assert seen["r0"]["device"] == "3" and seen["r1"]["device"] == "5"  # the two first runs, side by side
    assert {s["device"] for s in seen.values()} == {"3", "5"}
    assert all(s["omp"] == "3" and s["threads"] == "3" for s in seen.values())


def test_more_jobs_than_devices_share_them_round_robin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    seen = _run(tmp_path, jobs=3, runs=3)
    assert [seen[f"r{i}"]["device"] for i in range(3)] == ["0", "1", "0"]


def test_no_devices_no_hand_out_and_the_cores_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # set but no device: left as the parent had it
    assert parallel.visible_devices() == []
    seen = _run(tmp_path, jobs=2, runs=2)
    assert all(s["device"] == "7" for s in seen.values())
    assert all(s["threads"] == str(parallel.default_threads(2)) for s in seen.values())
