"""The matrix work of one optimizer step, split across the ranks of ``torch.distributed``.

:class:`~lightning_spectral.optim.base.MatrixOptimizer` calls :func:`step_matrices` for the matrix
groups of a step, :func:`whole_state` around its ``state_dict`` and :func:`owner_values` for its
reports. The interface to the optimizers is the matrix rule in three parts
(:meth:`~lightning_spectral.optim.base.MatrixOptimizer._pre_step`, elementwise: the momentum;
``_whole_step``, on a stack of whole same-shaped matrices; ``_apply_step``, elementwise) and
``_elementwise_state``, the state keys of the elementwise part; an optimizer that overrides
``_matrix_step`` instead is run whole.

Every matrix of the matrix groups has one owner rank (:func:`deal`, from the shapes on every
rank, no communication; same-shaped matrices spread evenly), and only the owner runs its
whole-matrix part.

DDP (plain parameters, the same all-reduced gradients on every rank), after Jordan's
distributed Muon (github.com/KellerJordan/Muon): only the owner runs the matrix rule on its
matrices and keeps their optimizer state, and one all-gather per dtype and device (a flat
buffer of each rank's new weights, padded to the largest rank's share) gives every rank every
new weight, bit for bit the owner's. No optimizer state crosses the network during a step.

Parameters sharded as ``DTensor`` on one dimension of a 1-D mesh of all ranks (FSDP2,
Lightning's ``ModelParallelStrategy``), after Dion's Muon for FSDP2 (Ahn et al. 2025,
github.com/microsoft/dion): the elementwise parts run on every rank's shards, and the state
they keep stays sharded (a ``DTensor`` with the parameter's placements, never gathered in a
step); per group and shape one ``all_to_all_single`` turns every rank's shards of ``M`` (and of
``W`` where the whole step reads it) into whole matrices on their owners, each owner runs the
whole step once on the stack of its matrices, and a second all-to-all returns each rank its
shards of the results. The collectives are asynchronous: every shape's first all-to-all is in
flight while the owners compute, and each result travels back while the next shape is computed.
The whole-matrix state (every key but ``_elementwise_state``) lives on the owner only.
``optimizer.communication_dtype = torch.bfloat16`` sends the updates back in bfloat16 (each
entry rounded to nearest: relative error at most 2⁻⁸, half bfloat16's eps; where the whole step
returns new weights, the constrained optimizers, their difference from the old ones is sent, so
only the update is rounded; the matrices sent to the owners keep their dtype: the constraints
need ``W`` exactly). Other sharded parameters take their matrix step
on the gathered full matrix on every rank (:mod:`.sharded`).

The state of a matrix lives on its owner (``1/world`` of it per rank); :func:`whole_state`
gathers it where a checkpoint needs all of it (every rank's ``state_dict()`` holds the
whole-matrix state of every matrix, so torch's distributed checkpoint saves one copy and a
resumed run on any number of ranks finds it), and a change of the layout (``distribute_work``
switched, a group added, a state dict loaded) moves it first. Set
``optimizer.distribute_work = False`` to repeat the work on every rank instead, or to a
:class:`~.split_cost.LatencyModel` (``"auto"``: one measured at the first step) to split only the
batches of same-shaped plain matrices whose split it says pays; every rank steps the others itself
(sharded matrices are always split: repeating them means gathering them).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
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
    """The matrix step of every ``(group, params)`` of ``matrices`` (the params with a gradient of
    each matrix group): each plain matrix on its owner, whose new weights then reach every rank;
    each sharded one through the all-to-alls (:func:`_start_batches`) or, where that path does
    not apply, on its gathered full matrix."""
    owners = _owners(optimizer)
    me = dist.get_rank() if owners is not None else 0
    batches: list[_Batch] = []
    for group, params in matrices:
        split = [p for p in params if owners is not None and is_sharded(p) and p in owners]
        batches += _start_batches(optimizer, group, split, owners)
        for p in [p for p in params if is_sharded(p) and (owners is None or p not in owners)]:
            with full_matrix(optimizer.state, p) as full:
                optimizer._matrix_step(group, [full])
        params = [p for p in params if not is_sharded(p) and (owners is None or owners[p] in (me, EVERY_RANK))]
        if params:  # (the sharded batches' first all-to-alls travel meanwhile)
            optimizer._matrix_step(group, params)
    _finish_batches(optimizer, batches)
    if owners is not None:
        _share_weights([p for _, params in matrices for p in params if not is_sharded(p)], owners)


def _has_parts(optimizer: Any) -> bool:
    """Whether the optimizer's matrix rule comes in the three parts (it does not override ``_matrix_step``)."""
    from .base import MatrixOptimizer

    cls = type(optimizer)
    return cls._whole_step is not MatrixOptimizer._whole_step and cls._matrix_step is MatrixOptimizer._matrix_step


