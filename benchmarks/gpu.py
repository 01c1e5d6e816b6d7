"""One-device GPU benchmark: optimizer steps on ResNet-18's and GPT-2 small's shapes, and a
ResNet-18 CIFAR-shaped training loop in bf16 autocast. Prints one Markdown table per part.

    python -m benchmarks.gpu [--out logs/gpu] [--device cuda] [--budget-s 420]
    python -m benchmarks.gpu --dry-run --device cpu --out /tmp/gpu   # tiny shapes, seconds (CI)
    torchrun --nproc-per-node 8 -m benchmarks.gpu                      # + the distributed steps (NCCL)

Rows: our ``Muon`` (bfloat16 and float32 Newton–Schulz) against ``torch.optim.Muon`` (whose
Newton–Schulz runs in bfloat16) and the chains alone on the pre-stacked matrices (the standard
chain, ``msign(..., method="standard")``, and the ``"auto"`` chain, the Gram form where one side
is ≥ 2× the other; both dtypes, each with its deviation from the float64 iteration); the amortized and inner modes of ``ManifoldMuon`` and
``SpectralBall``; then 200 training steps of ResNet-18 on synthetic 3×32×32 batches of 128 under
``torch.autocast(bfloat16)`` with our ``Muon`` and with ``torch.optim.AdamW`` (images/s); the
distributed cost model's inputs (msign per matrix of GPT-2 small's and a 1B GPT's shapes, the fitted
``γ + FLOPs/R``) and, under ``torchrun`` with several GPUs, the latency model measured over NCCL and
``Muon``'s step repeated, split and chosen by it. Times
are CUDA-event medians after warm-up, with ``torch.cuda.synchronize()`` around them; peak memory
is ``torch.cuda.max_memory_allocated`` since the row's start. Every row is guarded: a failure
(or a row past the time budget) is reported in the table, never ends the run. JSON and Markdown
go to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from benchmarks._common import stack_by_shape, write_result

GPT2_SMALL = {"n_layer": 12, "n_embd": 768}


def gpt2_shapes(scale: float = 1.0, n_layer: int = GPT2_SMALL["n_layer"]) -> list[tuple[int, int]]:
    """GPT-2 small's matrices per layer: Q, K, V, O (``d × d``), MLP ``4d × d`` and ``d × 4d``."""
    d = max(8, int(GPT2_SMALL["n_embd"] * scale))
    return [(d, d)] * 4 * n_layer + [(4 * d, d), (d, 4 * d)] * n_layer


def resnet18_shapes(scale: float = 1.0) -> list[tuple[int, int]]:
    from lightning_spectral.models import ResNet18

    return [(p.shape[0], p[0].numel()) for p in ResNet18(width_mult=scale).parameters() if p.ndim >= 2]


