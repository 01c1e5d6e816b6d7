"""Optimizer step time on gradients captured from real networks, Gaussian matrices beside them;
cost growth with n; many small matrices; ``torch.compile`` of Muon's msign chain.

    python -m benchmarks.real_gradients [--quick] [--models mlp,small_cnn,resnet18,gpt]
                                        [--sections forms,growth,small,chains,amortized,budgeted,inner,compile]
                                        [--out logs/bench_real.json] [--budget-s 600] [--threads 1]

Capture: each network (seeded) trains for a few SGD steps (lr 0.01, momentum 0.9) on synthetic
batches (CIFAR-shaped images with random labels; random tokens for the GPT, whose shapes follow
GPT-2 small's at a CPU-sized width), and the gradients of its matrix parameters (conv kernels as
``out × in·kh·kw``; not the GPT's embeddings, which Muon leaves to AdamW) at the last two steps
are kept with the weights they belong to, in a cache under ``logs/bench_cache/`` (ignored by git;
``--recapture`` rebuilds it). Real gradients are close to low rank, which is what the inner
modes' iteration counts and the msign chains' conditioning depend on.

Timing: every optimizer gets its own copy of the captured weights and steps on the two captured
gradients in turn; the "Gaussian" column uses the same shapes with i.i.d. Gaussian gradients.
One thread, warm-up steps, then interleaved rounds (every configuration once per round), medians;
the floor is the standard float32 Newton–Schulz chain (``msign(..., method="standard")``) on the
pre-stacked gradients.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from lightning_spectral.optim.msign import msign

from ._common import interleaved, median, ns_floor, stack_by_shape, table, write_result

CACHE = Path("logs/bench_cache")
MODELS = ("mlp", "small_cnn", "resnet18", "gpt")
TITLES = {"mlp": "MLP 3072-512-512-10", "small_cnn": "SmallCNN (CIFAR)", "resnet18": "ResNet-18 (CIFAR)",
          "gpt": "GPT (GPT-2 small's shapes at n_embd 384, 4 layers)"}
CAPTURE_STEPS = 3
SPECTRAL_BUDGET = 0.02


def _replay(opt, params, grads):
    """A step function that feeds the captured gradients ``grads`` to ``params`` in turn, then steps ``opt``."""
    counter = {"t": 0}

    def step():
        for p, g in zip(params, grads[counter["t"] % len(grads)]):
            p.grad = g.clone() if p.grad is None else p.grad.copy_(g)
        counter["t"] += 1
        opt.step()

    return step


# -- capture --------------------------------------------------------------------------------------

def _network(name: str, quick: bool):
    """``(model, batch(generator) → (input, target), loss(output, target))``."""
    from lightning_spectral import models

    torch.manual_seed(0)
    images = lambda g, b, s: (torch.randn(b, 3, s, s, generator=g), torch.randint(0, 10, (b,), generator=g))
    ce = torch.nn.functional.cross_entropy
    if name == "mlp":
        size = 8 if quick else 32
        return models.MLP(image_size=size, width_mult=1 / 8 if quick else 1.0), lambda g: images(g, 64, size), ce
    if name == "small_cnn":
        size = 8 if quick else 32
        return (models.SmallCNN(image_size=size, width_mult=1 / 4 if quick else 1.0),
                lambda g: images(g, 32 if quick else 64, size), ce)
    if name == "resnet18":
        return (models.ResNet18(width_mult=1 / 16 if quick else 1.0),
                lambda g: images(g, 8 if quick else 32, 32), ce)
    if name == "gpt":
        if not hasattr(models, "GPT"):
            raise ImportError("lightning_spectral.models.GPT is not available")
        vocab, block = (256, 16) if quick else (2048, 64)
        model = models.GPT(vocab_size=vocab, block_size=block, n_layer=1 if quick else 4,
                           n_head=2 if quick else 6, n_embd=32 if quick else 384)

        def batch(g):
            tokens = torch.randint(0, vocab, (4 if quick else 8, block + 1), generator=g)
            return tokens[:, :-1], tokens[:, 1:]

        return model, batch, lambda out, y: ce(out.flatten(0, 1), y.flatten())
    raise ValueError(f"unknown network {name!r}; choose from {', '.join(MODELS)}")


def _is_matrix(name: str, p: torch.Tensor) -> bool:
    return p.ndim >= 2 and "emb" not in name and "lm_head" not in name


def capture(name: str, quick: bool, recapture: bool = False, log=print, cache: Path = CACHE) -> dict:
    """Weights and gradients of the matrix parameters at the last 2 of ``CAPTURE_STEPS`` SGD steps
    (2-D, conv kernels flattened), from the cache if there."""
    path = Path(cache) / f"{name}{'-quick' if quick else ''}.pt"
    if path.exists() and not recapture:
        return torch.load(path, weights_only=True)
    model, batch, loss_fn = _network(name, quick)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    out: dict = {"names": [], "weights": [], "grads": []}
    start = time.perf_counter()
    for step in range(CAPTURE_STEPS):
        x, y = batch(g)
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if step >= CAPTURE_STEPS - 2:
            mats = [(n, p) for n, p in model.named_parameters() if _is_matrix(n, p) and p.grad is not None]
            if not out["names"]:
                out["names"] = [n for n, _ in mats]
                out["weights"] = [p.detach().reshape(p.shape[0], -1).clone() for _, p in mats]
            out["grads"].append([p.grad.reshape(p.shape[0], -1).clone() for _, p in mats])
        opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    log(f"[real gradients] captured {name}: {len(out['names'])} matrices in {time.perf_counter() - start:.1f} s -> {path}")
    return out


def spectrum_summary(grads: list[torch.Tensor]) -> dict:
    """Median over the matrices of the stable rank ``‖G‖_F²/‖G‖₂²`` relative to ``min(n, m)``."""
    ratios = []
    for G in grads:
        s = torch.linalg.svdvals(G.double())
        ratios.append(float((s**2).sum() / s[0] ** 2) / min(G.shape) if s[0] > 0 else 0.0)
    return {"stable_rank_fraction_median": median(ratios)}


# -- optimizers -----------------------------------------------------------------------------------
def optimizer_configs() -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    from lightning_spectral import optim as O

    return {
        "Muon": lambda ps: O.Muon(ps),
        "torch.optim.Muon": lambda ps: torch.optim.Muon(ps, lr=0.02, weight_decay=0.0),
        "Muon bf16": lambda ps: O.Muon(ps, ns_dtype="bfloat16"),
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
        "ManifoldMuon amortized": lambda ps: O.ManifoldMuon(ps, mode="amortized"),
        "SpectralBall amortized": lambda ps: O.SpectralBall(ps, mode="amortized"),
        "ManifoldMuon inner, inner_tol=2e-3": lambda ps: O.ManifoldMuon(ps, mode="inner", inner_tol=2e-3),
        "SpectralBall inner, inner_tol=1e-2": lambda ps: O.SpectralBall(ps, mode="inner", inner_tol=1e-2),
        "MuonSGD dual_ascent +tangent, 10 its": lambda ps: O.MuonSGD(
            ps, lr=0.1, spectral_budget=SPECTRAL_BUDGET,
            inner_solver=O.get_inner_solver("dual_ascent", tangent=True, max_iters=10)),
    }


FLOOR = "floor: standard float32 chain"
CHAIN = "Muon's chain: msign auto (Gram form where n ≥ 2m)"


def time_column(weights: list[torch.Tensor], grads: list[list[torch.Tensor]], configs: dict, warmup: int,
                repeats: int, cap_s: float, log, chain: bool = True) -> dict:
    """Median step time of every configuration, the floor and (``chain``) Muon's msign chain alone
    on these weights and gradients."""
    cases: dict[str, Callable[[], object]] = {}
    errors: dict[str, str] = {}

    def guarded(name: str, fn: Callable[[], object]) -> Callable[[], object]:
        """A configuration that raises is reported in its row and not run again."""
        def run():
            if name not in errors:
                try:
                    fn()
                except Exception as err:  # noqa: BLE001 - one row's failure must not end the table
                    errors[name] = f"{type(err).__name__}: {str(err)[:80]}"
        return run

    stacks = stack_by_shape(grads[0])
    cases[FLOOR] = lambda: ns_floor(stacks, 5)
    if chain:
        cases[CHAIN] = lambda: [msign(X, 5, "jordan") for X in stacks]
    for name, build in configs.items():
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        try:
            opt = build(params)
        except Exception as err:  # noqa: BLE001
            errors[name] = f"{type(err).__name__}: {str(err)[:80]}"
            continue
        step = _replay(opt, params, grads)

        cases[name] = guarded(name, step)
    results = {}
    timing = interleaved(cases, warmup=warmup, repeats=repeats, cap_s=cap_s, log=log)
    for name, r in timing.items():
        if name not in errors:
            results[name] = {"median_s": r["median_s"], "times_s": r["times_s"], "capped": r["capped"]}
    for name, msg in errors.items():
        results[name] = {"error": msg}
    return results


def bench_model(name: str, quick: bool, recapture: bool, log, cache: Path = CACHE) -> dict:
    data = capture(name, quick, recapture, log, cache)
    weights, real = data["weights"], data["grads"]
    g = torch.Generator().manual_seed(2)
    gaussian = [[torch.randn(w.shape, generator=g) * float(G.norm()) / math.sqrt(G.numel())
                 for w, G in zip(weights, step)] for step in real]
    configs = optimizer_configs()
    warmup, repeats, cap = (1, 1, math.inf) if quick else (1, 3, 6.0)
    columns = {}
    for column, grads in (("real", real), ("gaussian", gaussian)):
        log(f"[real gradients] {name}, {column} gradients: {len(configs) + 1} configurations")
        columns[column] = time_column(weights, grads, configs, warmup, repeats, cap, log)
    shapes = [tuple(w.shape) for w in weights]
    return {"shapes": shapes, "parameters": sum(w.numel() for w in weights), "columns": columns,
            "spectrum": {"real": spectrum_summary(real[-1]), "gaussian": spectrum_summary(gaussian[-1])}}


def render_model(name: str, res: dict) -> str:
    cols = res["columns"]
    head = (f"**{TITLES.get(name, name)}** — {len(res['shapes'])} matrices, {res['parameters'] / 1e6:.2f}M parameters; "
            f"median stable rank / min(n, m): real {res['spectrum']['real']['stable_rank_fraction_median']:.3f}, "
            f"Gaussian {res['spectrum']['gaussian']['stable_rank_fraction_median']:.3f}")
    rows = []
    for row in [FLOOR, CHAIN, *optimizer_configs()]:
        cells = [row]
        for column in ("real", "gaussian"):
            r, c = cols[column].get(row, {}), cols[column]
            if "median_s" not in r:
                cells += [r.get("error", "—"), "—", "—", "—"]
                continue
            ratio = lambda ref: r["median_s"] / c[ref]["median_s"] if "median_s" in c.get(ref, {}) else None
            cells += [r["median_s"] * 1e3, ratio(FLOOR), ratio("Muon"), ratio("torch.optim.Muon")]
        rows.append(cells)
    headers = ["optimizer", "real ms", "÷ floor", "÷ Muon", "÷ torch Muon",
               "Gaussian ms", "÷ floor", "÷ Muon", "÷ torch Muon"]
    return head + "\n\n" + table(headers, rows)


# -- cost growth and many small matrices ----------------------------------------------------------
GROWTH_CONFIGS = ("Muon", "ManifoldMuon amortized", "SpectralBall amortized")


def cost_growth(quick: bool, budget_s: float, log) -> dict:
    """Step time of one ``n × n`` matrix, n = 128, 256, …, 2048 while the floor's next step would
    stay under the cap and the section's budget lasts; the exponent is the least-squares slope of log t against log n
    over n ≥ 256 (cubic work shows as 3, Python overhead per parameter as < 3 at small n)."""
    configs = {k: v for k, v in optimizer_configs().items() if k in GROWTH_CONFIGS}
    sizes = (16, 32, 64) if quick else (128, 256, 512, 1024, 2048)
    cap = 0.5 if quick else 12.0
    start = time.perf_counter()
    rows: dict[str, dict[int, float]] = {FLOOR: {}, **{k: {} for k in configs}}
    g = torch.Generator().manual_seed(3)
    for n in sizes:
        if time.perf_counter() - start > budget_s:
            log(f"[growth] budget spent before n = {n}")
            break
        W = torch.randn(n, n, generator=g) / math.sqrt(n)
        grads = [[torch.randn(n, n, generator=g)] for _ in range(2)]
        res = time_column([W], grads, configs, warmup=1, repeats=1 if quick or n >= 1024 else 2, cap_s=math.inf,
                          log=lambda *_: None, chain=False)
        for k in rows:
            if "median_s" in res.get(k, {}):
                rows[k][n] = res[k]["median_s"]
        log(f"[growth] n = {n}: " + ", ".join(f"{k} {v.get(n, math.nan):.3f} s" for k, v in rows.items()))
        if 8 * rows[FLOOR].get(n, 0.0) > cap:  # the next doubling would take ≈ 8× as long
            log(f"[growth] stopping at n = {n}: the next size would pass {cap:g} s per floor step")
            break
    fits = {}
    for k, pts in rows.items():
        xs = [(math.log(n), math.log(t)) for n, t in pts.items() if n >= (32 if quick else 256) and t > 0]
        if len(xs) >= 2:
            mx, my = sum(x for x, _ in xs) / len(xs), sum(y for _, y in xs) / len(xs)
            fits[k] = sum((x - mx) * (y - my) for x, y in xs) / sum((x - mx) ** 2 for x, _ in xs)
    return {"sizes": sorted({n for pts in rows.values() for n in pts}), "times_s": rows, "exponent": fits}


def render_growth(sec: dict) -> str:
    rows = [[k, *[pts.get(n) * 1e3 if n in pts else None for n in sec["sizes"]], sec["exponent"].get(k)]
            for k, pts in ((k, {int(n): t for n, t in v.items()}) for k, v in sec["times_s"].items())]
    return table(["ms per step, n × n", *[str(n) for n in sec["sizes"]], "fitted exponent"], rows)


def _gemm_calls(fn: Callable[[], object]) -> int:
    """Matrix-multiply kernels launched by one call (``mm``/``bmm``/``addmm``/``baddbmm``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
    return sum(e.count for e in prof.key_averages() if e.key in names)


def many_small(quick: bool, log) -> dict:
    """200 matrices of 64 × 64 (quick: 20 of 16 × 16): one batched chain against 200 chains,
    and how many GEMM kernels each optimizer launches per step (≈ 200·k: not batched)."""
    count, n = (20, 16) if quick else (200, 64)
    g = torch.Generator().manual_seed(4)
    weights = [torch.linalg.qr(torch.randn(n, n, generator=g))[0] for _ in range(count)]
    grads = [[torch.randn(n, n, generator=g) for _ in range(count)] for _ in range(2)]
    stack = torch.stack(grads[0])
    configs = {k: v for k, v in optimizer_configs().items() if k in GROWTH_CONFIGS}
    res = time_column(weights, grads, configs, warmup=1, repeats=1 if quick else 3, cap_s=math.inf, log=lambda *_: None,
                      chain=False)
    loop = interleaved({"per-matrix msign loop": lambda: [msign(G, 5, "jordan") for G in grads[0]]}, 1,
                       1 if quick else 3)["per-matrix msign loop"]["median_s"]
    rows = {FLOOR: {"median_s": res[FLOOR]["median_s"], "gemm_calls": _gemm_calls(lambda: ns_floor([stack], 5))},
            "per-matrix msign loop": {"median_s": loop,
                                      "gemm_calls": _gemm_calls(lambda: [msign(G, 5, "jordan") for G in grads[0]])}}
    for k, build in configs.items():
        if "median_s" not in res.get(k, {}):
            rows[k] = {"error": res.get(k, {}).get("error", "not run")}
            continue
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = build(params)
        for p, G in zip(params, grads[0]):
            p.grad = G.clone()
        opt.step()
        rows[k] = {"median_s": res[k]["median_s"], "gemm_calls": _gemm_calls(opt.step)}
    for r in rows.values():
        if "gemm_calls" in r:
            r["batched"] = r["gemm_calls"] < count
    log(f"[many small] {count} × {n}×{n}: " + ", ".join(f"{k} {r.get('median_s', math.nan) * 1e3:.1f} ms"
                                                      for k, r in rows.items()))
    return {"count": count, "n": n, "rows": rows}


def render_small(sec: dict) -> str:
    floor = sec["rows"][FLOOR]["median_s"]
    rows = [[k, r.get("median_s", math.nan) * 1e3, r.get("median_s", math.nan) / floor, r.get("gemm_calls"),
             r.get("batched", r.get("error"))] for k, r in sec["rows"].items()]
    return (f"{sec['count']} matrices of {sec['n']} × {sec['n']}:\n\n"
            + table(["step", "ms", "÷ one batched chain", "GEMM kernels per step", "batched"], rows))


# -- the two msign forms by shape -------------------------------------------------------------------
def form_flops(m: int, n: int, steps: int = 5) -> tuple[float, float]:
    """Flops of the standard chain and of the re-synchronised Gram form for one ``m × n``, ``m ≤ n``."""
    from lightning_spectral.optim.msign import GRAM_RESYNC

    standard = steps * (4 * m * m * n + 2 * m**3)
    gram = 8 * m * m * n + (4 * steps - 6) * 2 * m**3 if steps > GRAM_RESYNC else 4 * m * m * n + (4 * steps - 3) * 2 * m**3
    return standard, gram


def msign_forms(quick: bool, log) -> dict:
    """``msign(method="gram")`` against ``method="standard"`` (Jordan, 5 steps, float32) on one
    ``m × n`` matrix per aspect ratio (``m = 256``; quick 32) and on GPT-2 small's MLP matrix,
    with the flop ratio predicted by :func:`form_flops`; what ``"auto"`` picks is marked."""
    from lightning_spectral.optim.msign import uses_gram

    m = 32 if quick else 256
    shapes = [(m, int(m * r)) for r in (1, 1.5, 2, 3, 4.5, 9)] + ([] if quick else [(768, 3072)])
    g = torch.Generator().manual_seed(5)
    rows = []
    for shape in shapes:
        X = torch.randn(*shape, generator=g)
        cases = {k: (lambda k=k: msign(X, 5, "jordan", method=k)) for k in ("standard", "gram")}
        t = interleaved(cases, 1, 1 if quick else 5)
        standard, gram = form_flops(*shape)
        rows.append({"shape": list(shape), "aspect": shape[1] / shape[0], "flop_ratio": gram / standard,
                     "time_ratio": t["gram"]["median_s"] / t["standard"]["median_s"],
                     "standard_s": t["standard"]["median_s"], "auto_uses_gram": uses_gram(shape, 5)})
        log(f"[forms] {shape}: gram/standard {rows[-1]['time_ratio']:.2f} (flops {rows[-1]['flop_ratio']:.2f})")
    return {"rows": rows}


def render_forms(sec: dict) -> str:
    rows = [[f"{r['shape'][0]} × {r['shape'][1]}", r["aspect"], r["standard_s"] * 1e3, r["time_ratio"], r["flop_ratio"],
             "Gram" if r["auto_uses_gram"] else "standard"] for r in sec["rows"]]
    return table(["matrix", "n/m", "standard ms", "Gram ÷ standard (time)", "(flops)", "auto picks"], rows)


# -- the Newton–Schulz chains: time and accuracy side by side ----------------------------------------
def _jordan_float64(G: torch.Tensor) -> torch.Tensor:
    return msign(G.double(), 5, "jordan", method="standard")


def ns_chains(models: list[str], quick: bool, log, cache: Path = CACHE, rounds: int = 5, repeats: int = 2) -> dict:
    """Jordan's 5-step chain on each model's captured gradients, every way it can run on this
    device: ours in float32 and in bfloat16, each ``"auto"`` (the Gram form where one side is ≥ 2×
    the other; in bfloat16 re-synchronised every 2 steps) and the standard chain, and
    ``torch.optim.Muon``'s own chain
    (bfloat16, per matrix). Accuracy: the largest relative Frobenius deviation over the matrices
    from the same iteration in float64 (the contract ``ns_dtype="auto"`` is held to). Time: ours
    on the gradients stacked by shape, torch's one matrix at a time (as its optimizer runs it);
    interleaved rounds, the median of the per-round ratios to ours float32 ``"auto"``, for each of
    ``repeats`` repeats."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    jordan = (3.4445, -4.7750, 2.0315)
    out: dict = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "models": {}}
    for name in models:
        grads = capture(name, quick, log=log, cache=cache)["grads"][0]
        stacks = stack_by_shape(grads)
        chains = {
            "ours float32 auto": lambda: [msign(X, 5, "jordan") for X in stacks],
            "ours float32 standard": lambda: [msign(X, 5, "jordan", method="standard") for X in stacks],
            "ours bfloat16 auto": lambda: [msign(X, 5, "jordan", dtype=torch.bfloat16) for X in stacks],
            "ours bfloat16 standard": lambda: [msign(X, 5, "jordan", dtype=torch.bfloat16, method="standard")
                                               for X in stacks],
            "torch.optim.Muon chain (bfloat16)": lambda: [_zeropower_via_newtonschulz(G, jordan, 5, 1e-7)
                                                          for G in grads],
        }
        exact = [_jordan_float64(X) for X in stacks]
        exact_single = [_jordan_float64(G) for G in grads]
        rows: dict = {}
        for label, fn in chains.items():
            result = fn()
            reference = exact_single if label.startswith("torch") else exact
            rows[label] = {"deviation": max(float((r.double() - e).norm() / e.norm()) for r, e in zip(result, reference)
                                            if float(e.norm()) > 0)}
        for repeat in range(repeats):
            timing = interleaved(chains, warmup=1, repeats=1 if quick else rounds)
            base = timing["ours float32 auto"]["times_s"]
            for label, r in timing.items():
                rows[label].setdefault("median_s", []).append(r["median_s"])
                rows[label].setdefault("ratio", []).append(median([t / b for t, b in zip(r["times_s"], base)]))
        out["models"][name] = rows
        log(f"[chains] {name}: " + ", ".join(f"{k} {v['ratio']} dev {v['deviation']:.1e}" for k, v in rows.items()))
        squares = [X for X in stacks if X.size(-1) == X.size(-2)]
        if squares:
            out.setdefault("squares", {})[name] = square_schedules(squares, quick, rounds, log)
    return out


SQUARE_SCHEDULES = tuple((s, k) for s in ("jordan", "you_quintic", "polar_express_5", "polar_express") for k in (3, 4, 5))


def square_schedules(stacks: list[torch.Tensor], quick: bool, rounds: int, log) -> dict:
    """Square matrices, where the Gram form gains nothing: shorter schedules against Jordan's 5
    steps, measured against the exact answer (the SVD): the relative Frobenius distance from the
    polar factor ``U Vᵀ`` (largest over the matrices), and the fraction of the spectral-norm
    steepest-descent optimum the direction reaches, ``⟨G, O⟩ / (‖G‖_* ‖O‖₂)`` (1 for ``U Vᵀ``;
    smallest over the matrices). Time: the standard chain in float32 and in bfloat16 on the
    stacks, interleaved rounds, the median of per-round ratios to Jordan's 5 steps in float32."""
    from lightning_spectral.optim.msign import msign_svd

    polar = [msign_svd(X.double()) for X in stacks]
    nuclear = [torch.linalg.svdvals(X.double()).sum(-1) for X in stacks]
    chains = {f"{s} {k} {d}": (lambda s=s, k=k, d=d: [msign(X, k, s, dtype=getattr(torch, d)) for X in stacks])
              for s, k in SQUARE_SCHEDULES for d in ("float32", "bfloat16")}
    rows: dict = {}
    for label, fn in chains.items():
        dist, share = [], []
        for O, P, G, nuc in zip(fn(), polar, stacks, nuclear):
            O = O.double()
            dist.append(float((torch.linalg.matrix_norm(O - P) / torch.linalg.matrix_norm(P)).max()))
            inner = (G.double() * O).sum((-2, -1))
            share.append(float((inner / (nuc * torch.linalg.matrix_norm(O, ord=2))).min()))
        rows[label] = {"polar_distance": max(dist), "steepest_share": min(share)}
    timing = interleaved(chains, warmup=1, repeats=1 if quick else rounds)
    base = timing["jordan 5 float32"]["times_s"]
    for label, r in timing.items():
        rows[label]["ratio"] = median([t / b for t, b in zip(r["times_s"], base)])
    log("[chains] squares: " + ", ".join(f"{k} {v['ratio']:.2f} {v['polar_distance']:.3f} {v['steepest_share']:.3f}"
                                           for k, v in rows.items()))
    return {"matrices": sum(X.size(0) if X.ndim == 3 else 1 for X in stacks),
            "shapes": sorted({tuple(X.shape[-2:]) for X in stacks}), "rows": rows}


def render_chains(sec: dict) -> str:
    parts = []
    for name, rows in sec["models"].items():
        reps = len(next(iter(rows.values()))["ratio"])
        body = [[label, r["median_s"][0] * 1e3, *r["ratio"], r["deviation"]] for label, r in rows.items()]
        parts.append(f"**{TITLES.get(name, name)}**\n\n" + table(
            ["chain (Jordan, 5 steps)", "ms", *[f"÷ ours float32 (repeat {i + 1})" for i in range(reps)],
             "deviation from float64"], body))
    for name, sq in sec.get("squares", {}).items():
        body = [[label, r["ratio"], r["polar_distance"], r["steepest_share"]] for label, r in sq["rows"].items()]
        parts.append(f"**{TITLES.get(name, name)}: its {sq['matrices']} square matrices** {sq['shapes']}\n\n" + table(
            ["schedule, steps, dtype", "÷ jordan 5 float32", "distance from U Vᵀ (max)",
             "⟨G, O⟩ / (‖G‖_* ‖O‖₂) (min)"], body))
    return f"CPU capability {sec['cpu_capability']}:\n\n" + "\n\n".join(parts)


# -- the budgeted solvers at their stated gap ----------------------------------------------------------
BUDGETED_SOLVERS = ("spectral_clip", "dual_ascent", "quasi_newton", "admm")


def budgeted_solvers(quick: bool, log, cache: Path = CACHE, rounds: int = 3, repeats: int = 2) -> dict:
    """MuonSGD with each tangent inner solver (the flagship's lr 0.1, momentum 0.9, weight decay
    5e-4; budget ``SPECTRAL_BUDGET``, binding from the first step on these gradients) at the
    solvers' default certified gap (tol 1e-3) against our Muon, on ResNet-18's captured gradients.
    Every optimizer steps on the two captured gradients in turn (warm starts carried), 2 warm-up
    steps, then ``rounds`` interleaved rounds (every configuration once per round); the ratio to
    Muon is taken per round and its median reported, for each of ``repeats`` repeats. Accuracy
    beside the time: the certified relative objective gap of every matrix's step in the timed
    rounds (median and max; the tests check the certificate against float64 references) and the
    dual evaluations per matrix. Frank–Wolfe is left out: with tangency each dual step's ball
    projection is up to ``fw_iters`` exact msigns (an SVD each), 500–17 000 oracle calls per
    solve on the 48 × 32 test cases, ≥ 10× Muon per dual step."""
    from lightning_spectral import optim as O

    data = capture("resnet18", quick, log=log, cache=cache)
    weights, grads = data["weights"], data["grads"]
    out: dict = {"budget": SPECTRAL_BUDGET, "matrices": len(weights), "repeats": []}
    for repeat in range(repeats):
        cases, infos = {}, {}
        for name in ("Muon", *BUDGETED_SOLVERS):
            params = [torch.nn.Parameter(w.clone()) for w in weights]
            if name == "Muon":
                opt = O.Muon(params)
            else:
                solver, infos[name] = _recording(O.get_inner_solver(name, tangent=True))
                opt = O.MuonSGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4, spectral_budget=SPECTRAL_BUDGET,
                                inner_solver=solver)
            step = _replay(opt, params, grads)

            cases[name] = step
        timing = interleaved(cases, warmup=2, repeats=1 if quick else rounds, log=log)
        for record in infos.values():
            del record[: 2 * len(weights)]  # the warm-up steps' solves
        rows = {}
        for name, r in timing.items():
            ratios = [t / m for t, m in zip(r["times_s"], timing["Muon"]["times_s"])]
            row = {"median_s": r["median_s"], "ratio_to_muon": median(ratios), "ratios": ratios}
            if name in infos:
                gaps = [i.gap for i in infos[name] if i.gap is not None]
                row.update(gap_median=median(gaps) if gaps else None, gap_max=max(gaps) if gaps else None,
                           iterations_per_matrix=sum(i.iterations for i in infos[name]) / max(len(infos[name]), 1))
            rows[name] = row
        out["repeats"].append(rows)
        log("[budgeted] repeat %d: " % (repeat + 1) + ", ".join(f"{k} {v['ratio_to_muon']:.2f}x" for k, v in rows.items()))
    return out