def _splits_shards(optimizer: Any, p: torch.Tensor) -> bool:
    """Whether ``p``'s whole-matrix part runs on one rank from an all-to-all of its shards: the
    optimizer's rule comes in three parts and ``p`` is sharded on one dimension of a 1-D mesh of
    every rank (FSDP2), as ``torch.chunk`` splits it."""
    if not _has_parts(optimizer) or p.ndim < 2:
        return False
    mesh, placements = p.device_mesh, p.placements
    if mesh.ndim != 1 or mesh.size() != dist.get_world_size() or len(placements) != 1 or not placements[0].is_shard():
        return False
    dim = placements[0].dim
    return tuple(p.to_local().shape) == _shard_shape(p.shape, dim, mesh.size(), mesh.get_local_rank())


def _shard_shape(shape: torch.Size, dim: int, world: int, rank: int) -> tuple[int, ...]:
    """The local shape of ``rank``'s ``Shard(dim)`` of ``shape`` (``torch.chunk``'s sizes, as DTensor
    splits: ``⌈n/world⌉`` rows each, the last ranks fewer or none)."""
    chunk = -(-shape[dim] // world)
    rows = max(0, min(chunk, shape[dim] - rank * chunk))
    return tuple(rows if d == dim else n for d, n in enumerate(shape))


def _bounds(shape: torch.Size, dim: int, world: int) -> list[int]:
    """Where ``tensor_split`` cuts dimension ``dim`` into the ranks' shards."""
    chunk = -(-shape[dim] // world)
    return [min(shape[dim], r * chunk) for r in range(1, world)]


@dataclass
class _Batch:
    """The same-shaped sharded matrices of one group on their way to their owners and back."""

    group: dict[str, Any]
    members: list[torch.Tensor]
    owners: list[int]  # the owner of each member, as its rank in the mesh
    shape: torch.Size
    dim: int
    pg: Any
    parts: int  # tensors sent per matrix: M, and W where the whole step reads it
    sizes: list[int]  # each rank's shard size
    received: torch.Tensor
    work: Any
    back: Optional[torch.Tensor] = None
    returned: Optional[torch.Tensor] = None
    back_work: Any = None
    mine: list[int] = field(default_factory=list)


@torch.no_grad()
def _start_batches(optimizer: Any, group: dict[str, Any], params: list[torch.Tensor],
                   owners: dict[torch.Tensor, int]) -> list[_Batch]:
    """The elementwise part of each of ``params`` (sharded) on this rank's shards, then, per
    shape, the all-to-all that sends each owner this rank's shards of its matrices (asynchronous,
    in flight when this returns). A group whose whole step is the identity is applied here."""
    from torch.distributed.tensor import DTensor

    by_key: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        by_key.setdefault((tuple(p.shape), p.dtype, p.placements), []).append(p)
    whole, weight = optimizer._needs_whole(group), optimizer._needs_weight(group)
    batches = []
    for (shape, _, placements), members in by_key.items():
        shape, mesh = torch.Size(shape), members[0].device_mesh
        updates = []
        for p in members:  # the elementwise part on the shards (state shaped like p: a DTensor, as p)
            state = optimizer.state[p]
            local = {k: v.to_local() if is_sharded(v) else v for k, v in state.items()
                     if k in optimizer._elementwise_state}
            update = optimizer._pre_step(group, p.to_local(), p.grad.to_local(), local)
            for k, v in local.items():
                if k not in state or not is_sharded(state[k]):
                    state[k] = (DTensor.from_local(v, mesh, placements, run_check=False, shape=shape, stride=p.stride())
                                if isinstance(v, torch.Tensor) and v.shape == update.shape else v)
            updates.append(update)
        if not whole:
            for p, update in zip(members, updates):
                optimizer._apply_step(group, p.to_local(), update, shape)
            continue
        world, me, dim = mesh.size(), mesh.get_local_rank(), placements[0].dim
        ranks = mesh.mesh.flatten().tolist()
        local_owner = [ranks.index(owners[p]) for p in members]
        wire = torch.promote_types(updates[0].dtype, members[0].dtype) if weight else updates[0].dtype
        sizes = [int(torch.Size(_shard_shape(shape, dim, world, r)).numel()) for r in range(world)]
        parts = 2 if weight else 1
        pieces = []  # to each owner, this rank's shards of its matrices (M, then W)
        for o in range(world):
            for i, p in enumerate(members):
                if local_owner[i] == o:
                    pieces.append(updates[i].reshape(-1).to(wire))
                    if weight:
                        pieces.append(p.to_local().reshape(-1).to(wire))
        send = torch.cat(pieces) if pieces else updates[0].new_empty(0, dtype=wire)
        mine = [i for i in range(len(members)) if local_owner[i] == me]
        in_splits = [parts * sizes[me] * local_owner.count(o) for o in range(world)]
        out_splits = [parts * sizes[r] * len(mine) for r in range(world)]
        received = send.new_empty(sum(out_splits))
        pg = mesh.get_group()
        work = dist.all_to_all_single(received, send, out_splits, in_splits, group=pg, async_op=True)
        batches.append(_Batch(group, members, local_owner, shape, dim, pg, parts, sizes, received, work, mine=mine))
    return batches


@torch.no_grad()
def _finish_batches(optimizer: Any, batches: list[_Batch]) -> None:
    """Each owner's whole step on its matrices of each batch as they arrive, each batch's results
    sent back at once (asynchronous), then every rank's shards of the results applied."""
    if not batches:
        return
    comm = getattr(optimizer, "communication_dtype", None)
    world = len(batches[0].sizes)
    for b in batches:
        b.work.wait()
        me = _mesh_rank(b)
        pieces = b.received.split([b.parts * b.sizes[r] * len(b.mine) for r in range(world)])
        wholes = [[torch.cat([pieces[r][(k * b.parts + j) * b.sizes[r]:(k * b.parts + j + 1) * b.sizes[r]]
                              .view(_shard_shape(b.shape, b.dim, world, r)) for r in range(world)], dim=b.dim)
                   for j in range(b.parts)] for k in range(len(b.mine))]
        results = []
        if wholes:
            members = [b.members[i] for i in b.mine]
            M = torch.stack([as_matrix(w[0]) for w in wholes])
            W = torch.stack([as_matrix(w[1]).to(p.dtype) for w, p in zip(wholes, members)]) if b.parts == 2 else None
            results = optimizer._whole_with_state(b.group, W, M, [optimizer.state[p] for p in members])
            if comm is not None and getattr(optimizer, "_result_is_weight", False):
                results = results - W.to(results.dtype)  # the update, not the new weights, is rounded
        wire = comm or b.received.dtype
        chunks = [r.reshape(b.shape).tensor_split(_bounds(b.shape, b.dim, world), dim=b.dim) for r in results]
        back = [chunks[k][r].reshape(-1).to(wire) for r in range(world) for k in range(len(b.mine))]
        b.back = torch.cat(back) if back else b.received.new_empty(0, dtype=wire)
        in_splits = [b.sizes[me] * b.owners.count(o) for o in range(world)]
        b.returned = b.back.new_empty(sum(in_splits))
        b.back_work = dist.all_to_all_single(b.returned, b.back, in_splits, [b.sizes[r] * len(b.mine) for r in range(world)],
                                             group=b.pg, async_op=True)
    for b in batches:
        b.back_work.wait()
        me = _mesh_rank(b)
        local = _shard_shape(b.shape, b.dim, world, me)
        parts = b.returned.split([b.sizes[me] * b.owners.count(o) for o in range(world)])
        for o in range(world):
            for k, i in enumerate([i for i in range(len(b.members)) if b.owners[i] == o]):
                p = b.members[i]
                shard = parts[o][k * b.sizes[me]:(k + 1) * b.sizes[me]].view(local)
                if comm is not None and getattr(optimizer, "_result_is_weight", False):
                    shard = p.to_local().float() + shard.float()
                optimizer._apply_step(b.group, p.to_local(), shard.to(p.dtype), b.shape)


def _mesh_rank(b: _Batch) -> int:
    return b.members[0].device_mesh.get_local_rank()


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


def _split_matrices(optimizer: Any) -> list[torch.Tensor]:
    """Every parameter of the matrix groups whose work is split (plain ones, and sharded ones
    that take the all-to-all path), gradient or not: the owners stay the same from step to step
    while a gradient comes and goes."""
    return [p for g in optimizer.param_groups if g[MATRIX_KEY] for p in g["params"]
            if p.numel() and (not is_sharded(p) or _splits_shards(optimizer, p))]


def _owners(optimizer: Any) -> Optional[dict[torch.Tensor, int]]:
    """Owner rank of every matrix whose work is split, or ``None`` when the work is not split. The
    layout the state follows is kept in ``optimizer._work_split`` (plain values: the world size and
    the matrices' keys, and the owners; ``None``: every rank holds every state). When it changes,
    the state is first gathered from the old owners; then each rank keeps only its own (of a
    sharded matrix: its elementwise state, and the whole-matrix state of those it owns)."""
    world = _split_world(optimizer)
    split = getattr(optimizer, "_work_split", None)
    matrices = _split_matrices(optimizer) if world > 1 or split is not None else []
    plain = [p for p in matrices if not is_sharded(p)]
    if world > 1 and plain and optimizer.distribute_work == "auto" and getattr(optimizer, "_latency", None) is None:
        optimizer._latency = LatencyModel.measure(plain[0].device)  # collective: every rank is here
    key = (world, tuple(_key(p) for p in matrices), repr(_latency(optimizer))) if world > 1 and matrices else None
    if split is not None and split[0] == key:
        return dict(zip(matrices, split[1]))
    if split is not None:  # a new layout: the old owners' state to every rank first
        _gather_state(optimizer, _split_matrices(optimizer), split[1])
    optimizer._work_split = None
    if key is None:
        return None
    owners = _split_owners(list(key[1]), world, _latency(optimizer))
    me = dist.get_rank()
    for p, owner in zip(matrices, owners):
        if owner not in (me, EVERY_RANK):
            _drop_owned_state(optimizer, p)
    optimizer._work_split = (key, tuple(owners))
    return dict(zip(matrices, owners))


def _drop_owned_state(optimizer: Any, p: torch.Tensor) -> None:
    """The state of a matrix another rank owns: all of it (plain), the whole-matrix part (sharded)."""
    state = optimizer.state.get(p)
    if state is None:
        return
    if is_sharded(p):
        for key in [k for k in state if k not in optimizer._elementwise_state]:
            del state[key]
    if not is_sharded(p) or not state:  # no empty entry: torch's distributed checkpoint reads one as initialised
        optimizer.state.pop(p, None)


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
    plain = [key for key in keys if len(key) == 3]  # (a sharded matrix's key names its placements: always split)
    split = model.choose(plain, world) if model is not None else dict.fromkeys(plain, True)
    chosen = [i for i, key in enumerate(keys) if split.get(key, True)]
    owners = [EVERY_RANK] * len(keys)
    for i, owner in zip(chosen, deal([keys[i] for i in chosen], world)):
        owners[i] = owner
    return owners


def _key(p: torch.Tensor) -> tuple:
    if is_sharded(p):
        return tuple(p.shape), str(p.dtype), str(p.device), str(p.placements)
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
    the owners: collective, every rank must enter it; a sharded matrix's elementwise state stays
    sharded); on leaving, each rank keeps its own again. Where the work is not split the state is
    whole already and nothing is sent."""
    split = getattr(optimizer, "_work_split", None)
    if split is None:
        yield
        return
    received = _gather_state(optimizer, _split_matrices(optimizer), split[1])
    try:
        yield
    finally:
        for p, own in received:
            if own is None:
                optimizer.state.pop(p, None)
            else:
                optimizer.state[p] = own


def owner_values(optimizer: Any, params: list[torch.Tensor], keys: tuple[str, ...]) -> list[dict[str, float]]:
    """The plain number state ``keys`` of each of ``params``, as its owner holds them: one
    all-reduce where the work is split (every rank must call it), the local state otherwise."""
    split = getattr(optimizer, "_work_split", None)
    local = [{k: float(optimizer.state[p][k]) for k in keys if k in optimizer.state.get(p, {})} for p in params]
    if split is None or not params:
        return local
    owners = dict(zip(_split_matrices(optimizer), split[1]))
    me = dist.get_rank()
    device = params[0].to_local().device if is_sharded(params[0]) else params[0].device
    table = torch.zeros(len(params), len(keys), 2, dtype=torch.float64, device=device)
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


def _gather_state(optimizer: Any, params: list[torch.Tensor], owners: Iterable[int]) -> list[tuple[torch.Tensor, Optional[dict]]]:
    """Each matrix's state from its owner to every rank (``params[i]`` owned by ``owners[i]``; of a
    sharded matrix only the whole-matrix part, every rank holding its shards of the rest): per
    owner the layout (keys, shapes, dtypes, plain values) as a small object, then the tensors, one
    flat broadcast per dtype. Returns the params whose state this rank received, each with its
    own state dict from before (``None``: it had none)."""
    states, me = optimizer.state, dist.get_rank()
    owned = list(zip(params, owners))
    received = []
    for owner in range(dist.get_world_size()):
        mine = [p for p, o in owned if o == owner]
        skip = [optimizer._elementwise_state if is_sharded(p) else () for p in mine]
        box = [[_state_layout(states.get(p, {}), s) for p, s in zip(mine, skip)] if me == owner else None]
        dist.broadcast_object_list(box, src=owner)
        tensors = []
        for p, entries in zip(mine, box[0]):
            if me != owner:
                if not entries:
                    continue
                # (a new dict: a state dict taken meanwhile holds it, after this rank's own is back)
                received.append((p, states.get(p) if is_sharded(p) else None))
                states[p] = dict(states[p]) if is_sharded(p) and p in states else {}
            state = states[p]
            for key, spec in entries.items():
                if spec[0] == "value":
                    state[key] = spec[1]
                    continue
                if me != owner:
                    state[key] = torch.empty(spec[1], dtype=spec[2], device=torch.device(spec[3]))
                tensors.append(state[key])
        device = (mine[0].to_local().device if is_sharded(mine[0]) else mine[0].device) if mine else None
        _broadcast_tensors(tensors, owner, device)
    return received


def _state_layout(state: dict, skip: Iterable[str] = ()) -> dict[str, tuple]:
    return {key: ("tensor", tuple(v.shape), v.dtype, str(v.device)) if isinstance(v, torch.Tensor) else ("value", v)
            for key, v in state.items() if key not in skip and not is_sharded(v)}


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
