"""The matrix work split across ranks (plain torch.distributed, gloo processes).

Each rank computes the update of the matrices it owns, keeps their state, and all-gathers the
new weights; the result must equal, bit for bit, what every rank gets when it does all the work
itself (``distribute_work = False``): the weights on every rank, the gathered ``state_dict()``,
the constraint report, a checkpoint's resumed steps. Each rank must really have skipped the
matrices it does not own and hold no state for them, and no optimizer state may cross the
network during a step: one all-gather of weights per step, no broadcast, nothing pickled.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks
from torch import nn

from lightning_spectral.optim import Muon, optimizer_entries
from lightning_spectral.optim.distributed import _split_matrices, deal

# Every registry entry in each of its configurations ("name:variant"), on four matrices of shapes it takes.
CASES = [(f"{entry.name}:{variant}", entry) for entry in optimizer_entries() for variant, _ in entry.configurations()]
STEPS = 3
MATRICES = 4
TIMEOUT_S = 300  # a hang fails the test
# Where a rank steps alone a matrix that one process stacks with its same-shaped peers (Muon's
# batched msign, the geometric optimizers' stacked steps), the stack-of-one takes the unstacked
# kernels and the results differ in the last bits: the weights (|W| about 1) by at most one
# float32 rounding of the weight and one of its update per step, the state and the reports (a
# dual, singular vectors, residuals: inner products of length n = 16, the longest side) by
# n roundings per step; all relative to max(1, |value|). Measured: 1.8e-7 and 1.3e-6.
EPS = torch.finfo(torch.float32).eps
WEIGHT_TOL, STATE_TOL = 2 * STEPS * EPS, 16 * STEPS * EPS
ROUNDOFF = {"manifold_muon:default", "spectral_ball:default", "spectral_ball:ball", "spectral_ball:muon_sphere", "muon:mixed"}


def _shapes(entry) -> list[tuple[int, ...]]:
    """Matrices the entry's rule takes (different costs, so the split is uneven) and a bias."""
    if entry.every_shape:
        return [(16, 12), (16, 16), (8, 16), (3, 8), (16, 12), (7,)]
    return [entry.example_shape] * MATRICES + [(7,)]


class Wire:
    """Counts what the work split sends during ``step()``: all-gathers (and their bytes);
    a broadcast or a pickled collective fails the run."""

    def __init__(self):
        self.gathers, self.bytes = 0, 0

    def __enter__(self):
        self.saved = {name: getattr(dist, name) for name in ("all_gather_into_tensor", "broadcast", "broadcast_object_list")}

        def gather(out, inp, *args, **kwargs):
            self.gathers += 1
            self.bytes += inp.numel() * inp.element_size()
            return self.saved["all_gather_into_tensor"](out, inp, *args, **kwargs)

        def refuse(*args, **kwargs):
            raise AssertionError("optimizer state or a pickled layout crossed the network during a step")

        dist.all_gather_into_tensor, dist.broadcast, dist.broadcast_object_list = gather, refuse, refuse
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _clone_state(state_dict: dict) -> dict:
    return {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
            for k, s in state_dict["state"].items()}


