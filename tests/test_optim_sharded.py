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
from lightning_spectral.optim.sharded import is_sharded

STEPS = 3
TOL = 1e-6
# The split steps' state beside the one-process state: where one process stacks same-shaped matrices and
# an owner stacks fewer, a dual or singular vectors differ by inner products of length n (16 at most
# here) rounded per step, relative to max(1, |value|) (as tests/test_optim_distributed.py's STATE_TOL).
STATE_TOL = 16 * STEPS * torch.finfo(torch.float32).eps
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


def _init(rank: int, port: int, world: int = 2):
    from torch.distributed.device_mesh import init_device_mesh

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return init_device_mesh("cpu", (world,))


def _max_diff(a: torch.Tensor, b) -> float:
    from torch.distributed.tensor import DTensor

    b = b.full_tensor() if isinstance(b, DTensor) else b
    return (a.detach() - b.detach()).abs().max().item() if a.numel() else 0.0


def _pair(spec, mesh, build):
    """The same random weights as plain parameters (``distribute_work = False``: all the work on
    this rank, the one-process reference) and as DTensors sharded as ``spec`` says, each with its
    optimizer from ``build``."""
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    full = [torch.randn(shape) for shape, _ in spec]
    ref = [nn.Parameter(t.clone()) for t in full]
    sharded = [nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(dim)])) for t, (_, dim) in zip(full, spec)]
    ref_opt, opt = build(ref), build(sharded)
    ref_opt.distribute_work = False
    return ref, sharded, ref_opt, opt


def _feed(spec, mesh, g, *param_lists) -> None:
    """One random gradient per matrix, the same on every rank: whole on plain parameters, sharded on DTensors."""
    from torch.distributed.tensor import Shard, distribute_tensor

    grads = [torch.randn(shape, generator=g) for shape, _ in spec]
    for params in param_lists:
        for p, grad, (_, dim) in zip(params, grads, spec):
            p.grad = distribute_tensor(grad.clone(), mesh, [Shard(dim)]) if is_sharded(p) else grad.clone()


def _state_gap(ref_opt, opt) -> tuple[float, bool]:
    """The largest difference of the two state dicts' tensors, and whether their keys agree (the
    sharded optimizer's state dict gathers each owner's whole-matrix state)."""
    ref, got = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    keys = ref.keys() == got.keys() and all(set(ref[i]) == set(got[i]) for i in ref)
    # (in the same order on every rank: a DTensor's full_tensor() is a collective)
    gap = max((_max_diff(ref[i][k], got[i][k]) / max(1.0, float(ref[i][k].float().abs().max()) if ref[i][k].numel() else 1.0)
               for i in sorted(got) for k in sorted(got[i])
               if isinstance(got[i][k], torch.Tensor) and i in ref and k in ref[i]), default=0.0)
    return gap, keys


