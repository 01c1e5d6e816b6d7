"""Checkpoint files that survive crashes and refuse code: atomic writes, safe loads, checks before resuming.

* :class:`AtomicCheckpointIO` writes a checkpoint to a temporary file in the destination
  directory, flushes and fsyncs it, then renames it over the old one (``os.replace``): a
  ``kill -9`` at any moment leaves either the old or the new file, never a truncated one,
  wherever ``TMPDIR`` is; the file's mode follows the umask, as every file Lightning writes.
  It loads through :func:`load_checkpoint_safely`, the package's one loader (also that of
  ``SpectralModule.load_from_checkpoint``): ``torch.load(weights_only=True)`` only, of local
  paths, ``file://`` and ``http(s)://`` URLs alike, so a crafted checkpoint cannot run code; the
  CRC-32 of every record is checked first, so a truncated or bit-flipped file is named as such
  (torch's legacy format, which has no checksums, is accepted when whole).
  :class:`~lightning_spectral.module.SpectralModule` installs it on its trainer
  (:func:`use_atomic_checkpoint_io`) unless a custom ``CheckpointIO`` is configured; whichever
  ``CheckpointIO`` reads or writes, the module refuses to resume from or to write a checkpoint
  holding NaN or Inf (its ``on_load_checkpoint`` and ``on_save_checkpoint`` hooks).
* :func:`validate_checkpoint` says why a file cannot be resumed from (``None`` if it can);
  :func:`resume_checkpoint` picks the checkpoint a study run resumes from: ``last.ckpt`` if it
  is valid and was written for the same config, else the newest valid one, else none (restart),
  moving unusable files aside with a message instead of failing forever.
* :func:`run_lock` takes an exclusive lock on a run directory, so that two processes never
  train the same run into the same checkpoints.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import pickletools
import secrets
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Optional
from urllib.parse import urlsplit
from urllib.request import url2pathname

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_spectral.optim.base import first_nonfinite

CONFIG_MARKER = "config_hash"  # beside the checkpoints: the config they were written for


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file is empty, truncated or damaged."""


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects other than tensors and plain values (refused by ``weights_only=True``)."""


class NonFiniteCheckpointError(ValueError):
    """A checkpoint's weights or optimizer state hold NaN or Inf (refused unless ``allow_nonfinite``)."""


class RunLockedError(RuntimeError):
    """Another process holds the lock of a run directory."""


def _fsync_directory(directory: str) -> None:
    """Make a rename inside ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate the process there: assume it lives
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete ``.<name>.<pid>.*.tmp`` files left beside ``path`` by writers that died (``kill -9``)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if parts and parts[0].isdigit() and int(parts[0]) != os.getpid() and not _pid_alive(int(parts[0])):
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _create_temporary(path: Path) -> tuple[int, str]:
    """A new file ``.<name>.<pid>.<random>.tmp`` beside ``path``, opened for writing. Created with
    mode 0o666 less the umask, as ``open(path, "wb")`` would (``tempfile.mkstemp`` makes 0o600,
    which nobody else on a shared project directory could read)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue


