"""SIGTERM (what SLURM and most schedulers send before a time limit): stop resumably, exit non-zero.

Lightning's trainer catches SIGTERM and stops at the next batch boundary by raising
``SIGTERMException``, a ``SystemExit`` whose code is ``None``: left alone, the process exits
with status 0 as if training had finished. Here:

* :class:`SigtermNotice` (added to every trainer by
  :meth:`~lightning_spectral.module.SpectralModule.configure_callbacks`) names the checkpoint
  to resume from: the last end-of-epoch ``last.ckpt``. A mid-epoch checkpoint would not resume
  exactly (the training loader cannot restart in the middle of an epoch; Lightning warns so), so
  none is written: rerunning with ``--ckpt_path`` repeats at most the interrupted epoch and ends
  with the uninterrupted run's weights.
* :func:`exit_code` maps the exception to ``128 + SIGTERM`` (143), the status a shell reports for
  a process ended by SIGTERM, so that schedulers and scripts see an interrupted run.

(Requeueing is Lightning's own: ``SLURMEnvironment(auto_requeue=True)`` saves and requeues on
the signal SLURM sends with ``--signal=USR1@90``.)
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

SIGTERM_EXIT_CODE = 128 + int(signal.SIGTERM)


def exit_code(exception: BaseException) -> Optional[int]:
    """The process exit status for ``exception``: 143 for Lightning's SIGTERM stop, else ``None``."""
    return SIGTERM_EXIT_CODE if isinstance(exception, SIGTERMException) else None


class SigtermNotice(Callback):
    """On SIGTERM, say where the run stopped and which checkpoint resumes it (``resume_from``)."""

    def __init__(self) -> None:
        self.resume_from: Optional[str] = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
        self.resume_from = last if last and Path(last).exists() else None
        where = f"SIGTERM: training stopped at step {trainer.global_step} (epoch {trainer.current_epoch})"
        if self.resume_from is None:
            rank_zero_warn(f"{where}; no checkpoint was written yet: rerun the same command to start afresh.")
        else:
            rank_zero_warn(f"{where}; resume from {self.resume_from} (written at the end of the last finished epoch): "
                           f"rerun the same command with --ckpt_path {self.resume_from}")