class Timer:
    """Median of ``repeats`` calls after ``warmup``, by CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object], warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(self.device)
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def optimizer_rows() -> dict[str, Callable[[list], object]]:
    """name → builder (``None``: the bare standard chain, built by the caller)."""
    from lightning_spectral import optim as O

    return {
        "standard chain float32 (floor)": None,
        "standard chain bfloat16": None,
        "auto chain float32 (Gram form where n >= 2m)": None,
        "auto chain bfloat16 (Gram form where n >= 2m)": None,
        "torch.optim.Muon (bf16 NS)": lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0),
        "Muon bf16": lambda ps: O.Muon(ps, ns_dtype="bfloat16"),
        "Muon float32": lambda ps: O.Muon(ps, ns_dtype="float32"),
        "ManifoldMuon amortized": lambda ps: O.ManifoldMuon(ps, mode="amortized"),
        "ManifoldMuon inner, inner_tol=2e-3": lambda ps: O.ManifoldMuon(ps, mode="inner", inner_tol=2e-3),
        "SpectralBall amortized": lambda ps: O.SpectralBall(ps, mode="amortized"),
        "SpectralBall inner, inner_tol=1e-2": lambda ps: O.SpectralBall(ps, mode="inner", inner_tol=1e-2),
    }


def bench_optimizers(shapes, device, timer: Timer, warmup: int, repeats: int, deadline: float, log) -> dict:
    from lightning_spectral.optim.msign import msign

    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(n, m, generator=g) / math.sqrt(m)).to(device) for n, m in shapes]
    grads = [[(torch.randn(n, m, generator=g) / math.sqrt(n * m)).to(device) for n, m in shapes] for _ in range(2)]
    rows: dict[str, dict] = {}
    for name, build in optimizer_rows().items():
        if time.perf_counter() > deadline:
            rows[name] = {"error": "skipped: time budget spent"}
            continue
        try:
            reset_peak(device)
            if build is None:
                dtype = torch.bfloat16 if "bfloat16" in name else torch.float32
                method = "standard" if name.startswith("standard") else "auto"
                stacks = stack_by_shape(grads[0])
                fn = lambda stacks=stacks, dtype=dtype, method=method: [
                    msign(X, 5, "jordan", dtype=dtype, method=method) for X in stacks]
                exact = [msign(X.double(), 5, "jordan", method="standard") for X in stacks]
                deviation = max(float((out.double() - e).norm() / e.norm()) for out, e in zip(fn(), exact))
            else:
                params = [torch.nn.Parameter(w.clone()) for w in weights]
                opt = build(params)
                counter = {"t": 0}

                def fn(opt=opt, params=params, counter=counter):
                    for p, G in zip(params, grads[counter["t"] % 2]):
                        p.grad = G.clone() if p.grad is None else p.grad.copy_(G)
                    counter["t"] += 1
                    opt.step()

            slow = "inner" in name  # a dual solve per matrix per step: fewer repeats
            seconds = timer(fn, min(warmup, 1) if slow else warmup, min(repeats, 2) if slow else repeats)
            rows[name] = {"ms": seconds * 1e3, "peak_mib": peak_mib(device)}
            if build is None:
                rows[name]["deviation"] = deviation
            log(f"  {name}: {seconds * 1e3:.2f} ms")
        except Exception as err:  # noqa: BLE001 - one row's failure must not end the table
            rows[name] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
            log(f"  {name}: FAILED\n{traceback.format_exc(limit=3)}")
    for r in rows.values():
        for ref, key in (("torch.optim.Muon (bf16 NS)", "over_torch_muon"), ("Muon bf16", "over_muon_bf16"),
                         ("standard chain float32 (floor)", "over_floor32")):
            if "ms" in r and "ms" in rows.get(ref, {}):
                r[key] = r["ms"] / rows[ref]["ms"]
    return {"shapes": len(shapes), "parameters": sum(n * m for n, m in shapes), "rows": rows}


def training_loop(device, timer: Timer, steps: int, batch: int, scale: float, log) -> dict:
    """ResNet-18 on synthetic CIFAR-shaped batches, forward/backward under bf16 autocast."""
    from lightning_spectral.models import ResNet18
    from lightning_spectral.optim import Muon

    out = {}
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    for name, build in (("Muon (ours, ns_dtype auto)", lambda ps: Muon(ps, lr=0.02)),
                        ("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3))):
        try:
            torch.manual_seed(0)
            model = ResNet18(width_mult=scale).to(device)
            opt = build(list(model.parameters()))

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            reset_peak(device)
            for _ in range(min(5, steps)):
                step()
            timer.sync()
            start = time.perf_counter()
            for _ in range(steps):
                step()
            timer.sync()
            wall = time.perf_counter() - start
            out[name] = {"steps": steps, "batch": batch, "s_per_step": wall / steps, "images_per_s": steps * batch / wall,
                         "peak_mib": peak_mib(device)}
            log(f"  loop {name}: {steps * batch / wall:.0f} images/s")
        except Exception as err:  # noqa: BLE001
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
            log(f"  loop {name}: FAILED\n{traceback.format_exc(limit=3)}")
    return out


def distributed_inputs(device, timer: Timer, scale: float, warmup: int, repeats: int, deadline: float, log) -> dict:
    """The cost model's device inputs (docs/distributed_cost_model.md): one msign (and a stack of
    8) of each distinct matrix shape of GPT-2 small and the 1B GPT, in bfloat16 and float32, and
    per dtype the fitted ``γ`` (seconds per call) and ``R`` (FLOP/s) of ``t = γ + FLOPs/R``."""
    from benchmarks.distributed import PAPER_MODELS, gpt_matrices
    from lightning_spectral.optim.msign import msign
    from lightning_spectral.optim.split_cost import line_fit, ns_flops

    shapes = sorted({s for n_layer, d, _, _ in PAPER_MODELS.values()
                     for s in gpt_matrices(1, max(8, int(d * scale)))})
    out: dict = {"rows": {}, "fit": {}}
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        samples = []
        for m, n in shapes:
            for k in (1, 8):
                name = f"{str(dtype).removeprefix('torch.')} {k}x{m}x{n}"
                if time.perf_counter() > deadline:
                    out["rows"][name] = {"error": "skipped: time budget spent"}
                    continue
                try:
                    X = torch.randn(k, m, n, generator=g).to(device)
                    seconds = timer(lambda X=X, dtype=dtype: msign(X, 5, dtype=dtype), warmup, repeats)
                    flops = k * ns_flops((m, n))
                    out["rows"][name] = {"ms": seconds * 1e3, "tflop_s": flops / seconds / 1e12}
                    samples.append((flops, seconds))
                    log(f"  msign {name}: {seconds * 1e3:.3f} ms")
                except Exception as err:  # noqa: BLE001
                    out["rows"][name] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
        try:
            gamma, per_flop = line_fit(samples, "msign")
            out["fit"][str(dtype).removeprefix("torch.")] = {"gamma_us": gamma * 1e6, "tflop_s": 1 / per_flop / 1e12}
        except (ValueError, ZeroDivisionError) as err:
            out["fit"][str(dtype).removeprefix("torch.")] = {"error": str(err)[:120]}
    return out


def distributed_steps(device, scale: float, repeats: int, log) -> dict:
    """Under ``torchrun`` with several GPUs (NCCL): the latency model measured on the ranks and
    ``Muon``'s step on GPT-2 small's matrices repeated, split and chosen by that model (interleaved,
    medians, the slowest rank's)."""
    import torch.distributed as dist

    from benchmarks.distributed import gpt_matrices
    from lightning_spectral.optim import Muon
    from lightning_spectral.optim.split_cost import LatencyModel

    latency = LatencyModel.measure(device)
    shapes = gpt_matrices(12, max(8, int(768 * scale)))
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(m, n, generator=g).to(device) / math.sqrt(m * n) for m, n in shapes]
    runs = {}
    for mode, work in (("repeated", False), ("split", True), ("chosen", latency)):
        params = [torch.nn.Parameter(torch.randn(m, n, generator=g).to(device) / math.sqrt(n)) for m, n in shapes]
        opt = Muon(params, lr=0.02)
        opt.distribute_work = work
        runs[mode] = (opt, params)
    times: dict[str, list[float]] = {mode: [] for mode in runs}
    for round_ in range(repeats + 1):
        for mode, (opt, params) in runs.items():
            for p, G in zip(params, grads):
                p.grad = G.clone()
            torch.cuda.synchronize(device)
            dist.barrier()
            start = time.perf_counter()
            opt.step()
            torch.cuda.synchronize(device)
            elapsed = torch.tensor([time.perf_counter() - start], device=device)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if round_:
                times[mode].append(float(elapsed))
    out = {"world": dist.get_world_size(), "latency": dataclasses.asdict(latency),
           "rows": {mode: {"ms": statistics.median(t) * 1e3} for mode, t in times.items()}}
    log(f"  distributed: {out}")
    return out


