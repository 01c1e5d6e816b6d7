"""Checkpoint files: atomic writes (kill -9 with TMPDIR elsewhere), weights_only loads, damaged files, locks."""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO

from lightning_spectral.checkpoint import (
    CONFIG_MARKER,
    AtomicCheckpointIO,
    CorruptCheckpointError,
    NonFiniteCheckpointError,
    RunLockedError,
    UnsafeCheckpointError,
    atomic_torch_save,
    load_checkpoint_safely,
    resume_checkpoint,
    run_lock,
    validate_checkpoint,
    write_config_marker,
)
from lightning_spectral.data import DigitsDataModule
from lightning_spectral.lm_module import LanguageModule
from lightning_spectral.models import SmallCNN
from lightning_spectral.module import NonFiniteStepError, SpectralModule

ROOT = Path(__file__).resolve().parents[1]


def _other_filesystem(tmp_path: Path) -> Path:
    """A temporary directory on another filesystem than ``tmp_path`` (tmpfs) when there is one."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        return Path(tempfile.mkdtemp(dir=shm))
    other = tmp_path / "other_tmp"
    other.mkdir()
    return other


def _lightning_checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((4, 4), float(step))}, "global_step": step}


def test_atomic_write_goes_beside_the_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = _other_filesystem(tmp_path)
    monkeypatch.setenv("TMPDIR", str(other))
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    path = tmp_path / "ckpt" / "last.ckpt"
    io = AtomicCheckpointIO()
    for step in (1, 2):
        io.save_checkpoint(_lightning_checkpoint(step), path)
    assert io.load_checkpoint(path)["global_step"] == 2
    assert list(path.parent.iterdir()) == [path] and not list(other.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """A checkpoint gets the mode of every other file Lightning writes with ``open`` (hparams.yaml,
    config.yaml, event files: 0o666 less the umask, 0o644 under the usual 0o022), written new or
    over an older one (the temporary file was 0o600)."""
    previous = os.umask(umask)
    try:
        for _ in range(2):  # a new file, then a replaced one
            AtomicCheckpointIO().save_checkpoint(_lightning_checkpoint(1), tmp_path / "ckpt" / "last.ckpt")
        (tmp_path / "hparams.yaml").write_text("lr: 0.1\n")
    finally:
        os.umask(previous)
    mode = (tmp_path / "ckpt" / "last.ckpt").stat().st_mode & 0o777
    assert mode == 0o666 & ~umask == (tmp_path / "hparams.yaml").stat().st_mode & 0o777


def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save(_lightning_checkpoint(1), path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save(_lightning_checkpoint(2), path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1 and list(tmp_path.iterdir()) == [path]


KILLER = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    import torch
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from lightning_spectral.checkpoint import AtomicCheckpointIO, validate_checkpoint

    path, rounds = sys.argv[1], int(sys.argv[2])
    io = {"atomic": AtomicCheckpointIO, "lightning": TorchCheckpointIO}[sys.argv[3]]()
    rng = random.Random(0)
    for _ in range(rounds):
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the writer: rewrites an 8 MB last.ckpt until killed
            step = 0
            while True:
                step += 1
                weights = {"w": torch.full((2_000_000,), float(step))}
                io.save_checkpoint({"state_dict": weights, "global_step": step}, path)
                if step == 1:
                    os.write(ready_w, b"1")
        os.read(ready_r, 1)
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        problem = validate_checkpoint(path)
        step = None if problem else torch.load(path, weights_only=True)["global_step"]
        whole = problem is None and bool((torch.load(path, weights_only=True)["state_dict"]["w"] == step).all())
        print(json.dumps({"problem": problem, "step": step, "whole": whole, "size": os.path.getsize(path),
                          "leftovers": sorted(os.listdir(os.path.dirname(path)))}), flush=True)
    """
)


def kill_during_writes(tmp_path: Path, rounds: int, io: str = "atomic") -> list[dict]:
    """Fork a process that rewrites ``last.ckpt`` in a loop and SIGKILL it after a random delay,
    ``rounds`` times (one interpreter, so the imports are paid once), TMPDIR on another filesystem."""
    path = tmp_path / "ckpt" / "last.ckpt"
    path.parent.mkdir()
    env = {**os.environ, "TMPDIR": str(_other_filesystem(tmp_path)), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", KILLER, str(path), str(rounds), io], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the writer")