def _recording(solver):
    """``(solver, infos)``: the same solver, now appending every call's ``SolveInfo`` to ``infos``."""
    infos: list = []

    class Recording(type(solver)):
        def __call__(self, *args, **kwargs):
            result = super().__call__(*args, **kwargs)
            infos.append(self.last_info)
            return result

    solver.__class__ = Recording
    return solver, infos


def render_budgeted(sec: dict) -> str:
    first = sec["repeats"][0]
    rows = []
    for name in first:
        cells = [name if name == "Muon" else f"MuonSGD + {name} (tangent)", first[name]["median_s"] * 1e3]
        cells += [rep[name]["ratio_to_muon"] for rep in sec["repeats"]]
        gap_max = [rep[name]["gap_max"] for rep in sec["repeats"] if rep[name].get("gap_max") is not None]
        cells += [first[name].get("gap_median"), max(gap_max) if gap_max else None, first[name].get("iterations_per_matrix")]
        rows.append(cells)
    headers = ["step", "ms", *[f"÷ Muon (repeat {i + 1})" for i in range(len(sec["repeats"]))],
               "certified gap, median", "max", "dual evaluations per matrix"]
    return (f"ResNet-18, {sec['matrices']} matrices, spectral budget {sec['budget']}, solvers at tol 1e-3:\n\n"
            + table(headers, rows))


