"""The one-matrix steepest directions (DESIGN §3) and their duality certificate.

``stiefel_direction``: max ⟨G, Φ⟩ s.t. ‖Φ‖₂ ≤ 1, WᵀΦ + ΦᵀW = 0 (tall; ΦWᵀ + WΦᵀ = 0 for a wide W).
``spectral_ball_direction``: the same with the sphere's tangent space uᵀΦv = 0 (u, v the exact top
singular pair of W), or the ball's cone. Feasibility and ⟨G, Φ⟩ are recomputed here in float64;
weak duality (objective ≤ dual value) must hold for every returned, certified Φ.

Measured (seeded cases below): Stiefel inner gap 1e-7 … 1e-5 where it converges; spectral sphere
inner gap ≤ 3e-5 over 10 seeds × 4 shapes; amortized sphere |uᵀΦv| falls from ~5e-2 to ~1e-5 in 60
calls; amortized Stiefel (64×16) residual from 7e-2 to 5e-5 in 30 calls.
"""

from __future__ import annotations

import pytest
import torch

from lightning_spectral.optim import msign_svd, spectral_ball_direction, stiefel_direction


pytestmark = pytest.mark.usefixtures("single_thread")


def stiefel_case(shape, seed):
    g = torch.Generator().manual_seed(seed)
    W = msign_svd(torch.randn(*shape, generator=g))
    G = torch.randn(*shape, generator=g)
    return W, G


def stiefel_tangency(W, Phi):
    W, Phi = W.double(), Phi.double()
    if W.shape[0] >= W.shape[1]:
        return float(torch.linalg.matrix_norm(W.T @ Phi + Phi.T @ W))
    return float(torch.linalg.matrix_norm(Phi @ W.T + W @ Phi.T))


def spec(M):
    return float(torch.linalg.matrix_norm(M.double(), ord=2))


def check_certificate(G, Phi, info):
    objective = float((G.double() * Phi.double()).sum())
    assert abs(objective - info.objective) <= 1e-5 * abs(objective)
    assert info.objective <= info.dual_value * (1 + 1e-6)  # weak duality
    assert info.duality_gap >= -1e-5


# -- Stiefel ----------------------------------------------------------------------------------
STIEFEL_CASES = [((64, 16), 2), ((16, 64), 2), ((32, 32), 2), ((64, 32), 3), ((32, 48), 3), ((40, 32), 2)]


@pytest.mark.parametrize("shape,seed", STIEFEL_CASES)
def test_stiefel_inner_direction_is_certified(shape, seed):
    W, G = stiefel_case(shape, seed)
    Phi, Y, info = stiefel_direction(W, G, certify=True)
    k = min(shape)
    assert Phi.shape == G.shape and Y.shape == (k, k)
    assert torch.allclose(Y, Y.T, atol=1e-5)
    assert stiefel_tangency(W, Phi) <= 1e-5
    assert spec(Phi) <= 1 + 1e-5
    check_certificate(G, Phi, info)
    assert info.duality_gap <= 1e-3


def test_stiefel_square_is_the_projected_polar_factor():
    """Square W: the tangent space is W·skew; Φ = msign(P_T(G)) = msign(W skew(WᵀG)) exactly."""
    W, G = stiefel_case((24, 24), 4)
    Wd, Gd = W.double(), G.double()
    K = Wd.T @ Gd
    expected = msign_svd(Wd @ (0.5 * (K - K.T)))
    Phi, _, info = stiefel_direction(W, G, certify=True)
    assert torch.allclose(Phi.double(), expected, atol=1e-4)
    assert info.duality_gap <= 1e-5


@pytest.mark.parametrize("shape", [(24, 16), (48, 32), (40, 32), (64, 32)])
@pytest.mark.parametrize("seed", range(6))
def test_stiefel_inner_certified_on_near_square(shape, seed):
    """Near-square shapes, where the dual optimum M = Ĝ + W X often loses rank (the nuclear norm is
    not smooth there and plain descent stalled at gaps up to 3.5e-2): the smoothed inner solve is
    certified at the default evaluation cap. Measured: max gap 2.3e-5 over 10 seeds per shape."""
    W, G = stiefel_case(shape, seed)
    Phi, _, info = stiefel_direction(W, G, certify=True)
    assert -1e-5 <= info.duality_gap <= 1e-3
    assert float(torch.linalg.matrix_norm(W.T @ Phi + Phi.T @ W)) <= 1e-4


def test_stiefel_general_point_and_wide_transpose_relation():
    """orthonormal=False (the eigensolved projection) at a point on the manifold agrees with the
    orthonormal shortcut; a wide W gives the transpose of the tall answer."""
    W, G = stiefel_case((48, 16), 5)
    Phi1, _, _ = stiefel_direction(W, G, orthonormal=True)
    Phi2, _, _ = stiefel_direction(W, G, orthonormal=False)
    assert torch.allclose(Phi1, Phi2, atol=1e-4)
    PhiT, _, _ = stiefel_direction(W.T, G.T)
    assert torch.allclose(PhiT, Phi1.T, atol=1e-4)


