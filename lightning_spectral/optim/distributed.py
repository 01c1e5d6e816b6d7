"""The matrix work of one optimizer step, split across the ranks of ``torch.distributed``.

:func:`step_matrices` is the one entry point :class:`~lightning_spectral.optim.base.MatrixOptimizer`
calls: it takes the matrix groups of a step and runs the optimizer's ``_matrix_step`` where each
matrix's update is computed.

- Under DDP (every rank holds the same all-reduced gradients) each matrix has one owner rank
  (greedy by its msign cost, ``m·n·min(m, n)``), only the owner runs the matrix rule on it, and
  the owners then broadcast the new weights and the matrix's whole optimizer state. Every rank
  ends the step with bit-identical weights and state while the msign/inner-solve time falls with
  the number of ranks. Set ``optimizer.distribute_work = False`` to repeat the work on every rank.
- Parameters sharded as ``DTensor`` (FSDP2, Lightning's ``ModelParallelStrategy``) take their
  matrix step on the gathered full matrix and keep their shard of the result (:mod:`.sharded`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .linalg import msign_cost
from .sharded import full_matrix, is_sharded

__all__ = ["step_matrices"]


def step_matrices(optimizer: Any, matrices: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> None:
    """Run ``optimizer._matrix_step(group, params)`` for every ``(group, params)`` of ``matrices``
    (the params with a gradient of each matrix group), each matrix's update computed by its owner
    and sent to the other ranks, or on every rank where the work is not split."""
    owners = _owners(optimizer, matrices)
    for group, params in matrices:
        for p in [p for p in params if is_sharded(p)]:
            with full_matrix(optimizer.state, p) as full:
                optimizer._matrix_step(group, [full])
        params = [p for p in params if not is_sharded(p)]
        if owners is not None:
            params = [p for p in params if owners[p] == dist.get_rank()]
        if params:
            optimizer._matrix_step(group, params)
    if owners is not None:
        _broadcast_owned(optimizer.state, owners)


def _owners(optimizer: Any, matrices: list[tuple[dict[str, Any], list[torch.Tensor]]]) -> Optional[dict[torch.Tensor, int]]:
    """Owner rank of every matrix with a gradient, or ``None`` when the work is not split.
    Greedy longest-processing-time assignment on ``m·n·min(m, n)``: the same on every rank
    (it depends on the shapes and the parameter order only)."""
    if not (optimizer.distribute_work and dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world == 1:
        return None
    plain = [p for _, params in matrices for p in params if not is_sharded(p)]
    if not plain:
        return None
    load = [0] * world
    owners: dict[torch.Tensor, int] = {}
    for index in sorted(range(len(plain)), key=lambda i: -msign_cost(plain[i])):
        rank = min(range(world), key=load.__getitem__)
        owners[plain[index]] = rank
        load[rank] += msign_cost(plain[index])
    return owners


def _broadcast_owned(states: dict, owners: dict[torch.Tensor, int]) -> None:
    """From each owner: its matrices and their state. The layout (state keys, shapes, plain
    values) goes first as a small object, so ranks that never held a state can allocate it."""
    me = dist.get_rank()
    for owner in range(dist.get_world_size()):
        params = [p for p in owners if owners[p] == owner]
        layout = [_state_layout(states[p]) for p in params] if me == owner else None
        box = [layout]
        dist.broadcast_object_list(box, src=owner)
        tensors = []
        for p, entries in zip(params, box[0]):
            state = states[p]
            tensors.append(p.data)
            for key, spec in entries.items():
                if spec[0] == "value":
                    state[key] = spec[1]
                    continue
                if me != owner:
                    state[key] = torch.empty(spec[1], dtype=spec[2], device=torch.device(spec[3]))
                tensors.append(state[key])
        _broadcast_tensors(tensors, owner, params[0].device if params else None)


def _state_layout(state: dict) -> dict[str, tuple]:
    return {key: ("tensor", tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else ("value", v)
            for key, v in state.items()}


def _broadcast_tensors(tensors: list[torch.Tensor], src: int, device: Optional[torch.device]) -> None:
    """Broadcast in place, one flat buffer per dtype, staged on ``device`` (the parameters'
    device: NCCL cannot send CPU tensors such as scalar step counters)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        flat = torch.cat([t.reshape(-1).to(device) for t in group])
        dist.broadcast(flat, src=src)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
