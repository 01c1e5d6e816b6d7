"""Optimizer step time with the matrix work split across 2 ranks against the same work repeated
on both (issue 8), on 2 CPU processes (gloo, one thread each).

    python -m benchmarks.distributed [--quick] [--model resnet18|mlp] [--repeats 3]

Each rank holds the model's matrices (``out × in·kh·kw``) with identical gradients, as after DDP's
all-reduce, and times ``optimizer.step()`` with ``distribute_work = True`` (each matrix updated by
its owner, then broadcast with its state) and ``False`` (every rank does everything), alternating,
median of ``--repeats``. Printed: seconds per step and the ratio split / repeated (ideal 1/2 on
2 ranks when the msign work dominates; the broadcast is the overhead).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch.distributed as dist

from lightning_spectral.optim import ManifoldMuon, Muon, MuonSGD, SpectralBall

from ._common import GradientStream, make_params, model_shapes, on_two_gloo_ranks, set_grads

OPTIMIZERS = {
    "Muon": lambda ps: Muon(ps, lr=0.02),
    "ManifoldMuon amortized": lambda ps: ManifoldMuon(ps, lr=0.02, mode="amortized"),
    "SpectralBall amortized": lambda ps: SpectralBall(ps, lr=0.02, mode="amortized"),
    "MuonSGD dual_ascent": lambda ps: MuonSGD(ps, lr=0.1, spectral_budget=0.1, inner_solver="dual_ascent"),
}


def _time_steps(opt, params, stream, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        set_grads(params, stream.grads())
        dist.barrier()
        start = time.perf_counter()
        opt.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _worker(rank: int, args, queue) -> None:
    shapes = model_shapes(args.model, args.quick)
    rows = {}
    for name, build in OPTIMIZERS.items():
        timings = {}
        for distribute in (False, True, False, True):
            params = make_params(shapes)
            opt = build(params)
            opt.distribute_work = distribute
            stream = GradientStream(shapes, seed=1)
            _time_steps(opt, params, stream, 1)  # warm-up: state allocation, first solves
            timings.setdefault(distribute, []).append(_time_steps(opt, params, stream, args.repeats))
        rows[name] = {"repeated_s": min(timings[False]), "split_s": min(timings[True])}
        rows[name]["ratio"] = rows[name]["split_s"] / rows[name]["repeated_s"]
    if rank == 0:
        queue.put(rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--model", default="resnet18", choices=("resnet18", "mlp"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    (rows,) = on_two_gloo_ranks(_worker, args, results=1, timeout=3600)
    print(f"| optimizer ({args.model}{', quick' if args.quick else ''}, 2 gloo ranks × 1 thread) "
          "| repeated on both (s/step) | split (s/step) | split / repeated |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['repeated_s']:.3f} | {r['split_s']:.3f} | {r['ratio']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
