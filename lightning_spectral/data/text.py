"""Byte-level text for next-token prediction: the Python standard library's source (offline, on
every install) and Tiny Shakespeare (downloaded into ``data_dir``).

A batch is ``(x, y)``, two ``(batch, block_size)`` long tensors of byte values (0..255), ``y``
being ``x`` shifted one byte ahead. Training windows start at random offsets, drawn afresh each
epoch from ``(seed, epoch)`` alone (so a resumed run sees the batches of the uninterrupted run);
validation windows are fixed, non-overlapping and evenly spread over the held-out text.

What a run trained on is recorded: the files of each split and the SHA-256 of each split's text
(:attr:`ByteTextDataModule.corpus`), logged as hyperparameters and stored in checkpoints.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import os
import sysconfig
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_spectral.data.vision import DatasetUnavailableError

#: Directories of a standard library tree left out of the corpus: installed packages differ
#: between installs, and the test suites hold generated and deliberately malformed text.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
#: Files left out: the build configuration generated for each machine (compiler flags, install paths).
STDLIB_EXCLUDED_FILES = ("_sysconfigdata_*.py",)

Split = list[tuple[str, bytes]]  # (name, content) of each document, in order


def bigram_bpb(train_bytes: bytes, val_bytes: bytes) -> float:
    """Bits per byte of ``val_bytes`` under a bigram model counted on ``train_bytes`` with add-one
    (Laplace) smoothing: ``p(b | a) = (n(a, b) + 1) / (n(a) + 256)``, averaged over the
    ``len(val_bytes) − 1`` consecutive pairs of the validation text, ``−mean log₂ p``."""
    if len(train_bytes) < 2 or len(val_bytes) < 2:
        raise ValueError("bigram_bpb needs at least two bytes of training and of validation text")
    train = torch.frombuffer(bytearray(train_bytes), dtype=torch.uint8).long()
    val = torch.frombuffer(bytearray(val_bytes), dtype=torch.uint8).long()
    counts = torch.bincount(train[:-1] * 256 + train[1:], minlength=256 * 256).reshape(256, 256).double() + 1.0
    log_p = counts.log() - counts.sum(dim=1, keepdim=True).log()
    return float(-log_p[val[:-1], val[1:]].mean() / math.log(2))


class TokenWindows(Dataset):
    """``(x, y) = (data[s : s+T], data[s+1 : s+T+1])`` for window starts ``s``: item ``i`` starts
    at ``starts[i]``, or at ``i`` itself (every possible start) when ``starts`` is ``None``."""

    def __init__(self, data: torch.Tensor, block_size: int, starts: torch.Tensor | None = None) -> None:
        if len(data) < block_size + 1:
            raise ValueError(f"the text ({len(data)} bytes) is shorter than block_size + 1 = {block_size + 1}")
        self.data, self.block_size, self.starts = data, block_size, starts

    def __len__(self) -> int:
        return len(self.starts) if self.starts is not None else len(self.data) - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[i]) if self.starts is not None else int(i)
        chunk = self.data[s : s + self.block_size + 1].long()
        return chunk[:-1], chunk[1:]


class EpochWindowSampler(Sampler[int]):
    """``num_windows`` window starts drawn uniformly (with replacement) from ``range(num_starts)``
    by a generator seeded with ``seed + epoch`` (every pass over the sampler in an epoch gives the
    same starts); Lightning calls :meth:`set_epoch` before every epoch. Not a ``RandomSampler``, so under DDP Lightning wraps it in its
    ``DistributedSamplerWrapper`` (which forwards ``set_epoch`` and gives each rank a share of
    the same draw) instead of replacing it with a pass over every possible start."""

    def __init__(self, num_starts: int, num_windows: int, seed: int) -> None:
        self.num_starts, self.num_windows, self.seed = num_starts, num_windows, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed((self.seed + self.epoch) % (1 << 64))  # the same draw every pass
        yield from torch.randint(self.num_starts, (self.num_windows,), generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_windows


class _Prompts(Dataset):
    def __init__(self, prompts: Sequence[str]) -> None:
        self.prompts = [encode(p) for p in prompts]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.prompts[i]


def encode(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as a 1-D long tensor of token ids."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(tokens: torch.Tensor | Sequence[int]) -> str:
    """Token ids (bytes) back to text; invalid UTF-8 (a character cut by sampling) becomes U+FFFD."""
    values = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
    return bytes(values).decode("utf-8", errors="replace")


class ByteTextDataModule(LightningDataModule, ABC):
    """Byte-level language-model data: subclasses say which documents form each split
    (:meth:`load_splits`); this class concatenates them, records them and serves windows.

    Attributes:
        vocab_size: 256 (one token per byte value); ``num_classes`` says the same.
        block_size: the argument (the network's context must be as long).
        corpus: after ``setup``, the record of the text: ``train_files``/``val_files`` (document
            names in order), ``train_sha256``/``val_sha256`` (of the concatenated bytes) and
            ``train_bytes``/``val_bytes``. Logged as ``corpus/...`` hyperparameters at ``fit``
            and kept in checkpoints (a resumed run on other text warns).

    Args:
        block_size: tokens per window (the model's context).
        batch_size: windows per batch (per device under DDP).
        windows_per_epoch: training windows per epoch; ``None``: ``train_bytes // block_size``
            (as many tokens as the training text).
        max_val_windows: cap on the validation windows (evenly spaced); ``None``: all of them.
        prompts: texts whose continuations ``predict`` samples (one batch each).
        num_workers: data-loading worker processes.
    """

    vocab_size = 256
    #: Next-byte prediction classifies over the vocabulary (read by code that sizes a network by ``num_classes``).
    num_classes = vocab_size

    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 32,
        windows_per_epoch: int | None = None,
        max_val_windows: int | None = None,
        prompts: Sequence[str] = ("\n",),
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, optional in (("block_size", block_size, False), ("batch_size", batch_size, False),
                                      ("windows_per_epoch", windows_per_epoch, True),
                                      ("max_val_windows", max_val_windows, True)):
            if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int)
                                                        or value < 1):
                raise ValueError(f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")
        if windows_per_epoch is not None and windows_per_epoch < batch_size:
            raise ValueError(f"windows_per_epoch ({windows_per_epoch}) must be >= batch_size ({batch_size}): "
                             "the training loader drops an incomplete last batch, so no step would run")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p for p in prompts):
            raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {prompts!r}")
        self.block_size = block_size
        self.batch_size = batch_size
        self.windows_per_epoch = windows_per_epoch
        self.max_val_windows = max_val_windows
        self.prompts = list(prompts)
        self.num_workers = num_workers
        self.train_text: bytes | None = None
        self.val_text: bytes | None = None
        self.corpus: dict[str, Any] = {}

    @abstractmethod
    def load_splits(self) -> tuple[Split, Split]:
        """``(train, val)``: the ``(name, bytes)`` documents of each split, in a fixed order."""

    def setup(self, stage: str) -> None:
        if self.train_text is None:
            train, val = self.load_splits()
            for split, docs in (("training", train), ("validation", val)):
                if not docs:
                    raise ValueError(f"{type(self).__name__}: the {split} split is empty; "
                                     "give more text (max_bytes) or another val_fraction")
            self.train_text = b"".join(content for _, content in train)
            self.val_text = b"".join(content for _, content in val)
            for split, text in (("training", self.train_text), ("validation", self.val_text)):
                if len(text) < self.block_size + 1:
                    raise ValueError(f"{type(self).__name__}: the {split} text has {len(text)} bytes, fewer than "
                                     f"block_size + 1 = {self.block_size + 1}; give more text or a smaller block_size")
            self.corpus = {
                "train_files": [name for name, _ in train],
                "val_files": [name for name, _ in val],
                "train_sha256": hashlib.sha256(self.train_text).hexdigest(),
                "val_sha256": hashlib.sha256(self.val_text).hexdigest(),
                "train_bytes": len(self.train_text),
                "val_bytes": len(self.val_text),
            }
        if stage == "fit" and self.trainer is not None:
            for logger in self.trainer.loggers:
                logger.log_hyperparams({f"corpus/{key}": value for key, value in self.corpus.items()})

    def _tensor(self, text: bytes | None) -> torch.Tensor:
        if text is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        return torch.frombuffer(bytearray(text), dtype=torch.uint8)

    def train_dataloader(self) -> DataLoader:
        dataset = TokenWindows(self._tensor(self.train_text), self.block_size)
        windows = self.windows_per_epoch or max(1, len(self.train_text) // self.block_size)
        # seed: torch's initial seed, which ``seed_everything`` sets (as the image data modules)
        sampler = EpochWindowSampler(len(dataset), windows, torch.initial_seed())
        return self._loader(dataset, sampler=sampler, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        data = self._tensor(self.val_text)
        starts = torch.arange(0, len(data) - self.block_size, self.block_size)
        if self.max_val_windows is not None and len(starts) > self.max_val_windows:
            starts = starts[torch.linspace(0, len(starts) - 1, self.max_val_windows).round().long()]
        return self._loader(TokenWindows(data, self.block_size, starts))

    test_dataloader = val_dataloader

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(_Prompts(self.prompts), batch_size=1)

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def bigram_bpb(self) -> float:
        """:func:`bigram_bpb` of this module's splits (the baseline a language model must beat)."""
        if self.train_text is None or self.val_text is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before bigram_bpb()")
        return bigram_bpb(self.train_text, self.val_text)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.corpus)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("train_sha256", "val_sha256"):
            if key in state_dict and self.corpus and state_dict[key] != self.corpus[key]:
                rank_zero_warn(
                    f"{type(self).__name__}: the checkpoint was trained on text with {key}={state_dict[key]}, "
                    f"this run's text has {self.corpus[key]} (another Python version's standard library, "
                    "another max_bytes or another file?); the run continues on this run's text."
                )


class PythonSourceDataModule(ByteTextDataModule):
    """The ``*.py`` files of the running interpreter's standard library: real text every install
    has, no download.

    Files are taken in sorted order of their relative paths (directories in
    :data:`STDLIB_EXCLUDED_DIRS` and files matching :data:`STDLIB_EXCLUDED_FILES` left out)
    until the next would pass ``max_bytes``; each goes to validation when the first 8 bytes of
    the SHA-256 of its relative path, as a fraction of 2⁶⁴, fall below ``val_fraction`` (a
    split by file that does not depend on the other files).
    The text differs between Python versions: compare ``corpus["train_sha256"]`` across runs.

    Args:
        max_bytes: cap on the text of both splits together.
        val_fraction: expected share of files held out.
        root: the directory to read (default ``sysconfig.get_paths()["stdlib"]``).
        **kwargs: :class:`ByteTextDataModule`'s arguments.
    """

    def __init__(self, max_bytes: int = 2_000_000, val_fraction: float = 0.1, root: str | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.max_bytes = max_bytes
        self.val_fraction = val_fraction
        self.root = root

    def load_splits(self) -> tuple[Split, Split]:
        root = Path(self.root if self.root is not None else sysconfig.get_paths()["stdlib"]).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"PythonSourceDataModule: root '{root}' is not a directory")
        names = []
        for directory, subdirs, files in os.walk(root):
            subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]  # not walked at all
            base = Path(directory).relative_to(root)
            names += [(base / f).as_posix() for f in files
                      if f.endswith(".py") and not any(fnmatch.fnmatchcase(f, p) for p in STDLIB_EXCLUDED_FILES)]
        names.sort()
        train: Split = []
        val: Split = []
        total = 0
        for name in names:
            content = (root / name).read_bytes()
            if total + len(content) > self.max_bytes:
                break
            total += len(content)
            held_out = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") < self.val_fraction * 2**64
            (val if held_out else train).append((name, content))
        return train, val


