"""Section 2: msign accuracy against cost, for every schedule and step count.

Test set (fixed seeds): tall, wide and square matrices whose singular values are log-spaced
from 1 down to 1e-2, and down to 1e-3 (random singular vectors). The error of a schedule is
the worst ``|σᵢ(msign(G)) − 1|`` over all singular values of all test matrices (float64 SVD of
the float32 result). The time is one call on a stack of ResNet-18-like matrices
(``2 × 256 × 1152``; quick: ``2 × 32 × 96``), interleaved over all settings, median of repeats.
"""

from __future__ import annotations

import torch

from ._common import interleaved, with_spectrum

STEPS = tuple(range(3, 11))


def test_matrices(quick: bool) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    dims = {"tall": (384, 96), "wide": (96, 384), "square": (192, 192)} if not quick else \
        {"tall": (48, 16), "wide": (16, 48), "square": (24, 24)}
    out = []
    for smin in (1e-2, 1e-3):
        for kind, (n, m) in dims.items():
            k = min(n, m)
            sigma = torch.logspace(0, torch.log10(torch.tensor(smin)).item(), k, dtype=torch.float64)
            out.append((f"{kind} {n}×{m} σ_min={smin:g}", with_spectrum(n, m, sigma, g)))
    return out


def run(quick: bool, log) -> dict:
    from lightning_spectral.optim.msign import SCHEDULES, msign

    mats = test_matrices(quick)
    rows = []
    for schedule in SCHEDULES:
        for steps in STEPS:
            worst = {1e-2: 0.0, 1e-3: 0.0}
            for label, G in mats:
                s = torch.linalg.svdvals(msign(G, steps, schedule).double())
                err = float((s - 1).abs().max())
                key = 1e-2 if "0.01" in label else 1e-3
                worst[key] = max(worst[key], err)
            rows.append({"schedule": schedule, "steps": steps, "worst_err_1e-2": worst[1e-2],
                         "worst_err_1e-3": worst[1e-3]})
    # Timing: all settings interleaved on the same stack.
    g = torch.Generator().manual_seed(8)
    n, m = (256, 1152) if not quick else (32, 96)
    stack = torch.stack([torch.randn(n, m, generator=g) for _ in range(2)])
    cases = {f"{r['schedule']}/{r['steps']}": (lambda s=r["schedule"], k=r["steps"]: msign(stack, k, s)) for r in rows}
    timing = interleaved(cases, warmup=1, repeats=3 if not quick else 1)
    for r in rows:
        r["time_s"] = timing[f"{r['schedule']}/{r['steps']}"]["median_s"]
    base = next(r["time_s"] for r in rows if r["schedule"] == "jordan" and r["steps"] == 5)
    for r in rows:
        r["time_over_jordan5"] = r["time_s"] / base
    return {"test_matrices": [label for label, _ in mats], "timing_stack": [2, n, m], "rows": rows,
            "recommendation": recommend(rows)}


def recommend(rows: list[dict]) -> dict:
    """The cheapest (fewest steps) setting reaching each accuracy level over σ ≥ 1e-2 and ≥ 1e-3."""
    def cheapest(key: str, tol: float):
        ok = [r for r in rows if r[key] <= tol]
        if not ok:
            return None
        best = min(ok, key=lambda r: (r["steps"], r[key]))
        return {"schedule": best["schedule"], "steps": best["steps"], "err": best[key]}

    return {
        "update (σ ≥ 1e-2, err ≤ 0.1)": cheapest("worst_err_1e-2", 0.1),
        "update (σ ≥ 1e-2, err ≤ 0.05)": cheapest("worst_err_1e-2", 0.05),
        "update (σ ≥ 1e-3, err ≤ 0.15)": cheapest("worst_err_1e-3", 0.15),
        "near-exact (σ ≥ 1e-3, err ≤ 1e-3)": cheapest("worst_err_1e-3", 1e-3),
        "near-exact (σ ≥ 1e-2, err ≤ 1e-4)": cheapest("worst_err_1e-2", 1e-4),
    }