def test_kill_9_during_writes_leaves_a_loadable_last_ckpt(tmp_path: Path) -> None:
    """kill -9 at a random moment of a loop of 8 MB checkpoint writes, TMPDIR on another
    filesystem, six times: last.ckpt always loads whole; the dead writer's temporary file is
    removed by the next write. (Lightning's own TorchCheckpointIO, the same way: a 0-byte
    last.ckpt in some rounds, and its temporary file left in TMPDIR.)"""
    rounds = kill_during_writes(tmp_path, 6)
    assert len(rounds) == 6
    for r in rounds:
        assert r["problem"] is None and r["whole"] and r["step"] >= 1, r
    path = tmp_path / "ckpt" / "last.ckpt"
    atomic_torch_save(_lightning_checkpoint(0), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


class _Payload:
    """Unpickling it would create a file: the code a crafted checkpoint would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path):
    """A directory and the ``http://`` URL of a local server of it (a thread)."""
    directory = tmp_path / "serve"
    directory.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(_QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield directory, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _addresses(path: Path, url: str) -> dict[str, str | Path]:
    return {"path": path, "file-url": path.resolve().as_uri(), "http": f"{url}/{path.name}"}


LOADERS = {
    "checkpoint-io": lambda where: AtomicCheckpointIO().load_checkpoint(where, weights_only=False),  # refused anyway
    "load-checkpoint-safely": load_checkpoint_safely,
    "SpectralModule.load_from_checkpoint": lambda where: SpectralModule.load_from_checkpoint(where, net=_net()),
    "LanguageModule.load_from_checkpoint": lambda where: LanguageModule.load_from_checkpoint(where, net=_net()),
}


def _net() -> SmallCNN:
    return SmallCNN(num_classes=10, in_channels=1, image_size=8, width_mult=0.25)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_crafted_pickle_is_refused_by_every_loader_local_and_remote(tmp_path: Path, served, monkeypatch,
                                                                     legacy: bool) -> None:
    """A checkpoint whose unpickling would create a file, in torch's zip and legacy formats, read
    from a path, a ``file://`` URL and an ``http://`` URL by each loader of the package: refused,
    the payload never ran, nothing was downloaded to disk. (Lightning's load_from_checkpoint over
    http(s) defaults to ``weights_only=False``: the payload ran.)"""
    directory, url = served
    marker = tmp_path / "payload_ran"
    evil = directory / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": _Payload(marker)}}, evil,
               _use_new_zipfile_serialization=not legacy)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for where in _addresses(evil, url).values():
        for name, load in LOADERS.items():
            with pytest.raises(UnsafeCheckpointError, match="evil.ckpt holds objects other than tensors"):
                load(where)
            assert not marker.exists(), (name, where)
        assert "refused" in validate_checkpoint(where)
    assert not (tmp_path / "torch_home").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_valid_checkpoints_load_from_a_path_a_file_url_and_http(tmp_path: Path, served, legacy: bool) -> None:
    """A Lightning checkpoint in the zip or the legacy format (``_use_new_zipfile_serialization=False``)
    loads through every loader from each address, with the weights it was saved with (the legacy
    one was reported as truncated, a ``file://`` URL as missing)."""
    import lightning

    directory, url = served
    module = SpectralModule(_net(), 10)
    saved = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
             "pytorch-lightning_version": lightning.__version__}
    path = directory / "good.ckpt"
    torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
    for where in _addresses(path, url).values():
        assert validate_checkpoint(where) is None, where
        assert torch.equal(AtomicCheckpointIO().load_checkpoint(where)["state_dict"]["net.fc1.weight"],
                           module.net.fc1.weight)
        loaded = SpectralModule.load_from_checkpoint(where, net=_net())
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), module.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint_safely(f"{url}/missing.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_checkpoint_safely((directory / "missing.ckpt").resolve().as_uri())


def test_a_file_url_is_written_to_its_file(tmp_path: Path) -> None:
    AtomicCheckpointIO().save_checkpoint(_lightning_checkpoint(5), (tmp_path / "last.ckpt").as_uri())
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 5


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_truncated_legacy_checkpoints_are_named(tmp_path: Path, cut: float) -> None:
    """The legacy format has no checksums: a cut inside its pickles or inside the tensor data is
    named as damage, never taken for an unsafe file."""
    path = tmp_path / "legacy.ckpt"
    torch.save(_lightning_checkpoint(3), path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CorruptCheckpointError, match="legacy.ckpt cannot be loaded"):
        load_checkpoint_safely(path)


def _damaged(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    atomic_torch_save(_lightning_checkpoint(3) | {"optimizer_states": [{"m": torch.arange(10_000.0)}]}, path)
    data = bytearray(path.read_bytes())
    if kind == "empty":
        data = bytearray()
    elif kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "bitflip":
        data[len(data) // 2] ^= 0x04  # inside the momentum buffer's record
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(("kind", "message"), [
    ("empty", "empty file"), ("truncated", "not a PyTorch checkpoint archive"), ("bitflip", "CRC-32 mismatch")])
def test_damaged_checkpoints_are_named(tmp_path: Path, kind: str, message: str) -> None:
    path = _damaged(tmp_path, kind)
    assert message in validate_checkpoint(path)
    with pytest.raises(CorruptCheckpointError, match=message):
        AtomicCheckpointIO().load_checkpoint(path)


def test_validate_checkpoint_accepts_good_and_rejects_foreign_files(tmp_path: Path) -> None:
    good = tmp_path / "good.ckpt"
    atomic_torch_save(_lightning_checkpoint(1), good)
    assert validate_checkpoint(good) is None
    foreign = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, foreign)
    assert "not a Lightning checkpoint" in validate_checkpoint(foreign)
    assert "not found" in validate_checkpoint(tmp_path / "missing.ckpt")


def test_resume_checkpoint_sets_damaged_and_stale_files_aside(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    logs: list[str] = []
    atomic_torch_save(_lightning_checkpoint(4), directory / "epoch=0-step=4.ckpt")
    atomic_torch_save(_lightning_checkpoint(8), directory / "last.ckpt")
    write_config_marker(directory, "abc")
    assert resume_checkpoint(directory, "abc", logs.append) == directory / "last.ckpt"

    (directory / "last.ckpt").write_bytes(b"")  # the 0-byte last.ckpt of a kill during a non-atomic write
    assert resume_checkpoint(directory, "abc", logs.append) == directory / "epoch=0-step=4.ckpt"
    aside = [p.name for p in directory.iterdir() if p.name.startswith("last.ckpt.corrupt-")]
    assert len(aside) == 1 and "empty file" in logs[-1] and aside[0] in logs[-1]

    assert resume_checkpoint(directory, "changed", logs.append) is None  # the run's config changed: restart
    assert not directory.exists() and "another config" in logs[-1]
    stale = next(tmp_path.glob("checkpoints.stale-*"))
    assert (stale / "epoch=0-step=4.ckpt").exists() and (stale / CONFIG_MARKER).read_text().strip() == "abc"
    assert resume_checkpoint(directory, "changed", logs.append) is None
    atomic_torch_save(_lightning_checkpoint(4), directory / "last.ckpt")  # changed again within the second
    write_config_marker(directory, "changed")
    assert resume_checkpoint(directory, "again", logs.append) is None
    assert len(list(tmp_path.glob("checkpoints.stale-*"))) == 2  # both kept, none overwritten


def _fit_with_checkpoints(directory: Path, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)):
    """Two epochs of two SGD-with-momentum steps: epoch=0-step=2.ckpt, epoch=1-step=4.ckpt, last.ckpt."""
    module = SpectralModule(_net(), 10, optimizer=optimizer)
    checkpoint = ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=-1)
    Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=2, limit_val_batches=0, logger=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint]).fit(
        module, DigitsDataModule(batch_size=32))
    return module, Path(checkpoint.last_model_path)


