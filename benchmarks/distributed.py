"""The optimizer step on 2 or 4 CPU processes (gloo, one thread each): the matrix work split
across the ranks (DDP), the same work repeated on every rank, the split chosen per batch by a
measured latency model, and the matrices sharded as ``DTensor`` (FSDP2), side by side.

    python -m benchmarks.distributed [--quick] [--model gpt resnet18 small] [--world 2 4] [--repeats 5]

Each rank holds the model's matrices (``out × in·kh·kw``; the GPT 4×256's 24 block matrices,
ResNet-18's convolutions and head, ``small``: the GPT 2×32's 12) with identical gradients, as
after DDP's all-reduce, and times ``optimizer.step()`` in four modes, interleaved round by round,
median of ``--repeats``: ``repeated`` (``distribute_work = False``: every rank does everything),
``split`` (each matrix updated by its owner, the new weights all-gathered), ``chosen``
(``distribute_work`` a :class:`~lightning_spectral.optim.split_cost.LatencyModel` measured on these
ranks first: only the batches it says pay are split) and ``fsdp2`` (every matrix a ``DTensor``
``Shard(0)`` over the ranks, as ``fully_shard`` leaves it). Counted per rank and step, not
estimated: the matrices orthogonalised (every ``msign`` call's batch), their Newton–Schulz FLOPs
(``steps·(4s²l + 2s³)`` per matrix, ``s ≤ l`` its sides) and the seconds spent in msign, and the
bytes the rank sends (every collective seen by a dispatch mode: all-gather and broadcast send the
rank's input to each other rank, all-to-all its chunks for the other ranks, all-reduce
``2(w−1)/w`` of the buffer, as a ring does), per collective. Step time is the slowest rank's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_spectral.optim
from lightning_spectral.optim import ManifoldMuon, Muon, MuonSGD, SpectralBall
from lightning_spectral.optim.split_cost import LatencyModel, ns_flops

from ._common import GradientStream, make_params, model_shapes, on_gloo_ranks, set_grads, write_result

OPTIMIZERS = {
    "Muon": lambda ps: Muon(ps, lr=0.02),
    "ManifoldMuon amortized": lambda ps: ManifoldMuon(ps, lr=0.02, mode="amortized"),
    "SpectralBall amortized": lambda ps: SpectralBall(ps, lr=0.02, mode="amortized"),
    "MuonSGD dual_ascent": lambda ps: MuonSGD(ps, lr=0.1, spectral_budget=0.1, inner_solver="dual_ascent"),
}
MODES = ("repeated", "split", "chosen", "fsdp2")


class CollectiveBytes(TorchDispatchMode):
    """Counts the bytes this rank sends in every ``torch.distributed`` collective it runs (the
    c10d ops and the functional collectives DTensor uses), and the number of collectives."""

    def __init__(self, world: int, rank: int):
        super().__init__()
        self.world, self.rank, self.bytes, self.calls = world, rank, 0, 0
        self.by_op: dict[str, list[int]] = {}  # op name -> [calls, bytes]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # DTensor runs first and desugars into the collectives counted here
        name = func.__name__.split(".")[0]
        sent = self._sent(func.namespace, name, args)
        if sent is not None:
            self.bytes += sent
            self.calls += 1
            tally = self.by_op.setdefault(name, [0, 0])
            tally[0] += 1
            tally[1] += sent
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
    """Every ``msign`` call of the package's optimizers, counted: calls, matrices (the batch),
    Newton–Schulz FLOPs at its step count, and the seconds spent in them."""

    def __init__(self):
        self.matrices, self.flops, self.calls, self.seconds = 0, 0, 0, 0.0
        self._patched = []

    def __enter__(self):
        from lightning_spectral.optim.msign import msign as original

        def counting(X, steps=5, *args, **kwargs):
            m, n = X.shape[-2:]
            batch = X.numel() // (m * n) if m * n else 0
            self.matrices += batch
            self.calls += 1
            self.flops += batch * ns_flops((m, n), steps)
            start = time.perf_counter()
            out = original(X, steps, *args, **kwargs)
            self.seconds += time.perf_counter() - start
            return out

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


def _shapes(model: str, quick: bool):
    return model_shapes("gpt", True) if model == "small" else model_shapes(model, quick)


def _worker(rank: int, args, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    latency = LatencyModel.measure(repeats=3 if args.quick else 15)
    rows: dict[str, Any] = {}
    for model in args.model:
        shapes = _shapes(model, args.quick)
        for name, build in OPTIMIZERS.items():
            if args.optimizers and name not in args.optimizers:
                continue
            runs = {}
            for mode in MODES:
                params = _params(mode, shapes, mesh)
                opt = build(params)
                opt.distribute_work = {"repeated": False, "chosen": latency}.get(mode, True)
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
                    counts.setdefault(mode, []).append((msigns, sent))
            for mode in MODES:
                msigns, sent = counts[mode][-1]
                rows[f"{model} | {name} | {mode}"] = dict(
                    model=model, optimizer=name, mode=mode, step_s=statistics.median(times[mode]),
                    matrices=msigns.matrices, flops=msigns.flops, msign_calls=msigns.calls,
                    msign_s=statistics.median(m.seconds for m, _ in counts[mode]),
                    sent_bytes=sent.bytes, collectives=sent.calls, by_op=sent.by_op,
                    param_bytes=sum(p.numel() * 4 for p in make_params(shapes)))
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(rows=rows, latency=dataclasses.asdict(latency)))
    if rank == 0:
        queue.put(gathered)


def _predicted(r: dict, latency: LatencyModel) -> float:
    """The model's msign and collective seconds of a row: ``γ·calls + FLOPs/R + α·collectives + β·bytes``
    from the row's counts (the slowest rank's)."""
    return (latency.gamma_s * r["msign_calls"] + r["flops"] / latency.flop_rate
            + latency.alpha_s * r["collectives"] + latency.beta_s_per_byte * r["sent_bytes"])


def summarise(per_rank: list[dict], world: int) -> dict:
    """Rows over the ranks: counts per rank (``per_rank``) and their maxima, the slowest rank's
    step time, ratios to the repeated and the split step, and the model's prediction."""
    latency = LatencyModel(**per_rank[0]["latency"])
    rows = {}
    for key in per_rank[0]["rows"]:
        ranks = [r["rows"][key] for r in per_rank]
        row = dict(ranks[0], world=world, per_rank=[{k: r[k] for k in ("matrices", "flops", "msign_calls", "sent_bytes",
                                                                       "collectives", "by_op")} for r in ranks])
        for k in ("matrices", "flops", "msign_calls", "msign_s", "sent_bytes", "collectives"):
            row[k] = max(r[k] for r in ranks)
        row["ns_gflop"], row["sent_mib"], row["param_mib"] = row["flops"] / 1e9, row["sent_bytes"] / 2**20, row["param_bytes"] / 2**20
        rows[key] = row
    for row in rows.values():
        base = f"{row['model']} | {row['optimizer']} | "
        row["vs_repeated"] = row["step_s"] / rows[base + "repeated"]["step_s"]
        row["vs_split"] = row["step_s"] / rows[base + "split"]["step_s"]
        row["model_s"] = _predicted(row, latency)
    return dict(world=world, latency=dataclasses.asdict(latency), crossover=latency.crossover(), rows=rows)


