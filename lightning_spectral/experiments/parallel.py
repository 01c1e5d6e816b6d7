"""``study --jobs N``: N runs of a study at once, each in its own process.

Each run is the ordinary single-run command (``python -m lightning_spectral study <args> --run ID
--no_collect``) with ``--threads`` set to ``max(1, cores // N)`` (and ``OMP_NUM_THREADS`` /
``MKL_NUM_THREADS`` to match), and, where CUDA devices exist, one device of its own
(``CUDA_VISIBLE_DEVICES``, round robin over the visible devices by slot). Its stdout and stderr go
to ``runs/<id>/log.txt`` (``tail -f`` it for the run's progress). The run lock
(:func:`~lightning_spectral.checkpoint.run_lock`) keeps two processes off one run, also across
two studies started at once. A progress line on stderr counts runs done, running, failed and
pending, with the elapsed time and an ETA from the mean time of the finished runs.

SIGTERM or SIGINT to the parent (Ctrl-C) sends SIGTERM to every run process, which stops at its
next batch keeping its end-of-epoch checkpoint; a process still alive after ``stop_grace_s``,
or at a second signal, is killed with its process group (each run is a session of its own, so
its data-loader workers go with it). Every process is reaped (its run lock released with it)
before :class:`~lightning_spectral.experiments.interrupt.StudyInterrupted` names the runs to resume.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Sequence

from lightning_spectral.experiments import interrupt


@dataclass
class _Job:
    run_id: str
    slot: int
    process: subprocess.Popen
    log: Path
    start: float


def default_threads(jobs: int) -> int:
    """The threads each of ``jobs`` processes gets: the usable cores split evenly, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // jobs)


def visible_devices() -> list[str]:
    """The CUDA devices to hand out (those of ``CUDA_VISIBLE_DEVICES`` when it is set), or none."""
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return []
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:count] if listed else [str(i) for i in range(count)]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def stop_jobs(jobs: Sequence[_Job], grace_s: float, say: Callable[[str], None], poll_s: float = 0.1) -> None:
    """SIGTERM to each job's process; SIGKILL to the process group of those alive after
    ``grace_s`` seconds or at another SIGTERM/SIGINT; every process waited for (reaped)."""
    for job in jobs:
        if job.process.poll() is None:
            job.process.terminate()
    deadline = time.monotonic() + grace_s
    try:
        with interrupt.stop_on_signals():
            while any(job.process.poll() is None for job in jobs) and time.monotonic() < deadline:
                time.sleep(poll_s)
    except interrupt.StudyInterrupted:
        say("second signal: killing the run processes now")
    with interrupt.ignoring_signals():
        for job in jobs:
            if job.process.poll() is None:  # not reaped, so its pid (and group id) is still its own
                say(f"killing {job.run_id} (pid {job.process.pid}) and the processes it started")
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(job.process.pid, signal.SIGKILL)  # a session of its own: the group is the run's
            job.process.wait()


def run_parallel(name: str, run_ids: Sequence[str], run_dirs: dict[str, Path], command: Sequence[str], jobs: int,
                 threads: int | None = None, stream: IO[str] | None = None,
                 poll_s: float = 0.5, stop_grace_s: float = 60.0) -> dict[str, list[str]]:
    """Run ``command + ["--run", id]`` for every id, ``jobs`` at a time; returns ``{"ran", "failed"}``.

    ``run_dirs[id]`` is where the run's ``log.txt`` goes. A run fails when its process exits
    non-zero; its log's last lines are shown. SIGTERM or SIGINT stops and reaps every run process
    (:func:`stop_jobs`) and raises :class:`~lightning_spectral.experiments.interrupt.StudyInterrupted`.
    """
    if jobs < 1:
        raise SystemExit(f"error: --jobs must be at least 1, got {jobs}")
    stream = stream or sys.stderr
    threads = threads or default_threads(jobs)
    devices = visible_devices()
    pending, running = list(run_ids), []  # type: list[str], list[_Job]
    done: dict[str, list[str]] = {"ran": [], "failed": []}
    durations: list[float] = []
    start = time.perf_counter()
    live = stream.isatty()
    last_line = ""

    def progress(final: bool = False) -> None:
        nonlocal last_line
        elapsed = time.perf_counter() - start
        left = len(pending) + len(running)
        eta = (f", ETA {_duration(sum(durations) / len(durations) * left / min(jobs, max(left, 1)))}"
               if durations and left else "")
        line = (f"[{name}] {len(done['ran'])} done, {len(running)} running, {len(done['failed'])} failed, "
                f"{len(pending)} pending | {_duration(elapsed)} elapsed{eta}")
        if live:
            stream.write("\r\033[K" + line + ("\n" if final else ""))
            stream.flush()
        elif final or line.split(" | ")[0] != last_line.split(" | ")[0]:  # a new line when the counts change
            stream.write(line + "\n")
            stream.flush()
        last_line = line

    def say(text: str) -> None:
        stream.write(("\r\033[K" if live else "") + text + "\n")
        stream.flush()

    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    say(f"[{name}] {len(pending)} run(s), {jobs} at a time, {threads} thread(s) each"
        + (f", devices {','.join(devices)}" if devices else "") + "; each run's output: runs/<id>/log.txt")
    try:
        with interrupt.stop_on_signals():
            while pending or running:
                free = sorted(set(range(jobs)) - {j.slot for j in running})
                while pending and free:
                    run_id, slot = pending.pop(0), free.pop(0)
                    log = run_dirs[run_id] / "log.txt"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    child_env = dict(env)
                    if devices:
                        child_env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
                    argv = [*command, "--threads", str(threads), "--run", run_id]
                    with interrupt.deferred(), open(log, "a") as f:  # a started process is always in `running`
                        f.write(f"$ {' '.join(argv)}\n")
                        f.flush()
                        process = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=child_env,
                                                   start_new_session=True)
                        running.append(_Job(run_id, slot, process, log, time.perf_counter()))
                for job in list(running):
                    code = job.process.poll()
                    if code is None:
                        continue
                    running.remove(job)
                    if code == 0:
                        done["ran"].append(job.run_id)
                        durations.append(time.perf_counter() - job.start)
                    else:
                        done["failed"].append(job.run_id)
                        say(f"FAILED {job.run_id} (exit {code}); last lines of {job.log}:\n{_tail(job.log)}")
                progress()
                if running:
                    time.sleep(poll_s)
    except (interrupt.StudyInterrupted, KeyboardInterrupt) as err:
        signum = err.signum if isinstance(err, interrupt.StudyInterrupted) else signal.SIGINT
        say(f"[{name}] {signal.Signals(signum).name}: stopping {len(running)} running run(s) (each keeps its last "
            f"end-of-epoch checkpoint; a second Ctrl-C kills them now)")
        stop_jobs(running, stop_grace_s, say)
        raise interrupt.StudyInterrupted(signum, [j.run_id for j in running], pending) from None
    if live:
        progress(final=True)
    return done