@pytest.mark.parametrize("alpha,iters,bound", [(0.1, 30, 1e-3), (0.3, 30, 1e-5)])
def test_stiefel_amortized_converges_when_fed_back(alpha, iters, bound):
    """One dual step per call, multiplier fed back with the same G: the tangency residual falls
    (64×16: 6.7e-2 → 4.5e-5 in 30 calls at α = 0.1, → 5e-7 at α = 0.3)."""
    W, G = stiefel_case((64, 16), 2)
    Y, residuals = None, []
    for _ in range(iters):
        _, Y, info = stiefel_direction(W, G, Y, mode="amortized", alpha=alpha)
        residuals.append(float(info.residual))
    assert residuals[-1] <= bound and residuals[-1] < 0.1 * residuals[0], residuals


@pytest.mark.xfail(strict=True, reason=(
    "amortized Stiefel dual descent with the default alpha=0.1 does not converge on square / near-square W: "
    "on a 32x32 Stiefel point the first call is already exact (residual 1.8e-6, the tangent-projection "
    "multiplier) and feeding Y back drives it to 0.35 within 10 calls (48x32: stays at ~0.2; alpha=0.01 "
    "still ends at 0.16). Fixed-step (sub)gradient descent on the nuclear norm is unstable where Ĝ + W X "
    "has tiny singular values."))
@pytest.mark.parametrize("shape", [(32, 32), (48, 32)])
def test_stiefel_amortized_converges_square(shape):
    W, G = stiefel_case(shape, 2)
    Y, residuals = None, []
    for _ in range(30):
        _, Y, info = stiefel_direction(W, G, Y, mode="amortized")
        residuals.append(float(info.residual))
    assert residuals[-1] <= 1e-3, residuals


def test_stiefel_rejects_bad_mode():
    W, G = stiefel_case((8, 4), 0)
    with pytest.raises(ValueError):
        stiefel_direction(W, G, mode="exact")


# -- spectral sphere / ball -------------------------------------------------------------------
def ball_case(shape, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    U, _, Vh = torch.linalg.svd(W)
    u, v = U[:, 0].float(), Vh[0].float()
    G = torch.randn(*shape, generator=g) + shift * torch.outer(u, v)
    return G, u, v


BALL_SHAPES = [(48, 32), (32, 48), (32, 32), (64, 16)]


@pytest.mark.parametrize("shape", BALL_SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sphere_inner_direction_is_certified(shape, seed):
    G, u, v = ball_case(shape, seed)
    Phi, lam, info = spectral_ball_direction(G, u, v, constraint="sphere", certify=True)
    assert abs(float(u.double() @ Phi.double() @ v.double())) <= 1e-5
    assert spec(Phi) <= 1 + 1e-5
    check_certificate(G, Phi, info)
    assert info.duality_gap <= 1e-3


@pytest.mark.parametrize("shape", BALL_SHAPES)
def test_ball_with_nonnegative_h0_is_plain_msign(shape):
    """On the ball's boundary, if msign(G) already satisfies uᵀΦv ≥ 0 the cone constraint is
    inactive: λ = 0 and Φ = msign(G)."""
    G, u, v = ball_case(shape, 0, shift=3.0)
    assert float(u @ msign_svd(G) @ v) >= 0
    Phi, lam, info = spectral_ball_direction(G, u, v, constraint="ball", certify=True)
    assert lam == 0.0
    assert torch.allclose(Phi, msign_svd(G), atol=1e-4)
    check_certificate(G, Phi, info)


@pytest.mark.parametrize("shape", BALL_SHAPES)
def test_ball_with_negative_h0_is_active(shape):
    G, u, v = ball_case(shape, 0, shift=-3.0)
    Phi, lam, info = spectral_ball_direction(G, u, v, constraint="ball", certify=True)
    assert lam > 0
    assert float(u.double() @ Phi.double() @ v.double()) >= -1e-5
    check_certificate(G, Phi, info)
    assert info.duality_gap <= 1e-3


@pytest.mark.parametrize("shape", BALL_SHAPES)
def test_sphere_amortized_converges_when_fed_back(shape):
    G, u, v = ball_case(shape, 3)
    lam, residuals = 0.0, []
    for _ in range(60):
        _, lam, info = spectral_ball_direction(G, u, v, lam, mode="amortized")
        residuals.append(float(info.residual))
    assert residuals[-1] <= 1e-3 and residuals[-1] < 0.05 * residuals[0], residuals
    # and the multiplier it converges to is the inner-mode root
    _, lam_inner, _ = spectral_ball_direction(G, u, v, constraint="sphere")
    assert abs(lam - lam_inner) <= 1e-2 * max(1.0, abs(lam_inner))


def test_ball_direction_rejects_bad_arguments():
    G, u, v = ball_case((8, 4), 0)
    with pytest.raises(ValueError):
        spectral_ball_direction(G, u, v, constraint="cube")
    with pytest.raises(ValueError):
        spectral_ball_direction(G, u, v, mode="exact")
