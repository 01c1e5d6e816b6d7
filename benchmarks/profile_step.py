"""Profile one optimizer step of section 1 (cProfile, cumulative time), after warm-up steps.

    python -m benchmarks.profile_step "SpectralBall amortized" [--model resnet18] [--steps 1] [--top 25]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from ._common import GradientStream, make_params, model_shapes, set_grads
from .optimizers import optimizer_configs


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = model_shapes(args.model, args.quick)
    build, _ = optimizer_configs(args.model, args.quick)[args.name]
    params = make_params(shapes)
    opt = build(params)
    stream = GradientStream(shapes)
    for _ in range(args.warmup):
        set_grads(params, stream.grads())
        opt.step()
    prof = cProfile.Profile()
    for _ in range(args.steps):
        set_grads(params, stream.grads())
        prof.enable()
        opt.step()
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
