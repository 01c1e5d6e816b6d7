"""Starting a multi-process run with Lightning's subprocess launcher (``strategy: ddp`` and the
other script-launched strategies, ``devices > 1``): fail at once, and take the launched ranks along.

The launcher starts ranks 1.. as copies of the command, then rank 0 opens the rendezvous (torch's
``TCPStore``) on ``MASTER_ADDR:MASTER_PORT``. When rank 0 fails there (a busy port) or anywhere
later, Lightning re-raises in rank 0 and leaves the other ranks running: they wait for a rendezvous
that never comes until torch's 30-minute timeout, orphaned. So:

* :func:`check_main_port` refuses, before any rank is launched, a ``MASTER_PORT`` that another
  process holds (:class:`MainPortInUseError`, naming the port and the fix);
* :class:`ReapLaunchedRanks`, when rank 0's fit, validate, test or predict raises, reaps the ranks
  it launched: those that do not end within a few seconds are killed (SIGKILL, as Lightning's own
  child-process observer does: a rank waiting in a rendezvous or collective ignores SIGTERM).

The CLI does both for every run (:meth:`~lightning_spectral.spectral_cli.SpectralCLI.before_fit`).
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import time
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_warn


class MainPortInUseError(RuntimeError):
    """``MASTER_PORT`` is held by another process, so rank 0 cannot open the rendezvous there."""


def _launcher(trainer: Any) -> _SubprocessScriptLauncher | None:
    launcher = getattr(trainer.strategy, "launcher", None)
    return launcher if isinstance(launcher, _SubprocessScriptLauncher) else None


def check_main_port(trainer: Any) -> None:
    """On the process that will launch the other ranks, with ``MASTER_PORT`` set: bind it as the
    rendezvous will (all interfaces, ``SO_REUSEADDR``, so a port in TIME_WAIT passes) and release it.
    Without ``MASTER_PORT`` Lightning picks a free port itself; nothing to check.

    Raises:
        MainPortInUseError: the port is in use, before any rank was launched.
    """
    launcher = _launcher(trainer)
    env = launcher.cluster_environment if launcher else None
    if env is None or env.creates_processes_externally or launcher.num_processes < 2 or env.node_rank() != 0 \
            or "MASTER_PORT" not in os.environ:
        return
    port = int(os.environ["MASTER_PORT"])
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise MainPortInUseError(
                f"MASTER_PORT={port} is in use by another process (an earlier run still alive, or another job), so "
                f"rank 0 cannot open the rendezvous of this {launcher.num_processes}-process run there; no rank was "
                f"started. Fix: unset MASTER_PORT (Lightning then picks a free port), set a free one, or stop the "
                f"process that holds it (`ss -ltnp 'sport = :{port}'` names it).") from None


class ReapLaunchedRanks(Callback):
    """When the run raises on the rank that launched the others, give those ranks ``grace_s``
    seconds to end on their own (after a SIGTERM, which Lightning forwards to them, each stops at
    its next batch), then SIGKILL and reap the rest."""

    def __init__(self, grace_s: float = 5.0) -> None:
        self.grace_s = grace_s

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        launcher = _launcher(trainer)
        running = [p for p in (launcher.procs if launcher else []) if p.poll() is None]
        deadline = time.monotonic() + self.grace_s
        while running and time.monotonic() < deadline:
            time.sleep(0.1)
            running = [p for p in running if p.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGKILL)
        for proc in launcher.procs if launcher else []:
            proc.wait()
        if running:
            rank_zero_warn(f"{type(exception).__name__} on rank 0: stopped the {len(running)} rank(s) it launched "
                           f"(pid {', '.join(str(p.pid) for p in running)}), which would wait for the rendezvous "
                           "until torch's timeout.")
