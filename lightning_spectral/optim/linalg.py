"""Small exact linear-algebra pieces shared by the solvers and the manifold directions.

Conventions: a weight ``W`` is worked on in *tall* orientation (``n ≥ m``; a wide matrix is
transposed first and the answer transposed back), so the Stiefel manifold is ``WᵀW = I`` and
its tangent space at ``W`` is ``{A : WᵀA + AᵀW = 0}``.
"""

from __future__ import annotations

import torch

from .msign import msign


def as_matrix(p: torch.Tensor) -> torch.Tensor:
    """View a weight as a matrix: a conv kernel ``(out, in, kh, kw)`` becomes ``out × (in·kh·kw)``."""
    if p.ndim < 2:
        raise ValueError(f"expected a tensor with ndim >= 2, got shape {tuple(p.shape)}")
    return p if p.ndim == 2 else p.reshape(p.shape[0], -1)


def msign_cost(p: torch.Tensor | torch.Size) -> int:
    """``m·n·min(m, n)`` of the ``m × n`` matrix view of ``p`` (a tensor or its shape): how an msign's work grows."""
    shape = p.shape if isinstance(p, torch.Tensor) else p
    rows, cols = shape[0], shape.numel() // max(shape[0], 1)
    return rows * cols * min(rows, cols)


def sym(M: torch.Tensor) -> torch.Tensor:
    """Symmetric part ``(M + Mᵀ)/2``."""
    return 0.5 * (M + M.mT)


def skew(M: torch.Tensor) -> torch.Tensor:
    """Skew-symmetric part ``(M − Mᵀ)/2``."""
    return 0.5 * (M - M.mT)


def spectral_norm(M: torch.Tensor, method: str = "svd") -> torch.Tensor:
    """``‖M‖₂`` (largest singular value), in float32 or better. ``method="svd"``: from the singular
    values; ``"gram"``: ``√λ_max(MᵀM)`` of the short side's Gram matrix (one GEMM and a small
    float64 ``eigvalsh``, several times cheaper than an SVD on a ResNet-18 convolution). The top
    singular value is the best-conditioned one, so the Gram route keeps the working dtype's
    accuracy for it (relative error ``≈ ε``, ``ε`` the GEMM's epsilon)."""
    work = M if M.dtype in (torch.float32, torch.float64) else M.float()
    if method == "gram":
        return torch.linalg.eigvalsh(_short_gram(work).double())[..., -1].clamp_min(0.0).sqrt().to(work.dtype)
    if method != "svd":
        raise ValueError(f"unknown spectral_norm method {method!r}; use 'svd' or 'gram'")
    return torch.linalg.matrix_norm(work, ord=2)


def _short_gram(M: torch.Tensor) -> torch.Tensor:
    """``MᵀM`` or ``MMᵀ``, whichever is the smaller square."""
    return M.mT @ M if M.size(-2) >= M.size(-1) else M @ M.mT


def is_wide(W: torch.Tensor) -> bool:
    return W.size(-2) < W.size(-1)


def orient(W: torch.Tensor, *others: torch.Tensor) -> tuple[bool, list[torch.Tensor]]:
    """Return ``(transposed, [W, *others])`` in tall orientation."""
    flip = is_wide(W)
    mats = [W, *others]
    return flip, [m.mT for m in mats] if flip else mats