# -- the amortized constrained optimizers: time, host syncs, ops, accuracy -------------------------------
AMORTIZED = ("Muon", "ManifoldMuon amortized", "SpectralBall amortized")
HOST_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "cpu", "tolist", "numpy")
COUNTED_OPS = {"GEMM (mm/bmm/addmm/baddbmm)": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"),
               "matrix-vector (mv/addmv)": ("aten::mv", "aten::addmv_", "aten::addmv"),
               "eigh": ("aten::_linalg_eigh",), "svd": ("aten::_linalg_svd",)}


def host_reads(fn: Callable[[], object]) -> int:
    """Python-level reads of a tensor's value on the host during ``fn()`` (``item``, ``bool``, ``float``,
    ``tolist``, ``cpu``, …): on a GPU each is a synchronisation."""
    count = [0]
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(original):
        def read(self, *args, **kwargs):
            count[0] += 1
            return original(self, *args, **kwargs)
        return read

    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, counting(original))
        fn()
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
    return count[0]


def op_counts(fn: Callable[[], object]) -> dict:
    """Kernel calls of ``fn()`` by kind (:data:`COUNTED_OPS`), from ``torch.profiler``; with
    ``"GEMM GFLOP"`` (the profiler's flop count of the matrix products: the operation count that
    sets a floor on the ratio) and ``"eigh share"`` (the eigensolves' part of the profiled time)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    averages = prof.key_averages()
    events = {e.key: e.count for e in averages}
    out = {kind: sum(events.get(name, 0) for name in names) for kind, names in COUNTED_OPS.items()}
    gemm = COUNTED_OPS["GEMM (mm/bmm/addmm/baddbmm)"]
    out["GEMM GFLOP"] = sum(e.flops for e in averages if e.key in gemm) / 1e9
    total = sum(e.self_cpu_time_total for e in averages)
    out["eigh share"] = sum(e.self_cpu_time_total for e in averages if e.key in COUNTED_OPS["eigh"]) / max(total, 1e-9)
    return out


def _direction_accuracy(name: str, opt, params) -> dict:
    """Certified accuracy of the direction each matrix would take next (its state copied, the
    direction recomputed with ``certify=True``): the relative duality gap ``(dual − ⟨G, Φ⟩)/dual`` of
    the feasible direction (Muon: ``‖G‖_*`` against ``⟨G, O⟩/‖O‖₂``), median and max over the
    matrices, and the constraint error (Stiefel ``max |σᵢ(W) − 1|``, sphere ``|σ₁(W)/R − 1|``, by SVD)."""
    from lightning_spectral.optim.constrained.directions import spectral_ball_direction, stiefel_amortized
    from lightning_spectral.optim.msign import msign as chain, nuclear_norm

    gaps, constraint = [], []
    for p in params:
        state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
        G = state.get("momentum_buffer", p.grad).reshape(p.shape[0], -1).float()
        W = p.detach().reshape(p.shape[0], -1).float()
        if name == "Muon":
            O = chain(G, 5, "jordan")
            gap = 1 - float((G * O).sum()) / float(torch.linalg.matrix_norm(O, ord=2)) / float(nuclear_norm(G))
        elif name.startswith("ManifoldMuon"):
            group = opt.param_groups[0]
            _, info = stiefel_amortized(W, G, state, memory=group["dual_memory"], certify=True)
            gap = info.duality_gap
            constraint.append(float((torch.linalg.svdvals(W.double()) - 1).abs().max()))
        else:
            group = opt.param_groups[0]
            _, _, info = spectral_ball_direction(G, state["u"], state["v"], float(state["dual"]), mode="amortized",
                                                 dual_lr=group["dual_lr"], msign_steps=group["ns_steps"],
                                                 schedule=group["ns_schedule"], certify=True)
            gap = info.duality_gap
            radius = opt.radius(group, p)
            constraint.append(abs(float(torch.linalg.matrix_norm(W.double(), ord=2)) / radius - 1))
        gaps.append(gap)
    return {"gap_median": median(gaps), "gap_max": max(gaps),
            "constraint_max": max(constraint) if constraint else None}


def amortized_section(models: list[str], quick: bool, log, cache: Path = CACHE, rounds: int = 3,
                      repeats: int = 2) -> dict:
    """Our Muon, ManifoldMuon and SpectralBall amortized (defaults) on each model's captured
    gradients: 3 warm-up steps, then ``rounds`` interleaved rounds, the median of the per-round
    ratios to Muon, for each of ``repeats`` repeats (each repeat a fresh optimizer); beside it the
    host reads of one steady step (:func:`host_reads`), its kernel counts (:func:`op_counts`) and the
    certified accuracy of the next direction (:func:`_direction_accuracy`)."""
    from lightning_spectral import optim as O

    build = {"Muon": lambda ps: O.Muon(ps), "ManifoldMuon amortized": lambda ps: O.ManifoldMuon(ps, mode="amortized"),
             "SpectralBall amortized": lambda ps: O.SpectralBall(ps, mode="amortized")}
    out: dict = {"models": {}}
    for model in models:
        data = capture(model, quick, log=log, cache=cache)
        weights, grads = data["weights"], data["grads"]
        rows: dict = {name: {"ratio": [], "median_s": []} for name in AMORTIZED}
        for repeat in range(repeats):
            cases, opts = {}, {}
            for name in AMORTIZED:
                params = [torch.nn.Parameter(w.clone()) for w in weights]
                opts[name] = (build[name](params), params)
                cases[name] = step = _replay(opts[name][0], params, grads)
                for _ in range(3):
                    step()
            timing = interleaved(cases, warmup=0, repeats=1 if quick else rounds)
            for name, r in timing.items():
                rows[name]["median_s"].append(r["median_s"])
                rows[name]["ratio"].append(median([t / b for t, b in zip(r["times_s"], timing["Muon"]["times_s"])]))
            if repeat == 0:
                for name, (opt, params) in opts.items():
                    rows[name]["host_reads"] = host_reads(cases[name])
                    rows[name]["ops"] = op_counts(cases[name])
                    rows[name].update(_direction_accuracy(name, opt, params))
        out["models"][model] = {"matrices": len(weights), "rows": rows}
        log(f"[amortized] {model}: " + ", ".join(f"{k} {v['ratio']} reads {v['host_reads']}" for k, v in rows.items()))
    return out


def render_amortized(sec: dict) -> str:
    parts = []
    for model, res in sec["models"].items():
        body = []
        muon_flop = res["rows"]["Muon"]["ops"]["GEMM GFLOP"]
        for name, r in res["rows"].items():
            ops = r["ops"]
            body.append([name, r["median_s"][0] * 1e3, *r["ratio"], r["host_reads"],
                         *[ops[k] for k in COUNTED_OPS], ops["GEMM GFLOP"] / max(muon_flop, 1e-12), ops["eigh share"],
                         r["gap_median"], r["gap_max"], r["constraint_max"]])
        reps = len(next(iter(res["rows"].values()))["ratio"])
        headers = ["step", "ms", *[f"÷ Muon (repeat {i + 1})" for i in range(reps)], "host reads",
                   *[f"{k} calls" for k in COUNTED_OPS], "GEMM flops ÷ Muon's", "eigh share of time",
                   "certified gap, median", "max", "constraint error"]
        parts.append(f"**{TITLES.get(model, model)}**, {res['matrices']} matrices\n\n" + table(headers, body))
    return "\n\n".join(parts)


# -- the inner modes of ManifoldMuon and SpectralBall at their stated tolerance --------------------------
INNER_CONFIGS = {"ManifoldMuon inner, inner_tol=2e-3": dict(kind="stiefel", tol=2e-3),
                 "SpectralBall inner, inner_tol=1e-2": dict(kind="sphere", tol=1e-2)}


def inner_modes(models: list[str], quick: bool, log, cache: Path = CACHE, rounds: int = 3, repeats: int = 2) -> dict:
    """ManifoldMuon and SpectralBall in ``mode="inner"`` at the tolerances of the time table
    against our Muon on each model's captured gradients: every optimizer steps on the two
    gradients in turn (warm starts carried), 2 warm-up steps, ``rounds`` interleaved rounds, the
    median of the per-round ratios to Muon, for each of ``repeats`` repeats; beside the time the
    inner evaluations per matrix (msign-free ``m × m`` eigensolves) and the accuracy of the
    directions the last step would take, certified outside the timing: for every matrix the
    direction solve is rerun on its weight, last gradient and warm start with ``certify=True``,
    and the relative duality gap ``(dual − ⟨G, Φ⟩)/dual`` of the feasible ``Φ`` reported
    (median, max), beside the stopping residual (SpectralBall ``|uᵀΦv|``, ManifoldMuon the
    tangency residual)."""
    from lightning_spectral import optim as O

    out: dict = {"models": {}}
    for model in models:
        data = capture(model, quick, log=log, cache=cache)
        weights, grads = data["weights"], data["grads"]
        rows: dict = {}
        for repeat in range(repeats):
            cases, opts = {}, {}
            for name in ("Muon", *INNER_CONFIGS):
                params = [torch.nn.Parameter(w.clone()) for w in weights]
                if name == "Muon":
                    opt = O.Muon(params)
                elif INNER_CONFIGS[name]["kind"] == "stiefel":
                    opt = O.ManifoldMuon(params, mode="inner", inner_tol=INNER_CONFIGS[name]["tol"])
                else:
                    opt = O.SpectralBall(params, mode="inner", inner_tol=INNER_CONFIGS[name]["tol"])
                opts[name] = (opt, params)
                cases[name] = _replay(opt, params, grads)
            timing = interleaved(cases, warmup=2, repeats=1 if quick else rounds, log=log)
            for name, r in timing.items():
                ratios = [t / m for t, m in zip(r["times_s"], timing["Muon"]["times_s"])]
                row = rows.setdefault(name, {"median_s": [], "ratio_to_muon": []})
                row["median_s"].append(r["median_s"])
                row["ratio_to_muon"].append(median(ratios))
                if name != "Muon" and repeat == 0:
                    row.update(_inner_accuracy(name, *opts[name], grads[-1]))
            log(f"[inner] {model} repeat {repeat + 1}: " + ", ".join(f"{k} {v['ratio_to_muon'][-1]:.2f}x" for k, v in rows.items()))
        out["models"][model] = rows
    return out


def _inner_accuracy(name: str, opt, params, grads) -> dict:
    """Evaluations per matrix of the last step, and the certified duality gap and stopping
    residual of each matrix's direction at its current weight, gradient and warm start."""
    from lightning_spectral.optim import spectral_ball_direction, stiefel_direction
    from lightning_spectral.optim.linalg import as_matrix

    config = INNER_CONFIGS[name]
    gaps, residuals, evaluations = [], [], []
    for p, G in zip(params, grads):
        state = opt.state[p]
        if "inner_iterations" not in state:
            continue  # not a matrix the optimizer constrains (e.g. left to its fallback)
        evaluations.append(int(state["inner_iterations"]))
        W, G = as_matrix(p.detach()).float(), as_matrix(G).float()
        if config["kind"] == "stiefel":
            _, _, info = stiefel_direction(W, G, state.get("dual"), mode="inner", tol=config["tol"], certify=True)
        else:
            _, _, info = spectral_ball_direction(G, state["u"], state["v"], float(state["dual"]), constraint="sphere",
                                                 mode="inner", tol=config["tol"], certify=True)
        gaps.append(info.duality_gap)
        residuals.append(float(info.residual))
    return {"evaluations_per_matrix": sum(evaluations) / max(len(evaluations), 1),
            "gap_median": median(gaps) if gaps else None, "gap_max": max(gaps) if gaps else None,
            "residual_max": max(residuals) if residuals else None}


