"""The LightningModule: an image classifier trained with manual optimization."""

from __future__ import annotations

import math
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torchmetrics.classification import MulticlassAccuracy

from lightning_spectral.optim.param_groups import build_param_groups


class CosineSchedule(LRScheduler):
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio·lr`` at ``total_steps``.

    Meant to be stepped once per optimizer step. With ``total_steps=None`` the horizon is
    left open until :meth:`set_total_steps`; :class:`SpectralModule` sets it to
    ``trainer.estimated_stepping_batches`` (every batch of every epoch, or ``max_steps``).

    Args:
        optimizer: the optimizer whose learning rates are scheduled.
        total_steps: optimizer steps until the end of the decay; ``None`` to set it later.
        warmup_steps: steps of linear warm-up from ``lr/warmup_steps`` to ``lr``.
        min_lr_ratio: final learning rate as a fraction of the initial one.
        last_epoch: index of the last step taken (``-1`` to start afresh).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the horizon of the decay."""
        if total_steps <= self.warmup_steps:
            raise ValueError(f"total_steps ({total_steps}) must exceed warmup_steps ({self.warmup_steps})")
        self.total_steps = int(total_steps)

    def lr_factor(self, step: int) -> float:
        """The multiplier of the initial learning rate at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step == self.warmup_steps:
            return 1.0
        if self.total_steps is None:
            raise RuntimeError("CosineSchedule.total_steps is unset: pass total_steps or call set_total_steps()")
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


class SpectralModule(LightningModule):
    """Image classification with one ``optimizer.step()`` per batch (manual optimization).

    The parameters are grouped by
    :func:`~lightning_spectral.optim.param_groups.build_param_groups`: a ``"matrix"`` group
    (≥2-D weights, for a spectral rule) and a ``"vector"`` group (biases, norms and the
    ``exclude`` patterns, for the fallback rule). ``optimizer`` is called with that list, so
    ``torch.optim.SGD``/``AdamW`` and the optimizers of :mod:`lightning_spectral.optim` all fit.
    The scheduler is stepped after every optimizer step and the learning rate of each group is
    logged as ``lr/<group name>``.

    Args:
        net: the network, mapping images to ``num_classes`` logits.
        num_classes: classes of the task; ``None``: the net's ``num_classes`` attribute, else the
            ``out_features`` of its last ``nn.Linear`` (the CLI fills it from the data module).
        optimizer: builds the optimizer from the parameter groups.
        scheduler: builds the learning-rate scheduler from the optimizer; ``None`` keeps the
            learning rate constant. The default, :class:`CosineSchedule` without ``total_steps``,
            decays over ``trainer.estimated_stepping_batches``, read when training starts.
        exclude: glob patterns of parameter names (``"fc2.*"``) whose matrices go to the fallback rule.
        vector_weight_decay: weight decay of the fallback group; ``None`` keeps the optimizer's.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = CosineSchedule,
        exclude: list[str] | None = None,
        vector_weight_decay: float | None = 0.0,
    ) -> None:
        super().__init__()
        if num_classes is None:
            num_classes = getattr(net, "num_classes", None) or next(
                (m.out_features for m in reversed(list(net.modules())) if isinstance(m, nn.Linear)), None)
            if num_classes is None:
                raise ValueError("num_classes: pass it, or a net with a num_classes attribute or a final nn.Linear")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if vector_weight_decay is not None and vector_weight_decay < 0:
            raise ValueError(f"vector_weight_decay must be >= 0 or None, got {vector_weight_decay}")
        # Under LightningCLI the hyperparameters are the parsed config (plain values that
        # rebuild everything in load_from_checkpoint); built in Python, the objects are left
        # out so that checkpoints load with torch.load(weights_only=True).
        objects = [] if _given_hyperparameters.get() is not None else ["net", "optimizer", "scheduler"]
        self.save_hyperparameters(ignore=objects)
        self.automatic_optimization = False
        self.net = net
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.exclude = exclude or []
        self.vector_weight_decay = vector_weight_decay
        self.criterion = nn.CrossEntropyLoss()
        # The training accuracy skips torchmetrics' input checks (≈ 0.2 ms per step on a CPU).
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc, self.test_acc = (MulticlassAccuracy(num_classes, average="micro") for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Optimizer | dict:
        groups = build_param_groups(self.net, exclude=self.exclude, vector_weight_decay=self.vector_weight_decay)
        optimizer = self.optimizer(groups)
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            raise TypeError("ReduceLROnPlateau needs a metric; SpectralModule steps its scheduler every batch")
        if isinstance(scheduler, CosineSchedule) and scheduler.total_steps is None:
            total = self.trainer.estimated_stepping_batches
            if math.isinf(total):
                raise ValueError("the cosine schedule needs trainer.max_epochs or trainer.max_steps (or total_steps)")
            scheduler.set_total_steps(int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        optimizer = self.optimizers()
        self._log_learning_rates(optimizer, len(y))
        logits = self(x)
        loss = self.criterion(logits, y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.train_acc.update(logits.detach(), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        if self._last_batch_of_epoch(batch_idx):
            # The epoch's accuracy, logged once at its last batch rather than as a Metric object
            # every step: each ``self.log`` costs about 1 ms of Lightning bookkeeping on a CPU
            # (a tenth of a small model's step). Not in ``on_train_epoch_end``: callbacks run
            # that hook before the module's and would not see it.
            self.log("train/acc", self.train_acc.compute(), on_step=False, on_epoch=True)
            self.train_acc.reset()
        return loss.detach()

    def _last_batch_of_epoch(self, batch_idx: int) -> bool:
        """The data ran out, ``limit_train_batches`` was reached, or this step hit ``max_steps``
        (checked after the optimizer step, which counts in ``global_step``)."""
        trainer = self.trainer
        return (trainer.is_last_batch or batch_idx + 1 >= trainer.num_training_batches
                or 0 <= trainer.max_steps <= trainer.global_step)

    def _log_learning_rates(self, optimizer: Optimizer, batch_size: int) -> None:
        """Log each parameter group's learning rate as ``lr/<group name>`` on the steps the
        loggers write (every ``trainer.log_every_n_steps``, as ``LearningRateMonitor`` does);
        on the other steps Lightning would drop the value after paying for ``self.log``."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        if not trainer.loggers or every == 0 or (trainer.global_step + 1) % every:
            return
        self.log_dict(
            {f"lr/{g.get('name', f'group{i}')}": g["lr"] for i, g in enumerate(optimizer.param_groups)},
            on_step=True,
            on_epoch=False,
            batch_size=batch_size,
        )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=1)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", self.criterion(logits, y), sync_dist=True, prog_bar=True, batch_size=len(y))
        self.log(f"{stage}/acc", accuracy, prog_bar=True, batch_size=len(y))