class TangentSpace:
    """The linear space ``T = {A : WᵀA + AᵀW = 0}`` at a tall ``W`` and its exact projection.

    ``T`` is the set of first-order moves that leave the Gram matrix ``WᵀW`` unchanged: for
    ``W`` on the Stiefel manifold it is the manifold's tangent space. The projection
    ``P_T(Δ) = Δ − W S`` with ``S`` symmetric solving the Lyapunov equation
    ``C S + S C = WᵀΔ + ΔᵀW``, ``C = WᵀW``; with ``C = QΛQᵀ`` that is
    ``S = Q [(QᵀRQ)ᵢⱼ / (λᵢ + λⱼ)] Qᵀ`` (``R`` the right-hand side). When ``W`` is known to be
    orthonormal (``orthonormal=True``) it reduces to ``Δ − W sym(WᵀΔ)`` and no eigensolve is done.
    """

    def __init__(self, W: torch.Tensor, orthonormal: bool = False):
        if W.size(-2) < W.size(-1):
            raise ValueError("TangentSpace expects a tall matrix (rows >= columns); transpose first")
        self.W = W
        self.orthonormal = orthonormal
        self.norm = 1.0  # ‖W‖₂
        if not orthonormal:
            C = (W.mT @ W).double()
            lam, Q = torch.linalg.eigh(C)
            self.norm = float(lam[-1].clamp_min(0.0).sqrt())
            denom = lam[:, None] + lam[None, :]
            tiny = denom.abs().max() * 1e-12
            self.eigenvectors, self.eigenvalues = Q, lam  # C = Q diag(λ) Qᵀ (float64)
            # 1/(λᵢ + λⱼ): the Lyapunov operator's inverse in C's eigenbasis
            self.inverse_denominators = torch.where(denom > tiny, 1.0 / denom.clamp_min(tiny), torch.zeros_like(denom))

    def constraint(self, A: torch.Tensor) -> torch.Tensor:
        """``sym(WᵀA)``: zero exactly when ``A ∈ T``."""
        return sym(self.W.mT @ A)

    def multiplier(self, A: torch.Tensor, constraint: torch.Tensor | None = None) -> torch.Tensor:
        """The symmetric ``S`` with ``P_T(A) = A − W S`` (``constraint``: ``sym(WᵀA)`` if at hand)."""
        C = self.constraint(A) if constraint is None else constraint
        if self.orthonormal:
            return C
        Q = self.eigenvectors
        return (Q @ ((Q.mT @ (2.0 * C.double()) @ Q) * self.inverse_denominators) @ Q.mT).to(A.dtype)

    def project(self, A: torch.Tensor, constraint: torch.Tensor | None = None) -> torch.Tensor:
        return A - self.W @ self.multiplier(A, constraint)

    def residual(self, A: torch.Tensor, constraint: torch.Tensor | None = None) -> torch.Tensor:
        """Scale-free tangency residual ``‖sym(WᵀA)‖_F / (‖W‖₂ ‖A‖_F)`` (0 on ``T``)."""
        C = self.constraint(A) if constraint is None else constraint
        return torch.linalg.matrix_norm(C) / (self.norm * torch.linalg.matrix_norm(A) + 1e-30)


