"""A study stopped by SIGTERM or SIGINT: every run it started stopped, a non-zero exit naming what to resume.

:func:`stop_on_signals` turns both signals into :class:`StudyInterrupted` in the process that
entered it. While a Lightning fit runs in that process, Lightning's own SIGTERM handler is in
place (it calls the one it replaced, which then only records the signal) and stops the fit at
the next batch with ``SIGTERMException``, keeping the resumable end-of-epoch checkpoint; SIGINT
raises at once (the fit tears down; its last checkpoint stays). :func:`deferred` holds either
signal back over a few lines that must run together (a finished run's result and the removal
of its checkpoints) and raises after them; :func:`check` raises for a signal that came too late
for Lightning to stop the fit. A process forked from the one that installed the
handlers (a data-loader worker) keeps the default behaviour.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator, Sequence

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StudyInterrupted(BaseException):
    """SIGTERM or SIGINT stopped a study: which runs were stopped and which had not started.

    A ``BaseException`` (like ``KeyboardInterrupt``), so that the runner's ``except Exception``,
    which records one failed run and goes on with the grid, never takes it for a run's failure."""

    def __init__(self, signum: int, stopped: Sequence[str] = (), not_started: Sequence[str] = ()) -> None:
        self.signum = signal.Signals(signum)
        self.stopped, self.not_started = list(stopped), list(not_started)
        super().__init__(self.message())

    @property
    def exit_status(self) -> int:
        """``128 + signal``, what a shell reports for a process ended by the signal: 143, 130."""
        return 128 + int(self.signum)

    def message(self) -> str:
        parts = [f"study interrupted by {self.signum.name}"]
        if self.stopped:
            parts.append(f"stopped {len(self.stopped)} run(s), each resumes from its last end-of-epoch checkpoint: "
                         + ", ".join(self.stopped))
        if self.not_started:
            parts.append(f"{len(self.not_started)} run(s) not started: " + ", ".join(self.not_started))
        return "; ".join(parts) + "; run the same command again to resume"


class _Stop:
    def __init__(self) -> None:
        self.pid, self.received, self.deferring = os.getpid(), None, 0

    def handler(self, signum: int, frame) -> None:
        if os.getpid() != self.pid:  # a forked worker: what the signal does by default
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        if self.deferring:
            return
        if signum == signal.SIGTERM and signal.getsignal(signal.SIGTERM) != self.handler:
            return  # a Lightning fit is running: its handler (which called this one) stops it at the next batch
        raise StudyInterrupted(signum)


_active: list[_Stop] = []


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT raise :class:`StudyInterrupted` (see the module docstring); the
    previous handlers come back after. Outside the main thread (where Python cannot set
    handlers) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stop = _Stop()
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, stop.handler)
    _active.append(stop)
    try:
        yield
    finally:
        _active.remove(stop)
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back until the block is done, then :func:`check`."""
    stop = _active[-1] if _active else None
    if stop is None:
        yield
        return
    stop.deferring += 1
    try:
        yield
    finally:
        stop.deferring -= 1
    check()


def check() -> None:
    """Raise :class:`StudyInterrupted` if SIGTERM or SIGINT came since :func:`stop_on_signals`
    began (e.g. at the very end of a fit, too late for Lightning to stop it): a study told to
    stop starts no further run."""
    stop = _active[-1] if _active else None
    if stop is not None and stop.received is not None and not stop.deferring:
        raise StudyInterrupted(stop.received)


@contextlib.contextmanager
def ignoring_signals() -> Iterator[None]:
    """SIGTERM and SIGINT ignored within (the last lines of a shutdown, which must not be cut short)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
