"""The matrix work split across ranks (plain torch.distributed, 2 gloo processes).

Each rank computes the update of the matrices it owns and broadcasts weights and state; the
result must equal, bit for bit, what every rank gets when it does all the work itself
(``distribute_work = False``), on every rank, with the same optimizer state, and each rank
must really have skipped the matrices it does not own.
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_spectral.optim import optimizer_entries

# Every registry entry in each of its configurations ("name:variant"), on four matrices of shapes it takes.
CASES = [(f"{entry.name}:{variant}", entry) for entry in optimizer_entries() for variant, _ in entry.configurations()]
STEPS = 3
MATRICES = 4


def _shapes(entry) -> list[tuple[int, ...]]:
    """Four matrices the entry's rule takes (different costs, so the split is uneven) and a bias."""
    if entry.every_shape:
        return [(16, 12), (16, 16), (8, 16), (3, 8), (7,)]
    return [entry.example_shape] * MATRICES + [(7,)]


def _run(distribute: bool, name: str, entry) -> tuple[list, list, list[int]]:
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape) / 3) for shape in _shapes(entry)]
    opt = entry.build(params, name.split(":")[1], lr=0.05)
    opt.distribute_work = distribute
    calls: list[int] = []
    inner = opt._matrix_step
    opt._matrix_step = lambda group, params: (calls.append(len(params)), inner(group, params))
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in params:  # the same gradients on every rank, as DDP's all-reduce leaves them
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    state = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()} for p in params]
    return [p.detach().clone() for p in params], state, calls


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, entry in CASES:
            split_w, split_state, split_calls = _run(True, name, entry)
            full_w, full_state, full_calls = _run(False, name, entry)
            same_weights = all(torch.equal(a, b) for a, b in zip(split_w, full_w))
            same_state = all(
                sa.keys() == sb.keys() and all(
                    torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)
                for sa, sb in zip(split_state, full_state))
            checksum = torch.stack([w.double().sum() for w in split_w])
            gathered = [torch.empty_like(checksum) for _ in range(2)]
            dist.all_gather(gathered, checksum)
            queue.put((rank, name, same_weights, same_state, torch.equal(*gathered),
                       sum(split_calls) // STEPS, sum(full_calls) // STEPS))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    out = [queue.get(timeout=300) for _ in range(2 * len(CASES))]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_split_work_matches_repeated_work_bit_for_bit(results, name):
    rows = [r for r in results if r[1] == name]
    assert len(rows) == 2
    for rank, _, same_weights, same_state, ranks_equal, split_calls, full_calls in rows:
        assert same_weights, (name, rank)
        assert same_state, (name, rank)
        assert ranks_equal, name
        # each rank ran the matrix rule on its share of the 4 matrices only
        assert 0 < split_calls < full_calls == MATRICES, (name, rank, split_calls, full_calls)