def spectral_clip(delta: torch.Tensor, budget: float, method: str = "svd") -> torch.Tensor:
    """``U min(Σ, η) Vᵀ``: the Frobenius-nearest matrix with ``‖A‖₂ ≤ η`` (the projection onto
    the spectral ball of radius ``η``).

    ``method="svd"`` is exact. ``method="gram"``: from the eigenpairs ``(σᵢ², vᵢ)`` of the short
    side's Gram matrix ``ΔᵀΔ`` (float64 ``eigh``), ``clip(Δ) = Δ − Σ_{σᵢ>η} (1 − η/σᵢ) Δvᵢvᵢᵀ``:
    one Gram GEMM and two thin ones, 1.5–7× cheaper than the SVD on ResNet-18's convolutions. Only
    the singular values above ``η`` are touched, and those the Gram form resolves to
    ``ε·σ₁²/η²`` relative (``ε`` the Gram GEMM's epsilon); the singular values below ``η`` (whose
    Gram eigenpairs squaring makes inaccurate) are left exactly as they are. Where
    ``ε·σ₁²/η² > 1e-6`` the Gram matrix is recomputed in float64, and where even float64's
    would be, the SVD answers.
    ``method="msign"`` needs no factorisation: with ``P = msign(Δ)``,
    ``clip(Δ) = ½ (Δ + ηP − msign(Δ − ηP) Pᵀ (Δ − ηP))`` (two Polar-Express msign calls;
    its error is set by how well msign resolves singular values near ``η``).
    """
    if method == "gram":
        work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
        wide = is_wide(work)
        M = work.mT if wide else work
        lam, V = torch.linalg.eigh(_short_gram(M).double())
        spread = float(lam[..., -1].max()) / budget**2  # σ₁²/η²: the Gram form's error amplification
        if torch.finfo(M.dtype).eps * spread > 1e-6:
            if torch.finfo(torch.float64).eps * spread > 1e-6:
                return spectral_clip(delta, budget, "svd")
            lam, V = torch.linalg.eigh(_short_gram(M.double()))
        shrink = (1.0 - budget / lam.clamp_min(0.0).sqrt().clamp_min(1e-300)).clamp_min(0.0)
        if M.ndim == 2:  # keep only the clipped directions: two thin GEMMs
            keep = shrink > 0
            V, shrink = V[:, keep], shrink[keep]
        V = V.to(M.dtype)
        A = M - ((M @ V) * shrink.to(M.dtype).unsqueeze(-2)) @ V.mT
        return (A.mT if wide else A).to(delta.dtype)
    if method == "svd":
        work = delta if delta.dtype in (torch.float32, torch.float64) else delta.float()
        U, S, Vh = torch.linalg.svd(work, full_matrices=False)
        return ((U * S.clamp(max=budget).unsqueeze(-2)) @ Vh).to(delta.dtype)
    if method == "msign":
        P = msign(delta, steps=10, schedule="polar_express")
        E = delta - budget * P
        return 0.5 * (delta + budget * P - msign(E, steps=10, schedule="polar_express") @ P.mT @ E)
    raise ValueError(f"unknown spectral_clip method {method!r}; use 'svd', 'gram' or 'msign'")


def rescale_into_ball(A: torch.Tensor, budget: float) -> torch.Tensor:
    """``A · min(1, η/‖A‖₂)``: stays in any linear space ``A`` is in."""
    norm = spectral_norm(A)
    return A * torch.clamp(budget / (norm + 1e-30), max=1.0).to(A.dtype)