def _dtensor_cases(mesh, rank: int, tmp: str) -> dict:
    """Every optimizer on PARAMS (and a shape it takes) as DTensors against plain tensors; checkpoint round trip."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for name in OPTIMIZERS:
        spec = _params(name)
        ref, sharded, ref_opt, opt = _pair(spec, mesh, lambda ps: _optimizer(name, ps))
        g = torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            _feed(spec, mesh, g, ref, sharded)
            ref_opt.step()
            opt.step()
        weight = max(_max_diff(a, b) for a, b in zip(ref, sharded))
        state, keys = _state_gap(ref_opt, opt)
        ref_report, report = ref_opt.constraint_report(), opt.constraint_report()
        report_diff = max((abs(value - report[name][key]) for name, entry in ref_report.items()
                           for key, value in entry.items()), default=0.0) if set(report) == set(ref_report) else 1.0
        # The elementwise state shaped like a sharded parameter stays a DTensor with its placements (1/world per rank).
        sharded_state = all(isinstance(v, DTensor) and v.placements == b.placements
                            for b in sharded for k, v in opt.state[b].items()
                            if isinstance(v, torch.Tensor) and v.shape == b.shape and k in opt._elementwise_state)
        # Checkpoint: save, load with weights_only=True into a fresh optimizer, one more step on both.
        path = os.path.join(tmp, f"{name.replace(':', '_')}_{rank}.pt")
        torch.save(opt.state_dict(), path)
        fresh_params = [nn.Parameter(distribute_tensor(p.detach().full_tensor(), mesh, p.placements)) for p in sharded]
        fresh = _optimizer(name, fresh_params)
        fresh.load_state_dict(torch.load(path, weights_only=True))
        _feed(spec, mesh, g, ref, fresh_params)
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


def _split_spec(entry) -> list[tuple[tuple[int, ...], int]]:
    """Three same-shaped matrices (uneven over 2 or 4 ranks), a 1×8 matrix smaller than the world
    (some ranks' shards are empty), mixed shapes and placements; of shapes the entry's rule takes."""
    if entry.every_shape:
        return [((6, 5), 0), ((6, 5), 0), ((6, 5), 0), ((1, 8), 0), ((5, 6), 1), ((8, 4), 1)]
    return [(entry.example_shape, 0)] * 3 + [(entry.example_shape, 1)]


class _Wire:
    """Counts, during the steps: each whole-step call's matrices, the all-to-alls and their bytes,
    and the matrices stepped on a gathered full matrix (the path the all-to-alls replace)."""

    def __init__(self, opt):
        import lightning_spectral.optim.distributed as distributed

        self.opt, self.module, self.matrices, self.all_to_all, self.bytes, self.gathered = opt, distributed, 0, 0, 0, 0

    def __enter__(self):
        self.saved = dist.all_to_all_single, self.module.full_matrix
        inner, to_all, full = self.opt._whole_step, *self.saved

        def whole(group, W, M, states):
            self.matrices += M.shape[0]
            return inner(group, W, M, states)

        def all_to_all(out, inp, *args, **kwargs):
            self.all_to_all += 1
            self.bytes += inp.numel() * inp.element_size()
            return to_all(out, inp, *args, **kwargs)

        def gathered(*args):
            self.gathered += 1
            return full(*args)

        self.opt._whole_step, dist.all_to_all_single, self.module.full_matrix = whole, all_to_all, gathered
        return self

    def __exit__(self, *exc):
        del self.opt._whole_step
        dist.all_to_all_single, self.module.full_matrix = self.saved


# Resumed from torch's distributed checkpoint on 2 ranks: one of each kind of state (Anderson memory
# and a dual; singular vectors and a float dual; a solver's matrix-sized warm start; Adam's replicated
# step counter); every case on 4 ranks (slow).
DCP_CASES = ("manifold_muon:default", "spectral_ball:default", "muon_sgd:admm_tangent", "muon_adamw:default")


def _split_cases(mesh, tmp: str, names: list[str]) -> dict:
    """Every optimizer (each variant) on :func:`_split_spec`: counts per rank (:class:`_Wire`),
    weights and state against the plain steps, which rank holds each matrix's whole-matrix state,
    and a resume from torch's distributed checkpoint (``get_optimizer_state_dict``, ``dcp.save``
    after 2 steps, ``dcp.load`` into a fresh model and optimizer) against the uninterrupted third step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    from torch.distributed.tensor import distribute_tensor

    out = {}
    for name in names:
        spec = _split_spec(CASES[name])
        ref, sharded, ref_opt, opt = _pair(spec, mesh, lambda ps: _optimizer(name, ps))
        model = nn.ParameterList(sharded)
        g = torch.Generator().manual_seed(1)
        with _Wire(opt) as wire:
            for step in range(STEPS):
                if step == STEPS - 1 and (name in DCP_CASES or mesh.size() > 2):
                    path = os.path.join(tmp, f"dcp_{name.replace(':', '_')}_{mesh.size()}")
                    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                             checkpoint_id=path)
                    # (weights perturbed before the load: the checkpoint must bring them back)
                    saved_weights = [p.detach().clone() for p in sharded]
                    fresh_params = [nn.Parameter(distribute_tensor(p.detach().full_tensor() * 1.5, mesh, p.placements))
                                    for p in sharded]
                    fresh_model, fresh = nn.ParameterList(fresh_params), _optimizer(name, fresh_params)
                _feed(spec, mesh, g, ref, sharded)
                ref_opt.step()
                opt.step()
        state, keys = _state_gap(ref_opt, opt)
        elementwise = set(opt._elementwise_state)
        out[name] = dict(weight=max(_max_diff(a, b) for a, b in zip(ref, sharded)), state=state, keys=keys,
                         matrices=wire.matrices / STEPS, total=len(spec), all_to_all=wire.all_to_all / STEPS,
                         bytes=wire.bytes / STEPS, gathered=wire.gathered, batches=len(set(spec)),
                         holds=[bool(set(opt.state.get(p, {})) - elementwise) for p in sharded],
                         whole_keys=[bool(set(ref_opt.state[p]) - elementwise) for p in ref], loaded=0.0, resumed=0.0)
        if not (name in DCP_CASES or mesh.size() > 2):
            continue
        saved = {"model": get_model_state_dict(fresh_model), "optim": get_optimizer_state_dict(fresh_model, fresh)}
        dcp.load(saved, checkpoint_id=path)
        set_model_state_dict(fresh_model, saved["model"])
        set_optimizer_state_dict(fresh_model, fresh, saved["optim"])
        loaded = [_max_diff(b.full_tensor(), a) for a, b in zip(fresh_params, saved_weights)]
        for p, q in zip(fresh_params, sharded):
            p.grad = q.grad
        fresh.step()
        out[name].update(loaded=max(loaded), resumed=max(_max_diff(b.full_tensor(), a) for a, b in zip(fresh_params, sharded)))
    return out


