"""Helpers shared by the diagnostics: isolation from training, flat parameter vectors, sharded (DTensor) vectors."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_spectral.optim.sharded import is_sharded

#: ``loss_fn(model, x, y) -> scalar mean loss``: the loss convention of every diagnostic.
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
#: ``reduce(t)``: a rank's contribution to an inner product summed over the ranks holding the shards.
Reduce = Callable[[Tensor], Tensor]


def no_reduce(t: Tensor) -> Tensor:
    """The :data:`Reduce` of unsharded parameters: every rank holds the whole vector."""
    return t


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


def local(t: Tensor) -> Tensor:
    """This rank's shard of a ``DTensor`` (``to_local()``, sharing its storage), else ``t`` itself."""
    return t.to_local() if is_sharded(t) else t


def shard_reduce(params: Sequence[Tensor]) -> Reduce | None:
    r"""``None`` when no parameter is sharded; else the sum over the ranks of the parameters' mesh
    (``all_reduce``), which turns each rank's share :math:`\sum_i a_i b_i` over its local shards
    into the inner product of the whole vectors. Raises unless every parameter is a ``DTensor``
    sharded (``Shard`` placements) over one 1-D mesh, FSDP2's layout: a plain parameter beside
    shards, or one replicated over a mesh dimension (HSDP, tensor parallelism), would be counted
    on several ranks."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    meshes = {p.device_mesh for p in sharded}
    problems = []
    if len(sharded) != len(params):
        problems.append(f"{len(params) - len(sharded)} plain parameter(s) beside DTensor shards")
    if len(meshes) != 1 or next(iter(meshes)).ndim != 1:
        problems.append("parameters on several meshes or on a mesh of more than one dimension (HSDP)")
    if any(not placement.is_shard() for p in sharded for placement in p.placements):
        problems.append("a parameter replicated (not sharded) over its mesh")
    if problems:
        raise ValueError(
            "sharded Hessian-vector products and gradient norms need every trainable parameter sharded "
            f"by FSDP2 (fully_shard) over one 1-D device mesh; found {'; '.join(problems)}. Shard the "
            "whole network with fully_shard over one data-parallel mesh, or measure it unsharded."
        )
    group = next(iter(meshes)).get_group()

    def reduce(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    return reduce


def random_vector(params: Sequence[Tensor], generator: torch.Generator) -> Tensor:
    """A standard normal vector over ``params`` (flat, local shards of ``DTensor`` parameters): one
    draw of the whole vector from ``generator``, so every sharding of the same parameters holds
    pieces of the same vector."""
    full = torch.randn(sum(p.numel() for p in params), generator=generator)
    pieces, start = [], 0
    for p in params:
        piece = full[start : start + p.numel()].view(p.shape)
        start += p.numel()
        if is_sharded(p):
            from torch.distributed.tensor import distribute_tensor

            piece = distribute_tensor(piece.to(p.device), p.device_mesh, p.placements, src_data_rank=None).to_local()
        pieces.append(piece.reshape(-1))
    return torch.cat(pieces) if pieces else full


@contextmanager
def kept_grads(params: Sequence[Tensor]) -> Iterator[None]:
    """Put back every parameter's ``.grad`` (the tensor object itself) afterwards: for measurements
    that must call ``backward`` (FSDP2 reduces gradients only in backward hooks, into ``.grad``)."""
    saved = [p.grad for p in params]
    try:
        yield
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


def backward_gradient(loss: Callable[[], Tensor], params: Sequence[Tensor]) -> Tensor:
    """``∇ loss()`` w.r.t. ``params`` as one flat vector of local shards, by ``loss().backward()``
    with every ``.grad`` cleared first (wrap in :func:`kept_grads`). Under FSDP2 this is the
    gradient of the mean of the ranks' losses: its reduce-scatter averages the ranks' gradients."""
    for p in params:
        p.grad = None
    loss().backward()
    return torch.cat([
        local(p.grad).reshape(-1) if p.grad is not None else local(p.detach()).new_zeros(local(p).numel())
        for p in params
    ])
