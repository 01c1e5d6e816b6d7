r"""``GradientNoiseScaleMonitor``: :math:`B_{simple}=\mathrm{tr}\,\Sigma/\|G\|^2` with smoothed unbiased estimators."""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from lightning_spectral.callbacks._base import (
    DiagnosticCallback,
    batch_loss,
    check_choice,
    check_loss_protocol,
    check_positive_int,
    has_sharded_parameters,
    log_step,
)
from lightning_spectral.diagnostics._utils import LossFn, isolated, shard_reduce, trainable_parameters
from lightning_spectral.diagnostics.noise_scale import GradientNoiseScale, ShardedGradientNorms, grad_sq_norms


class _NormRecorder:
    """State of the DDP comm hook: squared norms of local and averaged gradient buckets, summed over buckets."""

    def __init__(self, process_group: Any, world_size: int) -> None:
        self.process_group = process_group
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.local_sq: Tensor | float = 0.0
        self.global_sq: Tensor | float = 0.0
        self.passes = 0  # completed backward passes that reached the hook


def _recording_allreduce(state: _NormRecorder, bucket):  # no annotations: DDP checks them against real classes
    """DDP's default all-reduce (divide by world size, then SUM; no ``ReduceOp.AVG``, which gloo lacks),
    recording ‖local bucket‖² before and ‖averaged bucket‖² after, for a ``dist.GradBucket``. No ``.item()`` sync."""
    buffer = bucket.buffer()
    state.local_sq = state.local_sq + buffer.detach().float().pow(2).sum()
    if bucket.is_last():
        state.passes += 1
    buffer.div_(state.world_size)
    future = dist.all_reduce(buffer, group=state.process_group, async_op=True).get_future()

    def record(fut: torch.futures.Future[list[Tensor]]) -> Tensor:
        reduced = fut.value()[0]
        state.global_sq = state.global_sq + reduced.detach().float().pow(2).sum()
        return reduced

    return future.then(record)


def split_batch(batch: Any, num_chunks: int) -> list[Any]:
    """``num_chunks`` equal slices along dim 0 of every tensor in ``batch`` (the remainder is dropped)."""
    size = extract_batch_size(batch) // num_chunks
    if size == 0:
        return []
    return [apply_to_collection(batch, Tensor, lambda t, i=i: t[i * size : (i + 1) * size]) for i in range(num_chunks)]