def _poison(path: Path, where: str) -> None:
    """A NaN in last.ckpt's weight or momentum buffer of net.fc1.weight, saved whole (valid CRCs)."""
    state = torch.load(path, weights_only=True)
    if where == "weight":
        state["state_dict"]["net.fc1.weight"][0, 0] = float("nan")
    else:
        optimizer = state["optimizer_states"][0]
        index = next(i for g in optimizer["param_groups"] for i, n in zip(g["params"], g["param_names"])
                     if n == "fc1.weight")  # the optimizer names parameters within the net
        optimizer["state"][index]["momentum_buffer"][0, 0] = float("inf")
    atomic_torch_save(state, path)
    os.utime(path)  # the newest file


NONFINITE_ENTRIES = {"weight": "weight 'net.fc1.weight'",
                     "momentum": "optimizer state 'momentum_buffer' of parameter 'fc1.weight'"}


@pytest.mark.parametrize("where", sorted(NONFINITE_ENTRIES))
def test_a_nonfinite_checkpoint_refuses_the_resume_naming_the_tensor(tmp_path: Path, where: str) -> None:
    """A checkpoint with valid CRCs and a NaN weight or an Inf momentum buffer: resuming, loading
    and validating it are refused naming the tensor and the newest finite checkpoint beside it
    (which is finite); allow_nonfinite=True loads it (forensics). Before, it resumed without a word."""
    module, last = _fit_with_checkpoints(tmp_path / "ckpt")
    _poison(last, where)
    trainer = Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(NonFiniteCheckpointError, match=f"last.ckpt holds NaN or Inf in the {NONFINITE_ENTRIES[where]}"
                       ) as info:
        trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=last)
    named = str(info.value).split("The newest finite checkpoint beside it is ")[1].split(":")[0]
    assert Path(named) == tmp_path / "ckpt" / "epoch=1-step=4.ckpt" and validate_checkpoint(named) is None
    assert NONFINITE_ENTRIES[where] in validate_checkpoint(last)
    with pytest.raises(NonFiniteCheckpointError, match="allow_nonfinite=True"):
        SpectralModule.load_from_checkpoint(last, net=_net())
    loaded = SpectralModule.load_from_checkpoint(last, net=_net(), allow_nonfinite=True)
    assert loaded.net.fc1.weight.isnan().any() == (where == "weight")
    forensic = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                       enable_checkpointing=False, default_root_dir=tmp_path, limit_val_batches=1,
                       plugins=[AtomicCheckpointIO(allow_nonfinite=True)])
    forensic.validate(module, DigitsDataModule(batch_size=32), ckpt_path=last)


