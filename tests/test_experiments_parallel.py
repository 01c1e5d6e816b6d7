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


# -- SIGTERM / SIGINT to the parent ---------------------------------------------------------------
# A run process: records its pid, then works until stopped. "graceful" stops on SIGTERM with 143 (as a
# Lightning run does at its next batch); "stubborn" ignores SIGTERM and has a child of its own.
CHILD = """
import os, signal, subprocess, sys, time
tmp, mode, run = sys.argv[1], sys.argv[2], sys.argv[sys.argv.index('--run') + 1]
pids = [os.getpid()]
if mode == 'stubborn':
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids.append(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']).pid)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
open(os.path.join(tmp, run + '.pids'), 'w').write(' '.join(map(str, pids)))
while True:
    time.sleep(0.05)
"""
PARENT = """
import sys
from pathlib import Path
from lightning_spectral.experiments.interrupt import StudyInterrupted
from lightning_spectral.experiments import parallel
parallel.visible_devices = lambda: []  # no torch import: this parent only starts stand-in runs
tmp, mode, grace = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
ids = ['a', 'b', 'c']
try:
    parallel.run_parallel('t', ids, {i: tmp / i for i in ids}, [sys.executable, '-c', sys.argv[4], str(tmp), mode], jobs=2,
                 threads=1, poll_s=0.05, stop_grace_s=grace)
except StudyInterrupted as err:
    print(err, file=sys.stderr)
    sys.exit(err.exit_status)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _interrupt_parent(tmp_path: Path, mode: str, grace: float, signals: list[int]) -> tuple[int, str, list[int], float]:
    """Start the parent with two run processes at once (of three runs), send ``signals`` (the
    second one second later), return its exit status, stderr, every run process's pids and the
    seconds from the first signal to its exit."""
    import os
    import subprocess
    import time

    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc")
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), mode, str(grace), CHILD],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    files = [tmp_path / "a.pids", tmp_path / "b.pids"]
    while not all(f.exists() and f.read_text() for f in files):
        assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read()
        time.sleep(0.05)
    pids = [int(p) for f in files for p in f.read_text().split()]
    start = time.monotonic()
    for i, signum in enumerate(signals):
        if i:
            time.sleep(1.0)
        parent.send_signal(signum)
    _, err = parent.communicate(timeout=120)
    return parent.returncode, err, pids, time.monotonic() - start


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_parent_stops_and_reaps_every_run_process(tmp_path: Path, signum: str) -> None:
    import signal

    number = getattr(signal, signum)
    code, err, pids, _ = _interrupt_parent(tmp_path, "graceful", 60.0, [number])
    assert code == 128 + number, err
    assert f"study interrupted by {signum}" in err and "stopped 2 run(s)" in err and ": a, b" in err
    assert "1 run(s) not started: c" in err and "run the same command again to resume" in err
    assert not any(running(pid) for pid in pids)
    assert not (tmp_path / "c.pids").exists()  # the pending run never started


def test_a_run_process_that_ignores_sigterm_is_killed_with_its_children(tmp_path: Path) -> None:
    import signal

    code, err, pids, seconds = _interrupt_parent(tmp_path, "stubborn", 1.0, [signal.SIGTERM])
    assert code == 143 and "killing a (pid" in err and "killing b (pid" in err, err
    assert len(pids) == 4 and not any(running(pid) for pid in pids)  # the runs and the processes they started
    assert seconds < 30  # the 1 s grace, not the runs' 600 s


def test_a_second_signal_kills_at_once(tmp_path: Path) -> None:
    import signal

    code, err, pids, seconds = _interrupt_parent(tmp_path, "stubborn", 300.0, [signal.SIGINT, signal.SIGINT])
    assert code == 130 and "second signal: killing the run processes now" in err, err
    assert not any(running(pid) for pid in pids) and seconds < 60  # not the 300 s grace
