"""Shared fixtures: the in-process CLI and tiny datasets in torchvision's real on-disk formats."""

from __future__ import annotations

import hashlib
import pickle
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR10, MNIST

from lightning_spectral.cli import SpectralCLI, cli_main

QUIET = ("--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false")


class OverflowAtSecondStep(torch.optim.SGD):
    """SGD whose second step leaves a weight infinite, its gradients finite (an update that overflows).
    Shared by the failure and precision tests (``from conftest import OverflowAtSecondStep``)."""

    calls = 0

    def step(self, closure=None):
        self.calls += 1
        out = super().step(closure)
        if self.calls == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out


def flat_hessian(model: torch.nn.Module, loss_of_params: Callable) -> torch.Tensor:
    """The dense Hessian of ``loss_of_params({name: tensor})`` in the model's parameters, flattened
    in ``named_parameters()`` order (``torch.autograd.functional.hessian``): the exact answer the
    sharpness tests compare against (``from conftest import flat_hessian``)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(theta):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = theta[i : i + s.numel()].reshape(s)
            i += s.numel()
        return loss_of_params(params)

    return torch.autograd.functional.hessian(f, flat)


def spawn_ranks(worker: Callable, world: int, *args, messages: int, timeout: float) -> list:
    """Run ``worker(rank, world, port, *args, queue)`` in ``world`` spawned processes (a free local
    port for their process group) and return the ``messages`` items they put on the queue; every
    process is joined (killed if it hangs) and must exit cleanly. Shared by the gloo tests
    (``from conftest import spawn_ranks``)."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(rank, world, port, *args, queue)) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        out = [queue.get(timeout=timeout) for _ in range(messages)]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return out


@pytest.fixture(scope="module")
def single_thread():
    """One BLAS thread for modules of tiny-matrix tests: faster, and immune to a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class HostSync(RuntimeError):
    pass


@pytest.fixture
def no_host_sync(monkeypatch):
    """Inside ``with no_host_sync():`` every Python-level way of reading a tensor's value on the host
    (``item``, ``bool``/``float``/``int``/``index``, ``cpu``, ``tolist``, ``numpy``) raises: a CPU proxy
    for a CUDA synchronisation (``torch.cuda.set_sync_debug_mode`` needs a device)."""
    import contextlib

    @contextlib.contextmanager
    def guard():
        with monkeypatch.context() as m:
            for name in ("item", "__bool__", "__float__", "__int__", "__index__", "cpu", "tolist", "numpy"):
                m.setattr(torch.Tensor, name,
                          lambda self, *a, _n=name, **k: (_ for _ in ()).throw(HostSync(f"host sync: {_n}")))
            yield

    return guard


@pytest.fixture
def run_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., SpectralCLI]:
    """``run_cli("fit", "--config", ...)`` runs the CLI quietly in ``tmp_path`` (relative ``logs/`` land there)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning_spectral"])
    return lambda subcommand, *args: cli_main([subcommand, *args, *QUIET])


@dataclass
class FakeDataset:
    root: Path
    train_images: np.ndarray  # N×C×H×W uint8, in file order
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n)


@pytest.fixture
def fake_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDataset:
    """Five training batches of 8 images and a test batch of 12, pickled as CIFAR-10's python version.

    torchvision checks every file against the md5 sums in ``CIFAR10.train_list``/``test_list``/
    ``meta``; those lists are replaced by the sums of the files written here, so the check still runs.
    """
    root = tmp_path / "cifar"
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def write(name: str, images: np.ndarray, labels: np.ndarray) -> list[str]:
        entry = {"batch_label": name, "labels": labels.tolist(), "data": images.reshape(len(images), -1)}
        (folder / name).write_bytes(pickle.dumps(entry))
        return [name, _md5(folder / name)]

    train = [_images(rng, 8, (3, 32, 32)) for _ in range(5)]
    test_images, test_labels = _images(rng, 12, (3, 32, 32))
    monkeypatch.setattr(CIFAR10, "train_list", [write(f"data_batch_{i + 1}", *b) for i, b in enumerate(train)])
    monkeypatch.setattr(CIFAR10, "test_list", [write("test_batch", test_images, test_labels)])
    names = [f"class{i}" for i in range(10)]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / "batches.meta")})
    return FakeDataset(
        root,
        np.concatenate([b[0] for b in train]),
        np.concatenate([b[1] for b in train]),
        test_images,
        test_labels,
    )


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: magic (0x08 = uint8, ndim), big-endian dimensions, data."""
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path: Path) -> FakeDataset:
    """32 training and 16 test images as the four unpacked IDX files in ``<root>/MNIST/raw``."""
    root = tmp_path / "mnist"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_images, train_labels = _images(rng, 32, (1, 28, 28))
    test_images, test_labels = _images(rng, 16, (1, 28, 28))
    for prefix, images, labels in (("train", train_images, train_labels), ("t10k", test_images, test_labels)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    assert {name.removesuffix(".gz") for name, _ in MNIST.resources} == {p.name for p in raw.iterdir()}
    return FakeDataset(root, train_images, train_labels, test_images, test_labels)


@pytest.fixture
def unreachable_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the download URLs at a closed local port: a real urllib failure, with or without internet."""
    monkeypatch.setattr(CIFAR10, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    monkeypatch.setattr(MNIST, "mirrors", ["http://127.0.0.1:9/"])