# (Muon without weight decay: its decay is applied on the shards, so the step's change is the rounded update alone.)
BF16_CASES = {"muon:default": dict(weight_decay=0.0), "muon_sgd:dual_tangent": {}, "manifold_muon:default": {}}


def _bf16_cases(mesh) -> dict:
    """One step with the updates sent back in bfloat16 (``communication_dtype``) beside the same
    step sent in float32: each weight entry may differ by the bfloat16 rounding of its update,
    ``|Δ|·2⁻⁸`` (half bfloat16's eps), plus float32 rounding of the weight. Returns the largest
    ratio to that bound and the largest difference in units of ``eps_bf16·max|Δ|``."""
    out = {}
    for name, overrides in BF16_CASES.items():
        spec = _split_spec(CASES[name])
        build = lambda ps: CASES[name].build(ps, name.split(":")[1], **overrides)  # noqa: E731
        _, fp32, _, fp32_opt = _pair(spec, mesh, build)
        _, bf16, _, bf16_opt = _pair(spec, mesh, build)
        bf16_opt.communication_dtype = torch.bfloat16
        before = [p.detach().full_tensor() for p in fp32]
        _feed(spec, mesh, torch.Generator().manual_seed(1), fp32, bf16)
        fp32_opt.step()
        bf16_opt.step()
        ratio, units = 0.0, 0.0
        for w0, a, b in zip(before, fp32, bf16):
            a, b = a.detach().full_tensor(), b.detach().full_tensor()
            update, gap = (a - w0).abs(), (a - b).abs()
            bound = update * 2.0**-8 + 2 * torch.finfo(torch.float32).eps * w0.abs().clamp(min=1)
            ratio = max(ratio, float((gap / bound).max()))
            units = max(units, float(gap.max()) / (torch.finfo(torch.bfloat16).eps * float(update.max())))
        out[name] = dict(ratio=ratio, units=units, moved=max(float((p.detach().full_tensor() - w).abs().max())
                                                          for p, w in zip(bf16, before)))
    return out


