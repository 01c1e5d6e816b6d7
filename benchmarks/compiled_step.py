"""What ``torch.compile(optimizer.step)`` costs and gains, beside the eager step.

    python -m benchmarks.compiled_step [--quick] [--backend inductor] [--model mlp] [--out logs/compiled_step.json]

Every configuration gets two copies of the same parameters (the MLP's matrices and a bias each,
so the fallback runs too) and the same stream of power-law gradients (:mod:`._common`): one is
stepped eagerly, the other through ``torch.compile``; the first three compiled steps (trace,
the recompile for the state they create, one cached call) are the compile cost, then both are
timed in interleaved rounds (medians). Reported: compile seconds, eager and compiled ms per step,
their ratio (below 1: compiling pays) and the steps it takes to pay the compile time back, and
the largest weight difference after the run (the compiled step must match the eager one).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

from ._common import GradientStream, interleaved, make_params, model_shapes, set_grads, table, timed, write_result


def configs():
    from lightning_spectral import optim as O

    return {
        "torch.optim.Muon": lambda ps: torch.optim.Muon([p for p in ps if p.ndim == 2], lr=0.02),
        "Muon": lambda ps: O.Muon(ps, lr=0.02),
        "MuonSGD (spectral_clip)": lambda ps: O.MuonSGD(ps, lr=0.1, spectral_budget=0.02),
        "MuonAdamW (spectral_clip)": lambda ps: O.MuonAdamW(ps, lr=1e-3, spectral_budget=0.02),
        "ManifoldMuon amortized": lambda ps: O.ManifoldMuon(ps, lr=0.05),
        "SpectralBall amortized": lambda ps: O.SpectralBall(ps, lr=0.05),
    }


def run(model: str, backend: str, quick: bool, log) -> dict:
    shapes = model_shapes(model, quick)
    stream = GradientStream(shapes, seed=0)
    grads = [stream.grads(t) for t in range(4)]
    rows = {}
    for name, build in configs().items():
        base = make_params(shapes, seed=1)
        base += [torch.nn.Parameter(torch.zeros(s[0])) for s in shapes]  # biases: the fallback
        eager_params, compiled_params = base, copy.deepcopy(base)
        eager, compiled = build(eager_params), build(compiled_params)
        torch._dynamo.reset()
        step = torch.compile(compiled.step, backend=backend)
        counter = {"eager": 0, "compiled": 0}

        def stepper(kind, params, fn):
            def call():
                g = grads[counter[kind] % len(grads)]
                set_grads(params, g + [torch.ones(s[0]) * 1e-3 for s in shapes])
                counter[kind] += 1
                fn()
            return call

        run_eager, run_compiled = stepper("eager", eager_params, eager.step), stepper("compiled", compiled_params, step)
        compile_s = sum(timed(run_compiled) for _ in range(3))
        for _ in range(3):
            run_eager()
        timing = interleaved({"eager": run_eager, "compiled": run_compiled}, warmup=1, repeats=2 if quick else 9)
        diff = max(float((p - q).detach().abs().max()) for p, q in zip(eager_params, compiled_params))
        eager_s, compiled_s = timing["eager"]["median_s"], timing["compiled"]["median_s"]
        gain = eager_s - compiled_s
        rows[name] = dict(compile_s=compile_s, eager_ms=eager_s * 1e3, compiled_ms=compiled_s * 1e3,
                          ratio=compiled_s / eager_s, payback_steps=math.ceil(compile_s / gain) if gain > 0 else None,
                          max_weight_diff=diff)
        log(f"[compiled_step] {name}: compile {compile_s:.1f} s, ratio {rows[name]['ratio']:.3f}, diff {diff:.2e}")
    return {"model": model, "backend": backend, "shapes": shapes, "threads": torch.get_num_threads(), "rows": rows}


def render(result: dict) -> str:
    rows = [(name, r["compile_s"], r["eager_ms"], r["compiled_ms"], r["ratio"], r["payback_steps"] or "never",
             f"{r['max_weight_diff']:.1e}") for name, r in result["rows"].items()]
    return (f"**torch.compile(opt.step)**, backend {result['backend']}, {result['model']} shapes, "
            f"{result['threads']} thread(s)\n\n"
            + table(["optimizer", "compile s", "eager ms", "compiled ms", "compiled / eager", "steps to pay back",
                     "max |Δw|"], rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: a smoke test")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--model", default="mlp", choices=("mlp", "resnet18"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("logs/compiled_step.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.model, args.backend, args.quick, lambda m: print(m, file=sys.stderr, flush=True))
    markdown = render(result)
    write_result(args.out, result, markdown)
    print(markdown)


if __name__ == "__main__":
    main()
