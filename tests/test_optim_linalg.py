"""``optim/linalg.py``: the small exact linear-algebra pieces, each against its definition
(SVD, eigendecomposition, or a closed form computed here in float64)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_spectral.optim import msign_svd, spectral_clip
from lightning_spectral.optim.linalg import (
    TangentSpace,
    as_matrix,
    estimate_spectral_norm,
    is_wide,
    minimize_lbfgs,
    orient,
    power_iteration,
    rescale_into_ball,
    skew,
    spectral_norm,
    sym,
    top_singular_pair,
    top_singular_triple,
    track_top_singular,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ill_conditioned(n: int, m: int, seed: int = 0, lo: float = 1e-2):
    """``G = U diag(σ) Vᵀ`` with σ log-spaced from 1 to ``lo`` (float64, factors returned too)."""
    g = gen(seed)
    k = min(n, m)
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0.0, math.log10(lo), k, dtype=torch.float64)
    return (U * s) @ V.T, U, s, V


def svdvals(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(M.double())


def with_spectrum(n: int, m: int, sigma: torch.Tensor, seed: int) -> torch.Tensor:
    k = min(n, m)
    U = torch.linalg.qr(torch.randn(n, k, generator=gen(seed), dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(m, k, generator=gen(seed + 1), dtype=torch.float64))[0]
    return (U * sigma) @ V.T


def test_as_matrix_flattens_conv_kernels_and_rejects_vectors():
    kernel = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    M = as_matrix(kernel)
    assert M.shape == (2, 60) and torch.equal(M[1], kernel[1].flatten())
    W = torch.ones(3, 4)
    assert as_matrix(W) is W
    with pytest.raises(ValueError, match="ndim >= 2"):
        as_matrix(torch.ones(5))


def test_sym_and_skew_split_a_matrix():
    M = torch.randn(6, 6, generator=gen(0))
    S, K = sym(M), skew(M)
    assert torch.equal(S, S.T) and torch.equal(K, -K.T)
    assert torch.allclose(S + K, M, atol=1e-6)
    assert abs(float((S * K).sum())) <= 1e-5  # orthogonal under the trace inner product


def test_orient_transposes_wide_matrices_only():
    W, G = torch.randn(3, 5), torch.randn(3, 5)
    assert is_wide(W)
    flip, (Wt, Gt) = orient(W, G)
    assert flip and Wt.shape == (5, 3) and torch.equal(Gt, G.T)
    flip, (Wt,) = orient(W.T)
    assert not flip and Wt.shape == (5, 3)


@pytest.mark.parametrize("shape", [(12, 5), (9, 9)])
def test_tangent_space_general_projection_is_orthogonal_and_idempotent(shape):
    """For a full-rank W off the manifold, ``P_T(Δ) = Δ − W S`` with ``CS + SC = 2 sym(WᵀΔ)``:
    the result is in T, applying it twice changes nothing, and Δ − P_T(Δ) = WS is orthogonal
    to T (so P_T is the orthogonal projection)."""
    W = torch.randn(*shape, generator=gen(1), dtype=torch.float64)
    D = torch.randn(*shape, generator=gen(2), dtype=torch.float64)
    space = TangentSpace(W)
    P = space.project(D)
    assert float(torch.linalg.matrix_norm(space.constraint(P))) <= 1e-10
    assert torch.allclose(space.project(P), P, atol=1e-10)
    T_elem = space.project(torch.randn(*shape, generator=gen(3), dtype=torch.float64))
    assert abs(float(((D - P) * T_elem).sum())) <= 1e-10
    assert float(space.residual(P)) <= 1e-12 and float(space.residual(D)) > 1e-2
    assert abs(space.norm - float(torch.linalg.matrix_norm(W, ord=2))) <= 1e-10


def test_tangent_space_rejects_wide_matrices():
    with pytest.raises(ValueError, match="tall"):
        TangentSpace(torch.randn(3, 6))


def test_rescale_into_ball_caps_the_spectral_norm_only():
    A = with_spectrum(8, 5, torch.tensor([3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64), 4)
    B = rescale_into_ball(A, 1.5)
    assert abs(float(spectral_norm(B)) - 1.5) <= 1e-10
    assert torch.allclose(B, A * 0.5, atol=1e-12)
    assert torch.equal(rescale_into_ball(A, 10.0), A)


@pytest.mark.parametrize("gap", [0.5, 0.95])
def test_power_iteration_converges_to_the_top_singular_triple(gap):
    """σ₂/σ₁ = gap: the estimate is a lower bound that reaches σ₁ (to tol) and the vectors are
    the top singular pair up to sign; a scaled and negated matrix gives the scaled σ."""
    sigma = torch.tensor([2.0, 2.0 * gap, 0.3, 0.1], dtype=torch.float64)
    W = with_spectrum(10, 4, sigma, 5)
    s, u, v = power_iteration(W, max_iter=5000, tol=1e-12, generator=gen(6))
    assert float(s) <= 2.0 * (1 + 1e-12) and abs(float(s) - 2.0) <= 1e-8
    U, _, Vh = torch.linalg.svd(W)
    assert abs(abs(float(u @ U[:, 0])) - 1) <= 1e-6 and abs(abs(float(v @ Vh[0])) - 1) <= 1e-6
    s2, _, _ = power_iteration(-2.5 * W, max_iter=5000, tol=1e-12, generator=gen(6))
    assert abs(float(s2) - 5.0) <= 1e-7


def test_power_iteration_warm_start_and_early_stop():
    """From the exact top vector one round is exact and tol stops at once; with tol = 0 it runs
    all rounds (no host sync)."""
    W = with_spectrum(7, 7, torch.linspace(1.0, 0.1, 7, dtype=torch.float64), 7)
    U, S, _ = torch.linalg.svd(W)
    s, u, _ = power_iteration(W, U[:, 0], max_iter=1)
    assert abs(float(s - S[0])) <= 1e-12
    cold, _, _ = power_iteration(W, torch.ones(7, dtype=torch.float64), max_iter=3)
    assert float(cold) < float(S[0]) - 1e-6  # three rounds from a poor start: still a strict lower bound


def test_power_iteration_on_a_zero_matrix_keeps_the_vector():
    u0 = torch.tensor([0.6, 0.8])
    for tol in (0.0, 1e-4):
        s, u, _ = power_iteration(torch.zeros(2, 3), u0, max_iter=5, tol=tol)
        assert float(s) == 0.0 and torch.allclose(u, u0)


def test_estimate_spectral_norm_is_a_close_lower_bound():
    W = with_spectrum(40, 20, 1.0 / torch.arange(1, 21, dtype=torch.float64), 8).float()
    est = float(estimate_spectral_norm(W))
    assert 0.9 <= est <= 1.0 + 1e-6
    assert float(estimate_spectral_norm(torch.zeros(4, 3))) == 0.0


def test_top_singular_pair_is_the_svd_pair():
    W = with_spectrum(9, 6, torch.tensor([4.0, 2, 1, 0.5, 0.2, 0.1], dtype=torch.float64), 9).float()
    s, u, v = top_singular_pair(W)
    assert abs(float(s) - 4.0) <= 1e-5
    assert torch.allclose(s * torch.outer(u, v), W - with_spectrum(9, 6, torch.tensor(
        [0.0, 2, 1, 0.5, 0.2, 0.1], dtype=torch.float64), 9).float(), atol=1e-5)


def test_minimize_lbfgs_solves_a_quadratic():
    """``½ xᵀAx − bᵀx`` with A SPD: the minimiser is A⁻¹b, within the evaluation cap."""
    g = gen(10)
    Q = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))[0]
    A = (Q * torch.linspace(1.0, 20.0, 6, dtype=torch.float64)) @ Q.T
    b = torch.randn(6, generator=g, dtype=torch.float64)

    def value_and_grad(x):
        return 0.5 * x @ A @ x - b @ x, A @ x - b

    x, evaluations = minimize_lbfgs(value_and_grad, torch.zeros(6, dtype=torch.float64), 100, 1e-10)
    assert torch.allclose(x, torch.linalg.solve(A, b), atol=1e-8)
    assert evaluations <= 100


# -- spectral_clip ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
@pytest.mark.parametrize("eta", [0.05, 0.3, 2.0])
def test_spectral_clip_equals_svd_clipping(shape, eta):
    G, U, s, V = ill_conditioned(*shape, seed=8, lo=1e-2)
    expected = (U * s.clamp(max=eta)) @ V.T
    exact = spectral_clip(G.float(), eta, method="svd").double()
    assert torch.linalg.matrix_norm(exact - expected) <= 1e-5 * torch.linalg.matrix_norm(expected)
    approx = spectral_clip(G.float(), eta, method="msign").double()
    assert torch.linalg.matrix_norm(approx - expected) <= 1e-2 * torch.linalg.matrix_norm(expected)
    assert svdvals(approx).max() <= eta * (1 + 1e-2)


def test_spectral_clip_rejects_unknown_method():
    with pytest.raises(ValueError):
        spectral_clip(torch.ones(3, 3), 1.0, method="qr")


# -- TangentSpace -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(32, 16), (24, 24), (64, 8)])
@pytest.mark.parametrize("orthonormal", [True, False])
def test_tangent_projection_is_orthogonal_projection(shape, orthonormal):
    g = gen(9)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    if orthonormal:
        W = msign_svd(W)
    space = TangentSpace(W, orthonormal=orthonormal)
    A, B = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
    PA, PB = space.project(A), space.project(B)
    scale = torch.linalg.matrix_norm(A)
    # in T: WᵀP + PᵀW = 0 (recomputed here, not through space.constraint)
    assert torch.linalg.matrix_norm(W.T @ PA + PA.T @ W) <= 1e-10 * scale
    assert torch.linalg.matrix_norm(space.constraint(PA)) <= 1e-10 * scale
    # idempotent
    assert torch.allclose(space.project(PA), PA, atol=1e-10)
    # orthogonal: the residual A − P(A) is orthogonal to every tangent vector
    assert abs(float(((A - PA) * PB).sum())) <= 1e-10 * float(scale * torch.linalg.matrix_norm(B))
    # and the residual is of the form W S with S symmetric (the normal space)
    S = torch.linalg.lstsq(W, A - PA).solution
    assert torch.allclose(S, S.T, atol=1e-8) and torch.allclose(W @ S, A - PA, atol=1e-8)


def _with_singular_values(n, m, sigma, seed=0):
    g = gen(seed)
    k = min(n, m)
    U, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    return ((U * sigma) @ V.T).float()


SPECTRA = {
    "gaussian": lambda k: None,
    "gap 1e-3": lambda k: torch.cat([torch.tensor([1.0, 0.999]), torch.linspace(0.9, 0.1, k - 2)]).double(),
    "cluster": lambda k: 1.0 - 1e-5 * torch.arange(k, dtype=torch.float64) ** 2 / k,  # a flat top, as after msign steps
}


@pytest.mark.parametrize("shape", [(200, 50), (50, 200), (64, 64)])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("warm", [False, True])
def test_top_singular_triple_matches_svd(shape, spectrum, warm):
    """Lanczos' σ₁ is within its tolerance of the SVD's (a lower bound up to round-off), and
    ``(u, v)`` is a consistent unit pair with ``W v = σ u``, on hard spectra too (a 1e-3 gap,
    a cluster at the top), cold or warm-started from a nearby matrix's pair."""
    n, m = shape
    sigma = SPECTRA[spectrum](min(n, m))
    W = torch.randn(n, m, generator=gen(3)) if sigma is None else _with_singular_values(n, m, sigma)
    exact_s = torch.linalg.svdvals(W.double())[0]
    start = None
    if warm:
        _, u0, v0, _ = top_singular_triple(W + 1e-2 * torch.randn(n, m, generator=gen(4)))
        start = (u0, v0)
    s, u, v, iterations = top_singular_triple(W, start, tol=1e-6)
    assert abs(float(s) / float(exact_s) - 1) <= 1e-6
    assert float(s) <= float(exact_s) * (1 + 1e-6)
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6) and float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    assert float((W @ v - s * u).norm()) <= 1e-5 * float(s)
    assert 1 <= iterations <= min(n, m)


