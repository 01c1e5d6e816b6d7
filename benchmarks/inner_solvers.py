"""Section 3: inner-solver frontier (accuracy against time, from warm starts as in training).

Budgeted step (the five solvers, ``tangent=True``): ``A* = argmin ½‖A − Δ‖² s.t. ‖A‖₂ ≤ η,
WᵀA + AᵀW = 0`` on a ResNet-18 conv shape (``64 × 576``; quick ``16 × 48``). A common trajectory
(``W`` moved by the spectral-clip step, ``Δ = −lr·`` momentum of power-law gradients) runs
``WARM`` steps; every solver setting carries its own warm state (multipliers, ADMM's ``Z, U, ρ``)
along it and is then timed on the same next problem, its state restored before each repeat.
Objective gap ``(f(A) − f*)/f*`` against the best feasible answer found (ADMM, ``tol=1e-10``, long
run, and every answer of the sweep); residual: the solver's tangency residual and norm excess.

Manifold directions: ``stiefel_direction`` (``W`` on the Stiefel manifold) and
``spectral_ball_direction`` (sphere), inner at several caps/tolerances and amortized, all warm
started from the previous steps' multipliers, ``certify=True`` for the duality gap (computed in a
separate, untimed call on the same state). Times are also given in units of one Jordan 5-step
msign of the same matrix (Muon's per-matrix work).
"""

from __future__ import annotations

import copy
import math

import torch

from ._common import GradientStream, interleaved, make_params, median, timed

WARM = 4
LR, BUDGET, MOMENTUM = 0.1, 0.02, 0.9


def _problems(shape, steps: int):
    """``(W_t, Δ_t)`` for t = 0..steps along the spectral-clip trajectory."""
    from lightning_spectral.optim import get_inner_solver

    W = make_params([shape], seed=3)[0].detach().clone()
    stream = GradientStream([shape], seed=4, noise=0.5)
    clip = get_inner_solver("spectral_clip", tangent=True)
    buf, out = None, []
    for t in range(steps + 1):
        g = stream.grads(t)[0]
        buf = g.clone() if buf is None else buf.mul_(MOMENTUM).add_(g)
        D = -LR * buf
        out.append((W.clone(), D.clone()))
        W = W + clip(W, D, BUDGET)
    return out


def _objective(A, D) -> float:
    return 0.5 * float(((A.double() - D.double()) ** 2).sum())


def budgeted(quick: bool, log) -> dict:
    from lightning_spectral.optim import get_inner_solver

    shape = (16, 48) if quick else (64, 576)
    problems = _problems(shape, WARM)
    W, D = problems[-1]
    caps = (1, 10) if quick else (1, 3, 10, 30, 100)
    settings = []
    for name in ("spectral_clip", "frank_wolfe", "dual_ascent", "quasi_newton", "admm"):
        if name == "spectral_clip":
            settings.append((name, "closed form", {}))
            continue
        for cap in caps:
            if name == "frank_wolfe" and cap > 30:
                continue  # each dual step is up to fw_iters (100) SVD-exact msigns
            settings.append((name, f"max_iters={cap}", {"max_iters": cap, "tol": 1e-12}))
        if name != "frank_wolfe":
            settings.append((name, "defaults", {}))
    cases, runs = {}, {}
    for name, label, kw in settings:
        solver = get_inner_solver(name, tangent=True, **kw)
        state: dict = {}
        for Wt, Dt in problems[:-1]:  # warm the state along the trajectory
            solver(Wt, Dt, BUDGET, state=state)
        key = f"{name} {label}"
        runs[key] = {"solver": solver, "state": state, "name": name, "label": label}

        def call(solver=solver, state=state, key=key):
            out = solver(W, D, BUDGET, state=copy.deepcopy(state))
            runs[key]["A"], runs[key]["info"] = out, solver.last_info

        cases[key] = call
    log(f"[inner solvers] {len(cases)} budgeted settings on {shape}")
    timing = interleaved(cases, warmup=1, repeats=3 if not quick else 1)
    # Reference: long ADMM from scratch and from the warm state; the best feasible answer wins.
    ref_solver = get_inner_solver("admm", tangent=True, tol=1e-10, max_iters=300 if quick else 3000)
    ref_time = timed(lambda: runs.setdefault("_ref", ref_solver(W, D, BUDGET, state={})))
    candidates = [(runs["_ref"], ref_solver.last_info)] + [(r["A"], r["info"]) for k, r in runs.items() if k != "_ref"]
    feasible = [_objective(A, D) for A, info in candidates if info.tangent_residual < 1e-5 and info.norm_excess < 1e-5]
    best = min(feasible)
    rows = []
    for key, r in runs.items():
        if key == "_ref":
            continue
        info = r["info"]
        rows.append({"solver": r["name"], "setting": r["label"], "time_s": timing[key]["median_s"],
                     "iterations": info.iterations, "objective_gap": (_objective(r["A"], D) - best) / best,
                     "tangent_residual": info.tangent_residual, "norm_excess": info.norm_excess})
    return {"shape": list(shape), "budget": BUDGET, "warm_steps": WARM, "best_objective": best,
            "reference": {"solver": "admm tol=1e-10", "time_s": ref_time, "iterations": ref_solver.last_info.iterations},
            "rows": rows}


