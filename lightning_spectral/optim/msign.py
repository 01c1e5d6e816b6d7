"""msign: the polar factor ``U Vᵀ`` of ``G = U Σ Vᵀ``, the one primitive of every optimizer here.

Newton–Schulz iteration on ``X₀ = G / (safety·‖G‖_F + ε)``: each step applies an odd quintic
``X ← a X + (b A + c A²) X`` with ``A = X Xᵀ`` on the short side (tall inputs are transposed), so
every singular value ``σ`` of ``X₀`` goes through the scalar map ``p(σ) = aσ + bσ³ + cσ⁵``.
The coefficients are data (:data:`SCHEDULES`), one triple per step, the last triple repeated
when more steps are asked for than the schedule lists:

- ``"jordan"``: Keller Jordan's constant ``(3.4445, −4.7750, 2.0315)``; fast, not convergent
  (5 steps leave σ in about [0.68, 1.20]); what ``torch.optim.Muon`` uses.
- ``"polar_express"``: Amsel et al. (2025), per-step minimax-optimal for σ ∈ [1e-3, 1], with a
  1.01 safety factor so bfloat16 round-off cannot push σ past the stable region; it ends in
  the fixed-point quintic ``(15/8, −10/8, 3/8)``, which converges to 1 at third order:
  8 steps reach σ = 1.000 in float32.
- ``"you_quintic"``: You Jiacheng's 5-step set (modded-nanogpt): σ ∈ [0.98, 1.03] in 5 steps
  for σ ≥ 1e-2.
- ``"polar_express_5"``: the 5-step Polar Express set of nanochat (safety 1.02).

Two ways to run the same iteration (``method``):

- ``"standard"``: three GEMMs per step on ``X`` itself (``m × n``, ``m ≤ n``):
  ``K·(4m²n + 2m³)`` flops for ``K`` steps.
- ``"gram"``: every step multiplies ``X`` on the left by a polynomial in ``A = XXᵀ``, so
  ``X_k = Q_k X₀`` with ``Q_k`` a polynomial in the small Gram matrix ``A₀ = X₀X₀ᵀ``. The
  iteration runs on ``m × m`` matrices only: ``P_k = a I + b A_k + c A_k²``,
  ``Q_{k+1} = P_k Q_k``, ``A_{k+1} = P_k A_k P_k``, and ``X₀`` is multiplied once at the end:
  ``4m²n + (4K − 3)·2m³`` flops. The catch is round-off: ``A₀`` squares the condition
  number, so its float32 rounding ``δ ≈ ε‖A₀‖`` is a relative error ``δ/σ²`` on the small
  singular values that ``Q_K = q(A₀)`` turns into an output error ``≈ δ/(2σ²)`` (``Q`` no
  longer matches the ``X₀`` it multiplies); measured with Polar Express on σ ∈ [1e-6, 1]:
  top σ = 1.03 instead of 1.0000001. The standard chain never has this, as each step's
  ``A`` is recomputed from the ``X`` it acts on. So the Gram form re-synchronises once: after
  :data:`GRAM_RESYNC` steps it forms ``X₃ = Q₃X₀`` and a fresh ``A₃ = X₃X₃ᵀ`` (whose small
  singular values the first steps have already grown 40–130×) and runs the remaining steps
  from there. That restores the standard chain's float32 accuracy on every test here (σ down
  to 1e-6, rank-deficient) and costs ``8m²n + (4K − 6)·2m³`` flops for ``K > 3`` steps:
  0.53× the standard chain at ``n = 9m`` (most ResNet-18 convolutions), 0.67× at ``n = 4m``
  (GPT-2's MLP), equal at ``n ≈ 1.75m`` (``K = 5``; un-synchronised it would be 0.37× and
  0.56×). In bfloat16 every GEMM of the Gram form runs in bfloat16 as well (float32
  accumulation, bfloat16 results, as in the standard chain), re-synchronised every
  :data:`GRAM_SEGMENT_BF16` steps: ``A`` and ``Q`` are then rounded apart at bfloat16's ε, and a
  steep step (Polar Express's first ones, ``p'(1) ≈ 20``) amplifies that mismatch, so segments
  of 3 steps blow Polar Express up (NaN) while segments of 2 stay within 1.3–3.7× the standard
  bfloat16 chain's round-off on every test here. Measured on real gradients (Jordan, 5 steps as
  2 + 2 + 1, matrices with aspect ≥ 2; relative Frobenius distance from the same iteration in
  float64): 0.17 on ResNet-18's, 0.032 on GPT's, where the standard bfloat16 chain
  (``torch.optim.Muon``'s) is 0.17 and 0.028, in 0.68× and 0.78× its time (one CPU thread,
  AVX512-BF16). So the bfloat16 Gram form keeps the accuracy of a bfloat16 chain (a multiple
  of bfloat16's ε: the squared condition number is paid on two steps at a time), not float32's.
- ``"auto"`` (default): ``"gram"`` when ``n ≥`` :data:`GRAM_MIN_ASPECT` ``· m`` and ``steps >``
  :data:`GRAM_RESYNC`, in every compute dtype; ``"standard"`` otherwise (square matrices, few steps).

``schedule="svd"`` gives the exact answer (``torch.linalg.svd``; singular values below
``rank_tol·σ_max`` are treated as zero, as the odd polynomials do). Everything is batched over
leading dimensions: same-shaped matrices go through one ``bmm`` chain.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

Coefficients = tuple[float, float, float]

_PE_SAFETY = 1.01
_PE_RAW: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


def _with_safety(raw: Sequence[Coefficients], s: float) -> tuple[Coefficients, ...]:
    """Divide every triple but the last by ``(s, s³, s⁵)``: ``p(x/s)`` keeps σ below the edge."""
    scaled = [(a / s, b / s**3, c / s**5) for a, b, c in raw[:-1]]
    return tuple(scaled) + (tuple(raw[-1]),)


SCHEDULES: dict[str, tuple[Coefficients, ...]] = {
    "jordan": ((3.4445, -4.7750, 2.0315),),
    "polar_express": _with_safety(_PE_RAW, _PE_SAFETY),
    "you_quintic": (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ),
    "polar_express_5": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}

# The input is divided by this times ‖G‖_F for each schedule (Polar Express assumes σ ≤ 1/1.01).
INPUT_SAFETY: dict[str, float] = {"jordan": 1.0, "polar_express": _PE_SAFETY, "you_quintic": 1.0,
                                  "polar_express_5": 1.02}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: float32 on every CPU, bfloat16 on CUDA; both run the Gram form where one side
    is ≥ 2× the other. The CPU contract: Jordan's 5-step chain within float32 round-off of the
    same iteration in float64 (``≤ 1e3·ε₃₂`` relative Frobenius; measured 4.7e-5 on ResNet-18's
    real gradients, 7e-6 on GPT's). Every bfloat16 chain misses it by three orders (5–17 %,
    ``torch.optim.Muon``'s included), the bfloat16 Gram form too (it keeps the standard
    bfloat16 chain's accuracy, :func:`msign`), so "auto" does not pick bfloat16 even where the
    CPU has it natively: there ``"bfloat16"`` is the fastest chain, faster than
    ``torch.optim.Muon``'s at its accuracy (the README's measured table,
    ``benchmarks.real_gradients --sections chains``). On CUDA the contract is the bfloat16
    chain's (tensor cores; no GPU was measured here: ``benchmarks.gpu`` times both forms)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown msign dtype {name!r}; choose one of 'auto', {', '.join(map(repr, _DTYPES))}")
    return _DTYPES[name]


def check_schedule(schedule: str | Sequence[Coefficients], steps: int) -> None:
    """Fail early on an unknown schedule name or a non-positive step count (a schedule may also be
    given as its ``(a, b, c)`` triples, one per step, the last repeated)."""
    if not isinstance(schedule, str):
        if not schedule or any(len(triple) != 3 for triple in schedule):
            raise ValueError(f"an msign schedule given by its coefficients needs (a, b, c) triples, got {schedule!r}")
    elif schedule not in SCHEDULES and schedule != "svd":
        raise ValueError(
            f"unknown msign schedule {schedule!r}; choose one of {sorted(SCHEDULES)} or 'svd' (exact)"
        )
    if int(steps) != steps or steps < 1:
        raise ValueError(f"msign steps must be a positive integer, got {steps!r}")


METHODS = ("auto", "standard", "gram")
GRAM_RESYNC = 3
"""After this many steps the Gram form recomputes ``A = XXᵀ`` from ``X₃ = Q₃X₀`` (module
docstring). Without it the output moves by up to 2e-4 in σ even on Jordan's schedule (σ down to
1e-2, float32, measured), 100× the standard chain's round-off."""
GRAM_SEGMENT_BF16 = 2
"""Steps per Gram segment when the chain computes in bfloat16 or float16 (module docstring)."""
GRAM_MIN_ASPECT = 2.0
"""``"auto"`` runs the Gram form when the long side is at least this times the short side. The
flop counts cross at 1.75 (5 steps); measured on one CPU thread, Jordan 5 steps, ``m = 64…512``,
1 or 3 matrices, time of the Gram form ÷ the standard chain: 0.84–1.16 (median 0.9) at an aspect
of 2, 0.71–0.81 at 3, 0.55–0.68 at 4–9 (1.2–1.3 for square matrices)."""


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown msign method {method!r}; choose one of {', '.join(map(repr, METHODS))}")