class GradientNoiseScaleMonitor(DiagnosticCallback):
    r"""Log the simple gradient noise scale :math:`B_{simple}` (McCandlish et al. 2018) and its parts.

    Three paths, chosen by ``mode`` (``"auto"``: ``"fsdp"`` when the parameters are FSDP2 shards,
    ``"ddp"`` when the strategy wraps the model in ``DistributedDataParallel``, else ``"split"``):

    * ``"ddp"``: a DDP communication hook (registered in ``on_fit_start``) records each rank's
      local gradient, the small batch (:math:`b` = per-rank examples per optimizer step), and
      the all-reduced one, the big batch (:math:`B = b\cdot` world size). No extra forward or
      backward; the estimators are updated at every optimizer step and logged on schedule. DDP
      accepts one comm hook only, so this clashes with ``DDPStrategy(ddp_comm_hook=...)``; steps
      with several backward passes or unequal per-rank batches are skipped; under 16-bit AMP the
      loss scale is divided out.
    * ``"split"``: on schedule, rank 0 splits the current batch into ``num_chunks`` slices and
      takes per-slice gradients with ``torch.autograd.grad`` (one extra forward+backward over
      the batch; ``.grad``, RNG and BatchNorm statistics untouched; eval mode by default).

    * ``"fsdp"`` (FSDP2 ``fully_shard``, Lightning's ``ModelParallelStrategy``): the same two batch
      sizes as ``"ddp"``, each rank's local gradient measured inside FSDP2's reduce-scatter
      (:class:`~lightning_spectral.diagnostics.noise_scale.ShardedGradientNorms`, installed with
      ``set_custom_reduce_scatter`` in ``on_fit_start``; refused beside another custom
      reduce-scatter); no extra forward or backward; the same skips and loss-scale handling.

    Keys: ``gns/b_simple``, ``gns/grad_sq`` and ``gns/trace`` (the smoothed :math:`\|G\|^2` and
    :math:`\mathrm{tr}\,\Sigma`; ``b_simple`` is their ratio), ``gns/count`` (measurements so far),
    ``gns/negative``: 1 when the ratio is negative or undefined (the smoothed :math:`\|G\|^2` or
    :math:`\mathrm{tr}\,\Sigma` estimate is not positive: the gradient signal is not measurable
    from these batch sizes yet); ``b_simple`` is then clipped to 0. No NaN is logged.

    Args:
        every_n_steps: log (and in ``"split"`` mode measure) every N optimizer steps (default 50), or
        every_n_epochs: at the end of every N-th epoch (``"split"``: on its last batch).
        ema_decay: decay of the moving averages, per measurement.
        num_chunks: slices per batch in ``"split"`` mode (at least 2).
        mode: ``"auto"``, ``"ddp"``, ``"fsdp"`` or ``"split"``.
        loss_fn, eval_mode: as for :class:`~lightning_spectral.callbacks.SharpnessMonitor` (``"split"`` only;
            the loss is found as :func:`~lightning_spectral.callbacks._base.batch_loss` says).
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_n_epochs: int | None = None,
        ema_decay: float = 0.95,
        num_chunks: int = 4,
        mode: Literal["auto", "ddp", "fsdp", "split"] = "auto",
        loss_fn: LossFn | None = None,
        eval_mode: bool = True,
    ) -> None:
        super().__init__(every_n_steps, every_n_epochs)
        check_positive_int("num_chunks", num_chunks)
        if num_chunks < 2:
            raise ValueError(f"num_chunks must be at least 2, got {num_chunks}")
        check_choice("mode", mode, ("auto", "ddp", "fsdp", "split"))
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.estimator = GradientNoiseScale(ema_decay)
        self.num_chunks = num_chunks
        self.mode = mode
        self.loss_fn = loss_fn
        self.eval_mode = eval_mode
        self._recorder: _NormRecorder | None = None
        self._sharded: ShardedGradientNorms | None = None
        self._examples = 0
        self._passes = 0  # backward passes since the last optimizer step ("fsdp")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.mode == "split":
            check_loss_protocol(type(self).__name__, pl_module, self.loss_fn)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        model = trainer.strategy.model
        if has_sharded_parameters(pl_module):  # on every rank: each sees the same parameters
            self._attach_sharded(trainer, pl_module)
            return
        if self.mode == "fsdp":
            raise MisconfigurationException(
                "GradientNoiseScaleMonitor(mode='fsdp') needs FSDP2-sharded (DTensor) parameters; "
                f"{type(trainer.strategy).__name__} gives plain ones. Use mode='auto'."
            )
        if not isinstance(model, DistributedDataParallel):
            if self.mode == "ddp":
                raise MisconfigurationException(
                    f"GradientNoiseScaleMonitor(mode='ddp') needs a DistributedDataParallel model; "
                    f"{type(trainer.strategy).__name__} gives {type(model).__name__}."
                )
            check_loss_protocol(type(self).__name__, pl_module, self.loss_fn)
            return
        if self.mode == "split":
            return
        self._recorder = _NormRecorder(model.process_group, trainer.world_size)
        model.register_comm_hook(self._recorder, _recording_allreduce)

    def _attach_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = type(self).__name__
        if self.mode in ("ddp", "split"):
            why = "there is no DDP comm hook" if self.mode == "ddp" else "its per-slice gradients run on rank 0 alone"
            raise MisconfigurationException(
                f"{name}(mode={self.mode!r}) cannot measure FSDP2-sharded parameters "
                f"({type(trainer.strategy).__name__}): {why}. Use mode='auto' or 'fsdp' (the local "
                "gradients, measured in FSDP2's reduce-scatter)."
            )
        params = trainable_parameters(pl_module)
        try:
            shard_reduce(params)
            self._sharded = ShardedGradientNorms()
            self._sharded.attach(pl_module)
        except ValueError as error:
            raise MisconfigurationException(f"{name}: {error}") from None
        if params and params[0].device_mesh.size() == 1:
            raise MisconfigurationException(
                f"{name}: the parameters are sharded over a data-parallel mesh of 1 rank, so there is no "
                "per-rank gradient to compare with an average (ModelParallelStrategy's default splits the "
                "devices into tensor-parallel ranks). Use ModelParallelStrategy(data_parallel_size=<devices>, "
                "tensor_parallel_size=1), or remove GradientNoiseScaleMonitor."
            )

    @property
    def needs_batch(self) -> bool:
        return self._recorder is None and self._sharded is None

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # hold the process group; also keeps the callback picklable for a next fit. A ShardedGradientNorms
        # stays installed (a plain SUM reduce-scatter); the next fit's attach replaces it.
        self._recorder = self._sharded = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.needs_batch:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        else:
            self._examples += extract_batch_size(batch)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._sharded is not None:  # the reduced gradient before any clipping
            self._passes += 1
            self._sharded.record_reduced([p.grad for p in trainable_parameters(pl_module) if p.grad is not None])

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if self._sharded is not None:
            self._sharded_step(trainer, pl_module)
            return
        recorder = self._recorder
        if recorder is None:
            return
        start = time.perf_counter()
        passes, examples, local_sq, global_sq = recorder.passes, self._examples, recorder.local_sq, recorder.global_sq
        recorder.reset()
        self._examples = 0
        if passes == 1 and examples > 0:  # identical on all ranks, so the collective below is safe
            stats = torch.tensor([float(local_sq), examples, examples**2], dtype=torch.float64, device=pl_module.device)
            local_sum, b_sum, b2_sum = trainer.strategy.reduce(stats, reduce_op="sum").tolist()
            world = trainer.world_size
            if b2_sum * world == b_sum**2:  # every rank saw the same number of examples
                scale_sq = _loss_scale(trainer) ** 2
                self.estimator.update(local_sum / world / scale_sq, float(global_sq) / scale_sq, b_sum / world, b_sum)
        self.elapsed_s += time.perf_counter() - start
        step = log_step(trainer)
        if self._step_due(step):
            self._run(trainer, pl_module, None, step)

    def _sharded_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fold in the local (b) and reduced (world·b) gradient norms FSDP2's reduce-scatter recorded."""
        start = time.perf_counter()
        recorder, passes, examples = self._sharded, self._passes, self._examples
        self._passes = self._examples = 0
        if passes == 1 and examples > 0 and recorder.calls:  # identical on all ranks: the collectives are safe
            small_sq, big_sq = recorder.norms()
            stats = torch.tensor([examples, examples**2], dtype=torch.float64, device=pl_module.device)
            b_sum, b2_sum = trainer.strategy.reduce(stats, reduce_op="sum").tolist()
            world = trainer.world_size
            if b2_sum * world == b_sum**2:  # every rank saw the same number of examples
                scale_sq = _loss_scale(trainer) ** 2
                b = b_sum / world
                self.estimator.update(small_sq / scale_sq, big_sq / scale_sq, b, b * recorder.group.size())
        recorder.reset()
        self.elapsed_s += time.perf_counter() - start
        step = log_step(trainer)
        if self._step_due(step):
            self._run(trainer, pl_module, None, step)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, step: int) -> dict[str, float]:
        if self.needs_batch:
            if not trainer.is_global_zero:
                return {}
            chunks = split_batch(batch, self.num_chunks)
            if not chunks:
                return {}
            with isolated(pl_module, self.eval_mode):
                small_sq, big_sq = grad_sq_norms(
                    lambda chunk: batch_loss(pl_module, chunk, self.loss_fn), trainable_parameters(pl_module), chunks
                )
            size = extract_batch_size(chunks[0])
            self.estimator.update(small_sq, big_sq, size, size * len(chunks))
        if not self.estimator.count:
            return {}
        b_simple = self.estimator.noise_scale  # NaN when the smoothed ‖G‖² is not positive
        negative = not b_simple >= 0.0
        return {
            "gns/b_simple": 0.0 if negative else b_simple,
            "gns/negative": float(negative),
            "gns/grad_sq": self.estimator.grad_sq,
            "gns/trace": self.estimator.trace,
            "gns/count": float(self.estimator.count),
        }

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "estimator": self.estimator.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.estimator.load_state_dict(state_dict["estimator"])


def _loss_scale(trainer: pl.Trainer) -> float:
    """The AMP loss scale gradients were computed with (1 without a GradScaler)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
