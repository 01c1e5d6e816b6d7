"""The LightningModule of next-token prediction (a GPT on byte-level text), trained like the
image classifier: manual optimization, one ``optimizer.step()`` per batch, the same parameter
groups and the same optimizer and scheduler arguments as :class:`~lightning_spectral.module.SpectralModule`."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from lightning_spectral.checkpoint import use_atomic_checkpoint_io
from lightning_spectral.data.text import decode, encode
from lightning_spectral.module import CosineSchedule, SpectralModule
from lightning_spectral.optim.param_groups import build_param_groups
from lightning_spectral.signals import SigtermNotice


class LanguageModule(LightningModule):
    """Next-token prediction with one ``optimizer.step()`` per batch (manual optimization).

    Batches are ``(x, y)`` token ids ``(B, T)`` with ``y`` the next tokens of ``x``; the loss is
    the mean cross-entropy over all ``B·T`` positions. Parameter groups, optimizer and scheduler
    as :class:`~lightning_spectral.module.SpectralModule` (its learning-rate logging is used as
    it is): :func:`~lightning_spectral.optim.param_groups.build_param_groups` gives the token and
    position embeddings and the output head (tied or not) the fallback rule unless
    ``embeddings_as_matrices``/``head_as_matrix`` opt them in.

    Logged: ``train/loss``; ``train/tokens_per_s`` (tokens of all processes over the wall time
    of the training loop since the previous logged step, data loading and callbacks included)
    and ``lr/<group>``, on the steps the loggers write; ``val/loss`` and ``val/bpb`` (bits per
    byte = loss / ln 2, tokens being bytes; an exact mean over all validation tokens), likewise
    ``test/...``.

    Sampling: :meth:`sample` continues a prompt; at the end of ``fit`` the module prints a
    sample of ``max_new_tokens`` bytes from ``prompt`` (``max_new_tokens=0``: none);
    ``predict`` samples a continuation of each prompt of the data module.

    Args:
        net: a language model mapping ``(B, T)`` token ids to ``(B, T, vocab)`` logits, with a
            ``generate(idx, max_new_tokens, temperature, top_k, generator)`` method
            (:class:`~lightning_spectral.models.GPT`).
        optimizer: builds the optimizer from the parameter groups.
        scheduler: builds the scheduler (stepped every batch); default :class:`CosineSchedule`
            over ``trainer.estimated_stepping_batches`` (give ``warmup_steps`` in the config).
        exclude: glob patterns of parameter names whose matrices take the fallback rule.
        embeddings_as_matrices, head_as_matrix: give the embedding tables / the output head the
            matrix rule (both, for a head tied to the token embedding).
        vector_weight_decay: weight decay of the ``vector`` group (biases, norm gains); ``None``
            keeps the optimizer's. The embedding and head groups keep the optimizer's.
        prompt: the text the end-of-fit sample continues.
        max_new_tokens: bytes sampled at the end of ``fit`` and by ``predict``.
        temperature, top_k: sampling (``temperature=0``: the most likely byte each time).
        sample_seed: seed of the sampling generator (the global RNG is left alone).
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = CosineSchedule,
        exclude: list[str] | None = None,
        embeddings_as_matrices: bool = False,
        head_as_matrix: bool = False,
        vector_weight_decay: float | None = 0.0,
        prompt: str = "\n",
        max_new_tokens: int = 300,
        temperature: float = 0.8,
        top_k: int | None = None,
        sample_seed: int = 0,
    ) -> None:
        super().__init__()
        if vector_weight_decay is not None and vector_weight_decay < 0:
            raise ValueError(f"vector_weight_decay must be >= 0 or None, got {vector_weight_decay}")
        if not prompt:
            raise ValueError("prompt must be a non-empty string (the model needs a first token)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not callable(getattr(net, "generate", None)):
            raise TypeError(f"net must have a generate(idx, max_new_tokens, ...) method; {type(net).__name__} has none")
        # As SpectralModule: under LightningCLI the hyperparameters are the parsed config;
        # built in Python, the objects are left out (checkpoints load with weights_only=True).
        objects = [] if _given_hyperparameters.get() is not None else ["net", "optimizer", "scheduler"]
        self.save_hyperparameters(ignore=objects)
        self.automatic_optimization = False
        self.net = net
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.exclude = exclude or []
        self.embeddings_as_matrices = embeddings_as_matrices
        self.head_as_matrix = head_as_matrix
        self.vector_weight_decay = vector_weight_decay
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.sample_seed = sample_seed
        self._clock: float | None = None
        self._tokens = 0

    _log_learning_rates = SpectralModule._log_learning_rates

    def setup(self, stage: str) -> None:
        # As SpectralModule: atomic checkpoint writes, installed before any checkpoint is read or written.
        use_atomic_checkpoint_io(self.trainer)

    def configure_callbacks(self) -> list:
        """:class:`~lightning_spectral.signals.SigtermNotice`: on SIGTERM, the checkpoint to resume from."""
        return [SigtermNotice()]

    def configure_optimizers(self) -> Optimizer | dict:
        # The parameter groups and schedule of SpectralModule.configure_optimizers.
        groups = build_param_groups(self.net, exclude=self.exclude, vector_weight_decay=self.vector_weight_decay,
                                    embeddings_as_matrices=self.embeddings_as_matrices,
                                    head_as_matrix=self.head_as_matrix)
        optimizer = self.optimizer(groups)
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        if isinstance(scheduler, ReduceLROnPlateau):
            raise TypeError("ReduceLROnPlateau needs a metric; LanguageModule steps its scheduler every batch")
        if isinstance(scheduler, CosineSchedule) and scheduler.total_steps is None:
            total = self.trainer.estimated_stepping_batches
            if math.isinf(total):
                raise ValueError("the cosine schedule needs trainer.max_epochs or trainer.max_steps (or total_steps)")
            if total <= 0:
                raise ValueError("no optimizer step would run: the training data gives no batch (windows_per_epoch "
                                 "below batch_size?) or trainer.limit_train_batches is 0")
            scheduler.set_total_steps(int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.net(idx)

    def loss_for_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy of ``batch`` (nats per token); no side effects."""
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def on_train_epoch_start(self) -> None:
        self._clock, self._tokens = None, 0  # the validation between epochs is not training time

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        optimizer = self.optimizers()
        self._log_learning_rates(optimizer, len(y))
        self._log_throughput(len(y))
        loss = self.loss_for_batch(batch)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self._tokens += y.numel()
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss.detach()

    def _log_throughput(self, batch_size: int) -> None:
        """``train/tokens_per_s`` over the steps since the last logged one (the same steps as
        ``lr/...``), counted for all processes."""
        trainer = self.trainer
        every = trainer.log_every_n_steps
        if not trainer.loggers or every == 0 or (trainer.global_step + 1) % every:
            return
        now = time.perf_counter()
        if self._clock is not None and self._tokens:
            rate = self._tokens * trainer.world_size / (now - self._clock)
            self.log("train/tokens_per_s", rate, on_step=True, on_epoch=False, batch_size=batch_size)
        self._clock, self._tokens = now, 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        loss = self.loss_for_batch(batch)
        tokens = batch[1].numel()  # weights of Lightning's epoch mean: an exact per-token mean
        self.log(f"{stage}/loss", loss, sync_dist=True, prog_bar=True, batch_size=tokens)
        self.log(f"{stage}/bpb", loss / math.log(2), sync_dist=True, prog_bar=True, batch_size=tokens)

    def sample(self, prompt: str | None = None, max_new_tokens: int | None = None, seed: int | None = None) -> str:
        """``prompt`` (default: the module's) followed by ``max_new_tokens`` sampled bytes, decoded
        as UTF-8; eval mode (no dropout) and a private generator seeded with ``seed``
        (default ``sample_seed``)."""
        prompt = self.prompt if prompt is None else prompt
        if not prompt:
            raise ValueError("prompt must be a non-empty string")
        idx = encode(prompt).to(self.device)[None]
        return decode(self._generate(idx, self.max_new_tokens if max_new_tokens is None else max_new_tokens,
                                     self.sample_seed if seed is None else seed)[0])

    def _generate(self, idx: torch.Tensor, max_new_tokens: int, seed: int) -> torch.Tensor:
        generator = torch.Generator(device=idx.device).manual_seed(seed)
        was_training = self.net.training
        self.net.eval()
        try:
            return self.net.generate(idx, max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                                     generator=generator)
        finally:
            self.net.train(was_training)

    def on_fit_end(self) -> None:
        if self.max_new_tokens and self.trainer.is_global_zero:
            self.print(f"\n----- sample: {self.max_new_tokens} bytes after {self.prompt!r} -----\n"
                       f"{self.sample()}\n-----")

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[str]:
        """Continue each prompt of ``batch`` (``(B, L)`` token ids) by ``max_new_tokens`` bytes."""
        out = self._generate(batch, self.max_new_tokens, self.sample_seed + batch_idx)
        texts = [decode(row) for row in out]
        for text in texts:
            self.print(text)
        return texts
