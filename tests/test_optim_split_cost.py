"""The latency model that chooses, per batch of same-shaped matrices, between splitting the
matrix work across the ranks and repeating it (``lightning_spectral.optim.split_cost``)."""

from __future__ import annotations

import dataclasses
import io
import os

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks
from torch import nn

from lightning_spectral.optim import Muon
from lightning_spectral.optim.distributed import EVERY_RANK, _split_matrices
from lightning_spectral.optim.split_cost import LatencyModel, ns_flops

F32 = "torch.float32"
# A gloo-on-a-CPU-like model: 100 µs per collective, 1 GB/s, 50 µs per msign call, 50 GFLOP/s.
CPU = LatencyModel(alpha_s=1e-4, beta_s_per_byte=1e-9, gamma_s=5e-5, flop_rate=5e10)


def _keys(*batches):
    return [((m, n), F32, "cpu") for m, n, k in batches for _ in range(k)]


def test_gain_is_the_formula():
    k, m, n, w = 3, 64, 32, 2
    f = 5 * (4 * 32 * 32 * 64 + 2 * 32**3)
    assert ns_flops((m, n)) == ns_flops((n, m)) == f
    expected = 5e-5 * (1 - 1) + (1 - 1 / w) * k * f / 5e10 - 1e-9 * (w - 1) / w * k * m * n * 4
    assert CPU.gain_s(k, (m, n), F32, w) == pytest.approx(expected, rel=1e-12)
    # one matrix on 4 ranks: three ranks skip the call (γ saved on 3/4 of them on average)
    one = 5e-5 * (1 - 1 / 4) + (3 / 4) * f / 5e10 - 1e-9 * (3 / 4) * m * n * 4
    assert CPU.gain_s(1, (m, n), F32, 4) == pytest.approx(one, rel=1e-12)
    assert ns_flops((8, 2, 3, 3)) == ns_flops((8, 18))  # a conv kernel: out × in·kh·kw


def test_tiny_matrices_are_repeated_and_large_ones_split():
    tiny = _keys((8, 8, 4), (1, 8, 1))
    assert not any(CPU.choose(tiny, 2).values())  # together they save less than one collective's α
    large = _keys((512, 512, 4))
    assert all(CPU.choose(large, 2).values()) and all(CPU.choose(large, 4).values())
    mixed = CPU.choose(_keys((512, 512, 2), (4, 4, 6)), 2)
    assert mixed[((512, 512), F32, "cpu")] and not mixed[((4, 4), F32, "cpu")]  # 4 < crossover
    assert not any(CPU.choose(large, 1).values())  # one rank: nothing to split


def test_crossover_separates_square_matrices_that_pay_their_bytes():
    model = LatencyModel(alpha_s=0.0, beta_s_per_byte=1e-9, gamma_s=0.0, flop_rate=3e12)  # crossover 400
    assert model.crossover() == pytest.approx(400.0)
    assert model.gain_s(8, (390, 390), F32, 2) < 0 < model.gain_s(8, (410, 410), F32, 2)
    assert model.crossover(torch.bfloat16) == pytest.approx(200.0)  # half the bytes to send


def test_fit_recovers_the_constants_of_exact_samples():
    true = LatencyModel(alpha_s=2e-4, beta_s_per_byte=3e-10, gamma_s=7e-5, flop_rate=4e10)
    coll = [(b, true.alpha_s + true.beta_s_per_byte * b) for b in (4, 4096, 65536, 2**20)]
    ms = [(ns_flops((m, m)), true.msign_s(1, (m, m))) for m in (16, 64, 256)]
    fitted = LatencyModel.fit(coll, ms)
    for name in ("alpha_s", "beta_s_per_byte", "gamma_s", "flop_rate"):
        assert getattr(fitted, name) == pytest.approx(getattr(true, name), rel=1e-6), name


def test_bad_constants_and_samples_are_refused():
    with pytest.raises(ValueError, match="alpha_s"):
        LatencyModel(alpha_s=-1.0, beta_s_per_byte=0.0, gamma_s=0.0, flop_rate=1.0)
    with pytest.raises(ValueError, match="flop_rate"):
        LatencyModel(alpha_s=0.0, beta_s_per_byte=0.0, gamma_s=0.0, flop_rate=float("nan"))
    with pytest.raises(ValueError, match="two sizes"):
        LatencyModel.fit([(4, 1.0), (4, 2.0)], [(1, 1.0), (2, 2.0)])
    with pytest.raises(ValueError, match="do not grow"):
        LatencyModel.fit([(4, 1.0), (8, 2.0)], [(1, 2.0), (2, 1.0)])
    with pytest.raises(RuntimeError, match="torch.distributed"):
        LatencyModel.measure()