def _cell(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return f"{x:.{digits}g}"


def render(result: dict) -> str:
    lines = [f"Device: {result['device_name']}, torch {result['torch']}; {result['mode']}."]
    for part, sec in result["optimizers"].items():
        lines += ["", f"**{part}** — {sec['shapes']} matrices, {sec['parameters'] / 1e6:.1f}M parameters", "",
                  "| optimizer | ms/step | ÷ torch.optim.Muon | ÷ Muon bf16 | ÷ float32 floor | peak MiB "
                  "| chain's deviation from float64 |", "|---|---|---|---|---|---|---|"]
        for name, r in sec["rows"].items():
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | — | — | — | — | — |")
            else:
                lines.append(f"| {name} | {_cell(r['ms'])} | {_cell(r.get('over_torch_muon'))} | "
                             f"{_cell(r.get('over_muon_bf16'))} | {_cell(r.get('over_floor32'))} | {_cell(r['peak_mib'], 5)} "
                             f"| {_cell(r.get('deviation'))} |")
    loop = result.get("training_loop", {})
    if loop:
        lines += ["", "**ResNet-18 training loop** (synthetic 3×32×32, bf16 autocast)", "",
                  "| optimizer | steps × batch | ms/step | images/s | peak MiB |", "|---|---|---|---|---|"]
        for name, r in loop.items():
            if "error" in r:
                lines.append(f"| {name} | {r['error']} | — | — | — |")
            else:
                lines.append(f"| {name} | {r['steps']} × {r['batch']} | {_cell(r['s_per_step'] * 1e3)} | "
                             f"{_cell(r['images_per_s'], 5)} | {_cell(r['peak_mib'], 5)} |")
    dist_in = result.get("distributed_inputs", {})
    if dist_in:
        lines += ["", "**msign per matrix** (the distributed cost model's inputs; fit t = γ + FLOPs/R: "
                  + "; ".join(f"{k}: " + (f"γ {v['gamma_us']:.0f} µs, R {v['tflop_s']:.1f} TFLOP/s" if "error" not in v
                                           else v["error"]) for k, v in dist_in["fit"].items()) + ")", "",
                  "| dtype, k × m × n | ms | TFLOP/s |", "|---|---|---|"]
        for name, r in dist_in["rows"].items():
            lines.append(f"| {name} | {r['error']} | — |" if "error" in r else f"| {name} | {_cell(r['ms'])} | {_cell(r['tflop_s'])} |")
    steps = result.get("distributed_steps")
    if steps:
        lines += ["", f"**Muon on GPT-2 small's matrices, {steps.get('world', '?')} GPUs** (slowest rank, median)", "",
                  "| mode | ms |", "|---|---|"] + [f"| {m} | {_cell(r['ms'])} |" for m, r in steps.get("rows", {}).items()]
        if "error" in steps:
            lines.append(f"| error | {steps['error']} |")
    lines += ["", f"Total {result['wall_s']:.0f} s."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="logs/gpu", help="output folder (gpu.json, gpu.md)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and step counts (CI, any device)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="rows after this many seconds are skipped")
    parser.add_argument("--steps", type=int, default=200, help="training-loop steps")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu (with --dry-run for the tiny CI mode)")
    ranks = int(os.environ.get("WORLD_SIZE", "1")) if device.type == "cuda" else 1
    if ranks > 1:  # under torchrun: one GPU per rank, rank 0 writes
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    start = time.perf_counter()
    deadline = start + args.budget_s
    timer = Timer(device)
    scale, warmup, repeats = (1 / 16, 1, 1) if args.dry_run else (1.0, 3, 10)
    steps, batch = (3, 8) if args.dry_run else (args.steps, 128)
    result: dict = {"torch": torch.__version__, "device": str(device),
                    "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                    "mode": "dry run (tiny shapes)" if args.dry_run else "full shapes", "optimizers": {}}
    parts = {"ResNet-18 shapes": resnet18_shapes(scale),
             "GPT-2 small shapes": gpt2_shapes(scale, 2 if args.dry_run else GPT2_SMALL["n_layer"])}
    for part, shapes in parts.items():
        log(f"[gpu] {part}")
        try:
            result["optimizers"][part] = bench_optimizers(shapes, device, timer, warmup, repeats, deadline, log)
        except Exception as err:  # noqa: BLE001
            result["optimizers"][part] = {"shapes": len(shapes), "parameters": 0,
                                          "rows": {"setup": {"error": f"{type(err).__name__}: {err}"}}}
    log("[gpu] distributed cost model inputs")
    result["distributed_inputs"] = distributed_inputs(device, timer, scale, warmup, repeats, deadline, log)
    if ranks > 1:
        import torch.distributed as dist

        try:
            dist.init_process_group("nccl", device_id=device)
            result["distributed_steps"] = distributed_steps(device, scale, repeats, log)
        except Exception as err:  # noqa: BLE001
            result["distributed_steps"] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
    log("[gpu] training loop")
    result["training_loop"] = training_loop(device, timer, steps, batch, 1 / 16 if args.dry_run else 1.0, log)
    result["wall_s"] = time.perf_counter() - start
    text = render(result)
    result["markdown"] = text
    if ranks > 1 and int(os.environ.get("RANK", "0")) != 0:
        return result
    print(text)
    out = Path(args.out)
    write_result(out / "gpu.json", result, text)
    log(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
    return result


if __name__ == "__main__":
    main()