def power_iteration(
    W: torch.Tensor,
    u: torch.Tensor | None = None,
    max_iter: int = 20,
    tol: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triple of ``W`` (or of each matrix of a stack ``…, m, n``) by power iteration
    from the left vector ``u`` (warm start, ``…, m``; ``None``: a normal draw from ``generator``).
    Each round ``v ← Wᵀu/‖·‖``, ``u ← Wv/‖·‖``, ``σ = ‖Wv‖``: a lower bound on ``‖W‖₂`` that
    increases to it at the rate ``(σ₂/σ₁)²`` per round. With ``tol > 0`` it stops once every
    ``σ`` changes by at most ``tol`` relative (one host sync per round); with ``tol = 0`` it runs
    ``max_iter`` rounds without a sync. A zero ``W`` gives ``σ = 0`` and keeps ``u``. Returns
    ``(σ, u, v)`` (``σ`` of shape ``…``)."""
    if u is None:
        u = torch.randn(W.shape[:-1], generator=generator, dtype=W.dtype).to(W.device)
    tiny = torch.finfo(W.dtype).tiny
    u = u.to(W) / torch.linalg.vector_norm(u.to(W), dim=-1, keepdim=True).clamp_min(tiny)
    sigma = W.new_zeros(W.shape[:-2])
    v = W.new_zeros(*W.shape[:-2], W.shape[-1])
    for _ in range(max_iter):
        v = matvec(W.mT, u)
        v = v / torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min(tiny)
        Wv = matvec(W, v)
        new_sigma = torch.linalg.vector_norm(Wv, dim=-1)
        u = torch.where(new_sigma[..., None] > 0, Wv / new_sigma[..., None].clamp_min(tiny), u)
        converged = tol > 0 and bool(((new_sigma - sigma).abs() <= tol * new_sigma).all())
        sigma = new_sigma
        if converged or (tol > 0 and bool((sigma == 0.0).all())):
            break
    return sigma, u, v


def per_matrix(t: torch.Tensor) -> torch.Tensor:
    """A value per matrix (shape ``…``) made to broadcast over the matrices (``…, 1, 1``); a 0-d
    value stays 0-d (the fast scalar path of elementwise kernels)."""
    return t if t.ndim == 0 else t[..., None, None]


def matvec(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M x`` for a matrix and a vector, or a stack of each (``…, m, n`` times ``…, n``)."""
    if M.ndim == 2:
        return M @ x
    if M.ndim == 3 and M.device.type == "cpu" and (len(M) == 1 or M.shape[-2] * M.shape[-1] >= 1 << 16):
        # On a CPU one BLAS matrix-vector product per matrix runs about twice as fast as a batched
        # matrix product with one column on large matrices (measured at 3 × 512 × 512, float64).
        return torch.stack([m @ v for m, v in zip(M, x)])
    return (M @ x.unsqueeze(-1)).squeeze(-1)


def addmm(C: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, beta: float = 1.0, alpha: float = 1.0) -> torch.Tensor:
    """``beta·C + alpha·A B`` fused into one GEMM, for matrices or 3-D stacks of them."""
    if A.ndim == 2:
        return torch.addmm(C, A, B, beta=beta, alpha=alpha)
    return torch.baddbmm(C, A, B, beta=beta, alpha=alpha)


def estimate_spectral_norm(M: torch.Tensor, steps: int = 4) -> torch.Tensor:
    """Cheap deterministic estimate of ``‖M‖₂`` (power iteration from the column sums of
    ``|M|``; per matrix of a stack), used only to put gradients on a common scale."""
    v = torch.nn.functional.normalize(M.abs().sum(-2) + 1e-30, dim=-1)
    u = torch.nn.functional.normalize(matvec(M, v), dim=-1)
    sigma, _, _ = power_iteration(M, u, steps)
    return sigma


def top_singular_triple(
    W: torch.Tensor, warm: tuple[torch.Tensor, torch.Tensor] | None = None, tol: float = 1e-6,
    max_iters: int = 64, check_every: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(σ₁, u₁, v₁, iterations)`` of ``W`` (or of each matrix of a stack ``…, m, n``; then
    ``iterations`` is a tensor) by Lanczos on the short side's Gram matrix
    ``A = WᵀW`` (one GEMM; the iterations are then ``k × k`` matrix–vector products, in float64
    with full reorthogonalisation), started from the short side's vector of ``warm = (u, v)``
    (e.g. the last step's top pair) or from the column sums of ``|W|``.

    The top Ritz value ``θ`` never exceeds ``σ₁²`` (it is a Rayleigh–Ritz value on an orthonormal
    basis) and converges to it fast even where the top singular values cluster (power iteration
    crawls there, at the rate ``(σ₂/σ₁)²``). Every ``check_every`` iterations (one host sync, not
    one per iteration) it stops if the Ritz residual ``r`` (an eigenvalue of ``A`` lies within
    ``r`` of ``θ``) is at most ``2·tol·θ``, i.e. ``σ₁`` to ``tol`` relative; also when the space is
    exhausted (exact) or after ``max_iters``. ``σ₁ = ‖W v₁‖`` is recomputed from ``W`` itself. A
    stack runs until its last matrix stops; each matrix's answer is taken from the iteration at
    which it stopped, so it is the one it would get alone.
    """
    flip = is_wide(W)
    M = W.mT if flip else W
    work = M if M.dtype in (torch.float32, torch.float64) else M.float()
    lead = work.shape[:-2]
    work = work.reshape(-1, *work.shape[-2:])
    A = (work.mT @ work if len(work) > 1 else (work[0].mT @ work[0])[None]).double()  # one matrix: a plain GEMM
    count, k = A.shape[0], A.shape[-1]
    if warm is None:
        q = A.abs().sum(-2) + 1e-30
    else:
        q = warm[0 if flip else 1].reshape(count, k).double() + 1e-30
    q = q / q.norm(dim=-1, keepdim=True)
    iters = min(max_iters, k)
    Q = torch.zeros(count, iters, k, dtype=A.dtype, device=A.device)
    alphas, betas = torch.zeros(count, iters, dtype=A.dtype, device=A.device), torch.zeros_like(Q[..., 0])
    tiny = torch.finfo(A.dtype).tiny
    stopped: dict[int, tuple[int, torch.Tensor]] = {}  # matrix -> (iterations, Ritz vector's coefficients)
    for j in range(iters):
        Q[:, j] = q
        w = matvec(A, q)
        alphas[:, j] = (q * w).sum(-1)
        basis = Q[:, : j + 1]
        for _ in range(2):  # classical Gram–Schmidt twice: orthogonal to round-off
            w = w - matvec(basis.mT, matvec(basis, w))
        betas[:, j] = w.norm(dim=-1)
        q = w / betas[:, j, None].clamp_min(tiny)
        if (j + 1) % check_every and j + 1 < iters:
            continue
        a, b = alphas[:, : j + 1].cpu(), betas[:, : j + 1].cpu()
        T = torch.diag_embed(a) + torch.diag_embed(b[:, :-1], 1) + torch.diag_embed(b[:, :-1], -1)
        theta, S = torch.linalg.eigh(T)
        converged = (b[:, -1] * S[:, -1, -1].abs() <= 2.0 * tol * theta[:, -1]).tolist()
        for i in range(count):  # each matrix stops at its own iteration, as if it were alone
            if i not in stopped and (converged[i] or j + 1 == iters):
                stopped[i] = (j + 1, S[i, :, -1])
        if len(stopped) == count:
            break
    v = torch.stack([Q[i, :used].mT @ S_i.to(A.device) for i, (used, S_i) in sorted(stopped.items())]).to(work.dtype)
    Mv = matvec(work, v)
    sigma = torch.linalg.vector_norm(Mv, dim=-1)
    u = Mv / sigma[:, None].clamp_min(torch.finfo(work.dtype).tiny)
    # One matrix: fresh tensors, not views into the stack of one (a state keeps them).
    u, v, sigma = (t.reshape(lead + t.shape[1:]).to(W.dtype) if lead else t[0].to(W.dtype).clone() for t in (u, v, sigma))
    used = [stopped[i][0] for i in range(count)]
    return sigma, *((v, u) if flip else (u, v)), (used[0] if not lead else torch.tensor(used).reshape(lead))


def track_top_singular(W: torch.Tensor, u: torch.Tensor, v: torch.Tensor, steps: int = 32
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(σ₁, u₁, v₁, r)`` of ``W`` (or of each matrix of a stack ``…, m, n``) by ``steps`` steps
    of Golub–Kahan–Lanczos bidiagonalisation started from the short side's vector of ``(u, v)``
    (``…, m`` and ``…, n``; e.g. the last step's top pair), in ``W``'s precision, with no host
    synchronisation.

    ``W V = U B`` with ``B`` upper bidiagonal (``steps × steps``) and ``U``, ``V`` orthonormal
    (classical Gram–Schmidt twice against the earlier vectors); the singular triples of the small
    ``B`` (one batched SVD in float64) give the Ritz triple (Golub & Van Loan 2013, "Matrix
    Computations", §10.4). The Ritz value never exceeds ``σ₁`` and is exact once the Krylov space
    is (``steps ≥ min(m, n)``, a start on a singular vector, a low-rank ``W``); from a warm start
    the error shrinks like a Chebyshev polynomial in the top gap, much faster than power
    iteration's ``(σ₂/σ₁)²`` per step where the top singular values cluster. A step can reorder
    a clustered top (a GPT's freshly initialised 1536 × 384 weight: σ₂/σ₁ = 0.998, the new top
    had overlap 0.23 with the tracked one after SpectralBall's first step): there 16 steps left
    ``σ₁`` 1.6e-3 low, 32 steps 3e-6, 64 steps at round-off. ``σ₁ = ‖W v₁‖`` is recomputed from ``W``, so
    ``W v₁ = σ₁u₁`` (tall ``W``; wide: ``Wᵀu₁ = σ₁v₁``) and the other residual
    ``r = ‖Wᵀu₁ − σ₁v₁‖`` (resp. ``‖W v₁ − σ₁u₁‖``; a singular value of ``W`` lies within ``r``
    of ``σ₁``) is returned, on the device, for a caller that wants to check. A zero ``W`` gives
    ``σ₁ = 0``.
    """
    if steps < 1:
        raise ValueError(f"track_top_singular: steps must be >= 1, got {steps}")
    if is_wide(W):  # the short side's Krylov space is exhausted after min(m, n) steps: exact
        sigma, v1, u1, residual = track_top_singular(W.mT, v, u, steps)
        return sigma, u1, v1, residual
    tiny = torch.finfo(W.dtype).tiny
    lead, (m, n) = W.shape[:-2], W.shape[-2:]
    steps = min(steps, m, n)
    Wt = W.mT

    def unit(x):
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(tiny)

    x = unit(v.to(W.dtype))
    V = W.new_zeros(*lead, steps, n)
    U = W.new_zeros(*lead, steps, m)
    alphas = W.new_zeros(*lead, steps)
    betas = W.new_zeros(*lead, steps)

    def orthogonalise(w, basis):
        for _ in range(2):
            w = w - matvec(basis.mT, matvec(basis, w))
        return w

    p = matvec(W, x)
    for j in range(steps):
        V[..., j, :] = x
        if j:
            p = orthogonalise(p - betas[..., j - 1, None] * U[..., j - 1, :], U[..., :j, :])
        alphas[..., j] = torch.linalg.vector_norm(p, dim=-1)
        U[..., j, :] = y = p / alphas[..., j, None].clamp_min(tiny)
        if j + 1 == steps:
            break
        r = orthogonalise(matvec(Wt, y) - alphas[..., j, None] * x, V[..., : j + 1, :])
        betas[..., j] = torch.linalg.vector_norm(r, dim=-1)
        x = r / betas[..., j, None].clamp_min(tiny)
        p = matvec(W, x)
    B = torch.diag_embed(alphas.double()) + torch.diag_embed(betas[..., :-1].double(), 1)
    right = torch.linalg.svd(B)[2].to(W.dtype)  # (tiny, batched; on the device)
    v1 = unit(matvec(V.mT, right[..., 0, :]))
    Wv = matvec(W, v1)
    sigma = torch.linalg.vector_norm(Wv, dim=-1)
    u1 = Wv / sigma[..., None].clamp_min(tiny)
    residual = torch.linalg.vector_norm(matvec(Wt, u1) - sigma[..., None] * v1, dim=-1)
    return sigma, u1, v1, residual


def top_singular_pair(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact ``(σ₁, u₁, v₁)`` by SVD (of each matrix of a stack): the deterministic start for
    warm-started power iteration."""
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return S[..., 0].to(W.dtype), U[..., :, 0].to(W.dtype), Vh[..., 0, :].to(W.dtype)


def minimize_lbfgs(value_and_grad, x0: torch.Tensor, max_evals: int, grad_tol: float,
                   history_size: int = 10) -> tuple[torch.Tensor, int]:
    """Minimise a smooth function with ``torch.optim.LBFGS`` (strong-Wolfe line search);
    ``value_and_grad(x) -> (f, ∇f)`` is evaluated without autograd. Returns ``(x, evaluations)``."""
    x = x0.detach().clone()
    lbfgs = torch.optim.LBFGS([x], lr=1.0, max_iter=max_evals, max_eval=max_evals,
                              tolerance_grad=grad_tol, tolerance_change=1e-12,
                              history_size=history_size, line_search_fn="strong_wolfe")
    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        value, grad = value_and_grad(x.detach())
        x.grad = grad
        return value

    lbfgs.step(closure)
    return x.detach(), evaluations
