"""The optimizer step on 2 (or 4) CPU processes (gloo, one thread each): the matrix work split
across the ranks (DDP), the same work repeated on every rank, and the matrices sharded as
``DTensor`` (FSDP2), side by side.

    python -m benchmarks.distributed [--quick] [--model gpt resnet18] [--world 2] [--repeats 3]

Each rank holds the model's matrices (``out × in·kh·kw``; the GPT 4×256's 24 block matrices,
ResNet-18's convolutions and head) with identical gradients, as after DDP's all-reduce, and
times ``optimizer.step()`` in three modes, interleaved round by round, median of ``--repeats``:
``repeated`` (``distribute_work = False``: every rank does everything), ``split`` (each matrix
updated by its owner, the new weights sent to the others) and ``fsdp2`` (every matrix a
``DTensor`` ``Shard(0)`` over the ranks, as ``fully_shard`` leaves it). Counted per rank and
step, not estimated: the matrices orthogonalised (every ``msign`` call's batch) and their
Newton–Schulz FLOPs (``steps·(4m²n + 2m³)`` per ``m × n`` matrix, ``m`` the short side), and the
bytes the rank sends (every collective seen by a dispatch mode: all-gather and broadcast send
the rank's input to each other rank, all-to-all its chunks for the other ranks, all-reduce
``2(w−1)/w`` of the buffer, as a ring does). Step time is the slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_spectral.optim
from lightning_spectral.optim import ManifoldMuon, Muon, MuonSGD, SpectralBall

from ._common import GradientStream, make_params, model_shapes, on_gloo_ranks, set_grads

OPTIMIZERS = {
    "Muon": lambda ps: Muon(ps, lr=0.02),
    "ManifoldMuon amortized": lambda ps: ManifoldMuon(ps, lr=0.02, mode="amortized"),
    "SpectralBall amortized": lambda ps: SpectralBall(ps, lr=0.02, mode="amortized"),
    "MuonSGD dual_ascent": lambda ps: MuonSGD(ps, lr=0.1, spectral_budget=0.1, inner_solver="dual_ascent"),
}
MODES = ("repeated", "split", "fsdp2")


class CollectiveBytes(TorchDispatchMode):
    """Counts the bytes this rank sends in every ``torch.distributed`` collective it runs (the
    c10d ops and the functional collectives DTensor uses), and the number of collectives."""

    def __init__(self, world: int, rank: int):
        super().__init__()
        self.world, self.rank, self.bytes, self.calls = world, rank, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs first and desugars into the collectives counted here
        sent = self._sent(func.namespace, func.__name__.split(".")[0], args)
        if sent is not None:
            self.bytes += sent
            self.calls += 1
        return func(*args, **(kwargs or {}))

    def _sent(self, namespace: str, name: str, args: tuple) -> int | None:
        """Bytes sent by this rank, by each op's schema (``torch.ops.c10d`` / ``_c10d_functional``)."""
        w, rank = self.world, self.rank

        def size(t) -> int:
            return sum(size(x) for x in t) if isinstance(t, (list, tuple)) else t.numel() * t.element_size()

        def to_others(inp, splits) -> int:
            if not splits:
                return size(inp) * (w - 1) // w
            return inp.element_size() * (inp.numel() // max(sum(splits), 1)) * (sum(splits) - splits[rank])

        if namespace == "c10d":
            ops = {"allgather_": lambda: size(args[1]) * (w - 1), "_allgather_base_": lambda: size(args[1]) * (w - 1),
                   "allgather_into_tensor_coalesced_": lambda: size(args[1]) * (w - 1),
                   "broadcast_": lambda: size(args[0]) * (w - 1) if args[2] == rank else 0,
                   "alltoall_base_": lambda: to_others(args[1], args[4]),
                   "allreduce_": lambda: size(args[0]) * 2 * (w - 1) // w}
        elif namespace == "_c10d_functional":
            ops = {"all_gather_into_tensor": lambda: size(args[0]) * (w - 1),
                   "broadcast": lambda: size(args[0]) * (w - 1) if args[1] == rank else 0,
                   "all_to_all_single": lambda: to_others(args[0], args[2]),
                   "all_reduce": lambda: size(args[0]) * 2 * (w - 1) // w,
                   "reduce_scatter_tensor": lambda: size(args[0]) * (w - 1) // w}
        else:
            return None
        return ops[name]() if name in ops else None  # wait_tensor, barrier and wrappers send nothing


class MsignCount:
    """Every ``msign`` call of the package's optimizers, counted: matrices (the batch) and
    Newton–Schulz FLOPs at its step count."""

    def __init__(self):
        self.matrices, self.flops = 0, 0.0
        self._patched = []

    def __enter__(self):
        from lightning_spectral.optim.msign import msign as original

        def counting(X, steps=5, *args, **kwargs):
            m, n = sorted(X.shape[-2:])
            batch = X.numel() // (m * n) if m * n else 0
            self.matrices += batch
            self.flops += batch * steps * (4 * m * m * n + 2 * m**3)
            return original(X, steps, *args, **kwargs)

        for module in list(sys.modules.values()):
            if module is not None and module.__name__.startswith(lightning_spectral.optim.__name__) \
                    and getattr(module, "msign", None) is original:
                self._patched.append(module)
                module.msign = counting
        self._original = original
        return self

    def __exit__(self, *exc):
        for module in self._patched:
            module.msign = self._original


def _params(mode: str, shapes, mesh):
    params = make_params(shapes)
    if mode != "fsdp2":
        return params
    from torch.distributed.tensor import Shard, distribute_tensor

    return [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in params]


def _set_grads(mode: str, params, grads, mesh) -> None:
    if mode != "fsdp2":
        set_grads(params, grads)
        return
    from torch.distributed.tensor import Shard, distribute_tensor

    for p, g in zip(params, grads):
        p.grad = distribute_tensor(g, mesh, [Shard(0)])


def _worker(rank: int, args, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows: dict[str, Any] = {}
    for model in args.model:
        shapes = model_shapes(model, args.quick)
        for name, build in OPTIMIZERS.items():
            if args.optimizers and name not in args.optimizers:
                continue
            runs = {}
            for mode in MODES:
                params = _params(mode, shapes, mesh)
                opt = build(params)
                opt.distribute_work = mode == "split"
                stream = GradientStream(shapes, seed=1)
                _set_grads(mode, params, stream.grads(), mesh)
                opt.step()  # warm-up: state allocation, first solves
                runs[mode] = (opt, params, stream)
            times = {mode: [] for mode in MODES}
            counts = {}
            for _ in range(args.repeats):
                for mode, (opt, params, stream) in runs.items():
                    _set_grads(mode, params, stream.grads(), mesh)
                    sent, msigns = CollectiveBytes(world, rank), MsignCount()
                    dist.barrier()
                    start = time.perf_counter()
                    with sent, msigns:
                        opt.step()
                    elapsed = torch.tensor([time.perf_counter() - start])
                    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's
                    times[mode].append(float(elapsed))
                    counts[mode] = (msigns.matrices, msigns.flops, sent.bytes, sent.calls)
            for mode in MODES:
                matrices, flops, sent_bytes, calls = counts[mode]
                rows[f"{model} | {name} | {mode}"] = dict(
                    model=model, optimizer=name, mode=mode, step_s=statistics.median(times[mode]),
                    matrices=matrices, ns_gflop=flops / 1e9, sent_mib=sent_bytes / 2**20, collectives=calls,
                    param_mib=sum(p.numel() * 4 for p in make_params(shapes)) / 2**20)
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        queue.put(gathered)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--model", nargs="+", default=["gpt", "resnet18"], choices=("gpt", "resnet18", "mlp"))
    parser.add_argument("--optimizers", nargs="*", default=None, help=f"a subset of {list(OPTIMIZERS)}")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    (per_rank,) = on_gloo_ranks(_worker, args, results=1, timeout=3600, world=args.world)
    rows = {}
    for key in per_rank[0]:
        ranks = [r[key] for r in per_rank]
        rows[key] = dict(ranks[0], matrices=max(r["matrices"] for r in ranks),
                         ns_gflop=max(r["ns_gflop"] for r in ranks), sent_mib=max(r["sent_mib"] for r in ranks))
    print(f"| model | optimizer ({args.world} gloo ranks × 1 thread{', quick' if args.quick else ''}) | mode "
          "| matrices / rank | NS GFLOP / rank | MiB sent / rank | collectives | step (ms) | / repeated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        base = rows[f"{r['model']} | {r['optimizer']} | repeated"]["step_s"]
        r["vs_repeated"] = r["step_s"] / base
        print(f"| {r['model']} | {r['optimizer']} | {r['mode']} | {r['matrices']} | {r['ns_gflop']:.2f} | "
              f"{r['sent_mib']:.2f} (weights {r['param_mib']:.2f}) | {r['collectives']} | {1e3 * r['step_s']:.0f} | "
              f"{r['vs_repeated']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
