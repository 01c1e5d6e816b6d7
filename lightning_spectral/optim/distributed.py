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
``optimizer.distribute_work = False`` to repeat the work on every rank instead, or to a
:class:`~.split_cost.LatencyModel` (``"auto"``: one measured at the first step) to split only the
batches of same-shaped matrices whose split it says pays; every rank steps the others itself.

Parameters sharded as ``DTensor`` (FSDP2, Lightning's ``ModelParallelStrategy``): where the
optimizer's step comes in three parts (Muon: ``_momentum_update`` and ``_apply_direction``
elementwise, ``_direction`` of the whole matrix) and the parameter is sharded on one dimension of
a 1-D mesh, its direction is computed on one rank from an all-to-all of the shards
(:func:`_sharded_directions`); the other optimizers take their matrix step on the gathered full
matrix on every rank and keep their shard of the result (:mod:`.sharded`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from .linalg import as_matrix, msign_cost
from .param_groups import MATRIX_KEY
from .split_cost import LatencyModel
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
        sharded = [p for p in params if is_sharded(p)]
        split = {id(p) for p in sharded if _splits_shards(optimizer, p)}
        if split:
            _sharded_directions(optimizer, group, [p for p in sharded if id(p) in split])
        for p in [p for p in sharded if id(p) not in split]:
            with full_matrix(optimizer.state, p) as full:
                optimizer._matrix_step(group, [full])
        params = [p for p in params if not is_sharded(p) and (owners is None or owners[p] in (me, EVERY_RANK))]
        if params:
            optimizer._matrix_step(group, params)
    if owners is not None:
        _share_weights([p for _, params in matrices for p in params if not is_sharded(p)], owners)


def _splits_shards(optimizer: Any, p: torch.Tensor) -> bool:
    """Whether ``p``'s direction is computed on one rank from an all-to-all of its shards: the
    optimizer's step comes in three parts (``_momentum_update``, ``_direction``,
    ``_apply_direction``: Muon) and ``p`` is sharded on one dimension of a 1-D mesh (FSDP2)."""
    if not hasattr(optimizer, "_direction") or not hasattr(optimizer, "_apply_direction"):
        return False
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or len(placements) != 1 or not placements[0].is_shard():
        return False
    dim = placements[0].dim
    return tuple(p.to_local().shape) == _shard_shape(p.shape, dim, mesh.size(), mesh.get_local_rank())


def _shard_shape(shape: torch.Size, dim: int, world: int, rank: int) -> tuple[int, ...]:
    """The local shape of ``rank``'s ``Shard(dim)`` of ``shape`` (``torch.chunk``'s sizes, as DTensor
    splits: ``⌈n/world⌉`` rows each, the last ranks fewer or none)."""
    chunk = -(-shape[dim] // world)
    rows = max(0, min(chunk, shape[dim] - rank * chunk))
    return tuple(rows if d == dim else n for d, n in enumerate(shape))


@torch.no_grad()
def _sharded_directions(optimizer: Any, group: dict[str, Any], params: list[torch.Tensor]) -> None:
    """Dion's Muon for FSDP2 (Ahn et al. 2025, github.com/microsoft/dion): the momentum stays
    sharded and is updated on the shards; per shape, one all-to-all turns every rank's shards of
    the shape's matrices into whole matrices on their owners (:func:`deal`), each owner computes
    the direction of its matrices (one stacked call), and a second all-to-all returns each rank
    its shards of the directions, applied on the shards."""
    from torch.distributed.tensor import DTensor

    by_key: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        by_key.setdefault((tuple(p.shape), p.dtype, p.device_mesh, p.placements), []).append(p)
    start = 0
    for (shape, dtype, mesh, placements), members in by_key.items():
        shape, dim, world, me = torch.Size(shape), placements[0].dim, mesh.size(), mesh.get_local_rank()
        pg = mesh.get_group()
        updates = []
        for p in members:  # the momentum, updated on the shards (a DTensor in the state, as p)
            state = optimizer.state[p]
            local = {k: v.to_local() if is_sharded(v) else v for k, v in state.items()}
            updates.append(optimizer._momentum_update(group, local, p.grad.to_local()))
            for k, v in local.items():
                if k not in state:
                    state[k] = DTensor.from_local(v, mesh, placements, run_check=False, shape=shape, stride=p.stride())
        owners = [(start + i) % world for i in range(len(members))]  # round robin, each shape after the last
        start = (start + len(members)) % world
        sizes = [int(torch.Size(_shard_shape(shape, dim, world, r)).numel()) for r in range(world)]
        # to each owner, this rank's shards of its matrices
        send = torch.cat([updates[i].reshape(-1) for o in range(world) for i in range(len(members)) if owners[i] == o]
                         or [updates[0].new_empty(0)])
        mine = [i for i in range(len(members)) if owners[i] == me]
        in_splits = [sizes[me] * owners.count(o) for o in range(world)]
        out_splits = [sizes[r] * len(mine) for r in range(world)]
        received = send.new_empty(sum(out_splits))
        dist.all_to_all_single(received, send, out_splits, in_splits, group=pg)
        pieces = received.split(out_splits)
        wholes = [torch.cat([pieces[r][k * sizes[r]:(k + 1) * sizes[r]].view(_shard_shape(shape, dim, world, r))
                             for r in range(world)], dim=dim) for k in range(len(mine))]
        directions = []
        if wholes:
            stacked = as_matrix(wholes[0]) if len(wholes) == 1 else torch.stack([as_matrix(w) for w in wholes])
            ortho = optimizer._direction(group, stacked)
            directions = [ortho.view(shape)] if len(wholes) == 1 else [o.view(shape) for o in ortho]
        # back: to each rank r its shards of this rank's directions
        chunks = [d.tensor_split(_bounds(shape, dim, world), dim=dim) for d in directions]
        back = torch.cat([chunks[k][r].reshape(-1) for r in range(world) for k in range(len(mine))]
                         or [send.new_empty(0)])
        returned = send.new_empty(sum(in_splits))
        dist.all_to_all_single(returned, back, in_splits, out_splits, group=pg)
        parts = returned.split(in_splits)
        for o in range(world):
            owned = [i for i in range(len(members)) if owners[i] == o]
            for k, i in enumerate(owned):
                p = members[i]
                shard = parts[o][k * sizes[me]:(k + 1) * sizes[me]]
                optimizer._apply_direction(group, p.to_local(), shard, shape)


def _bounds(shape: torch.Size, dim: int, world: int) -> list[int]:
    """Where ``tensor_split`` cuts dimension ``dim`` into the ranks' shards."""
    chunk = -(-shape[dim] // world)
    return [min(shape[dim], r * chunk) for r in range(1, world)]


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
    if world > 1 and plain and optimizer.distribute_work == "auto" and getattr(optimizer, "_latency", None) is None:
        optimizer._latency = LatencyModel.measure(plain[0].device)  # collective: every rank is here
    key = (world, tuple(_key(p) for p in plain), repr(_latency(optimizer))) if world > 1 and plain else None
    split = getattr(optimizer, "_work_split", None)
    if split is not None and split[0] == key:
        return dict(zip(plain, split[1]))
    if split is not None:  # a new layout: the old owners' state to every rank first
        _gather_state(optimizer.state, plain, split[1])
    optimizer._work_split = None
    if key is None:
        return None
    owners = _split_owners(list(key[1]), world, _latency(optimizer))
    me = dist.get_rank()
    for p, owner in zip(plain, owners):
        if owner not in (me, EVERY_RANK):
            optimizer.state.pop(p, None)
    optimizer._work_split = (key, tuple(owners))
    return dict(zip(plain, owners))


EVERY_RANK = -1  # the owner of a matrix that every rank steps itself


def _latency(optimizer: Any) -> Optional[LatencyModel]:
    """The latency model that chooses the batches to split (``distribute_work`` a
    :class:`~.split_cost.LatencyModel`, or ``"auto"``: measured at the first split step), or ``None``: split all."""
    if isinstance(optimizer.distribute_work, LatencyModel):
        return optimizer.distribute_work
    return getattr(optimizer, "_latency", None) if optimizer.distribute_work == "auto" else None


def _split_owners(keys: list[tuple], world: int, model: Optional[LatencyModel]) -> list[int]:
    """Owners from :func:`deal` of the matrices whose batch (same key) ``model`` splits
    (:meth:`~.split_cost.LatencyModel.choose`; every batch without one), ``EVERY_RANK`` for the rest."""
    split = model.choose(keys, world) if model is not None else dict.fromkeys(keys, True)
    chosen = [i for i, key in enumerate(keys) if split[key]]
    owners = [EVERY_RANK] * len(keys)
    for i, owner in zip(chosen, deal([keys[i] for i in chosen], world)):
        owners[i] = owner
    return owners


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
    return [{k: float(table[i, j, 0]) for j, k in enumerate(keys) if table[i, j, 1] > 0}
            if owners.get(p, EVERY_RANK) != EVERY_RANK else values
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
