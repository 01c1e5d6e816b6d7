"""The LightningModules' common training step (manual optimization, non-finite policy, routing
report) and the image classifier built on it; the resume checks are :mod:`lightning_spectral.resume`'s."""

from __future__ import annotations

import inspect
import math
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torchmetrics.classification import MulticlassAccuracy

from lightning_spectral.checkpoint import checkpoint_bytes, nonfinite_entry, use_atomic_checkpoint_io
from lightning_spectral.config_policy import enforce_in_jsonargparse
from lightning_spectral.optim.base import finite_flags, first_nonfinite
from lightning_spectral.optim.param_groups import build_param_groups, routing_table
from lightning_spectral.resume import CheckpointMismatchError  # noqa: F401 (its import path before resume.py)
from lightning_spectral.resume import META_KEY, ResumeCheck, checkpoint_metadata, resume_hint
from lightning_spectral.signals import SigtermNotice

# What a config may name (lightning_spectral.config_policy), for the CLI and studies (which import this
# module) and for load_from_checkpoint, which rebuilds a CLI-trained module from its saved config.
enforce_in_jsonargparse()


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
            raise ValueError(
                f"total_steps ({total_steps}) must exceed warmup_steps ({self.warmup_steps}): the schedule needs "
                "optimizer steps after its warm-up; train longer or shorten the warm-up"
            )
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
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * self.decay(progress)

    @staticmethod
    def decay(progress: float) -> float:
        """The decay from 1 to 0 as ``progress`` goes from 0 to 1: ½(1 + cos πp)."""
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        factor = self.lr_factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


class LinearSchedule(CosineSchedule):
    """:class:`CosineSchedule`'s warm-up and horizon (``trainer.estimated_stepping_batches`` unless
    ``total_steps`` is given) with a linear decay, 1 − p: without warm-up, torch's
    ``PolynomialLR(power=1, total_iters=total_steps)``, whose horizon follows the trainer."""

    @staticmethod
    def decay(progress: float) -> float:
        return 1.0 - progress


