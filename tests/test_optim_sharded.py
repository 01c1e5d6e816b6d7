"""The optimizers on parameters sharded as ``DTensor`` (FSDP2), on 2 CPU gloo processes.

Each sharded matrix's step runs on its gathered full matrix and every rank keeps its shard
(:mod:`lightning_spectral.optim.sharded`); the full weights and state after a few steps must
equal the same optimizer's steps on plain tensors in one process. Cases: ``DTensor`` parameters
on a CPU device mesh (``Shard(0)``/``Shard(1)``, a 10×7 matrix that 2 ranks split unevenly, a
tall/wide pair, a bias), torch's FSDP2 ``fully_shard`` directly, and Lightning's
``ModelParallelStrategy`` (FSDP2) training a tiny model.

Lightning's ``FSDPStrategy`` (FSDP1) does not run on a CPU: ``ValueError: The strategy `fsdp`
requires a GPU accelerator, but received `accelerator='cpu'`.`` torch's FSDP1 itself runs on
CPU/gloo, but its ``use_orig_params`` parameters are 1-D slices of a flat buffer that cut
matrices at arbitrary offsets: the optimizers refuse them with an error naming FSDP2.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_spectral import optim as O

STEPS = 3
TOL = 1e-6
# (shape, placement dim): a matrix split unevenly over 2 ranks on either dim, a tall/wide pair, a bias.
PARAMS = [((10, 7), 0), ((10, 7), 1), ((12, 6), 1), ((6, 12), 0), ((7,), 0)]


# Every registry entry that supports DTensor parameters, in each of its configurations ("name:variant");
# an entry of restricted shapes gets one more matrix of a shape it takes.
CASES = {f"{entry.name}:{variant}": entry for entry in O.optimizer_entries(sharded=True)
         for variant, _ in entry.configurations()}


def _optimizer(case: str, params) -> torch.optim.Optimizer:
    return CASES[case].build(params, case.split(":")[1])


def _params(case: str) -> list[tuple[tuple[int, ...], int]]:
    entry = CASES[case]
    return PARAMS if entry.every_shape else PARAMS + [(entry.example_shape, 1)]


OPTIMIZERS = list(CASES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int):
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    return init_device_mesh("cpu", (2,))


def _max_diff(a: torch.Tensor, b) -> float:
    from torch.distributed.tensor import DTensor

    b = b.full_tensor() if isinstance(b, DTensor) else b
    return (a.detach() - b.detach()).abs().max().item()


def _dtensor_cases(mesh, rank: int, tmp: str) -> dict:
    """Every optimizer on PARAMS (and a shape it takes) as DTensors against plain tensors; checkpoint round trip."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    out = {}
    for name in OPTIMIZERS:
        spec = _params(name)
        torch.manual_seed(0)
        full = [torch.randn(shape) for shape, _ in spec]
        ref = [nn.Parameter(t.clone()) for t in full]
        sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(dim)])) for t, (_, dim) in zip(full, spec)]
        ref_opt, opt = _optimizer(name, ref), _optimizer(name, sharded)
        ref_opt.distribute_work = False  # the plain reference: all the work on this rank
        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            grads = [torch.randn(shape, generator=g) for shape, _ in spec]
            for p, q, grad, (_, dim) in zip(ref, sharded, grads, spec):
                p.grad = grad.clone()
                q.grad = distribute_tensor(grad.clone(), mesh, [Shard(dim)])
            ref_opt.step()
            opt.step()
        weight = max(_max_diff(a, b) for a, b in zip(ref, sharded))
        state = max((_max_diff(ref_opt.state[a][k], v) for a, b in zip(ref, sharded)
                     for k, v in opt.state[b].items() if isinstance(v, torch.Tensor)), default=0.0)
        keys = all(set(ref_opt.state[a]) == set(opt.state[b]) for a, b in zip(ref, sharded))
        ref_report, report = ref_opt.constraint_report(), opt.constraint_report()
        report_diff = max((abs(value - report[name][key]) for name, entry in ref_report.items()
                           for key, value in entry.items()), default=0.0) if set(report) == set(ref_report) else 1.0
        # State shaped like a sharded parameter stays a DTensor with its placements (1/world per rank).
        sharded_state = all(isinstance(v, DTensor) and v.placements == b.placements
                            for b in sharded for v in opt.state[b].values()
                            if isinstance(v, torch.Tensor) and v.shape == b.shape)
        # Checkpoint: save, load with weights_only=True into a fresh optimizer, one more step on both.
        path = os.path.join(tmp, f"{name.replace(':', '_')}_{rank}.pt")
        torch.save(opt.state_dict(), path)
        fresh_params = [nn.Parameter(distribute_tensor(p.detach().full_tensor(), mesh, p.placements)) for p in sharded]
        fresh = _optimizer(name, fresh_params)
        fresh.load_state_dict(torch.load(path, weights_only=True))
        grads = [torch.randn(shape, generator=g) for shape, _ in spec]
        for p, q, r, grad, (_, dim) in zip(ref, sharded, fresh_params, grads, spec):
            p.grad = grad.clone()
            q.grad = distribute_tensor(grad.clone(), mesh, [Shard(dim)])
            r.grad = distribute_tensor(grad.clone(), mesh, [Shard(dim)])
        ref_opt.step()
        fresh.step()
        resumed = max(_max_diff(a, b) for a, b in zip(ref, fresh_params))
        out[name] = dict(weight=weight, state=state, keys=keys, report=report_diff, sharded_state=sharded_state, resumed=resumed)
    return out