# -- on two gloo ranks --------------------------------------------------------------------------
SHAPES = [(96, 96), (96, 96), (4, 4), (4, 4), (4, 4), (1, 8), (7,)]
# Splits the 96×96 batch only (each matrix saves ~0.9 ms of msign on 1 GB/s, the small ones not
# their bytes and γ); the split batch saves more than α.
CHOICE = LatencyModel(alpha_s=1e-4, beta_s_per_byte=1e-9, gamma_s=0.0, flop_rate=5e10)
EPS = torch.finfo(torch.float32).eps
STEPS = 3


def _run(distribute, resume: bool = False):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s) / 3) for s in SHAPES]
    opt = Muon(params, lr=0.05)
    opt.distribute_work = distribute
    g = torch.Generator().manual_seed(1)
    gathered = []
    inner = dist.all_gather_into_tensor
    for step in range(STEPS):
        if resume and step == 2:
            saved = opt.state_dict()
            params = [nn.Parameter(p.detach().clone()) for p in params]
            opt = Muon(params, lr=0.05)
            opt.distribute_work = distribute
            opt.load_state_dict(saved)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        dist.all_gather_into_tensor = lambda out, inp, *a, **k: (gathered.append(inp.numel() * inp.element_size()),
                                                                   inner(out, inp, *a, **k))[1]
        try:
            opt.step()
        finally:
            dist.all_gather_into_tensor = inner
    split = getattr(opt, "_work_split", None)
    owners = list(split[1]) if split else []
    held = [bool(opt.state.get(p)) for p in _split_matrices(opt)]
    state = {k: {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in s.items()}
             for k, s in opt.state_dict()["state"].items()}
    return dict(weights=[p.detach().clone() for p in params], owners=owners, held=held, state=state,
                gathered=gathered[-1] if gathered else 0, latency=_constants(getattr(opt, "_latency", None)))


def _constants(model):
    return None if model is None else dataclasses.astuple(model)


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = dict(full=_run(False), chosen=_run(CHOICE), resumed=_run(CHOICE, resume=True), auto=_run("auto"))
        buffer = io.BytesIO()  # tensors through a queue need their sender alive: send bytes
        torch.save(out, buffer)
        queue.put((rank, buffer.getvalue()))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    out = spawn_ranks(_worker, 2, messages=2, timeout=300)
    return {rank: torch.load(io.BytesIO(data), weights_only=True) for rank, data in out}


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / a.abs().clamp(min=1)).max()) if a.numel() else 0.0


def test_chosen_split_keeps_the_step_exact_and_the_state_where_it_is_stepped(ranks):
    for rank, out in ranks.items():
        full, chosen = out["full"], out["chosen"]
        assert chosen["owners"][:2] in ([0, 1], [1, 0]) and chosen["owners"][2:] == [EVERY_RANK] * 4, chosen["owners"]
        # the owner of a split matrix holds its momentum, every rank that of a repeated one
        assert chosen["held"] == [o in (rank, EVERY_RANK) for o in chosen["owners"]]
        # one all-gather carries the one 96×96 matrix each rank owns, nothing of the repeated ones
        assert chosen["gathered"] == 96 * 96 * 4
        # the repeated matrices step exactly as before; the split pair, stepped one by one instead
        # of stacked, within a float32 rounding of the weight and one of its update per step
        for i, (a, b) in enumerate(zip(chosen["weights"], full["weights"])):
            if i >= 2:
                assert torch.equal(a, b), i
            else:
                assert _gap(a, b) <= 2 * STEPS * EPS, (i, _gap(a, b))
        assert chosen["state"].keys() == full["state"].keys()  # state_dict() holds every matrix's state
        for k, state in full["state"].items():
            assert chosen["state"][k].keys() == state.keys()
            for name, v in state.items():
                if isinstance(v, torch.Tensor):
                    assert _gap(chosen["state"][k][name], v) <= 2 * STEPS * EPS, (k, name)
        resumed = out["resumed"]
        assert all(torch.equal(a, b) for a, b in zip(resumed["weights"], chosen["weights"]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["chosen"]["weights"], ranks[1]["chosen"]["weights"]))


def test_auto_measures_one_model_that_every_rank_shares(ranks):
    models = [LatencyModel(*out["auto"]["latency"]) for out in ranks.values()]
    assert models[0] == models[1]
    assert models[0].flop_rate > 0 and models[0].beta_s_per_byte >= 0
    assert ranks[0]["auto"]["owners"] == ranks[1]["auto"]["owners"]
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["auto"]["weights"], ranks[1]["auto"]["weights"]))
