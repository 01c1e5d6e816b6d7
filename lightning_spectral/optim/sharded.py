"""Matrix steps on parameters sharded as ``DTensor`` (FSDP2 ``fully_shard``, Lightning's
``ModelParallelStrategy``) taken on the gathered full matrix.

msign, the retractions and the spectral constraints are functions of the whole matrix, not of
its rows or columns. Where the optimizer's rule comes in three parts and the parameter is
sharded on one dimension of a 1-D mesh, :mod:`.distributed` steps each matrix once, on its
owner, from an all-to-all of the shards. Elsewhere (a rule that overrides ``_matrix_step``, a
2-D mesh, ``distribute_work = False``, and the projection onto a constraint set when an
optimizer is built) the step runs here, one matrix at a time: every rank of its mesh gathers the
full gradient, weight and optimizer state (``DTensor.full_tensor``, an all-gather), runs the
optimizer's own matrix rule on these plain tensors, and keeps only its shard of the results
(local slicing by the placements, no communication): the same update on every rank, repeated.

State shaped like the parameter (momentum, Adam moments) stays sharded, a ``DTensor`` with the
parameter's placements (``1/world`` of DDP's); other state tensors and plain values are kept
whole on every rank; the transient buffers are the full weight, gradient and state of one
matrix at a time. Elementwise rules (the AdamW/SGD fallback) run on the shards directly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["full_matrix", "is_sharded", "whole"]

if dist.is_available():
    from torch.distributed.tensor import DTensor, distribute_tensor
else:  # a torch built without distributed support has no DTensor
    DTensor = ()


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter of FSDP2 / tensor parallelism)."""
    return isinstance(t, DTensor)


def _full(value: Any) -> Any:
    return value.full_tensor() if is_sharded(value) else value


@contextlib.contextmanager
@torch.no_grad()
def full_matrix(state: dict, p: torch.Tensor) -> Iterator[torch.Tensor]:
    """Stand a plain full tensor in for the ``DTensor`` parameter ``p``: inside the block it holds
    ``p``'s full values, ``.grad`` the full gradient (if ``p`` has one) and ``state[full]`` the
    optimizer state of ``p`` with every ``DTensor`` gathered. On leaving, ``p``'s local shard
    takes the full tensor's new values, and the state returns to ``p``: tensors shaped like
    ``p`` as ``DTensor`` with ``p``'s placements, other values as they are. Collective: every
    rank of ``p``'s mesh must enter it for the same parameters in the same order."""
    mesh, placements = p.device_mesh, p.placements
    full = p.full_tensor()
    if p.grad is not None:
        full.grad = p.grad.full_tensor()
    state[full] = {key: _full(value) for key, value in state.pop(p, {}).items()}
    try:
        yield full
    finally:
        new = state.pop(full)
        p.to_local().copy_(_shard(full, mesh, placements))
        if new:  # no empty entry: torch's distributed checkpoint reads a non-empty ``state`` as initialised
            state[p] = {key: (distribute_tensor(value, mesh, placements, src_data_rank=None)
                              if isinstance(value, torch.Tensor) and value.shape == full.shape else value)
                        for key, value in new.items()}


def whole(state: dict, p: torch.Tensor) -> contextlib.AbstractContextManager[torch.Tensor]:
    """:func:`full_matrix` for a ``DTensor`` ``p``; ``p`` itself otherwise."""
    return full_matrix(state, p) if is_sharded(p) else contextlib.nullcontext(p)


def _shard(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """This rank's local shard of ``full`` (no communication: every rank holds ``full``)."""
    return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