def directions(quick: bool, log) -> dict:
    from lightning_spectral.optim import msign, msign_svd, spectral_ball_direction, stiefel_direction
    from lightning_spectral.optim.linalg import top_singular_pair

    shape = (16, 48) if quick else (64, 576)
    g = torch.Generator().manual_seed(5)
    W0 = msign_svd(torch.randn(*shape, generator=g))
    stream = GradientStream([shape], seed=6, noise=0.5)
    grads = [stream.grads(t)[0] for t in range(WARM + 1)]
    caps = (3, 10) if quick else (3, 10, 30, 100, 300)
    tols = (1e-1, 1e-3) if quick else (1e-1, 1e-2, 1e-3, 1e-4, 1e-6)

    # Common trajectories: W moved by an accurate inner direction, lr 0.1, exact retraction.
    W_st, W_sb = [W0], [W0 / torch.linalg.matrix_norm(W0, ord=2)]
    Y, lam = None, 0.0
    for G in grads[:-1]:
        Phi, Y, _ = stiefel_direction(W_st[-1], G, Y, mode="inner", max_iters=300, tol=1e-7)
        W_st.append(msign_svd(W_st[-1] - 0.1 * Phi))
        _, u, v = top_singular_pair(W_sb[-1])
        Phi, lam, _ = spectral_ball_direction(G, u, v, lam, mode="inner", tol=1e-8, msign_steps=8)
        Wn = W_sb[-1] - 0.1 * Phi
        W_sb.append(Wn / torch.linalg.matrix_norm(Wn, ord=2))
    G = grads[-1]

    # msign as the optimizers' defaults: 5 Polar-Express steps amortized, 8 in the sphere's inner mode.
    amortized = {"mode": "amortized", "msign_steps": 5, "schedule": "polar_express_5"}
    inner_sb = {"mode": "inner", "msign_steps": 8, "schedule": "polar_express"}
    settings = [("stiefel", "amortized", amortized)]
    settings += [("stiefel", f"inner max_iters={c}", {"mode": "inner", "max_iters": c, "tol": 1e-9}) for c in caps]
    settings += [("stiefel", "inner tol=2e-3 (section 1's 1e-3-gap setting)", {"mode": "inner", "max_iters": 300, "tol": 2e-3})]
    settings += [("stiefel", "inner defaults (ManifoldMuon: tol 1e-5, ≤300)", {"mode": "inner", "max_iters": 300, "tol": 1e-5})]
    settings += [("spectral_ball", "amortized", amortized)]
    settings += [("spectral_ball", f"inner tol={t:g}", {**inner_sb, "tol": t}) for t in tols]
    settings += [("spectral_ball", "inner defaults (SpectralBall: tol 1e-4, ≤50)", {**inner_sb, "tol": 1e-4, "max_iters": 50})]

    cases, runs = {}, {}
    for method, label, kw in settings:
        # Warm the multiplier with this very setting along the trajectory.
        if method == "stiefel":
            Yw = None
            for Wt, Gt in zip(W_st[:-1], grads[:-1]):
                _, Yw, _ = stiefel_direction(Wt, Gt, Yw, **kw)
            fn = (lambda Yw=Yw, kw=kw: stiefel_direction(W_st[-1], G, Yw, **kw))
            cert = (lambda Yw=Yw, kw=kw: stiefel_direction(W_st[-1], G, Yw, certify=True, **kw))
            base = W_st[-1]
        else:
            lw = 0.0
            for Wt, Gt in zip(W_sb[:-1], grads[:-1]):
                _, u, v = top_singular_pair(Wt)
                _, lw, _ = spectral_ball_direction(Gt, u, v, lw, **kw)
            _, u, v = top_singular_pair(W_sb[-1])
            fn = (lambda lw=lw, kw=kw, u=u, v=v: spectral_ball_direction(G, u, v, lw, **kw))
            cert = (lambda lw=lw, kw=kw, u=u, v=v: spectral_ball_direction(G, u, v, lw, certify=True, **kw))
            base = W_sb[-1]
        key = f"{method} {label}"
        cases[key] = fn
        runs[key] = {"method": method, "label": label, "cert": cert}
    cases["msign jordan-5 (Muon's work)"] = lambda: msign(G, 5, "jordan")
    log(f"[inner solvers] {len(settings)} direction settings on {shape}")
    timing = interleaved(cases, warmup=1, repeats=3 if not quick else 1)
    unit = timing["msign jordan-5 (Muon's work)"]["median_s"]
    rows = []
    for key, r in runs.items():
        _, _, info = r["cert"]()
        rows.append({"method": r["method"], "setting": r["label"], "time_s": timing[key]["median_s"],
                     "time_over_msign5": timing[key]["median_s"] / unit, "iterations": info.iterations,
                     "duality_gap": info.duality_gap, "residual": float(info.residual)})
    return {"shape": list(shape), "warm_steps": WARM, "msign5_time_s": unit, "rows": rows}


def run(quick: bool, log) -> dict:
    return {"budgeted": budgeted(quick, log), "directions": directions(quick, log)}
