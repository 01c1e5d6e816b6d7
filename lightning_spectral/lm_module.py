"""The LightningModule of next-token prediction (a GPT on byte-level text), trained like the
image classifier: :class:`~lightning_spectral.module.ManualOptimizationModule`'s training step
(one ``optimizer.step()`` per batch, the same parameter groups, optimizer and scheduler arguments,
non-finite policy and resume checks) on the next-token loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from lightning_spectral.data.text import decode, encode
from lightning_spectral.module import CosineSchedule, ManualOptimizationModule


class LanguageModule(ManualOptimizationModule):
    """Next-token prediction with one ``optimizer.step()`` per batch (manual optimization).

    Batches are ``(x, y)`` token ids ``(B, T)`` with ``y`` the next tokens of ``x``; the loss is
    the mean cross-entropy over all ``B·T`` positions. Parameter groups, optimizer, scheduler,
    routing table, non-finite policy and resume checks as
    :class:`~lightning_spectral.module.ManualOptimizationModule`:
    :func:`~lightning_spectral.optim.param_groups.build_param_groups` gives the token and
    position embeddings and the output head (tied or not) the fallback rule unless
    ``embeddings_as_matrices``/``head_as_matrix`` opt them in.

    Logged: ``train/loss`` (steps taken); ``train/tokens_per_s`` and ``train/samples_per_s`` (of all processes over
    the wall time of the training loop since the previous logged step, data loading and
    callbacks included) and ``lr/<group>``, on the steps the loggers write;
    ``train/skipped_steps`` with ``nonfinite="skip"``; ``val/loss`` and ``val/bpb`` (bits per
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
        nonfinite: what a NaN/Inf loss or gradient does: ``"raise"`` stops with
            :class:`~lightning_spectral.module.NonFiniteStepError`; ``"skip"`` drops the step,
            counts it in ``train/skipped_steps`` and stops after ``max_consecutive_skips`` in a row.
        max_consecutive_skips: with ``nonfinite="skip"``, skipped steps in a row that stop the run.
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
        nonfinite: str = "raise",
        max_consecutive_skips: int = 10,
    ) -> None:
        if not prompt:
            raise ValueError("prompt must be a non-empty string (the model needs a first token)")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if not callable(getattr(net, "generate", None)):
            raise TypeError(f"net must have a generate(idx, max_new_tokens, ...) method; {type(net).__name__} has none")
        # The hyperparameters saved are these arguments (no ``head``: build_param_groups finds
        # the output head, the last nn.Linear, by itself).
        super().__init__(net, optimizer, scheduler, exclude, vector_weight_decay, None, head_as_matrix,
                         embeddings_as_matrices, nonfinite, max_consecutive_skips)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_k = top_k
        self.sample_seed = sample_seed

    def loss_for_batch(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy of ``batch`` (nats per token); no side effects."""
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    def _training_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, None]:
        return self.loss_for_batch(batch), None

    def _throughput_counts(self, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, int]:
        return {"samples": len(batch[1]), "tokens": batch[1].numel()}

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
            if self.device_mesh is not None:
                from torch.distributed.fsdp import FSDPModule

                if isinstance(self.net, FSDPModule):
                    # FSDP2 keeps the root's weights gathered after a forward without backward:
                    # back to shards, as training and checkpoints expect them.
                    self.net.reshard()

    def on_fit_end(self) -> None:
        if not self.max_new_tokens:
            return
        # A network sharded by configure_model runs forward collectively: every rank samples
        # (the same text, from the same seed); otherwise rank 0 alone.
        if self.trainer.is_global_zero or self.device_mesh is not None:
            text = self.sample()
            self.print(f"\n----- sample: {self.max_new_tokens} bytes after {self.prompt!r} -----\n{text}\n-----")

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> list[str]:
        """Continue each prompt of ``batch`` (``(B, L)`` token ids) by ``max_new_tokens`` bytes."""
        out = self._generate(batch, self.max_new_tokens, self.sample_seed + batch_idx)
        texts = [decode(row) for row in out]
        for text in texts:
            self.print(text)
        return texts