def render(result: dict, quick: bool) -> str:
    w, lat = result["world"], result["latency"]
    lines = [f"{w} gloo ranks × 1 thread{', quick' if quick else ''}. Latency model (measured on these ranks, "
             f"max over ranks): α = {1e6 * lat['alpha_s']:.0f} µs, 1/β = {1e-9 / max(lat['beta_s_per_byte'], 1e-30):.2f} GB/s, "
             f"γ = {1e6 * lat['gamma_s']:.0f} µs, R = {lat['flop_rate'] / 1e9:.1f} GFLOP/s; square crossover "
             f"{result['crossover']:.0f}.", "",
             "| model | optimizer | mode | matrices / rank | NS GFLOP / rank | MiB sent / rank (weights) | collectives "
             "| msign ms (model: msign+wire) | step ms | / repeated | / split |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"].values():
        lines.append(f"| {r['model']} | {r['optimizer']} | {r['mode']} | {r['matrices']} | {r['ns_gflop']:.2f} | "
                     f"{r['sent_mib']:.2f} ({r['param_mib']:.2f}) | {r['collectives']} | {1e3 * r['msign_s']:.0f} "
                     f"({1e3 * r['model_s']:.0f}) | {1e3 * r['step_s']:.0f} | {r['vs_repeated']:.2f} | {r['vs_split']:.2f} |")
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    """Issue 26's targets on these rows: FSDP2 ≤ 1.1× split, split ≤ 0.6× repeated, split's bytes ≤ weights,
    the chosen mode ≤ 1.1× the better of split and repeated."""
    out = []
    for r in result["rows"].values():
        if r["mode"] == "fsdp2":
            out.append(f"{r['model']} {r['optimizer']}: FSDP2 / split {r['vs_split']:.2f} (≤ 1.1)")
        elif r["mode"] == "split":
            out.append(f"{r['model']} {r['optimizer']}: split / repeated {r['vs_repeated']:.2f} (≤ 0.6), sent / weights "
                       f"{r['sent_bytes'] / r['param_bytes']:.2f} (≤ 1)")
        elif r["mode"] == "chosen":
            out.append(f"{r['model']} {r['optimizer']}: chosen / min(split, repeated) "
                       f"{max(r['vs_split'], r['vs_repeated']):.2f} (≤ 1 within noise)")
    return out