def _nonfinite_case(mesh, rank: int) -> dict:
    """A NaN in rank 1's shard only: both ranks refuse the step, no weight changes."""
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    p = nn.Parameter(distribute_tensor(torch.randn(10, 7), mesh, [Shard(0)]))
    opt = O.Muon([p], lr=0.05)
    grad = torch.randn(10, 7)
    grad[9, 0] = float("nan")  # row 9 lives on rank 1
    p.grad = distribute_tensor(grad, mesh, [Shard(0)])
    before = p.full_tensor().clone()
    try:
        opt.step()
        raised = ""
    except O.NonFiniteGradientError as error:
        raised = str(error)
    lazy = O.Muon([p], lr=0.05, check_finite="lazy")
    try:
        lazy.step()
        lazy_error = ""
    except ValueError as error:
        lazy_error = str(error)
    return dict(raised=raised, unchanged=bool(torch.equal(before, p.full_tensor())), lazy_error=lazy_error)


def _fsdp2_case(mesh) -> dict:
    """torch's FSDP2 ``fully_shard`` on a small MLP: Muon and the AdamW fallback against plain steps."""
    from torch.distributed.fsdp import fully_shard

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))

    ref, model = net(), net()
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ref_opt, opt = O.Muon(ref.parameters(), lr=0.05), O.Muon(model.parameters(), lr=0.05)
    ref_opt.distribute_work = False
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)  # same batch on both ranks
        for m, o in ((ref, ref_opt), (model, opt)):
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    return dict(weight=max(_max_diff(a, b) for a, b in zip(ref.parameters(), model.parameters())),
                moved=max(_max_diff(a, b) for a, b in zip(net().parameters(), model.parameters())))


def _split_case(mesh) -> dict:
    """Muon's directions under DTensor: each matrix orthogonalised on one rank only (counted from
    msign's calls), same-shaped matrices three (uneven over 2 ranks), a 1×8 matrix smaller than
    the world (rank 1's shard is empty), mixed placements; weights and momentum against plain steps."""
    from torch.distributed.tensor import Shard, distribute_tensor

    import lightning_spectral.optim.muon as muon_module

    spec = [((6, 5), 0), ((6, 5), 0), ((6, 5), 0), ((1, 8), 0), ((5, 6), 1), ((8, 4), 1)]
    torch.manual_seed(0)
    full = [torch.randn(shape) for shape, _ in spec]
    ref = [nn.Parameter(t.clone()) for t in full]
    sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(dim)])) for t, (_, dim) in zip(full, spec)]
    ref_opt, opt = O.Muon(ref, lr=0.05), O.Muon(sharded, lr=0.05)
    ref_opt.distribute_work = False
    counted, original = [0], muon_module.msign
    g = torch.Generator().manual_seed(1)
    try:
        for _ in range(STEPS):
            grads = [torch.randn(shape, generator=g) for shape, _ in spec]
            for p, q, grad, (_, dim) in zip(ref, sharded, grads, spec):
                p.grad = grad.clone()
                q.grad = distribute_tensor(grad.clone(), mesh, [Shard(dim)])
            ref_opt.step()
            muon_module.msign = lambda X, *a, **k: (counted.__setitem__(0, counted[0] + (X.shape[0] if X.ndim == 3 else 1)),
                                                    original(X, *a, **k))[1]
            opt.step()
            muon_module.msign = original
    finally:
        muon_module.msign = original
    return dict(weight=max(_max_diff(a, b) for a, b in zip(ref, sharded)),
                state=max(_max_diff(ref_opt.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"])
                          for a, b in zip(ref, sharded)),
                per_step=counted[0] / STEPS, matrices=len(spec))


def _fsdp1_case() -> str:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 7)),
                                     use_orig_params=True, device_id=torch.device("cpu"))
    try:
        O.Muon(model.parameters(), lr=0.05)
    except ValueError as error:
        return str(error)
    return ""