def _fsdp1_case() -> str:
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 7)),
                                     use_orig_params=True, device_id=torch.device("cpu"))
    try:
        O.Muon(model.parameters(), lr=0.05)
    except ValueError as error:
        return str(error)
    return ""


def _worker(rank: int, world: int, port: int, tmp: str, queue) -> None:
    mesh = _init(rank, port, world)
    try:
        out = dict(split=_split_cases(mesh, tmp, OPTIMIZERS))
        if world == 2:
            out.update(dtensor=_dtensor_cases(mesh, rank, tmp), nonfinite=_nonfinite_case(mesh, rank), bf16=_bf16_cases(mesh),
                       fsdp2=_fsdp2_case(mesh), fsdp1=_fsdp1_case())
        queue.put((rank, out))
    finally:
        dist.destroy_process_group()


def _launch(world: int, tmp: str) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(world, _free_port(), tmp, queue), nprocs=world, start_method="spawn")
    return dict(queue.get(timeout=600) for _ in range(world))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _launch(2, str(tmp_path_factory.mktemp("sharded")))


def _check_split(cases: list[dict], name: str) -> None:
    """Each matrix's whole step ran on exactly one rank, from two all-to-alls per shape and none
    of the gathered full matrices; weights and state equal the plain steps to float32 round-off
    (TOL); each whole-matrix state is held by its owner only; a distributed checkpoint resumes
    bit for bit."""
    first, total = cases[0], cases[0]["total"]
    stepped = sum(c["matrices"] for c in cases)
    assert stepped in (total, 0) and all(c["matrices"] < total for c in cases), cases
    assert all(c["all_to_all"] == (2 * c["batches"] if stepped else 0) for c in cases), cases
    assert all(c["gathered"] == 0 for c in cases), "a matrix was gathered whole on every rank"
    assert all(c["weight"] <= TOL and c["state"] <= STATE_TOL and c["keys"] for c in cases), (name, cases)
    for i, whole in enumerate(first["whole_keys"]):
        assert sum(c["holds"][i] for c in cases) == int(whole), (i, cases)
    assert all(c["loaded"] == 0.0 and c["resumed"] == 0.0 for c in cases), "the resumed step differs from the uninterrupted one"


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_matrix_stepped_once_across_ranks(results, name):
    _check_split([results[rank]["split"][name] for rank in (0, 1)], name)


@pytest.mark.slow
def test_each_matrix_stepped_once_across_four_ranks(tmp_path):
    results = _launch(4, str(tmp_path))
    for name in OPTIMIZERS:
        _check_split([results[rank]["split"][name] for rank in range(4)], name)


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


@pytest.mark.parametrize("name", list(BF16_CASES))
def test_bf16_communication_rounds_only_the_update(results, name):
    """Updates sent in bfloat16: every weight within the bfloat16 rounding of its update
    (``|Δ|·2⁻⁸``, half bfloat16's eps, plus float32 round-off) of the float32-sent step."""
    for rank in (0, 1):
        case = results[rank]["bf16"][name]
        assert case["moved"] > 1e-4 and case["ratio"] <= 1.0, case
        assert 0 < case["units"] <= 0.5 + 1e-3, case


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
        # Both sizes given: the default ("auto") makes both ranks tensor-parallel and shards nothing.
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=epochs,
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
        local = sum(p.to_local().numel() for p in model.net.parameters()) / sum(p.numel() for p in model.net.parameters())
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
            json.dump({"err": err, "moved": moved, "types": types, "steps": second.global_step, "local": local}, open(sys.argv[1], "w"))
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
    assert result["local"] < 0.75, result  # sharded for real: rank 0 holds about half of the entries
    assert result["steps"] == 4
    assert result["moved"] > 1e-3
    assert result["err"] <= TOL, result
