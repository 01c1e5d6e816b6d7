"""What a data module tells the network, and the image data modules' common base.

Any :class:`~lightning.pytorch.LightningDataModule` works with the CLI and with
:class:`~lightning_spectral.module.SpectralModule`. The network is sized by the data module,
never by hand: every constructor argument of the network (and of the LightningModule) named
like one of :data:`DATA_ATTRIBUTES` is filled from the data module by :func:`data_arguments`
(the CLI does it for ``model.init_args`` and ``model.init_args.net.init_args``; from Python,
``MLP(**data_arguments(MLP, datamodule), hidden_sizes=[64])``). The data module's values win
over the network's defaults; a config that states another value is an error.

The contract, attribute by attribute (class or instance attributes, readable after
``__init__``; a data module need declare none of them):

``num_classes`` (int)
    Classes of the labels. Undeclared: read from the training set's labels (its ``classes``,
    ``targets``, or the last tensor of a ``TensorDataset``) after ``setup("fit")``.
``input_shape`` (tuple of ints)
    Shape of one input sample without the batch dimension: ``(40,)`` for a 1-D signal,
    ``(C, H, W)`` for an image. Undeclared: the shape of the first training batch after
    ``prepare_data()`` and ``setup("fit")`` (the batch is ``x``, or ``(x, y, ...)``).
``in_channels``, ``image_size`` (ints)
    Channels and side of square images; derived from an ``input_shape`` of ``(C, S, S)``.
``in_features`` (int)
    Values in one flattened sample, the product of ``input_shape``.
``vocab_size``, ``block_size`` (ints)
    Tokens of the vocabulary and of one context window (language modelling); never inferred.

A batch-inferred value costs one ``setup("fit")`` and one batch before the Trainer starts, on
every process; declare the attributes to avoid it (and under DDP, where ``prepare_data`` must
not run on every rank, declare them).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

#: The data module's attributes that size a network (see the module docstring).
DATA_ATTRIBUTES = ("num_classes", "input_shape", "in_channels", "image_size", "in_features", "vocab_size", "block_size")
_INFERRED = ("num_classes", "input_shape", "in_channels", "image_size", "in_features")


class DataShapeError(ValueError):
    """The data module cannot give a value the network needs, or a config contradicts it."""


class DataDescription:
    """The :data:`DATA_ATTRIBUTES` values of one data module, read (or inferred) on first use.

    With ``infer=False`` only what the data module declares (and what follows from it) is
    given: nothing is set up or loaded.
    """

    def __init__(self, datamodule: LightningDataModule, infer: bool = True) -> None:
        self.datamodule = datamodule
        self.infer = infer
        self._values: dict[str, Any] = {}
        self._set_up = False

    def __getitem__(self, name: str) -> Any:
        """The value of ``name``; ``KeyError`` when the data module neither declares nor implies it."""
        if name not in DATA_ATTRIBUTES:
            raise KeyError(name)
        if name not in self._values:
            self._values[name] = self._resolve(name)
        return self._values[name]

    def declared(self, name: str) -> Any:
        value = getattr(self.datamodule, name, None)
        if name == "input_shape" and value is not None:
            value = tuple(int(v) for v in value)
        return value

    def _resolve(self, name: str) -> Any:
        value = self.declared(name)
        if value is not None:
            return value
        if name not in _INFERRED:
            raise KeyError(name)
        if not self.infer and (name == "num_classes" or self.declared("input_shape") is None):
            raise KeyError(name)  # only the data could tell
        if name == "num_classes":
            return self._labels_count()
        shape = self.declared("input_shape")
        if shape is None:
            shape = self._batch_shape()
            self._values["input_shape"] = shape
        if name == "input_shape":
            return shape
        if name == "in_features":
            return math.prod(shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise DataShapeError(
                f"{type(self.datamodule).__name__} gives inputs of shape {shape}, not square images (C, S, S): "
                f"a network that takes in_channels and image_size cannot read them; use one that takes "
                "input_shape (e.g. MLP) or declare in_channels and image_size on the data module")
        return shape[0] if name == "in_channels" else shape[1]

    def _setup(self) -> None:
        if not self._set_up:
            self.datamodule.prepare_data()
            self.datamodule.setup("fit")
            self._set_up = True

    def _batch_shape(self) -> tuple[int, ...]:
        self._setup()
        batch = next(iter(self.datamodule.train_dataloader()))
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor) or x.ndim < 2:
            raise DataShapeError(
                f"cannot read the input shape from a batch of {type(self.datamodule).__name__} (expected a tensor x "
                f"or (x, y, ...) with a batch dimension, got {type(x).__name__}); "
                "declare input_shape on the data module")
        return tuple(x.shape[1:])

    def _labels_count(self) -> int:
        self._setup()
        dataset = self.datamodule.train_dataloader().dataset
        classes = getattr(dataset, "classes", None)
        if classes is not None:
            return len(classes)
        labels = getattr(dataset, "targets", None)
        if labels is None and isinstance(dataset, TensorDataset) and len(dataset.tensors) > 1:
            labels = dataset.tensors[-1]
        labels = torch.as_tensor(labels) if labels is not None else None
        if labels is None or labels.ndim != 1 or labels.is_floating_point() or not len(labels):
            raise DataShapeError(
                f"cannot tell the class count of {type(self.datamodule).__name__}: its training set has no 'classes', "
                "'targets' or integer label tensor; declare num_classes on the data module")
        return int(labels.max()) + 1


def data_arguments(target: Callable[..., Any], datamodule: LightningDataModule | DataDescription) -> dict[str, Any]:
    """The constructor arguments of ``target`` that the data module gives: ``{name: value}`` for
    each parameter of ``target`` named in :data:`DATA_ATTRIBUTES` that the data module declares
    or implies (see the module docstring).

    A parameter whose default is ``None`` is optional: left out when the data cannot give it.
    Any other parameter the data cannot give raises :class:`DataShapeError` (its default would
    silently size the network for other data). ``in_channels``, ``image_size`` and
    ``in_features`` count as optional for a network that also takes ``input_shape``.
    """
    data = datamodule if isinstance(datamodule, DataDescription) else DataDescription(datamodule)
    params = inspect.signature(target).parameters
    out: dict[str, Any] = {}
    for name in DATA_ATTRIBUTES:
        if name not in params:
            continue
        optional = params[name].default is None
        if name in ("in_channels", "image_size", "in_features") and "input_shape" in params:
            optional = True  # the network reads input_shape; these are alternatives to it
        try:
            out[name] = data[name]
        except KeyError:
            continue
        except DataShapeError:
            if not optional:
                raise
    return out


class EpochSeededSampler(RandomSampler):
    """A random order that depends only on ``(seed, epoch)``: Lightning calls :meth:`set_epoch`
    before every epoch, so a run resumed from an epoch-end checkpoint sees the same batches as
    the uninterrupted run (a plain ``shuffle=True`` draws from the global RNG, whose state a
    checkpoint does not hold). Under DDP Lightning replaces any ``RandomSampler`` with its
    ``DistributedSampler``, which is epoch-seeded the same way."""

    def __init__(self, data_source: Dataset, seed: int) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.generator.manual_seed((self.seed + epoch) % (1 << 64))


class ImageDataModule(LightningDataModule, ABC):
    """Image classification data: a training set and a held-out set.

    Subclasses set the class attributes ``num_classes``, ``in_channels`` and ``image_size``
    (so :attr:`input_shape` is ``(in_channels, image_size, image_size)``) and implement
    :meth:`make_datasets`. The held-out set serves ``validate``, ``test`` and ``predict`` alike.

    Args:
        batch_size: samples per batch (per device under DDP).
        num_workers: data-loading worker processes.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self, batch_size: int = 128, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.eval_set: Dataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(in_channels, image_size, image_size)``: one image without the batch dimension."""
        return (self.in_channels, self.image_size, self.image_size)

    @abstractmethod
    def make_datasets(self) -> tuple[Dataset, Dataset]:
        """Return ``(train, held_out)``; called once, in ``setup``, on every process."""

    def setup(self, stage: str) -> None:
        if self.train_set is None:
            self.train_set, self.eval_set = self.make_datasets()

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.eval_set, shuffle=False)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before its dataloaders are requested")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # seed: torch's initial seed, which ``seed_everything`` sets
            sampler=EpochSeededSampler(dataset, torch.initial_seed()) if shuffle else None,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