def uses_gram(shape: Sequence[int], steps: int, method: str = "auto") -> bool:
    """Whether :func:`msign` runs the Gram form for a matrix of this ``shape`` (``…, n, m``)."""
    check_method(method)
    if method != "auto":
        return method == "gram"
    short, long = min(shape[-2:]), max(shape[-2:])  # sorted() of symbolic sizes breaks torch.compile graphs
    return steps > GRAM_RESYNC and long >= GRAM_MIN_ASPECT * short


def msign(
    G: torch.Tensor,
    steps: int = 5,
    schedule: str | Sequence[Coefficients] = "jordan",
    dtype: torch.dtype | None = None,
    eps: float = 1e-7,
    method: str = "auto",
) -> torch.Tensor:
    """Polar factor of ``G`` (``…, n, m``), batched over leading dimensions.

    Args:
        G: a matrix or a stack of matrices.
        steps: Newton–Schulz steps (ignored by ``schedule="svd"``).
        schedule: a key of :data:`SCHEDULES`, ``"svd"`` for the exact answer, or the
            coefficients themselves (``(a, b, c)`` triples, one per step, the last repeated).
        dtype: compute dtype (default: ``G``'s). The result has ``G``'s dtype.
        eps: added to the Frobenius norm so ``msign(0) = 0``.
        method: ``"auto"``, ``"standard"`` or ``"gram"`` (module docstring); the same
            iteration, equal results up to round-off.
    """
    if G.ndim < 2:
        raise ValueError(f"msign needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    check_method(method)
    if schedule == "svd":
        return msign_svd(G)
    check_schedule(schedule, steps)
    table = SCHEDULES[schedule] if isinstance(schedule, str) else tuple(schedule)
    coefficients = [table[min(k, len(table) - 1)] for k in range(steps)]
    out_dtype = G.dtype
    lead = G.shape[:-2]
    compute = dtype or G.dtype
    gram = uses_gram(G.shape, steps, method)
    X = G.to(compute)
    if X.ndim > 3:
        X = X.reshape(-1, *X.shape[-2:])
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    low_precision = X.dtype not in (torch.float32, torch.float64)
    norm = torch.linalg.matrix_norm(X.float() if low_precision else X, keepdim=True).to(X.dtype)
    X = X / (norm * (INPUT_SAFETY[schedule] if isinstance(schedule, str) else 1.0) + eps)
    if gram:
        cuts = list(range(0, steps, GRAM_SEGMENT_BF16)) if low_precision else [0, GRAM_RESYNC]
        for start, stop in zip(cuts, cuts[1:] + [steps]):
            X = _gram_chain(X, coefficients[start:stop])
    else:
        for a, b, c in coefficients:
            X = _quintic_step(X, a, b, c)
    if transposed:
        X = X.mT
    if len(lead) > 1:
        X = X.reshape(*lead, *X.shape[-2:])
    return X.to(out_dtype)


def _mm(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return A @ B if A.ndim == 2 else torch.bmm(A, B)


def _gram(X: torch.Tensor) -> torch.Tensor:
    return _mm(X, X.mT)


def _poly(A: torch.Tensor, a: float, b: float, c: float) -> torch.Tensor:
    """``a I + b A + c A²``: one GEMM fused with the add."""
    P = torch.addmm(A, A, A, beta=b, alpha=c) if A.ndim == 2 else torch.baddbmm(A, A, A, beta=b, alpha=c)
    P.diagonal(dim1=-2, dim2=-1).add_(a)
    return P


def _quintic_step(X: torch.Tensor, a: float, b: float, c: float, A: torch.Tensor | None = None) -> torch.Tensor:
    """``a X + (b A + c A²) X`` with ``A = X Xᵀ`` (computed unless given): three GEMMs, two of
    them fused with the adds."""
    A = _gram(X) if A is None else A
    if X.ndim == 2:
        B = torch.addmm(A, A, A, beta=b, alpha=c)
        return torch.addmm(X, B, X, beta=a)
    B = torch.baddbmm(A, A, A, beta=b, alpha=c)
    return torch.baddbmm(X, B, X, beta=a)


def _gram_chain(X: torch.Tensor, coefficients: Sequence[Coefficients], A: torch.Tensor | None = None) -> torch.Tensor:
    """The quintic steps ``X ← P_k X`` run on ``m × m`` matrices (``X`` is ``m × n``, wide):
    ``P_k = a I + b A_k + c A_k²``, ``Q ← P_k Q``, ``A_{k+1} = P_k A_k P_k``, then ``Q X`` once.
    ``A = X Xᵀ`` may be given. ``4K − 3`` GEMMs of ``m × m`` and two of ``m × m × n``."""
    if not coefficients:
        return X
    A = _gram(X) if A is None else A
    Q = None
    last = len(coefficients) - 1
    for k, (a, b, c) in enumerate(coefficients):
        P = _poly(A, a, b, c)
        Q = P if Q is None else _mm(P, Q)
        if k < last:
            A = _mm(_mm(P, A), P)
    return _mm(Q, X)


FIXED_POINT_QUINTIC: Coefficients = (1.875, -1.25, 0.375)
"""``p(σ) = (15σ − 10σ³ + 3σ⁵)/8``: ``p(1 ± e) = 1 ± 2.5e³ + O(e⁴)``, increasing everywhere,
converging to 1 from any ``σ ∈ (0, √(7/3))``; on ``A = XᵀX = I + E`` it is the second-order
Taylor polynomial of ``X (I + E)^{-1/2}``."""


def _fixed_point_steps(delta: float, tol: float, max_steps: int) -> int | None:
    """Steps of :data:`FIXED_POINT_QUINTIC` that bring every ``σ`` with ``|σ² − 1| ≤ delta``
    within ``tol`` of 1 (the map is increasing, so the two ends of the interval are the worst
    cases); ``None`` if more than ``max_steps`` would be needed or the interval leaves the basin."""
    if not delta < 1.0:  # also catches NaN
        return None
    a, b, c = FIXED_POINT_QUINTIC
    lo, hi = math.sqrt(1.0 - delta), math.sqrt(1.0 + delta)
    for steps in range(max_steps + 1):
        if 1.0 - lo <= tol and hi - 1.0 <= tol:
            return steps
        lo, hi = (a * x + b * x**3 + c * x**5 for x in (lo, hi))
    return None


def polar_retraction(Y: torch.Tensor, tol: float = 1e-6, max_steps: int = 6, bound: float | None = None) -> torch.Tensor:
    """Polar factor of a ``Y`` whose singular values are already near 1, as after a step along
    a tangent direction from an orthonormal ``W``: ``(W − tD)ᵀ(W − tD) = I + t²DᵀD`` when
    ``WᵀD + DᵀW = 0``. No normalisation (which would throw that away): ``A = XXᵀ`` on the short
    side gives the rigorous bound ``max |σ² − 1| ≤ ‖A − I‖_F``, from which the number of
    :data:`FIXED_POINT_QUINTIC` steps that reach ``|σ − 1| ≤ tol`` is counted exactly (one or
    two at the usual learning rates: 3–6 GEMMs instead of the 24 of eight Polar-Express steps;
    two or more steps on a matrix with aspect ≥ :data:`GRAM_MIN_ASPECT` run in the Gram form).
    Far from orthonormal (bound ≥ 1, or more than ``max_steps`` needed), it is
    ``msign(Y, 8, "polar_express")``. Batched over leading dimensions, each matrix taking the
    number of steps it needs; one host sync. ``bound``: a bound on ``max |σ² − 1|`` the caller
    knows (e.g. ``t²‖D‖₂²`` plus the start's deviation, for a tangent ``D`` of known norm): the
    steps are counted from it, every matrix takes them, and nothing is read back to the host.
    """
    transposed = Y.size(-2) > Y.size(-1)
    X = Y.mT if transposed else Y
    lead = X.shape[:-2]
    if X.ndim > 3:
        X = X.reshape(-1, *X.shape[-2:])
    A = _gram(X)
    if bound is not None:
        X = _fixed_point_polar(X, A, _fixed_point_steps(bound, tol, max_steps))
        if len(lead) > 1:
            X = X.reshape(*lead, *X.shape[-2:])
        return X.mT if transposed else X
    eye = torch.eye(A.size(-1), dtype=A.dtype, device=A.device)
    deltas = torch.linalg.matrix_norm(A - eye)
    if deltas.ndim == 0:
        X = _fixed_point_polar(X, A, _fixed_point_steps(float(deltas), tol, max_steps))
    else:  # each matrix of a stack takes the steps it needs alone (one host sync for all)
        counts = [_fixed_point_steps(d, tol, max_steps) for d in deltas.tolist()]
        if len(set(counts)) == 1:
            X = _fixed_point_polar(X, A, counts[0])
        else:
            out = torch.empty_like(X)
            for steps in set(counts):
                index = torch.tensor([i for i, c in enumerate(counts) if c == steps], device=X.device)
                out[index] = _fixed_point_polar(X[index], A[index], steps)
            X = out
    if len(lead) > 1:
        X = X.reshape(*lead, *X.shape[-2:])
    return X.mT if transposed else X


def _fixed_point_polar(X: torch.Tensor, A: torch.Tensor, steps: int | None) -> torch.Tensor:
    """``steps`` fixed-point quintic steps on the wide ``X`` with ``A = XXᵀ`` (``None``: the
    Polar-Express msign, for an ``X`` far from orthonormal)."""
    if steps is None:
        return msign(X, 8, "polar_express")
    if steps >= 2 and uses_gram(X.shape, GRAM_RESYNC + 1):
        # Near-orthonormal, A's eigenvalues are ≈ 1: the Gram form needs no re-synchronisation.
        return _gram_chain(X, [FIXED_POINT_QUINTIC] * steps, A=A)
    for k in range(steps):
        X = _quintic_step(X, *FIXED_POINT_QUINTIC, A=A if k == 0 else None)
    return X


def msign_svd(G: torch.Tensor, rank_tol: float | None = None) -> torch.Tensor:
    """Exact ``U sign(Σ) Vᵀ`` in float32 or better; singular values ≤ ``rank_tol·σ_max`` map to 0."""
    work = G if G.dtype in (torch.float32, torch.float64) else G.float()
    U, S, Vh = torch.linalg.svd(work, full_matrices=False)
    if rank_tol is None:
        rank_tol = max(G.shape[-2:]) * torch.finfo(work.dtype).eps
    keep = (S > rank_tol * S[..., :1]).to(work.dtype)
    return ((U * keep.unsqueeze(-2)) @ Vh).to(G.dtype)


def nuclear_norm(M: torch.Tensor) -> torch.Tensor:
    """``‖M‖_*`` (sum of singular values), exact."""
    return torch.linalg.svdvals(M if M.dtype in (torch.float32, torch.float64) else M.float()).sum(-1)
