"""Sections 4 and 5: Lightning training-loop overhead and callback overhead.

Section 4: ``SpectralModule(SmallCNN)`` with SGD (lr 0.05, momentum 0.9, no scheduler), fitted
by a ``Trainer`` without progress bar, logger, checkpointing, model summary or validation,
against a plain PyTorch loop over the same DataLoader, model and optimizer, on two workloads:
the digits (``DigitsDataModule``, 8×8, batch 64: a 10 ms step, where Lightning's fixed cost per
step shows most) and CIFAR-10-shaped random images (3×32×32, batch 128, the CIFAR configs'
setting). Per-step time excludes start-up: each is run for ``E₁`` and ``E₂`` epochs and the
difference divided by the extra steps; the four runs are interleaved and repeated, medians
reported.

Section 5: the same fit (with the module's default cosine schedule, as a user would have it) for
a fixed number of epochs, with and without each callback at its default frequency, interleaved;
the overhead is ``(T_with − T_without)/T_without`` (start-up is the same in both, so it cancels
from the difference, and the ratio is given against the steps' time, i.e. the fit time minus
start-up measured in section 4's way). ``ConstraintMonitor`` runs against a ``ManifoldMuon``
baseline. Each callback's own ``elapsed_s`` bookkeeping is reported beside it.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch

from ._common import median, timed


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_utilities"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _data(batch_size: int):
    from lightning_spectral.data.digits import DigitsDataModule

    dm = DigitsDataModule(batch_size=batch_size)
    dm.setup("fit")
    return dm


def _cifar_shaped_data(batch_size: int = 128, batches: int = 16):
    """Random 3×32×32 images and labels, as a ``LightningDataModule`` (no download)."""
    import lightning.pytorch as pl

    g = torch.Generator().manual_seed(0)
    n = batch_size * batches
    images, labels = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return pl.LightningDataModule.from_datasets(torch.utils.data.TensorDataset(images, labels),
                                                batch_size=batch_size, num_workers=0)


def _model(seed: int = 0, in_channels: int = 1, image_size: int = 8):
    from lightning_spectral.models import SmallCNN

    torch.manual_seed(seed)
    return SmallCNN(num_classes=10, in_channels=in_channels, image_size=image_size)


SGD = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)


def fit_lightning(dm, epochs: int, callbacks=(), optimizer=SGD, scheduler=None, max_steps: int = -1,
                  model=_model) -> float:
    """Wall time of ``Trainer.fit`` (trainer construction included, it is part of start-up)."""
    import lightning.pytorch as pl

    from lightning_spectral.module import SpectralModule

    def go():
        module = SpectralModule(model(), num_classes=10, optimizer=optimizer, scheduler=scheduler)
        trainer = pl.Trainer(max_epochs=epochs, max_steps=max_steps, accelerator="cpu", devices=1,
                             enable_progress_bar=False, logger=False, enable_checkpointing=False,
                             enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                             callbacks=list(callbacks))
        trainer.fit(module, datamodule=dm)

    return timed(go)


def fit_plain(dm, epochs: int, model=_model) -> float:
    def go():
        net = model()
        net.train()
        opt = SGD(net.parameters())
        criterion = torch.nn.CrossEntropyLoss()
        for _ in range(epochs):
            for x, y in dm.train_dataloader():
                loss = criterion(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()

    return timed(go)


def loop_overhead(quick: bool, log) -> dict:
    _quiet()
    cifar_model = functools.partial(_model, in_channels=3, image_size=32)
    workloads = {
        "digits 8×8, batch 64": (_data(64), _model, (1, 2) if quick else (2, 8)),
        "CIFAR-10-shaped 3×32×32, batch 128": (_cifar_shaped_data(batches=2 if quick else 8), cifar_model,
                                                (1, 2) if quick else (1, 3)),
    }
    out = {}
    for name, (dm, model, (e1, e2)) in workloads.items():
        repeats = 1 if quick else (7 if name.startswith("digits") else 3)
        steps_per_epoch = len(dm.train_dataloader())
        fit_lightning(dm, 1, model=model), fit_plain(dm, 1, model=model)  # warm-up: imports, allocator
        t = {k: [] for k in ("pl1", "pl2", "plain1", "plain2")}
        for _ in range(repeats):
            t["pl1"].append(fit_lightning(dm, e1, model=model))
            t["plain1"].append(fit_plain(dm, e1, model=model))
            t["pl2"].append(fit_lightning(dm, e2, model=model))
            t["plain2"].append(fit_plain(dm, e2, model=model))
        extra = (e2 - e1) * steps_per_epoch
        pl_step = [(b - a) / extra for a, b in zip(t["pl1"], t["pl2"])]
        plain_step = [(b - a) / extra for a, b in zip(t["plain1"], t["plain2"])]
        ratios = [a / b for a, b in zip(pl_step, plain_step)]
        startup = [a - e1 * steps_per_epoch * s for a, s in zip(t["pl1"], pl_step)]
        log(f"[loop] {name}: lightning {median(pl_step) * 1e3:.2f} ms/step, plain {median(plain_step) * 1e3:.2f} ms/step")
        out[name] = {"steps_per_epoch": steps_per_epoch, "epochs": [e1, e2], "repeats": repeats,
                     "lightning_step_s": median(pl_step), "plain_step_s": median(plain_step),
                     "ratio": median(ratios), "ratios": ratios, "lightning_startup_s": median(startup), "raw_s": t}
    return {"workloads": out, "lightning_startup_s": out["digits 8×8, batch 64"]["lightning_startup_s"]}


def callback_overhead(quick: bool, log, startup_s: float = 0.0) -> dict:
    from lightning_spectral.callbacks import (ConstraintMonitor, GradientNoiseScaleMonitor, SharpnessMonitor,
                                              SpectralNormMonitor)
    from lightning_spectral.module import CosineSchedule
    from lightning_spectral.optim import ManifoldMuon

    _quiet()
    dm = _data(64)
    steps_per_epoch = len(dm.train_dataloader())
    # Enough steps for every default frequency (50, 100) to fire several times.
    epochs = 2 if quick else 14
    max_steps = 12 if quick else 300
    steps = min(max_steps, epochs * steps_per_epoch)
    repeats = 1 if quick else 3
    mm = functools.partial(ManifoldMuon, lr=0.05, mode="amortized")
    every = {} if not quick else {"every_n_steps": 10}
    variants = {
        "baseline (SGD)": (lambda: [], SGD),
        "SpectralNormMonitor": (lambda: [SpectralNormMonitor(**every)], SGD),
        "SharpnessMonitor": (lambda: [SharpnessMonitor(**every, **({"max_iter": 3} if quick else {}))], SGD),
        "GradientNoiseScaleMonitor": (lambda: [GradientNoiseScaleMonitor(**every)], SGD),
        "baseline (ManifoldMuon)": (lambda: [], mm),
        "ConstraintMonitor": (lambda: [ConstraintMonitor(**every)], mm),
    }
    fit_lightning(dm, 1, max_steps=5)  # warm-up
    times = {k: [] for k in variants}
    book = {k: [] for k in variants}
    for _ in range(repeats):
        for name, (make, opt) in variants.items():
            cbs = make()
            times[name].append(fit_lightning(dm, epochs, cbs, optimizer=opt, scheduler=CosineSchedule,
                                             max_steps=max_steps))
            if cbs:
                book[name].append((cbs[0].elapsed_s, cbs[0].num_measurements))
    rows = {}
    for name in variants:
        base = "baseline (ManifoldMuon)" if name == "ConstraintMonitor" else "baseline (SGD)"
        med, bmed = median(times[name]), median(times[base])
        row = {"fit_s": med, "times_s": times[name], "steps": steps}
        if name != base and not name.startswith("baseline"):
            cb = variants[name][0]()[0]
            row["every_n_steps"] = cb.every_n_steps
            row["extra_per_step_s"] = (med - bmed) / steps
            base_step = (bmed - max(startup_s, 0.0)) / steps
            row["baseline_step_s"] = base_step
            row["fraction_of_step"] = row["extra_per_step_s"] / base_step
            elapsed = [e for e, _ in book[name]]
            row["elapsed_s"] = median(elapsed)
            row["measurements"] = book[name][0][1] if book[name] else None
            row["elapsed_per_measurement_s"] = row["elapsed_s"] / max(row["measurements"] or 1, 1)
            row["elapsed_per_step_s"] = row["elapsed_s"] / steps
            row["elapsed_fraction_of_step"] = row["elapsed_per_step_s"] / base_step
        rows[name] = row
    log("[callbacks] " + ", ".join(f"{k} {median(v):.2f} s" for k, v in times.items()))
    return {"steps": steps, "repeats": repeats, "startup_s_subtracted": startup_s, "rows": rows}
