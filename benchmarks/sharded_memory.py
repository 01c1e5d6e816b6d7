"""Optimizer memory per rank with the parameters sharded by FSDP2 against the replicated (DDP)
model, on 2 CPU processes (gloo, one thread each).

    python -m benchmarks.sharded_memory [--quick] [--steps 2] [--out results/sharded_memory.json]

Each rank builds the network (the GPT with ``n_layer=4, n_embd=256, n_head=4``; the MLP
3072-512-512-10 on 32×32×3 images), routes its parameters with the package's defaults
(:func:`~lightning_spectral.optim.build_param_groups`, as ``SpectralModule.configure_optimizers``)
and takes ``--steps`` optimizer steps on the same batch, once with the network sharded by torch's
``fully_shard`` over a CPU device mesh (each parameterised child of an ``nn.ModuleList`` /
``nn.Sequential`` its own unit, then the network, as ``SpectralModule.configure_model``) and once
unsharded and replicated (``distribute_work = False``: every rank holds every matrix's state;
under DDP's work split each rank keeps only the state of the matrices it owns). Reported per rank: the bytes of optimizer state the rank holds (the local shard of a
``DTensor``, the whole of a plain tensor), and the buffer one gathered matrix adds during the
sharded step (full weight + full gradient + full state of the largest matrix-routed parameter,
from the sizes).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_spectral.models import GPT, MLP
from lightning_spectral.optim import ManifoldMuon, Muon, MuonAdamW, build_param_groups

from ._common import on_gloo_ranks, table, write_result

MiB = 2**20
OPTIMIZERS = {"Muon": Muon, "MuonAdamW": MuonAdamW, "ManifoldMuon": ManifoldMuon}


def build_model(name: str, quick: bool) -> nn.Module:
    """The GPT 4×256 (vocabulary 256, context 128) or the MLP 3072-512-512-10 (``width_mult=2``);
    ``quick``: a 2×32 GPT and a 192-32-32-10 MLP."""
    torch.manual_seed(0)
    if name == "gpt":
        return GPT(n_layer=2, n_embd=32, n_head=4, block_size=16) if quick else GPT(n_layer=4, n_embd=256, n_head=4)
    if name == "mlp":
        return MLP(image_size=8, width_mult=1 / 8) if quick else MLP(image_size=32, width_mult=2.0)
    raise ValueError(f"unknown model {name!r}; use 'gpt' or 'mlp'")


def shard(net: nn.Module, mesh) -> None:
    """FSDP2 the way ``SpectralModule.configure_model`` does it: innermost containers' children
    with parameters first, then the network."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    containers = [m for m in reversed(list(net.modules())) if isinstance(m, (nn.ModuleList, nn.Sequential))]
    for container in containers:
        for block in container.children():
            if not isinstance(block, FSDPModule) and any(True for _ in block.parameters()):
                fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def _tensors(value: Any):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds: a ``DTensor``'s local shard, a plain tensor whole."""
    from torch.distributed.tensor import DTensor

    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def full_bytes(t: torch.Tensor) -> int:
    """Bytes of the whole tensor (a ``DTensor``'s global shape)."""
    return t.numel() * t.element_size()


def _batch(name: str, model: nn.Module, quick: bool):
    g = torch.Generator().manual_seed(1)  # the same batch on both ranks
    if name == "gpt":
        idx = torch.randint(0, model.vocab_size, (4, model.block_size + 1), generator=g)
        return idx[:, :-1], idx[:, 1:]
    size = 8 if quick else 32
    return torch.randn(8, 3, size, size, generator=g), torch.randint(0, 10, (8,), generator=g)


def measure(name: str, opt_name: str, mesh, sharded: bool, steps: int, quick: bool) -> dict:
    net = build_model(name, quick)
    if sharded:
        shard(net, mesh)
    groups = build_param_groups(net)
    matrices = [p for g in groups if g["matrix"] for p in g["params"]]
    opt = OPTIMIZERS[opt_name](groups)
    opt.distribute_work = False  # replicated: every rank holds every state (the DDP split keeps only its own)
    x, y = _batch(name, net, quick)
    for _ in range(steps):
        opt.zero_grad()
        logits = net(x)
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
        opt.step()
    state = sum(local_bytes(t) for s in opt.state.values() for t in _tensors(s))
    largest = max(matrices, key=lambda p: p.numel())
    gathered = 2 * full_bytes(largest) + sum(full_bytes(t) for t in _tensors(opt.state[largest]))
    return dict(state_bytes=state, largest_matrix=list(largest.shape), gathered_bytes=gathered)


def _worker(rank: int, args, queue) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    rows = {}
    for model in ("gpt", "mlp"):
        for opt_name in OPTIMIZERS:
            replicated = measure(model, opt_name, mesh, False, args.steps, args.quick)
            sharded = measure(model, opt_name, mesh, True, args.steps, args.quick)
            rows[f"{model} {opt_name}"] = dict(model=model, optimizer=opt_name,
                                               replicated_bytes=replicated["state_bytes"],
                                               sharded_bytes=sharded["state_bytes"],
                                               largest_matrix=sharded["largest_matrix"],
                                               gathered_bytes=sharded["gathered_bytes"])
    queue.put((rank, rows))


def markdown(result: dict) -> str:
    headers = ["model", "optimizer", "rank", "replicated state (MiB)", "sharded state (MiB)", "sharded / replicated",
               "largest matrix", "gathered buffer (MiB)"]
    rows = []
    for rank, per_rank in sorted(result["ranks"].items()):
        for r in per_rank.values():
            rows.append([r["model"], r["optimizer"], rank, r["replicated_bytes"] / MiB, r["sharded_bytes"] / MiB,
                         r["sharded_bytes"] / r["replicated_bytes"], "×".join(map(str, r["largest_matrix"])),
                         r["gathered_bytes"] / MiB])
    return table(headers, rows)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models (smoke test)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps before the state is counted")
    parser.add_argument("--out", default=None, help="JSON output path (the Markdown table beside it, .md)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1 (the state is created by the first step), got {args.steps}")
    ranks = dict(on_gloo_ranks(_worker, args, results=2, timeout=1800))
    result = {"quick": args.quick, "steps": args.steps, "world_size": 2, "ranks": ranks}
    text = markdown(result)
    print(text)
    if args.out:
        write_result(Path(args.out), result, text)
    return result


if __name__ == "__main__":
    main()