def _gap(a, b) -> float:
    """The largest difference of two nested states/reports, relative to ``max(1, |value|)``
    (``inf`` where keys, types or plain values differ)."""
    if isinstance(a, dict):
        return max((_gap(a[k], b[k]) for k in a), default=0.0) if a.keys() == b.keys() else float("inf")
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if not a.is_floating_point():
            return 0.0 if torch.equal(a, b) else float("inf")
        return float(((a - b).abs() / a.abs().clamp(min=1)).max()) if a.numel() else 0.0
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) / max(1.0, abs(a))
    return 0.0 if a == b else float("inf")


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _run(distribute: bool, shapes, build, steps: int = STEPS, resume_at: int | None = None):
    """``steps`` steps on fixed gradients; with ``resume_at``, the optimizer's state dict is
    saved after that many steps and loaded into a fresh optimizer (fresh parameters with the
    same weights), which takes the remaining steps."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape) / 3) for shape in shapes]
    opt = build(params)
    opt.distribute_work = distribute
    calls: list[int] = []
    wire = Wire()
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == resume_at:
            saved = opt.state_dict()
            params = [nn.Parameter(p.detach().clone()) for p in params]
            opt = build(params)
            opt.distribute_work = distribute
            opt.load_state_dict(saved)
        inner = opt._matrix_step
        opt._matrix_step = lambda group, ps, inner=inner: (calls.append(len(ps)), inner(group, ps))
        for p in params:  # the same gradients on every rank, as DDP's all-reduce leaves them
            p.grad = torch.randn(p.shape, generator=g)
        with wire:
            opt.step()
        del opt._matrix_step
    split = getattr(opt, "_work_split", None)
    owners = dict(zip(_split_matrices(opt), split[1])) if split else {}
    foreign = sum(1 for p, owner in owners.items() if owner != dist.get_rank() and opt.state.get(p))
    return dict(weights=[p.detach().clone() for p in params], state=_clone_state(opt.state_dict()),
                report=opt.constraint_report(), calls=sum(calls) // steps, foreign=foreign, gathers=wire.gathers,
                bytes=wire.bytes // steps, weight_bytes=sum(4 * p.numel() for p in params if p.ndim >= 2))


def _ranks_agree(weights: list[torch.Tensor]) -> bool:
    checksum = torch.stack([w.double().sum() for w in weights])
    gathered = [torch.empty_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(gathered[0], c) for c in gathered)


def _compare(name: str, shapes, build) -> dict:
    split, full = _run(True, shapes, build), _run(False, shapes, build)
    resumed = _run(True, shapes, build, resume_at=2)
    return dict(name=name, weights=all(torch.equal(a, b) for a, b in zip(split["weights"], full["weights"])),
                gap=max(_gap(split["weights"][i], full["weights"][i]) for i in range(len(shapes))),
                state_gap=_gap(split["state"], full["state"]), report_gap=_gap(split["report"], full["report"]),
                state=_same(split["state"], full["state"]), report=_same(split["report"], full["report"]),
                resumed=all(torch.equal(a, b) for a, b in zip(resumed["weights"], split["weights"]))
                and _same(resumed["state"], split["state"]),
                agree=_ranks_agree(split["weights"]), split_calls=split["calls"], full_calls=full["calls"],
                foreign=split["foreign"], gathers=split["gathers"] // STEPS,
                bytes=split["bytes"], weight_bytes=split["weight_bytes"])


def _muon(params):
    return Muon(params, lr=0.05)


# Beside the registry: one matrix only (every other rank owns nothing), a 1×8 matrix (smaller than
# the world), and mixed shapes with repeats, on Muon.
EXTRA = {"muon:one matrix": [(6, 5), (7,)], "muon:mixed": [(1, 8), (6, 5), (6, 5), (6, 5), (5, 6), (9, 3), (4,)]}


def _switched() -> dict:
    """``distribute_work`` switched off after a split step: the state comes back from the owners
    first, and the repeated steps go on exactly."""
    shapes = [(1, 8), (6, 5), (5, 6), (9, 3), (4,)]
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(shape) / 3) for shape in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in params]
    opt, ref_opt = _muon(params), _muon(ref)
    ref_opt.distribute_work = False
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        opt.distribute_work = step == 0
        for p, q in zip(params, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    return dict(name="switched", weights=all(torch.equal(p, q) for p, q in zip(params, ref)),
                state=_same(_clone_state(opt.state_dict()), _clone_state(ref_opt.state_dict())))


def _worker(rank: int, world: int, port: int, cases: list[str], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        entries = dict(CASES)
        for name in cases:
            if name in EXTRA:
                out = _compare(name, EXTRA[name], _muon)
            else:
                entry = entries[name]
                out = _compare(name, _shapes(entry), lambda ps, e=entry, n=name: e.build(ps, n.split(":")[1], lr=0.05))
            queue.put((rank, out))
        queue.put((rank, _switched()))
    finally:
        dist.destroy_process_group()


def _launch(world: int, cases: list[str]) -> list:
    return spawn_ranks(_worker, world, cases, messages=world * (len(cases) + 1), timeout=TIMEOUT_S)


ALL = [name for name, _ in CASES] + list(EXTRA)


@pytest.fixture(scope="module")
def results():
    return _launch(2, ALL)


def _check(rows: list, name: str, world: int) -> None:
    rows = [out for _, out in rows if out["name"] == name]
    assert len(rows) == world
    if name == "switched":
        assert all(out["weights"] and out["state"] for out in rows), rows
        return
    for out in rows:
        if name in ROUNDOFF:
            assert out["gap"] <= WEIGHT_TOL and out["state_gap"] <= STATE_TOL and out["report_gap"] <= STATE_TOL, out
        else:
            assert out["weights"] and out["state"] and out["report"], out
        assert out["resumed"], "a checkpoint must resume the split run exactly"
        assert out["agree"], out
        # each rank ran the matrix rule on its share only, and holds no state of the others' matrices
        assert out["split_calls"] < out["full_calls"] or out["full_calls"] < world, out
        assert out["foreign"] == 0, out
        # one all-gather per step carries the new weights: no more than the weights' bytes
        assert out["gathers"] == 1 and 0 < out["bytes"] <= out["weight_bytes"], out
    assert sum(out["split_calls"] for out in rows) == rows[0]["full_calls"], rows


@pytest.mark.parametrize("name", ALL + ["switched"])
def test_split_work_matches_repeated_work_bit_for_bit(results, name):
    _check(results, name, 2)


@pytest.mark.slow
def test_split_work_on_four_ranks():
    cases = ["muon:default", "muon:mixed", "muon:one matrix", "manifold_muon:default", "spectral_ball:default"]
    rows = _launch(4, cases)
    for name in cases + ["switched"]:
        _check(rows, name, 4)


def test_deal_spreads_each_shape_and_gives_the_remainders_to_the_least_loaded():
    keys = [((4, 4), "f", "cpu")] * 3 + [((8, 8), "f", "cpu")] * 3 + [((2, 2), "f", "cpu")]
    owners = deal(keys, 2)
    assert owners[3:6] == [0, 1, 0]  # the costliest shape first: one each, the third to rank 0
    assert sorted(owners[:3]) == [0, 1, 1]  # the next shape's remainder to rank 1, now the least loaded
    assert owners[6] == 1  # rank 1 still the least loaded (8³ + 2·4³ < 2·8³ + 4³)
    assert deal(keys, 2) == owners  # deterministic: every rank computes the same