def test_the_last_good_checkpoint_named_after_a_nonfinite_step_is_finite(tmp_path: Path) -> None:
    """Resumed (allow_nonfinite, for forensics) from a last.ckpt with an Inf momentum buffer, the
    first step makes the weights non-finite, named at the next step's check (it was taken for a
    non-finite loss there, "the weights are those before it"); the error names epoch=1-step=4.ckpt,
    which is finite, as the checkpoint to resume from, never the poisoned last.ckpt (named before)."""
    module, last = _fit_with_checkpoints(tmp_path / "ckpt")
    _poison(last, "momentum")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
    trainer = Trainer(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint],
                      plugins=[AtomicCheckpointIO(allow_nonfinite=True)])
    with pytest.raises(NonFiniteStepError, match="the optimizer step at step 5 made the weight") as info:
        trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=last)
    good = tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    assert f"The last good (finite) checkpoint is {good}" in str(info.value) and validate_checkpoint(good) is None
    assert validate_checkpoint(last) is not None


def test_run_lock_is_exclusive(tmp_path: Path) -> None:
    with run_lock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=rf"run is in use by pid {os.getpid()}"):
            with run_lock(tmp_path / "run"):
                pass
    with run_lock(tmp_path / "run"):  # released
        pass


def test_module_installs_the_atomic_io_and_names_a_corrupt_ckpt_path(tmp_path: Path) -> None:
    module = SpectralModule(SmallCNN(num_classes=10, in_channels=1, image_size=8, width_mult=0.25), 10,
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=0, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint])
    trainer.fit(module, DigitsDataModule(batch_size=32))
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    last = Path(checkpoint.last_model_path)
    last.write_bytes(last.read_bytes()[:100])
    trainer = Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    with pytest.raises(CorruptCheckpointError, match=rf"checkpoint {last} cannot be loaded"):
        trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=last)


class _PlainIO(CheckpointIO):
    """A user's own CheckpointIO: plain torch.save / torch.load, no check of its own."""

    def __init__(self) -> None:
        self.saved: list[str] = []
        self.loaded: list[str] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.saved.append(str(path))
        torch.save(checkpoint, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        self.loaded.append(str(path))
        return torch.load(path, map_location=map_location, weights_only=True)

    def remove_checkpoint(self, path) -> None:
        os.remove(path)


def test_a_custom_checkpoint_io_neither_writes_nor_resumes_a_nonfinite_checkpoint(tmp_path: Path) -> None:
    """With the user's own CheckpointIO (kept: not replaced by AtomicCheckpointIO), a NaN weight is
    still refused at the write (the module's on_save_checkpoint) and a checkpoint with an Inf
    momentum buffer still refuses the resume, naming it, before any weight is loaded (before, it
    resumed through the user's IO and the first step made the weights non-finite);
    ``allow_nonfinite = True`` on the IO lets it resume (forensics)."""
    module, last = _fit_with_checkpoints(tmp_path / "ckpt")
    _poison(last, "momentum")
    io = _PlainIO()
    kwargs = dict(accelerator="cpu", max_epochs=3, limit_train_batches=2, limit_val_batches=0, logger=False,
                  enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer = Trainer(**kwargs, plugins=[io])
    before = module.net.fc1.weight.detach().clone()
    with pytest.raises(NonFiniteCheckpointError,
                       match=f"last.ckpt holds NaN or Inf in the {NONFINITE_ENTRIES['momentum']}.*allow_nonfinite"):
        trainer.fit(module, DigitsDataModule(batch_size=32), ckpt_path=last)
    assert io.loaded == [str(last)] and trainer.strategy.checkpoint_io is io  # the user's IO read it
    assert torch.equal(module.net.fc1.weight, before)  # refused before the weights were loaded
    with torch.no_grad():
        module.net.fc1.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteStepError, match="refusing to write a checkpoint.*weight 'net.fc1.weight'"):
        trainer.save_checkpoint(tmp_path / "poisoned.ckpt")
    assert io.saved == [] and not (tmp_path / "poisoned.ckpt").exists()
    io.allow_nonfinite = True
    forensic = Trainer(**{**kwargs, "max_epochs": 2}, plugins=[io])  # resumed at the end of epoch 2: no step
    forensic.fit(module, DigitsDataModule(batch_size=32), ckpt_path=last)
    assert io.loaded == [str(last)] * 2