def atomic_write(path: _PATH, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a binary file that becomes ``path`` whole or not at all: temporary file in
    the same directory (the same filesystem, so the rename is atomic; its mode follows the umask),
    flush, fsync, ``os.replace``, fsync of the directory. The temporary file is removed if the
    write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    fd, tmp = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(str(path.parent))


def local_path(path: _PATH) -> Optional[Path]:
    """The file a local path or a ``file://`` URL names; ``None`` for another URL (``https://``, ``s3://``)."""
    text = str(path)
    if text.startswith("file://"):
        return Path(url2pathname(urlsplit(text).path))
    return None if "://" in text else Path(path)


def _legacy_problem(f: BinaryIO) -> Optional[str]:
    """Why ``f`` (at its start) is not a whole checkpoint of torch's legacy format
    (``torch.save(..., _use_new_zipfile_serialization=False)``), or ``None``. That format has no
    checksums: five pickles (the magic number, the protocol version, the system info, the object,
    the storage keys; read as opcodes, none executed) must end before the file does, then the
    tensor data follows, whose truncation ``torch.load`` reports itself."""
    try:
        magic = [arg for op, arg, _ in pickletools.genops(f) if op.name.startswith(("LONG", "INT"))]
    except ValueError:
        magic = None
    if magic != [torch.serialization.MAGIC_NUMBER]:
        return "another format"
    try:
        for _ in range(4):
            for _ in pickletools.genops(f):
                pass
    except ValueError as err:
        return f"truncated legacy-format checkpoint ({err})"
    return None


def archive_problem(source: _PATH | BinaryIO) -> Optional[str]:
    """Why ``source`` (a local path or a binary file) is not an intact PyTorch checkpoint, or
    ``None``: a zip archive (``torch.save``'s format) with every record's CRC-32 checked, so that
    truncation and flipped bits show; or a whole file of torch's legacy format
    (:func:`_legacy_problem`; it has no checksums)."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            return "no such file"
        with open(path, "rb") as f:
            return archive_problem(f)
    f = source
    size = f.seek(0, os.SEEK_END)
    try:
        if size == 0:
            return "empty file (0 bytes)"
        if zipfile.is_zipfile(f):
            try:
                with zipfile.ZipFile(f) as archive:
                    bad = archive.testzip()
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
                return f"damaged archive: {err}"
            return f"damaged record {bad!r} (CRC-32 mismatch)" if bad is not None else None
        f.seek(0)
        legacy = _legacy_problem(f)
        if legacy == "another format":
            return f"not a PyTorch checkpoint archive ({size} bytes; truncated or another format)"
        return legacy
    finally:
        f.seek(0)


def _checked_source(path: _PATH | BinaryIO) -> _PATH | BinaryIO:
    """What ``torch.load`` reads the checkpoint ``path`` from once its integrity is checked
    (:func:`archive_problem`): a local file's path (``file://`` URLs too), a remote file's bytes in
    memory (any URL ``fsspec`` opens; nothing is written to disk), a binary file object as given.
    Raises ``FileNotFoundError`` or :class:`CorruptCheckpointError` naming ``path``."""
    if not isinstance(path, (str, Path)):
        source: _PATH | BinaryIO = path
    elif (source := local_path(path)) is None:
        import fsspec

        try:
            with fsspec.open(str(path), "rb") as f:
                source = io.BytesIO(f.read())
        except FileNotFoundError:
            raise FileNotFoundError(f"Checkpoint file not found: {path}") from None
    problem = archive_problem(source)
    if problem == "no such file":
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    if problem is not None:
        raise CorruptCheckpointError(f"checkpoint {path} cannot be loaded: {problem}")
    return source


def load_checkpoint_safely(path: _PATH | BinaryIO, map_location: Any = None,
                           allow_nonfinite: bool = False) -> dict[str, Any]:
    """The one loader of every checkpoint the package reads: ``torch.load(weights_only=True)`` of
    a local path, a ``file://`` or remote (``http(s)://``, any ``fsspec`` URL) file or a binary
    file object, once its integrity is checked (:func:`_checked_source`); then its contents: a
    weight or an optimizer state holding NaN or Inf (:func:`nonfinite_entry`) is refused with
    :class:`NonFiniteCheckpointError` naming it and the newest finite checkpoint beside it, unless
    ``allow_nonfinite`` (to inspect a poisoned checkpoint). Raises ``FileNotFoundError``,
    :class:`CorruptCheckpointError` or :class:`UnsafeCheckpointError` naming ``path``."""
    checkpoint = _deserialize(_checked_source(path), path, map_location)
    if not allow_nonfinite:
        refuse_nonfinite(checkpoint, path)
    return checkpoint


def refuse_nonfinite(checkpoint: Any, path: Any) -> None:
    """Raise :class:`NonFiniteCheckpointError` if the checkpoint ``checkpoint`` read from ``path``
    holds NaN or Inf (:func:`nonfinite_entry`), naming the entry and the newest finite checkpoint
    beside ``path`` (a local file)."""
    entry = nonfinite_entry(checkpoint)
    if entry is None:
        return
    local = local_path(path) if isinstance(path, (str, Path)) else None
    siblings = sorted((p for p in local.parent.glob("*.ckpt") if p.name != local.name), key=_mtime,
                      reverse=True) if local else []
    earlier = last_good_checkpoint(siblings)
    raise NonFiniteCheckpointError(
        f"checkpoint {path} holds NaN or Inf in the {entry}: it was written after a non-finite step, and "
        "training from it would make the weights NaN. "
        + (f"The newest finite checkpoint beside it is {earlier}: resume from that one. " if earlier else "")
        + "To load it anyway for inspection, pass allow_nonfinite=True (load_checkpoint_safely, "
        "SpectralModule.load_from_checkpoint, or the trainer plugin "
        "lightning_spectral.checkpoint.AtomicCheckpointIO(allow_nonfinite=True); a CheckpointIO of your own: "
        "set its attribute allow_nonfinite = True)."
    )


def io_allows_nonfinite(checkpoint_io: Any) -> bool:
    """Whether a checkpoint ``checkpoint_io`` loaded needs no check for NaN/Inf here: an
    :class:`AtomicCheckpointIO` checked it itself (or was asked not to); any other ``CheckpointIO``
    (the user's own) did not, unless its ``allow_nonfinite`` attribute is true."""
    return isinstance(checkpoint_io, AtomicCheckpointIO) or bool(getattr(checkpoint_io, "allow_nonfinite", False))


def nonfinite_entry(checkpoint: Any) -> Optional[str]:
    """The first entry of a Lightning checkpoint that holds NaN or Inf, named, or ``None``:
    the floating tensors of ``state_dict`` (``weight 'net.fc1.weight'``), and the tensors and
    floats of each optimizer's state (``optimizer state 'momentum_buffer' of parameter
    'net.fc1.weight'``, the parameter named by its group's ``param_names``, else its index).
    One fused reduction per device while all is finite (:func:`~lightning_spectral.optim.base.first_nonfinite`)."""
    if not isinstance(checkpoint, dict):
        return None
    weights = checkpoint.get("state_dict")
    named = [(f"weight {key!r}", value) for key, value in (weights.items() if isinstance(weights, dict) else ())
             if torch.is_tensor(value)]
    for i, optimizer in enumerate(checkpoint.get("optimizer_states") or []):
        if not isinstance(optimizer, dict):
            continue
        names = {index: name for group in optimizer.get("param_groups") or []
                 for index, name in zip(group.get("params") or [], group.get("param_names") or [])}
        for index, state in (optimizer.get("state") or {}).items():
            param = repr(names[index]) if index in names else f"#{index}"
            for key, value in state.items() if isinstance(state, dict) else ():
                name = f"optimizer state {key!r} of parameter {param}" + (f" (optimizer {i})" if i else "")
                if isinstance(value, float) and not math.isfinite(value):
                    return name
                if torch.is_tensor(value):
                    named.append((name, value))
    return first_nonfinite(named)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def last_good_checkpoint(candidates: Any) -> Optional[Path]:
    """The first of the local checkpoint files ``candidates`` that :func:`validate_checkpoint`
    accepts (intact, safe, a Lightning checkpoint, finite), or ``None``: each is loaded in turn."""
    for candidate in candidates:
        if candidate and local_path(candidate) is not None and validate_checkpoint(candidate) is None:
            return local_path(candidate)
    return None


def _deserialize(source: _PATH | BinaryIO, path: Any, map_location: Any) -> dict[str, Any]:
    """``torch.load(source, weights_only=True)``, its errors naming ``path``."""
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain values, refused (it is loaded with "
            f"torch.load(weights_only=True) so that it cannot run code). If you trust it, load it yourself with "
            f"weights_only=False and save its state dicts again.\n{err}"
        ) from None
    except (EOFError, RuntimeError) as err:
        raise CorruptCheckpointError(f"checkpoint {path} cannot be loaded: {type(err).__name__}: {err}") from err


def checkpoint_bytes(path: _PATH | BinaryIO, allow_nonfinite: bool = False) -> io.BytesIO:
    """The bytes of the checkpoint ``path`` once :func:`load_checkpoint_safely` has accepted them,
    for a loader that reads a file object itself (Lightning's ``load_from_checkpoint``, with
    ``weights_only=True``): both read these same bytes."""
    source = _checked_source(path)
    data = source.read_bytes() if isinstance(source, Path) else source.read()
    checkpoint = _deserialize(io.BytesIO(data), path, "cpu")
    if not allow_nonfinite and nonfinite_entry(checkpoint) is not None:
        load_checkpoint_safely(path, "cpu")  # raises, naming the entry and an earlier finite checkpoint
    return io.BytesIO(data)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` with atomic local writes and
    ``weights_only=True`` loads (see the module docstring). Remote writes go through Lightning's
    own ``fsspec`` path.

    Args:
        allow_nonfinite: load (and resume from) a checkpoint whose weights or optimizer state hold
            NaN or Inf, for forensics; refused by default (:func:`load_checkpoint_safely`). Give it
            as a trainer plugin: ``--trainer.plugins+='{"class_path":
            "lightning_spectral.checkpoint.AtomicCheckpointIO", "init_args": {"allow_nonfinite": true}}'``.
    """

    def __init__(self, allow_nonfinite: bool = False) -> None:
        super().__init__()
        self.allow_nonfinite = allow_nonfinite

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        local = local_path(path)
        if storage_options is not None or local is None:
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, local)

    def load_checkpoint(
        self, path: _PATH, map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Always ``weights_only=True``, whatever ``weights_only`` asks."""
        return load_checkpoint_safely(path, map_location, self.allow_nonfinite)


def use_atomic_checkpoint_io(trainer: Any) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO`, unless it was configured with a
    ``CheckpointIO`` other than Lightning's default ``TorchCheckpointIO``."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


def validate_checkpoint(path: _PATH) -> Optional[str]:
    """Why ``path`` cannot be resumed from (empty, truncated, damaged, unsafe, not a Lightning
    checkpoint, NaN or Inf in a weight or an optimizer state), or ``None`` if it loads."""
    try:
        checkpoint = load_checkpoint_safely(path, map_location="cpu", allow_nonfinite=True)
    except (CorruptCheckpointError, UnsafeCheckpointError, FileNotFoundError) as err:
        return str(err)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        return f"checkpoint {path} is not a Lightning checkpoint (no 'state_dict')"
    entry = nonfinite_entry(checkpoint)
    return f"checkpoint {path} holds NaN or Inf in the {entry}" if entry is not None else None


def _aside_name(path: Path, tag: str) -> Path:
    """``<path>.<tag>-<UTC time>``, with a counter if that exists already."""
    stem = f"{path.name}.{tag}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    target, n = path.with_name(stem), 1
    while target.exists():
        target, n = path.with_name(f"{stem}-{n}"), n + 1
    return target


def set_aside(path: _PATH, reason: str, log: Callable[[str], None] = print) -> Path:
    """Rename ``path`` to ``<path>.corrupt-<UTC time>`` (kept for inspection) and say why."""
    path = Path(path)
    target = _aside_name(path, "corrupt")
    os.replace(path, target)
    log(f"  {reason}: moved aside to {target}")
    return target


def write_config_marker(checkpoint_dir: _PATH, digest: str) -> None:
    """Record, beside the checkpoints, the hash of the config they are written for."""
    directory = Path(checkpoint_dir)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_MARKER).write_text(digest + "\n")


def resume_checkpoint(checkpoint_dir: _PATH, digest: str, log: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint a study run resumes from, or ``None`` to start afresh.

    Checkpoints written for another config (their :data:`CONFIG_MARKER` differs from ``digest``,
    or is missing) are moved aside whole: a changed run is rerun, never continued. Among the
    rest, ``last.ckpt`` if it loads, else the newest other ``*.ckpt`` that loads; each file
    that does not load is moved aside (:func:`set_aside`) with the reason.
    """
    directory = Path(checkpoint_dir)
    checkpoints = sorted(directory.glob("*.ckpt")) if directory.is_dir() else []
    if not checkpoints:
        return None
    marker = directory / CONFIG_MARKER
    written_for = marker.read_text().strip() if marker.is_file() else None
    if written_for != digest:
        stale = _aside_name(directory, "stale")
        os.replace(directory, stale)
        log(f"  the checkpoints in {directory} were written for "
            f"{'another config' if written_for else 'an unknown config'}; the run restarts (old ones in {stale})")
        return None
    last = directory / "last.ckpt"
    ordered = ([last] if last in checkpoints else []) + sorted(
        (p for p in checkpoints if p != last), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in ordered:
        problem = validate_checkpoint(path)
        if problem is None:
            return path
        set_aside(path, problem, log)
    return None


@contextlib.contextmanager
def run_lock(directory: _PATH) -> Iterator[Path]:
    """Hold an exclusive, non-blocking lock on ``<directory>/.lock`` (``fcntl.flock``; released
    when the process exits, even by ``kill -9``). Raises :class:`RunLockedError` naming the
    process that holds it. Where ``fcntl`` is missing (Windows) no lock is taken."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield path
        return
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunLockedError(f"{directory} is in use by {holder}: two processes must not train the same run; "
                                 "wait for it to finish, or give this one another --out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield path
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