# -- the cost model on paper (docs/distributed_cost_model.md) ---------------------------------------
# NVIDIA H100 Tensor Core GPU datasheet (SXM): bf16 dense Tensor Core 989 TFLOP/s (1,979 with
# sparsity), NVLink 900 GB/s per GPU (both directions together); NVIDIA ConnectX-7 / Quantum-2 NDR
# InfiniBand: 400 Gb/s = 50 GB/s per GPU (one adapter per GPU, as in a DGX H100).
H100_BF16_FLOPS = 989e12
NVLINK_BYTES_S = 900e9 / 2  # one direction
IB_NDR_BYTES_S = 400e9 / 8
GPUS_PER_NODE = 8
PAPER_MODELS = {  # name: (n_layer, d, parameters, tokens per step)
    "GPT-2 small (124M)": (12, 768, 124e6, 2**19),
    "GPT 1B (20 x 2048)": (20, 2048, 1.11e9, 2**20),
}


def gpt_matrices(n_layer: int, d: int) -> list[tuple[int, int]]:
    """The hidden matrices of a GPT block stack: Q, K, V, O (d × d), MLP 4d × d and d × 4d per layer."""
    return [(d, d)] * 4 * n_layer + [(4 * d, d), (d, 4 * d)] * n_layer


def cost_model(gpus=(8, 64, 256), ns_efficiency: float = 0.5, mfu: float = 0.4) -> list[dict]:
    """Per model and GPU count (strong scaling: the tokens per step fixed), in seconds per step:
    ``train`` = 6·P·tokens/(w·mfu·peak) (forward and backward), ``allreduce`` = DDP's bf16 gradient
    ring all-reduce 2(w−1)/w·P·2/B, the optimizer ``repeated`` = F/R (F every matrix's NS FLOPs,
    R = ns_efficiency·peak), its compute split by :func:`deal` (the busiest rank's FLOPs/R), the
    DDP ``split`` all-gather of the new weights (w−1)·slot·b/B (slot: the busiest rank's share of
    elements, b = 4 or 2 bytes) and FSDP2's two all-to-alls 2(w−1)/w²·P_m·b/B; B the per-GPU
    bandwidth, NVLink within a node, InfiniBand across nodes. Latency terms are left out."""
    from lightning_spectral.optim.distributed import deal

    rate = ns_efficiency * H100_BF16_FLOPS
    rows = []
    for name, (n_layer, d, params, tokens) in PAPER_MODELS.items():
        shapes = gpt_matrices(n_layer, d)
        flops = [ns_flops(s) for s in shapes]
        numel = [m * n for m, n in shapes]
        for w in gpus:
            owners = deal([(s, "torch.float32", "cuda") for s in shapes], w)
            busiest = max(sum(f for f, o in zip(flops, owners) if o == r) for r in range(w))
            slot = max(sum(n for n, o in zip(numel, owners) if o == r) for r in range(w))
            bw = NVLINK_BYTES_S if w <= GPUS_PER_NODE else IB_NDR_BYTES_S
            row = dict(model=name, gpus=w, matrices=len(shapes), matrix_params=sum(numel), ns_tflop=sum(flops) / 1e12,
                       bandwidth_gb_s=bw / 1e9, train=6 * params * tokens / (w * mfu * H100_BF16_FLOPS),
                       allreduce=2 * (w - 1) / w * params * 2 / bw, repeated=sum(flops) / rate, split_compute=busiest / rate,
                       crossover_fp32=(4 / bw) * rate / 30, crossover_bf16=(2 / bw) * rate / 30)
            for b, tag in ((4, "fp32"), (2, "bf16")):
                row[f"ddp_split_{tag}"] = row["split_compute"] + (w - 1) * slot * b / bw
                row[f"fsdp2_{tag}"] = row["split_compute"] + 2 * (w - 1) / w**2 * sum(numel) * b / bw
            step = row["train"] + row["allreduce"]
            for key in ("repeated", "ddp_split_fp32", "ddp_split_bf16", "fsdp2_fp32", "fsdp2_bf16"):
                row[f"share_{key}"] = row[key] / (step + row[key])
            rows.append(row)
    return rows


