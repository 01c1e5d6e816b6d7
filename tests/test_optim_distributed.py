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

from lightning_spectral.optim import create_optimizer

CASES = [
    ("muon", {}),
    ("muon_sgd", {"inner_solver_type": "dual_ascent", "solver_tangent": True}),
    ("muon_adamw", {"inner_solver_type": "admm", "lr": 1e-3}),
    ("manifold_muon", {"mode": "amortized"}),
    ("spectral_ball", {"mode": "inner"}),
    ("oblique", {}),
]
STEPS = 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 8),
                         nn.Tanh(), nn.Linear(8, 3))


def _run(distribute: bool, optimizer_type: str, kwargs: dict) -> tuple[list, list, list[int]]:
    model = _model()
    opt = create_optimizer(model, optimizer_type=optimizer_type, head_as_matrix=True, **{"lr": 0.05, **kwargs})
    opt.distribute_work = distribute
    calls: list[int] = []
    inner = opt._matrix_step
    opt._matrix_step = lambda group, params: (calls.append(len(params)), inner(group, params))
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(32, 12, generator=g), torch.randint(0, 3, (32,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()  # same data on every rank: same grads
        opt.step()
    state = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for p in model.parameters()]
    return [p.detach().clone() for p in model.parameters()], state, calls


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name, kwargs in CASES:
            split_w, split_state, split_calls = _run(True, name, kwargs)
            full_w, full_state, full_calls = _run(False, name, kwargs)
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
        # 4 matrices (the head too: head_as_matrix); each rank ran the matrix rule on its share only
        assert 0 < split_calls < full_calls == 4, (name, rank, split_calls, full_calls)
