"""lightning_spectral.launch: a busy MASTER_PORT fails before any rank starts; a failing rank 0
takes the ranks it launched along (2 CPU gloo processes; the refusal itself is a row of
tests/test_failures.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from lightning_spectral.launch import MainPortInUseError, check_main_port

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _listening() -> socket.socket:
    """A socket listening on a free port of all interfaces (what a live earlier run's rendezvous holds)."""
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    held.bind(("", 0))
    held.listen(8)
    return held


def _ddp_trainer() -> Trainer:
    return Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False, enable_progress_bar=False)


def test_a_free_or_unset_port_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MASTER_PORT", raising=False)
    check_main_port(_ddp_trainer())
    held = _listening()
    port = held.getsockname()[1]
    held.close()
    monkeypatch.setenv("MASTER_PORT", str(port))
    check_main_port(_ddp_trainer())
    with _listening() as busy:  # one process only: nothing is launched, nothing to check
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        check_main_port(Trainer(accelerator="cpu", devices=1, logger=False))
        with pytest.raises(MainPortInUseError):
            check_main_port(_ddp_trainer())


def _session_processes(sid: int) -> list[int]:
    """Live processes of session ``sid`` (zombies excluded), from /proc."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            alive.append(int(entry.name))
    return alive


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[str, int, float, list[int]]:
    """``command`` in its own session: its output, exit status, wall time, and the session's processes
    still alive a second after it exited (the ranks it launched share its session)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        seconds = time.perf_counter() - start
        time.sleep(1)
        return out, proc.returncode, seconds, _session_processes(proc.pid)
    finally:
        for pid in _session_processes(proc.pid):  # whatever is left, so that a failing test leaves nothing
            os.kill(pid, signal.SIGKILL)


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", **extra}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_the_cli_on_a_busy_master_port_fails_at_once_and_leaves_no_process(tmp_path: Path) -> None:
    with _listening() as busy:
        port = busy.getsockname()[1]
        out, code, seconds, left = _run([sys.executable, "-m", "lightning_spectral", "fit", "--config",
                                         str(QUICKSTART), "--trainer.strategy=ddp", "--trainer.devices=2",
                                         "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.callbacks=[]"],
                                        tmp_path, _env(MASTER_PORT=str(port)), timeout=600)
    assert code == 1, out[-3000:]
    assert f"error: MASTER_PORT={port} is in use by another process" in out
    assert "unset MASTER_PORT" in out and "no rank was started" in out
    assert not left and seconds < 600  # seconds of imports (minutes on a loaded machine); the hang was 30 minutes


UNCHECKED_PORT = textwrap.dedent(
    '''
    """Written by tests/test_launch.py: a plain Trainer (no port check) whose rank 0 cannot open the rendezvous."""
    import torch
    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_spectral.launch import ReapLaunchedRanks


    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)


    if __name__ == "__main__":
        Trainer(accelerator="cpu", strategy="ddp", devices=2, max_steps=1, logger=False, enable_progress_bar=False,
                enable_checkpointing=False, callbacks=[ReapLaunchedRanks()]).fit(Tiny())
    '''
)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_failing_rank_zero_kills_and_reaps_the_rank_it_launched(tmp_path: Path) -> None:
    """Rank 0 fails on the busy port (torch retries the bind for about 30 s); rank 1, connected to the
    port's holder, would wait for torch's 30-minute rendezvous timeout: it is killed and reaped."""
    (tmp_path / "unchecked_port.py").write_text(UNCHECKED_PORT)
    with _listening() as busy:
        out, code, seconds, left = _run([sys.executable, "unchecked_port.py"], tmp_path,
                                        _env(MASTER_PORT=str(busy.getsockname()[1])), timeout=600)
    assert code != 0 and "EADDRINUSE" in out, out[-3000:]
    assert "stopped the 1 rank(s) it launched" in out
    assert not left and seconds < 600  # without the callback rank 1 is left running (checked by hand)