def render_cost_model(rows: list[dict]) -> str:
    lines = ["| model | GPUs | link GB/s | train ms | grad all-reduce ms | optimizer repeated ms (share) | split compute ms "
             "| DDP split fp32 / bf16 ms (share) | FSDP2 all-to-all fp32 / bf16 ms (share) | crossover side fp32 / bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['gpus']} | {r['bandwidth_gb_s']:.0f} | {1e3 * r['train']:.1f} | {1e3 * r['allreduce']:.1f} | "
                     f"{1e3 * r['repeated']:.2f} ({100 * r['share_repeated']:.0f}%) | {1e3 * r['split_compute']:.3f} | "
                     f"{1e3 * r['ddp_split_fp32']:.2f} / {1e3 * r['ddp_split_bf16']:.2f} ({100 * r['share_ddp_split_fp32']:.0f}% / "
                     f"{100 * r['share_ddp_split_bf16']:.0f}%) | {1e3 * r['fsdp2_fp32']:.3f} / {1e3 * r['fsdp2_bf16']:.3f} "
                     f"({100 * r['share_fsdp2_fp32']:.1f}% / {100 * r['share_fsdp2_bf16']:.1f}%) | "
                     f"{r['crossover_fp32']:.0f} / {r['crossover_bf16']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--model", nargs="+", default=["gpt", "resnet18", "small"], choices=("gpt", "resnet18", "mlp", "small"))
    parser.add_argument("--optimizers", nargs="*", default=["Muon"], help=f"a subset of {list(OPTIMIZERS)}")
    parser.add_argument("--world", type=int, nargs="+", default=[2], help="rank counts, one launch each")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON output path (the tables beside it, .md)")
    parser.add_argument("--cost-model", action="store_true", help="print the H100 cost model's table only (no ranks)")
    args = parser.parse_args(argv)
    if args.cost_model:
        rows = cost_model()
        print(render_cost_model(rows))
        return {"cost_model": rows}
    results, text = {}, []
    for world in args.world:
        (per_rank,) = on_gloo_ranks(_worker, args, results=1, timeout=3600, world=world)
        result = summarise(per_rank, world)
        results[str(world)] = result
        text += [render(result, args.quick), "", "Targets: " + "; ".join(targets(result)), ""]
        print("\n".join(text[-4:]), flush=True)
        if args.out:  # after every world, so a long run keeps what it measured
            write_result(Path(args.out), results, "\n".join(text))
    return results


if __name__ == "__main__":
    main()
