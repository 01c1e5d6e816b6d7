"""Helpers shared by the diagnostics: isolation from training, flat parameter vectors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

#: ``loss_fn(model, x, y) -> scalar mean loss``: the loss convention of every diagnostic.
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


@contextmanager
def isolated(module: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run extra forwards on ``module`` without changing training.

    Forks the RNG (CPU and the module's CUDA devices), enables grad, disables autocast
    (diagnostics run in fp32), runs ``scaled_dot_product_attention`` on its math backend (the
    fused flash and memory-efficient kernels have no second derivative, which Hessian-vector
    products take) and either puts the module in eval mode (default: BatchNorm running
    statistics and dropout untouched; the measured loss is the eval-mode loss) or keeps train
    mode and restores every buffer afterwards. Train/eval flags are restored.
    """
    modes = [(m, m.training) for m in module.modules()]
    snapshot = None if eval_mode else [(b, b.detach().clone()) for b in module.buffers()]
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    device_type = next((p.device.type for p in module.parameters()), "cpu")
    try:
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(
            device_type=device_type, enabled=False
        ), sdpa_kernel(SDPBackend.MATH):
            if eval_mode:
                module.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        if snapshot is not None:
            with torch.no_grad():
                for buffer, saved in snapshot:
                    buffer.copy_(saved)


def trainable_parameters(module: nn.Module) -> list[Tensor]:
    """Parameters with ``requires_grad``, in ``module.parameters()`` order."""
    return [p for p in module.parameters() if p.requires_grad]


def flat_grad(loss: Tensor, params: Sequence[Tensor], create_graph: bool = False) -> Tensor:
    """``∇_θ loss`` as one flat vector, by ``torch.autograd.grad`` (``.grad`` is untouched)."""
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, materialize_grads=True)
    return torch.cat([g.reshape(-1) for g in grads])


def xy_batch(batch: Any) -> tuple[Any, Any]:
    """Split an ``(x, y)`` batch; raise a clear error for any other structure."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"expected an (x, y) batch for a loss_fn(model, x, y), got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
    )