def render_inner(sec: dict) -> str:
    parts = []
    for model, rows in sec["models"].items():
        reps = len(rows["Muon"]["ratio_to_muon"])
        body = [[name, r["median_s"][0] * 1e3, *r["ratio_to_muon"], r.get("gap_median"), r.get("gap_max"),
                 r.get("residual_max"), r.get("evaluations_per_matrix")] for name, r in rows.items()]
        parts.append(f"**{TITLES.get(model, model)}**\n\n" + table(
            ["step", "ms", *[f"÷ Muon (repeat {i + 1})" for i in range(reps)], "duality gap, median", "max",
             "stopping residual, max", "evaluations per matrix"], body))
    return "\n\n".join(parts)


# -- torch.compile ----------------------------------------------------------------------------------
def compiled_chain(quick: bool, log, cache: Path = CACHE) -> dict:
    """Muon's msign chain (the stacked ResNet-18 gradients, Jordan 5 steps, auto method) under
    ``torch.compile`` on the CPU against eager; compile time reported apart."""
    grads = capture("resnet18", quick, log=log, cache=cache)["grads"][0]
    stacks = stack_by_shape(grads)
    chain = lambda: [msign(X, 5, "jordan") for X in stacks]
    try:
        compiled = torch.compile(chain)
        start = time.perf_counter()
        compiled()
        compile_s = time.perf_counter() - start
    except Exception as err:  # noqa: BLE001 - no compiler on this machine, say so
        return {"error": f"{type(err).__name__}: {str(err)[:200]}"}
    timing = interleaved({"eager": chain, "compiled": compiled}, 1, 1 if quick else 5)
    max_diff = max(float((a - b).abs().max()) for a, b in zip(chain(), compiled()))
    out = {"compile_s": compile_s, "eager_s": timing["eager"]["median_s"], "compiled_s": timing["compiled"]["median_s"],
           "max_abs_diff": max_diff}
    out["ratio"] = out["compiled_s"] / out["eager_s"]
    log(f"[compile] ratio {out['ratio']:.3f}, compile {compile_s:.1f} s")
    return out