@pytest.mark.parametrize("shape", [(200, 50), (50, 200), (64, 64), (3, 40)])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_track_top_singular_from_a_warm_start(shape, spectrum, no_host_sync):
    """Eight Golub–Kahan–Lanczos steps from the top pair of a nearby matrix (1e-2 off, as a training
    step moves it), without a host sync: σ₁ a lower bound on the SVD's (up to round-off), within
    1e-6 of it on a Gaussian matrix and within 2e-4 where the top two are 1e-3 apart or the top is a
    cluster (measured 2e-6 … 1e-4: the warm start mixes the top singular vectors there and eight
    steps do not separate them; the value is then as good as any in the cluster); exact to
    round-off once the steps reach ``min(m, n)`` (3 × 40). ``(u, v)`` is a unit pair with the
    one of ``W v = σ u``, ``Wᵀu = σ v`` exact (the one of the long side) and the other's residual
    returned as ``r``; a stack gives each
    matrix's answer."""
    n, m = shape
    sigma = SPECTRA[spectrum](min(n, m))
    W = torch.randn(n, m, generator=gen(3)) if sigma is None else _with_singular_values(n, m, sigma)
    exact_s = float(torch.linalg.svdvals(W.double())[0])
    _, u0, v0 = top_singular_pair(W + 1e-2 * torch.randn(n, m, generator=gen(4)) * exact_s / math.sqrt(max(n, m)))
    with no_host_sync():
        s, u, v, r = track_top_singular(W, u0, v0, 8)
    eps = torch.finfo(torch.float32).eps
    tol = 64 * eps if min(n, m) <= 8 else (1e-6 if spectrum == "gaussian" else 2e-4)
    assert abs(float(s) / exact_s - 1) <= tol
    assert float(s) <= exact_s * (1 + 16 * eps)
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6) and float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    Wd, ud, vd = W.double(), u.double(), v.double()
    exact_side, other = (Wd @ vd - float(s) * ud).norm(), (Wd.T @ ud - float(s) * vd).norm()
    if n < m:
        exact_side, other = other, exact_side
    assert float(exact_side) <= 32 * eps * float(s)
    assert float(r) == pytest.approx(float(other), rel=1e-2, abs=32 * eps * float(s))
    stack = torch.stack([W, 2 * W])
    s2, _, _, _ = track_top_singular(stack, torch.stack([u0, u0]), torch.stack([v0, v0]), 8)
    assert torch.allclose(s2, torch.stack([s, 2 * s]), rtol=1e-5)


def test_track_top_singular_on_a_zero_matrix_and_bad_steps():
    s, u, v, r = track_top_singular(torch.zeros(5, 4), torch.ones(5), torch.ones(4), 3)
    assert float(s) == 0.0 and float(r) == 0.0 and torch.isfinite(u).all() and torch.isfinite(v).all()
    with pytest.raises(ValueError, match="steps"):
        track_top_singular(torch.ones(3, 3), torch.ones(3), torch.ones(3), 0)
