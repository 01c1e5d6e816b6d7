"""The matrix work of one optimizer step, split across the ranks of ``torch.distributed``.

:class:`~lightning_spectral.optim.base.MatrixOptimizer` calls :func:`step_matrices` for the matrix
groups of a step (it runs the optimizer's ``_matrix_step`` where each matrix's update is
computed), :func:`whole_state` around its ``state_dict`` and :func:`owner_values` for its reports.

DDP (plain parameters, the same all-reduced gradients on every rank), after Jordan's
distributed Muon (github.com/KellerJordan/Muon): every matrix of the matrix groups has one
owner rank (:func:`deal`, from the shapes on every rank, no communication; same-shaped
matrices spread evenly); only the
owner runs the matrix rule on it and keeps its optimizer state, and one all-gather per dtype and
device (a flat buffer of each rank's new weights, padded to the largest rank's share) gives
every rank every new weight, bit for bit the owner's. No optimizer state crosses the network
during a step. The state of a matrix lives on its owner only (``1/world`` of it per rank);
:func:`whole_state` gathers it where a checkpoint needs all of it, and a change of the layout
(``distribute_work`` switched, a group added) moves it first. Set
``optimizer.distribute_work = False`` to repeat the work on every rank instead.

Parameters sharded as ``DTensor`` (FSDP2, Lightning's ``ModelParallelStrategy``) take their
matrix step on the gathered full matrix and keep their shard of the result (:mod:`.sharded`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from .linalg import msign_cost
from .param_groups import MATRIX_KEY
from .sharded import full_matrix, is_sharded

__all__ = ["deal", "owner_values", "step_matrices", "whole_state"]

Matrices = list[tuple[dict[str, Any], list[torch.Tensor]]]


def step_matrices(optimizer: Any, matrices: Matrices) -> None:
    """Run ``optimizer._matrix_step(group, params)`` for every ``(group, params)`` of ``matrices``
    (the params with a gradient of each matrix group): each plain matrix on its owner, whose new
    weights then reach every rank; every sharded matrix on its gathered full matrix."""
    owners = _owners(optimizer)
    me = dist.get_rank() if owners is not None else 0
    for group, params in matrices:
        for p in [p for p in params if is_sharded(p)]:
            with full_matrix(optimizer.state, p) as full:
                optimizer._matrix_step(group, [full])
        params = [p for p in params if not is_sharded(p) and (owners is None or owners[p] == me)]
        if params:
            optimizer._matrix_step(group, params)
    if owners is not None:
        _share_weights([p for _, params in matrices for p in params if not is_sharded(p)], owners)


def deal(keys: list[tuple], world: int) -> list[int]:
    """The owner rank of each matrix, from its ``(shape, dtype, device)`` key. Keys in decreasing
    msign cost (``m·n·min(m, n)``): each rank takes ``⌊count/world⌋`` of a key's matrices, and the
    remaining ones go one each to the least loaded ranks (longest-processing-time on the
    remainders), so the ranks' msign work stays within one matrix of each shape."""
    by_key: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        by_key.setdefault(key, []).append(i)
    owners = [0] * len(keys)
    load = [0] * world
    for key in sorted(by_key, key=lambda k: -msign_cost(torch.Size(k[0]))):
        members, cost = by_key[key], msign_cost(torch.Size(key[0]))
        full = len(members) - len(members) % world
        ranks = list(range(world)) * (full // world) + sorted(range(world), key=lambda r: (load[r], r))[:len(members) - full]
        for i, rank in zip(members, ranks):
            owners[i] = rank
            load[rank] += cost
    return owners


def _split_world(optimizer: Any) -> int:
    if not (optimizer.distribute_work and dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def _plain_matrices(optimizer: Any) -> list[torch.Tensor]:
    """Every plain (not sharded) parameter of the matrix groups, gradient or not: the owners stay
    the same from step to step while a gradient comes and goes."""
    return [p for g in optimizer.param_groups if g[MATRIX_KEY] for p in g["params"] if not is_sharded(p)]


def _owners(optimizer: Any) -> Optional[dict[torch.Tensor, int]]:
    """Owner rank of every plain matrix, or ``None`` when the work is not split. The layout the
    state follows is kept in ``optimizer._work_split`` (plain values: the world size and the
    matrices' keys, and the owners; ``None``: every rank holds every state). When it changes,
    the state is first gathered from the old owners; then each rank keeps only its own."""
    plain = _plain_matrices(optimizer)
    world = _split_world(optimizer)
    key = (world, tuple(_key(p) for p in plain)) if world > 1 and plain else None
    split = getattr(optimizer, "_work_split", None)
    if split is not None and split[0] == key:
        return dict(zip(plain, split[1]))
    if split is not None:  # a new layout: the old owners' state to every rank first
        _gather_state(optimizer.state, plain, split[1])
    optimizer._work_split = None
    if key is None:
        return None
    owners = deal(list(key[1]), world)
    me = dist.get_rank()
    for p, owner in zip(plain, owners):
        if owner != me:
            optimizer.state.pop(p, None)
    optimizer._work_split = (key, tuple(owners))
    return dict(zip(plain, owners))


def _key(p: torch.Tensor) -> tuple:
    return tuple(p.shape), str(p.dtype), str(p.device)


@torch.no_grad()
def _share_weights(params: list[torch.Tensor], owners: dict[torch.Tensor, int]) -> None:
    """Every owner's new weights to every rank: per dtype and device one ``all_gather_into_tensor``
    of a flat buffer (each rank's matrices in order, padded to the largest rank's share)."""
    me, world = dist.get_rank(), dist.get_world_size()
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        by_kind.setdefault((p.dtype, p.device), []).append(p)
    for (dtype, device), kind in by_kind.items():
        shares = [[p for p in kind if owners[p] == rank] for rank in range(world)]
        sizes = [sum(p.numel() for p in share) for share in shares]
        slot = max(sizes)
        if slot == 0:
            continue
        mine = torch.cat([p.reshape(-1) for p in shares[me]] + [torch.zeros(slot - sizes[me], dtype=dtype, device=device)])
        out = torch.empty(world * slot, dtype=dtype, device=device)
        dist.all_gather_into_tensor(out, mine)
        for rank, share in enumerate(shares):
            offset = rank * slot
            for p in share:
                if rank != me:
                    p.copy_(out[offset:offset + p.numel()].view_as(p))
                offset += p.numel()


@contextlib.contextmanager
def whole_state(optimizer: Any) -> Iterator[None]:
    """Inside the block every rank's ``optimizer.state`` holds every matrix's state (gathered from
    the owners: collective, every rank must enter it); on leaving, each rank keeps its own again.
    Where the work is not split the state is whole already and nothing is sent."""
    split = getattr(optimizer, "_work_split", None)
    if split is None:
        yield
        return
    plain = _plain_matrices(optimizer)
    received = _gather_state(optimizer.state, plain, split[1])
    try:
        yield
    finally:
        for p in received:
            optimizer.state.pop(p, None)


def owner_values(optimizer: Any, params: list[torch.Tensor], keys: tuple[str, ...]) -> list[dict[str, float]]:
    """The plain number state ``keys`` of each of ``params``, as its owner holds them: one
    all-reduce where the work is split (every rank must call it), the local state otherwise."""
    split = getattr(optimizer, "_work_split", None)
    local = [{k: float(optimizer.state[p][k]) for k in keys if k in optimizer.state.get(p, {})} for p in params]
    if split is None or not params:
        return local
    owners = dict(zip(_plain_matrices(optimizer), split[1]))
    me = dist.get_rank()
    table = torch.zeros(len(params), len(keys), 2, dtype=torch.float64, device=params[0].device)
    for i, (p, values) in enumerate(zip(params, local)):
        if owners.get(p) == me:
            for j, k in enumerate(keys):
                if k in values:
                    table[i, j] = torch.tensor([values[k], 1.0], dtype=torch.float64)
    dist.all_reduce(table)
    table = table.cpu()
    return [{k: float(table[i, j, 0]) for j, k in enumerate(keys) if table[i, j, 1] > 0} if p in owners else values
            for i, (p, values) in enumerate(zip(params, local))]


def _gather_state(states: dict, params: list[torch.Tensor], owners: Iterable[int]) -> list[torch.Tensor]:
    """Each matrix's state from its owner to every rank (``params[i]`` owned by ``owners[i]``):
    per owner the layout (keys, shapes, dtypes, plain values) as a small object, then the tensors,
    one flat broadcast per dtype. Returns the params whose state this rank received."""
    me = dist.get_rank()
    owned = list(zip(params, owners))
    received = []
    for owner in range(dist.get_world_size()):
        mine = [p for p, o in owned if o == owner]
        box = [[_state_layout(states.get(p, {})) for p in mine] if me == owner else None]
        dist.broadcast_object_list(box, src=owner)
        tensors = []
        for p, entries in zip(mine, box[0]):
            if me != owner:
                if not entries:
                    continue
                received.append(p)
                states[p] = {}
            state = states[p]
            for key, spec in entries.items():
                if spec[0] == "value":
                    state[key] = spec[1]
                    continue
                if me != owner:
                    state[key] = torch.empty(spec[1], dtype=spec[2], device=torch.device(spec[3]))
                tensors.append(state[key])
        _broadcast_tensors(tensors, owner, mine[0].device if mine else None)
    return received


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