# -- command ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny networks, one repeat (smoke test)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--out", default="logs/bench_real.json", help="JSON path (Markdown beside it, .md)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=600.0, help="sections after this many seconds are skipped")
    parser.add_argument("--recapture", action="store_true", help="rebuild the gradient cache")
    parser.add_argument("--cache", default=str(CACHE), help="gradient cache folder")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile section")
    parser.add_argument("--sections", default="forms,growth,small,compile",
                        help="after the models: any of forms, growth, small, chains (the Newton–Schulz chains' "
                             "time and accuracy, opt-in), amortized (Muon, ManifoldMuon and SpectralBall amortized: "
                             "time, host reads, kernel counts, certified gap; opt-in), budgeted (the inner solvers of MuonSGD on ResNet-18, "
                             "opt-in: ~10 min), inner (ManifoldMuon/SpectralBall inner modes on ResNet-18 and the GPT, opt-in), compile")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)
    result: dict = {"command": "python -m benchmarks.real_gradients " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "torch": torch.__version__, "threads": args.threads, "models": {}, "skipped": {}}
    md = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if left() <= 0:
            result["skipped"][name] = "time budget spent"
            continue
        try:
            result["models"][name] = res = bench_model(name, args.quick, args.recapture, log, Path(args.cache))
        except ImportError as err:  # e.g. no GPT in this version of the package
            result["skipped"][name] = str(err)
            log(f"[real gradients] {name} skipped: {err}")
            continue
        md.append(render_model(name, res))
    wanted = {s.strip() for s in args.sections.split(",")}
    if left() > 0 and "forms" in wanted:
        result["forms"] = msign_forms(args.quick, log)
        md += ["msign, standard chain against the Gram form (Jordan, 5 steps, float32):", render_forms(result["forms"])]
    if left() > 0 and "growth" in wanted:
        result["growth"] = cost_growth(args.quick, max(left() / 2, 1.0), log)
        md += ["Cost growth, one n × n matrix:", render_growth(result["growth"])]
    if left() > 0 and "small" in wanted:
        result["many_small"] = many_small(args.quick, log)
        md += ["Many small matrices:", render_small(result["many_small"])]
    if left() > 0 and "chains" in wanted:
        chain_models = [m for m in ("resnet18", "gpt") if m in args.models.split(",")] or ["resnet18", "gpt"]
        result["chains"] = ns_chains(chain_models, args.quick, log, Path(args.cache))
        md += ["The Newton–Schulz chains, time and accuracy:", render_chains(result["chains"])]
    if left() > 0 and "budgeted" in wanted:
        result["budgeted"] = budgeted_solvers(args.quick, log, Path(args.cache))
        md += ["The budgeted solvers at their certified gap:", render_budgeted(result["budgeted"])]
    if left() > 0 and "amortized" in wanted:
        amortized_models = [m for m in ("resnet18", "gpt") if m in args.models.split(",")] or ["resnet18", "gpt"]
        result["amortized"] = amortized_section(amortized_models, args.quick, log, Path(args.cache))
        md += ["The amortized constrained optimizers, time beside accuracy, host reads and kernel counts:",
               render_amortized(result["amortized"])]
    if left() > 0 and "inner" in wanted:
        inner_models = [m for m in ("resnet18", "gpt") if m in args.models.split(",")] or ["resnet18", "gpt"]
        result["inner"] = inner_modes(inner_models, args.quick, log, Path(args.cache))
        md += ["The inner modes at their stated tolerance:", render_inner(result["inner"])]
    if left() > 0 and "compile" in wanted and not args.no_compile:
        result["compile"] = c = compiled_chain(args.quick, log, Path(args.cache))
        md.append("torch.compile of Muon's msign chain on ResNet-18's gradients (CPU): " + (
            c["error"] if "error" in c else f"compiled ÷ eager = {c['ratio']:.3f} (compile {c['compile_s']:.1f} s, "
                                           f"max |difference| {c['max_abs_diff']:.1e})"))
    for name, why in result["skipped"].items():
        md.append(f"{name}: skipped ({why}).")
    result["wall_s"] = time.perf_counter() - start
    text = (f"Measured with `{result['command']}` — torch {torch.__version__}, {args.threads} thread(s), "
            f"{result['wall_s']:.0f} s.\n\n" + "\n\n".join(md))
    result["markdown"] = text
    print(text)
    if args.out:
        path = Path(args.out)
        write_result(path, result, text)
        log(f"wrote {path} and {path.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