def fixed_horizon(scheduler: LRScheduler) -> tuple[str, int] | None:
    """``(argument, step)`` of a torch scheduler whose decay ends at a step its config states
    (``PolynomialLR.total_iters``, ``CosineAnnealingLR.T_max``), else ``None``."""
    if isinstance(scheduler, torch.optim.lr_scheduler.PolynomialLR):
        return "total_iters", scheduler.total_iters
    if isinstance(scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
        return "T_max", scheduler.T_max
    return None


NONFINITE_POLICIES = ("raise", "skip")
class NonFiniteStepError(FloatingPointError):
    """A NaN/Inf loss, gradient or weight stopped training before it reached the weights or a checkpoint."""


class _StepWeightsCheck:
    """Whether every weight stayed finite after each optimizer step since the last read, kept on
    the device: one fused reduction per step (:func:`~lightning_spectral.optim.base.finite_flags`)
    ANDed into a 0-d flag per device, no host sync; read (:meth:`take`) where the host syncs anyway."""

    def __init__(self) -> None:
        self._flags: dict[torch.device, torch.Tensor] = {}
        self.steps = 0  # steps accumulated since the last read

    def after_step(self, params: Any) -> None:
        for device, flag in finite_flags(params).items():
            self._flags[device] = flag & self._flags[device] if device in self._flags else flag
        self.steps += 1

    def take(self) -> tuple[dict[torch.device, torch.Tensor], int]:
        """The accumulated flags and the number of steps they cover; then start afresh."""
        taken = self._flags, self.steps
        self._flags, self.steps = {}, 0
        return taken


class ManualOptimizationModule(LightningModule):
    """A network trained with one ``optimizer.step()`` per batch (manual optimization).

    The common part of :class:`SpectralModule` (image classification) and
    :class:`~lightning_spectral.lm_module.LanguageModule` (next-token prediction); a task
    supplies the loss of a batch (:meth:`_training_loss`), its evaluation steps and, if it
    wants, logging after each optimizer step and at the end of an epoch.

    The parameters are grouped by
    :func:`~lightning_spectral.optim.param_groups.build_param_groups`: a ``"matrix"`` group
    (≥2-D weights, for a spectral rule), and for the fallback rule an ``"embedding"`` group
    (embedding tables), a ``"head"`` group (the output layer) and a ``"vector"`` group (biases,
    norms and the ``exclude`` patterns). ``optimizer`` is called with that list, so
    ``torch.optim.SGD``/``AdamW`` and the optimizers of :mod:`lightning_spectral.optim` all fit.
    At fit start the routing table (which rule takes each parameter, with its shape) is printed
    and written to ``<log_dir>/routing.md``. The scheduler is stepped after every optimizer step
    and the learning rate of each group is logged as ``lr/<group name>``; the loss of every
    step taken as ``train/loss``; the throughput as ``train/samples_per_s``.

    Before every optimizer step the loss and the gradients are checked for NaN/Inf (one fused
    norm and one host sync per step, whatever the optimizer; under fp16's ``GradScaler`` the
    scaler's own check): a non-finite step never reaches the weights, so a package optimizer's
    own check (``check_finite=True``) is switched off rather than repeated. After every optimizer
    step the weights are checked too (a finite step can overflow them: a learning rate too
    large, a poisoned momentum buffer): one fused norm on the device, no host sync of its own;
    its flag is read with the next step's check (under the ``GradScaler``: every
    :attr:`weight_check_every` steps), at the last batch of an epoch and before a checkpoint is
    written, and stops the run naming the step and the weight. No checkpoint is written from
    non-finite weights or optimizer state.

    Resuming (``ckpt_path``) follows :class:`~lightning_spectral.resume.ResumeCheck`: another
    network, ``exclude``, head/embedding routing or optimizer class than the checkpoint's raises
    :class:`~lightning_spectral.resume.CheckpointMismatchError` with the differences; changed
    optimizer hyperparameters (learning rate, weight decay, budget, ...) are applied to the
    restored optimizer and listed in a warning. Checkpoints carry the network and optimizer
    classes and the skipped-step count under the key ``"spectral_module"``, whatever the subclass.

    Args:
        net: the network; ``forward`` is ``net(x)``.
        optimizer: builds the optimizer from the parameter groups.
        scheduler: builds the learning-rate scheduler from the optimizer; ``None`` keeps the
            learning rate constant. :class:`CosineSchedule` without ``total_steps`` decays over
            ``trainer.estimated_stepping_batches``, read when training starts.
        exclude: glob patterns of parameter names whose matrices go to the fallback rule.
        vector_weight_decay: weight decay of the ``vector`` group; ``None`` keeps the optimizer's.
        head: module-name globs of the output head; ``None``: the net's last ``nn.Linear`` (and
            any Linear tied to an embedding); ``[]``: no head.
        head_as_matrix: give the head the matrix rule.
        embeddings_as_matrices: give embedding tables the matrix rule.
        nonfinite: what a NaN/Inf loss or gradient does: ``"raise"`` stops with
            :class:`NonFiniteStepError` (naming the step, the first non-finite gradient and the
            checkpoint to resume from); ``"skip"`` drops the step (weights, optimizer state and
            schedule untouched), counts it in ``train/skipped_steps`` and stops after
            ``max_consecutive_skips`` skipped steps in a row.
        max_consecutive_skips: with ``nonfinite="skip"``, skipped steps in a row that stop the run.

    The hyperparameters saved are the arguments of the subclass's ``__init__``.

    Attributes:
        skipped_steps: steps skipped by ``nonfinite="skip"`` so far (kept in checkpoints).
        weight_check_every: under fp16's ``GradScaler`` (no check of its own before each step),
            the steps between two reads of the weights' finite flag (one host sync each).
    """

    weight_check_every = 100

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable,
        scheduler: LRSchedulerCallable | None,
        exclude: list[str] | None,
        vector_weight_decay: float | None,
        head: list[str] | None,
        head_as_matrix: bool,
        embeddings_as_matrices: bool,
        nonfinite: str,
        max_consecutive_skips: int,
    ) -> None:
        super().__init__()
        if vector_weight_decay is not None and vector_weight_decay < 0:
            raise ValueError(f"vector_weight_decay must be >= 0 or None, got {vector_weight_decay}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) \
                or max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be a positive int, got {max_consecutive_skips!r}")
        # The arguments of the subclass's __init__ (the frame that called this one). Under
        # LightningCLI they are the parsed config (plain values that rebuild everything in
        # load_from_checkpoint); built in Python, the objects are left out so that checkpoints
        # load with torch.load(weights_only=True).
        objects = [] if _given_hyperparameters.get() is not None else ["net", "optimizer", "scheduler"]
        self.save_hyperparameters(ignore=objects, frame=inspect.currentframe().f_back)
        self.automatic_optimization = False
        self.net = net
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.exclude = exclude or []
        self.vector_weight_decay = vector_weight_decay
        self.routing = dict(head=head, head_as_matrix=head_as_matrix, embeddings_as_matrices=embeddings_as_matrices)
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self._consecutive_skips = 0
        self._resume = ResumeCheck()
        self._step_weights = _StepWeightsCheck()
        self._clock: float | None = None  # when the throughput was last logged
        self._counted: dict[str, int] = {}  # samples (tokens, ...) since then

    @_restricted_classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = None,
                             allow_nonfinite: bool = False, **kwargs: Any) -> Any:
        """Lightning's ``load_from_checkpoint``, the file read through the package's one loader
        (:func:`~lightning_spectral.checkpoint.checkpoint_bytes`): local paths, ``file://`` and
        ``http(s)://`` URLs alike are checked for damage and loaded with ``weights_only=True``,
        whatever ``weights_only`` asks, so that a crafted checkpoint cannot run code. A checkpoint
        holding NaN or Inf in a weight or an optimizer state is refused, naming it, unless
        ``allow_nonfinite`` (to inspect it)."""
        return super().load_from_checkpoint(checkpoint_bytes(checkpoint_path, allow_nonfinite), map_location,
                                            hparams_file, strict, weights_only=True, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        # Before Lightning loads a ckpt_path (which follows the setup hooks) and writes any checkpoint.
        use_atomic_checkpoint_io(self.trainer)

    def configure_model(self) -> None:
        """Under a strategy with a device mesh (Lightning's ``ModelParallelStrategy``), shard the
        network with FSDP2 over the mesh's ``data_parallel`` dimension (a mesh with tensor-parallel
        ranks is refused: these networks have no tensor-parallel plan): each module held in an
        ``nn.ModuleList`` or ``nn.Sequential`` of the network (a transformer's blocks, an MLP's
        layers, a ResNet's stages) that has parameters is its own ``fully_shard`` unit (its weights
        gathered only around its own forward and backward), then the network itself (the rest:
        embeddings, final norm, head). Parameters keep their names, so routing, the routing
        table and checkpoints read the same. Nothing happens without a mesh, or once sharded."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.net, FSDPModule):
            return
        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            # ModelParallelStrategy's default sizes ("auto") give every device of a node to tensor
            # parallelism and one data-parallel rank per node: fully_shard over that mesh shards
            # nothing, and the tensor-parallel ranks, fed the same batches, repeat each other.
            raise ValueError(
                f"{type(self).__name__}: the strategy's device mesh has {mesh['tensor_parallel'].size()} "
                "tensor-parallel ranks, but this network has no tensor-parallel plan (it is sharded with FSDP2 "
                "over the data-parallel ranks only), so nothing would be sharded and every tensor-parallel rank "
                "would repeat the others' work. Set ModelParallelStrategy(data_parallel_size=<number of devices>, "
                "tensor_parallel_size=1) (in YAML: strategy: {class_path: "
                "lightning.pytorch.strategies.ModelParallelStrategy, init_args: {data_parallel_size: 2, "
                "tensor_parallel_size: 1}})."
            )
        mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        # Innermost containers first: a unit may hold smaller units, never the reverse.
        containers = [m for m in reversed(list(self.net.modules())) if isinstance(m, (nn.ModuleList, nn.Sequential))]
        for container in containers:
            for block in container.children():
                if not isinstance(block, FSDPModule) and any(True for _ in block.parameters()):
                    fully_shard(block, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def configure_callbacks(self) -> list:
        """:class:`~lightning_spectral.signals.SigtermNotice`: on SIGTERM, the checkpoint to resume from."""
        return [SigtermNotice()]

    def configure_optimizers(self) -> Optimizer | dict:
        groups = build_param_groups(self.net, exclude=self.exclude, vector_weight_decay=self.vector_weight_decay,
                                    **self.routing)
        optimizer = self.optimizer(groups)
        if getattr(optimizer, "check_finite", None) is True:
            # _finite_step checks the loss and every gradient before each step (or leaves it to
            # fp16's GradScaler, which never lets a non-finite step reach the optimizer): the
            # package optimizer's own check would repeat the same reduction and host sync.
            optimizer.check_finite = False
        self._resume.on_optimizer(self, optimizer)
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            raise TypeError(f"ReduceLROnPlateau needs a metric; {type(self).__name__} steps its scheduler every batch")
        # max_steps=0 asks for no step (Lightning ends the fit at once, as for max_epochs=0): no horizon to set.
        if isinstance(scheduler, CosineSchedule) and scheduler.total_steps is None and self.trainer.max_steps != 0:
            total = self.trainer.estimated_stepping_batches
            if math.isinf(total):
                raise ValueError("the cosine schedule needs trainer.max_epochs or trainer.max_steps (or total_steps)")
            if total <= 0:
                raise ValueError(self._no_training_batches())
            scheduler.set_total_steps(int(total))
        horizon = fixed_horizon(scheduler)
        if horizon is not None and horizon[1] != self.trainer.estimated_stepping_batches:
            name, step = horizon
            raise ValueError(
                f"{type(scheduler).__name__}({name}={step}) ends its decay at step {step}, but the trainer runs "
                f"{self.trainer.estimated_stepping_batches} optimizer steps (trainer.estimated_stepping_batches): "
                f"set {name} to that, or use lightning_spectral.module.LinearSchedule / CosineSchedule, whose "
                "horizon follows the trainer")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _no_training_batches(self) -> str:
        """Why an epoch has no optimizer step, and the fix."""
        trainer = self.trainer
        if trainer.limit_train_batches == 0:
            return "trainer.limit_train_batches is 0: no optimizer step would run; raise it or drop it"
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        size = len(dataset) if hasattr(dataset, "__len__") else None
        batch_size = getattr(loader, "batch_size", None)
        if size is not None and batch_size is not None and batch_size > size:
            return (f"the training data gives no batch: batch_size {batch_size} exceeds the {size} training samples "
                    f"(the training loader drops an incomplete last batch); set data.init_args.batch_size <= {size}")
        return "the training data gives no batch: the training dataset is empty"

    def on_fit_start(self) -> None:
        # Lightning would end a fit without batches silently; ``estimated_stepping_batches`` loads the data.
        # max_steps=0 asks for no step: Lightning ends the fit saying "`max_steps=0` reached".
        if self.trainer.max_steps != 0 and (self.trainer.estimated_stepping_batches <= 0
                                            or self.trainer.num_training_batches == 0):
            raise ValueError(self._no_training_batches())
        self._report_routing()

    def _report_routing(self) -> None:
        """Print the routing table and keep it with the run's logs (``<log_dir>/routing.md``, rank
        0; a trainer without a logger has no run directory, and only prints it)."""
        table = routing_table(self.optimizers(), self.net)
        rank_zero_info(f"Parameter routing (which rule updates which parameter):\n{table}")
        directory = self.trainer.log_dir if self.trainer.loggers else None
        if self.trainer.is_global_zero and directory is not None:
            Path(directory).mkdir(parents=True, exist_ok=True)
            (Path(directory) / "routing.md").write_text(table + "\n", encoding="utf-8")

    def on_train_start(self) -> None:
        self._resume.on_train_start(self)

    def _training_loss(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """The mean loss of ``batch`` to differentiate, and what :meth:`_on_step_taken` needs
        of the forward pass (``None`` when nothing)."""
        raise NotImplementedError(f"{type(self).__name__} must define _training_loss(batch)")

    def _on_step_taken(self, batch: Any, outputs: Any) -> None:
        """Task-specific logging after an optimizer step (not after a skipped one)."""

    def _on_last_training_batch(self) -> None:
        """Task-specific epoch logging at the last training batch of an epoch, before the
        epoch-end callbacks run (they run ``on_train_epoch_end`` before the module does)."""

    @staticmethod
    def _batch_size(batch: Any) -> int:
        """Samples of an ``(inputs, targets)`` batch, for Lightning's epoch means."""
        return len(batch[1])

    def _throughput_counts(self, batch: Any) -> dict[str, int]:
        """What ``batch`` holds in each unit of ``train/<unit>_per_s``: its samples."""
        return {"samples": self._batch_size(batch)}

    def on_train_epoch_start(self) -> None:
        self._clock, self._counted = None, {}  # the validation between epochs is not training time

    def _log_throughput(self, batch: Any, batch_size: int) -> None:
        """``train/<unit>_per_s`` (:meth:`_throughput_counts`, all processes) over the wall time of the
        training loop since the previous logged step (data loading and callbacks included, no device
        sync), on the steps the loggers write (those of ``lr/...``); then ``batch`` is counted."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        if trainer.loggers and every and not (trainer.global_step + 1) % every:
            now = time.perf_counter()
            if self._clock is not None and self._counted:
                self.log_dict({f"train/{unit}_per_s": count * trainer.world_size / (now - self._clock)
                               for unit, count in self._counted.items()},
                              on_step=True, on_epoch=False, batch_size=batch_size)
            self._clock, self._counted = now, {}
        for unit, count in self._throughput_counts(batch).items():  # a skipped step's batch was processed too
            self._counted[unit] = self._counted.get(unit, 0) + count

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        optimizer = self.optimizers()
        batch_size = self._batch_size(batch)
        self._log_throughput(batch, batch_size)
        self._log_learning_rates(optimizer, batch_size)
        loss, outputs = self._training_loss(batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self._finite_step(loss, optimizer, batch_idx):
            optimizer.step()
            self._step_weights.after_step(self.parameters())
            scheduler = self.lr_schedulers()
            if scheduler is not None:
                scheduler.step()
            self._on_step_taken(batch, outputs)
            self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        last = self._last_batch_of_epoch(batch_idx)
        if last or self._step_weights.steps >= self.weight_check_every:
            # The epoch-end callbacks (diagnostics, checkpoints) run after this step and must
            # not see non-finite weights: the flag of the steps not read yet (this one's).
            flags, steps = self._step_weights.take()
            self._raise_if_weights_nonfinite(self._nonfinite_weight(flags), steps)
        if last:
            self._on_last_training_batch()
            if self.skipped_steps:
                self.log("train/skipped_steps", float(self.skipped_steps), on_step=False, on_epoch=True,
                         reduce_fx="max")
        return loss.detach()
    def _finite_step(self, loss: torch.Tensor, optimizer: Any, batch_idx: int) -> bool:
        """Whether the loss and every gradient are finite (the same answer on every rank).

        Under a ``GradScaler`` (fp16) the scaler decides: an overflow is its normal signal to skip
        the step and lower the scale, so no step of it is refused or counted here.
        """
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return True
        grads = [(n, p.grad) for n, p in self.named_parameters() if p.grad is not None]
        loss_key = ("loss",)  # no parameter name is a tuple
        named = [(loss_key, loss.detach()), *grads]
        # The weights' flag of the steps since the last read joins this check's: one host sync.
        weights, steps = self._step_weights.take()
        flags = finite_flags(t for _, t in named)
        for device, flag in weights.items():
            flags[device] = flags[device] & flag if device in flags else flag
        bad = weight = None
        if not all(bool(flag) for flag in flags.values()):  # one host sync per device while all is finite
            bad, weight = first_nonfinite(named), self._nonfinite_weight(weights)
        if self.trainer.strategy.reduce_boolean_decision(bad is None and weight is None, all=True):
            self._consecutive_skips = 0
            return True
        # The previous step made a weight non-finite: this step's loss and gradients follow from it.
        self._raise_if_weights_nonfinite(weight, steps)
        loss_finite = bad != loss_key
        culprit = bad if loss_finite else first_nonfinite(grads)
        what = "gradient" if loss_finite else f"loss ({float(loss.detach()):g})"
        where = (f"non-finite {what} at step {self.trainer.global_step} (epoch {self.current_epoch}, batch "
                 f"{batch_idx}); first non-finite gradient: {culprit or 'none on this rank'}")
        if self.nonfinite == "raise":
            raise NonFiniteStepError(f"{where}. The step was not taken: the weights are those before it. "
                                     f"{self._resume_hint()}")
        optimizer.zero_grad()
        self.skipped_steps += 1
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise NonFiniteStepError(f"{where}: {self._consecutive_skips} steps in a row skipped "
                                     f"(max_consecutive_skips={self.max_consecutive_skips}), stopping. "
                                     f"{self._resume_hint()}")
        if self.skipped_steps == 1:
            rank_zero_warn(f"{where}: step skipped (nonfinite='skip'); skips are counted in train/skipped_steps")
        return False

    def _nonfinite_weight(self, flags: dict[torch.device, torch.Tensor]) -> Any:
        """The name of the first non-finite weight if the flags of :class:`_StepWeightsCheck` say
        there may be one (a host sync per device), else ``None``."""
        return None if all(bool(flag) for flag in flags.values()) else first_nonfinite(self.named_parameters())

    def _raise_if_weights_nonfinite(self, bad: Any, steps: int) -> None:
        """Stop if a rank found the non-finite weight ``bad`` after the last ``steps`` optimizer
        steps (every rank takes part: a sharded network's ranks check different shards)."""
        if not self.trainer.strategy.reduce_boolean_decision(bad is None, all=True):
            last = self.trainer.global_step
            which = (f"the optimizer step at step {last}" if steps <= 1
                     else f"one of the optimizer steps {last - steps + 1} to {last}")
            raise NonFiniteStepError(
                f"{which} made the weight "
                f"{repr(bad) if bad else '(on another rank)'} non-finite (finite loss and gradients); "
                f"{self._resume_hint()}"
            )

    def _resume_hint(self) -> str:
        return resume_hint(self.trainer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = nonfinite_entry(checkpoint)  # the weights and the optimizer state: what a resume refuses
        # Every rank must agree (a sharded network's ranks hold different shards); every rank saves.
        if not self.trainer.strategy.reduce_boolean_decision(bad is None, all=True):
            raise NonFiniteStepError(f"refusing to write a checkpoint at step {self.trainer.global_step}: the "
                                     f"{bad or 'weights or optimizer state on another rank'} hold(s) NaN or Inf. "
                                     f"{self._resume_hint()}")
        optimizers = self.trainer.optimizers
        checkpoint[META_KEY] = checkpoint_metadata(self.net, optimizers[0] if optimizers else None,
                                                   self.skipped_steps)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get(META_KEY, {}).get("skipped_steps", 0))
        if self._trainer is not None:  # not load_from_checkpoint, which builds from the checkpoint's hyperparameters
            self._resume.on_load_checkpoint(self, checkpoint)

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


class SpectralModule(ManualOptimizationModule):
    """Image classification with one ``optimizer.step()`` per batch (manual optimization).

    The loss is the cross-entropy of the ``num_classes`` logits; logged: ``train/loss`` and
    ``train/acc`` (the epoch's accuracy over the steps taken), ``val/loss``, ``val/acc``, likewise
    ``test/...``; ``predict`` gives the argmax class. Parameter groups, routing table, scheduler,
    ``lr/<group>`` logging, the non-finite policy and the resume checks are those of
    :class:`ManualOptimizationModule`; resuming with another class count is refused as well.

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
        head: module-name globs of the output head (``["fc"]``); ``None``: the net's last
            ``nn.Linear`` (and any Linear tied to an embedding); ``[]``: no head.
        head_as_matrix: give the head the matrix rule (a constrained optimizer then constrains
            the classifier too, which keeps its logits small: see the README's measurements).
        embeddings_as_matrices: give embedding tables the matrix rule.
        nonfinite: what a NaN/Inf loss or gradient does: ``"raise"`` stops with
            :class:`NonFiniteStepError` (naming the step, the first non-finite gradient and the
            checkpoint to resume from); ``"skip"`` drops the step (weights, optimizer state and
            schedule untouched), counts it in ``train/skipped_steps`` and stops after
            ``max_consecutive_skips`` skipped steps in a row.
        max_consecutive_skips: with ``nonfinite="skip"``, skipped steps in a row that stop the run.

    Attributes:
        skipped_steps: steps skipped by ``nonfinite="skip"`` so far (kept in checkpoints).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = CosineSchedule,
        exclude: list[str] | None = None,
        vector_weight_decay: float | None = 0.0,
        head: list[str] | None = None,
        head_as_matrix: bool = False,
        embeddings_as_matrices: bool = False,
        nonfinite: str = "raise",
        max_consecutive_skips: int = 10,
    ) -> None:
        if num_classes is None:
            num_classes = getattr(net, "num_classes", None) or next(
                (m.out_features for m in reversed(list(net.modules())) if isinstance(m, nn.Linear)), None)
            if num_classes is None:
                raise ValueError("num_classes: pass it, or a net with a num_classes attribute or a final nn.Linear")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        # The hyperparameters saved are these arguments, num_classes as inferred above.
        super().__init__(net, optimizer, scheduler, exclude, vector_weight_decay, head, head_as_matrix,
                         embeddings_as_matrices, nonfinite, max_consecutive_skips)
        self.criterion = nn.CrossEntropyLoss()
        # The training accuracy skips torchmetrics' input checks (≈ 0.2 ms per step on a CPU).
        self.train_acc = MulticlassAccuracy(num_classes, average="micro", validate_args=False)
        self.val_acc, self.test_acc = (MulticlassAccuracy(num_classes, average="micro") for _ in range(2))

    def _training_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return self.criterion(logits, y), logits

    def _on_step_taken(self, batch: tuple[torch.Tensor, torch.Tensor], outputs: torch.Tensor) -> None:
        self.train_acc.update(outputs.detach(), batch[1])

    def _on_last_training_batch(self) -> None:
        # The epoch's accuracy, logged once at its last batch rather than as a Metric object
        # every step: each ``self.log`` costs about 1 ms of Lightning bookkeeping on a CPU
        # (a tenth of a small model's step).
        if self.train_acc.update_called:
            self.log("train/acc", self.train_acc.compute(), on_step=False, on_epoch=True)
        self.train_acc.reset()

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