def _worker(rank: int, port: int, tmp: str, queue) -> None:
    mesh = _init(rank, port)
    try:
        queue.put((rank, dict(dtensor=_dtensor_cases(mesh, rank, tmp), nonfinite=_nonfinite_case(mesh, rank),
                              fsdp2=_fsdp2_case(mesh), fsdp1=_fsdp1_case(), split=_split_case(mesh))))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path_factory.mktemp("sharded")), queue), nprocs=2,
                       start_method="spawn")
    return dict(queue.get(timeout=60) for _ in range(2))


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("name", OPTIMIZERS)
def test_dtensor_steps_equal_unsharded_steps(results, name, rank):
    case = results[rank]["dtensor"][name]
    assert case["weight"] <= TOL, case
    assert case["state"] <= TOL, case
    assert case["keys"], "the sharded optimizer's state has other keys than the plain one's"
    assert case["report"] <= 1e-5, "constraint_report() must measure the full matrices"
    assert case["sharded_state"], "state shaped like the parameter must stay a DTensor with its placements"
    assert case["resumed"] <= TOL, "a checkpoint loaded with weights_only=True must resume the same steps"


@pytest.mark.parametrize("rank", [0, 1])
def test_nonfinite_shard_refused_on_every_rank(results, rank):
    case = results[rank]["nonfinite"]
    assert "holds NaN or Inf" in case["raised"]
    assert case["unchanged"]
    assert "check_finite='lazy'" in case["lazy_error"] and "check_finite=True" in case["lazy_error"]


@pytest.mark.parametrize("rank", [0, 1])
def test_fully_shard_fsdp2(results, rank):
    case = results[rank]["fsdp2"]
    assert case["moved"] > 1e-3, "the sharded model must have trained"
    assert case["weight"] <= TOL, case


def test_muon_directions_computed_once_across_ranks(results):
    """Every matrix orthogonalised on exactly one rank (the counts add up to the matrices), from
    the whole matrix: the steps equal the plain ones to float32 round-off (TOL)."""
    cases = [results[rank]["split"] for rank in (0, 1)]
    assert sum(c["per_step"] for c in cases) == cases[0]["matrices"], cases
    assert all(0 < c["per_step"] < c["matrices"] for c in cases), cases
    assert all(c["weight"] <= TOL and c["state"] <= TOL for c in cases), cases


@pytest.mark.parametrize("rank", [0, 1])
def test_fsdp1_flat_parameters_refused(results, rank):
    assert "FSDP1 flat shards" in results[rank]["fsdp1"] and "fully_shard" in results[rank]["fsdp1"]


LIGHTNING_SCRIPT = textwrap.dedent(
    '''
    """Written by tests/test_optim_sharded.py: Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes."""
    import json
    import sys

    import lightning.pytorch as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn

    from lightning_spectral import optim as O

    STEPS = 2  # batches per epoch


    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))


    def batches():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(STEPS)]


    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.net = net()

        def configure_model(self):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for module in self.net:
                if isinstance(module, nn.Linear):
                    fully_shard(module, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, _):
            opt = self.optimizers()
            x, y = batch
            opt.zero_grad()
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.manual_backward(loss)
            opt.step()

        def configure_optimizers(self):
            return O.Muon(self.net.parameters(), lr=0.05)


    def trainer(epochs):
        return L.Trainer(accelerator="cpu", devices=2, strategy=ModelParallelStrategy(), max_epochs=epochs,
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)


    if __name__ == "__main__":
        torch.set_num_threads(1)
        loader = torch.utils.data.DataLoader(batches(), batch_size=None)  # the same batches on both ranks
        first = trainer(1)
        first.fit(Tiny(), loader)
        first.save_checkpoint(sys.argv[2])  # a distributed checkpoint (DTensor optimizer state), then resume
        model, second = Tiny(), trainer(2)
        second.fit(model, loader, ckpt_path=sys.argv[2])
        full = [p.full_tensor() for p in model.net.parameters()]
        types = sorted({type(p).__name__ for p in model.net.parameters()})
        if second.global_rank == 0:
            ref = net()
            opt = O.Muon(ref.parameters(), lr=0.05)
            opt.distribute_work = False
            for x, y in batches() * 2:
                opt.zero_grad()
                nn.functional.cross_entropy(ref(x), y).backward()
                opt.step()
            err = max((a.detach() - b).abs().max().item() for a, b in zip(ref.parameters(), full))
            moved = max((a.detach() - b).abs().max().item() for a, b in zip(net().parameters(), full))
            json.dump({"err": err, "moved": moved, "types": types, "steps": second.global_step}, open(sys.argv[1], "w"))
    '''
)


def test_lightning_model_parallel_strategy(tmp_path):
    """Lightning's ModelParallelStrategy (FSDP2, gloo, 2 CPU processes via its popen launcher) with
    manual optimization and our Muon, one epoch, its distributed checkpoint, a resumed second epoch:
    equals plain Muon steps on one process (about 15 s)."""
    script, out = tmp_path / "fit_fsdp2.py", tmp_path / "result.json"
    script.write_text(LIGHTNING_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "epoch1.ckpt")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["types"] == ["DTensor"]
    assert result["steps"] == 4
    assert result["moved"] > 1e-3
    assert result["err"] <= TOL, result