class TinyShakespeareDataModule(ByteTextDataModule):
    """Tiny Shakespeare (about 1.1 MB of plays; Karpathy's char-rnn, the nanoGPT character-level
    benchmark), ``data_dir/tiny_shakespeare/input.txt``, downloaded when missing. One document,
    so the split is by position: the first ``1 − val_fraction`` of the bytes train, the rest
    is held out (as nanoGPT's ``prepare.py``).

    Args:
        data_dir: where ``tiny_shakespeare/input.txt`` is (or goes).
        download: fetch the file when it is missing.
        download_timeout: seconds a network operation may stall before the download is given up.
        val_fraction: the held-out tail.
        **kwargs: :class:`ByteTextDataModule`'s arguments.
    """

    url = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

    def __init__(self, data_dir: str = "data", download: bool = True, download_timeout: float = 30.0,
                 val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if download_timeout <= 0:
            raise ValueError(f"download_timeout must be > 0, got {download_timeout}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.data_dir = data_dir
        self.download = download
        self.download_timeout = download_timeout
        self.val_fraction = val_fraction

    @property
    def path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve() / "tiny_shakespeare" / "input.txt"

    def _unavailable(self, why: str) -> DatasetUnavailableError:
        return DatasetUnavailableError(
            f"Tiny Shakespeare is missing: '{self.path}' does not exist ({why}). Download {self.url} on a "
            f"connected machine and copy it to '{self.path}'."
        )

    def prepare_data(self) -> None:
        if self.path.is_file():
            return
        if not self.download:
            raise self._unavailable("download=False")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".part")
        try:
            with urllib.request.urlopen(self.url, timeout=self.download_timeout) as response:
                partial.write_bytes(response.read())
        except OSError as err:  # URLError, timeouts and refused connections are OSErrors
            partial.unlink(missing_ok=True)
            raise self._unavailable(f"could not be downloaded; {type(err).__name__}: {err}") from None
        partial.replace(self.path)

    def load_splits(self) -> tuple[Split, Split]:
        if not self.path.is_file():
            raise self._unavailable("prepare_data has not fetched it")
        text = self.path.read_bytes()
        cut = int(len(text) * (1.0 - self.val_fraction))
        return [(f"input.txt[:{cut}]", text[:cut])], [(f"input.txt[{cut}:]", text[cut:])]
