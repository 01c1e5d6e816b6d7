"""The constraint sets of :mod:`lightning_spectral.optim.constrained.geometry`, one section per set.

For each set: ``project`` lands on the set; ``tangent`` is idempotent, lands in the tangent
space and removes only a normal component (so it is the orthogonal projection: both checked
against the set's own characterisation, not its formula); ``retract`` stays on the set and
agrees with the straight move ``X − t·D`` to first order; ``unsupported_reason`` names the
shapes the set cannot hold.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_spectral.optim.constrained import geometry as geo
from lightning_spectral.optim.constrained.geometry import symplectic_form

pytestmark = pytest.mark.usefixtures("single_thread")


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def on_set(geometry, shape, seed=0):
    X = geometry.project(geometry.view(randn(*shape, seed=seed)))
    assert geometry.distance(X) <= 1e-5
    return X


def inner(A, B):
    return float((A.double() * B.double()).sum())


def check_tangent(geometry, X, in_tangent, in_normal, seed=1):
    """Idempotent, in the tangent space, ``A − P(A)`` normal, and ``⟨A − P(A), P(B)⟩ = 0``."""
    A, B = randn(*X.shape, seed=seed), randn(*X.shape, seed=seed + 1)
    P = geometry.tangent(X, A)
    scale = float(A.norm())
    assert float((geometry.tangent(X, P) - P).norm()) <= 1e-5 * scale
    assert in_tangent(P) <= 1e-5 * scale
    assert in_normal(A - P) <= 1e-5 * scale
    assert abs(inner(A - P, geometry.tangent(X, B))) <= 1e-4 * scale * float(B.norm())


def check_retraction(geometry, X, tol, move=lambda X, D: D, seed=3):
    """On the set after a step, and ``R(X, tD) = X − t·move(X, D) + O(t²)``."""
    D = geometry.tangent(X, randn(*X.shape, seed=seed))
    D = D / D.norm()
    assert geometry.distance(geometry.retract(X, D, 0.3)) <= tol
    errors = []
    for t in (1e-2, 5e-3):
        Y = geometry.retract(X.double() if X.dtype == torch.float64 else X, D, t)
        errors.append(float((Y.double() - (X.double() - t * move(X, D).double())).norm()))
    assert errors[0] <= 50 * 1e-4 and errors[1] <= 0.35 * errors[0] + 1e-5, errors  # second order


# -- Stiefel, blocks, Grassmann ---------------------------------------------------------------------
def sym_part(M):
    return 0.5 * (M + M.mT)


@pytest.mark.parametrize("shape", [(7, 4), (4, 7), (5, 5)])
def test_stiefel(shape):
    geometry = geo.Stiefel()
    X = on_set(geometry, shape)
    Xt = X if shape[0] >= shape[1] else X.mT

    def tall(A):
        return A if shape[0] >= shape[1] else A.mT

    def in_tangent(P):  # XᵀP + PᵀX = 0
        return float((Xt.mT @ tall(P) + tall(P).mT @ Xt).norm())

    def in_normal(N):  # N = X S with S symmetric
        S = Xt.mT @ tall(N)
        return float((Xt @ S - tall(N)).norm() + (S - S.mT).norm())

    check_tangent(geometry, X, in_tangent, in_normal)
    check_retraction(geometry, X, 2e-6)
    assert geometry.unsupported_reason(torch.Size(shape)) is None


@pytest.mark.parametrize("X0", [torch.zeros(6, 3), torch.outer(torch.arange(1.0, 7.0), torch.ones(3))])
def test_stiefel_projects_rank_deficient_matrices_onto_the_set(X0):
    assert geo.Stiefel().distance(geo.Stiefel().project(X0)) <= 1e-6


@pytest.mark.parametrize("blocks, shape", [("rows", (8, 6)), ("columns", (6, 8)), ("rows", (12, 2))])
def test_stiefel_blocks(blocks, shape):
    geometry = geo.StiefelBlocks(block_size=4, blocks=blocks)
    W = randn(*shape)
    assert torch.equal(geometry.unview(geometry.view(W), W.shape), W)
    X = on_set(geometry, shape)
    for block in geometry.unview(X, torch.Size(shape)).split(4, dim=0 if blocks == "rows" else 1):
        assert geo.Stiefel().distance(block) <= 1e-5
    check_retraction(geometry, X, 2e-6)
    assert "not divisible by block_size=4" in geometry.unsupported_reason(torch.Size((6, 8) if blocks == "rows"
                                                                                     else (8, 6)))


@pytest.mark.parametrize("shape", [(7, 3), (3, 7)])
def test_grassmann(shape):
    geometry = geo.Grassmann()
    X = on_set(geometry, shape)
    Xt = X if shape[0] > shape[1] else X.mT

    def tall(A):
        return A if shape[0] > shape[1] else A.mT

    check_tangent(geometry, X, lambda P: float((Xt.mT @ tall(P)).norm()),
                  lambda N: float((Xt @ (Xt.mT @ tall(N)) - tall(N)).norm()))
    check_retraction(geometry, X, 2e-6)
    assert "single point" in geometry.unsupported_reason(torch.Size((5, 5)))


# -- spectral sphere and ball -----------------------------------------------------------------------
@pytest.mark.parametrize("radius_mode", ["spectral_mup", "identity"])
def test_spectral_sphere(radius_mode):
    geometry = geo.SpectralSphere(radius_mode=radius_mode, radius_scale=2.0)
    shape = (6, 9)
    R = 2.0 * math.sqrt(6 / 9) if radius_mode == "spectral_mup" else 2.0
    assert geometry.radius(torch.Size(shape)) == pytest.approx(R)
    X = on_set(geometry, shape)
    assert float(torch.linalg.matrix_norm(X, ord=2)) == pytest.approx(R, rel=1e-6)
    U, _, Vh = torch.linalg.svd(X.double())
    u, v = U[:, 0].float(), Vh[0].float()
    check_tangent(geometry, X, lambda P: abs(float(u @ P @ v)),
                  lambda N: float((N - (u @ N @ v) * torch.outer(u, v)).norm()))
    state = {"u": u, "v": v}
    D = geometry.tangent(X, randn(*shape, seed=4))
    Y = geometry.retract(X, D, 0.1, state)
    assert abs(geometry.distance(Y)) <= 2e-6
    assert abs(float(state["u"] @ Y @ state["v"]) - R) <= 1e-5 * R  # the warm start is the new top pair


def test_spectral_ball_keeps_points_inside_and_scales_points_outside():
    geometry = geo.SpectralSphere(radius_mode="identity", ball=True)
    inside = 0.5 * geo.Stiefel().project(randn(5, 5))
    assert geometry.contains(inside, 1e-6) and torch.equal(geometry.project(inside), inside)
    outside = 3.0 * inside
    assert geometry.distance(geometry.project(outside)) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(geometry.tangent(inside, outside), outside)  # inside the ball every move is allowed
    assert torch.equal(geometry.project(torch.zeros(3, 4)), torch.zeros(3, 4))


def test_spectral_sphere_refuses_the_zero_matrix():
    with pytest.raises(ValueError, match="zero matrix.*nonzero"):
        geo.SpectralSphere().project(torch.zeros(4, 3))


# -- oblique ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", ["columns", "rows"])
def test_oblique(dim):
    geometry = geo.Oblique(dim=dim, radius=2.0)
    W = randn(6, 4)
    assert torch.equal(geometry.unview(geometry.view(W), W.shape), W)
    X = on_set(geometry, (6, 4))
    norms = geometry.unview(X, W.shape).norm(dim=0 if dim == "columns" else 1)
    assert torch.allclose(norms, torch.full_like(norms, 2.0), atol=1e-6)
    check_tangent(geometry, X, lambda P: float((X * P).sum(0).norm()),
                  lambda N: float((N - X * ((X * N).sum(0) / 4.0)).norm()))
    check_retraction(geometry, X, 1e-6)
    zero_column = geometry.project(torch.zeros(3, 2))
    assert torch.allclose(zero_column, torch.full((3, 2), 2.0 / math.sqrt(3)))


# -- the Lie groups (tangent vectors in Lie-algebra coordinates: the move is X·A) ----------------------
def test_special_linear():
    geometry = geo.SpecialLinear()
    X = on_set(geometry, (5, 5))
    assert float(torch.linalg.det(X.double())) == pytest.approx(1.0, abs=1e-5)
    eye = torch.eye(5)
    check_tangent(geometry, X, lambda P: abs(float(torch.trace(P))),
                  lambda N: float((N - eye * torch.diagonal(N).mean()).norm()))
    check_retraction(geometry, X, 1e-5, move=lambda X, A: X @ A)
    G, A = randn(5, 5, seed=7), geometry.tangent(X, randn(5, 5, seed=8))
    # the Riemannian gradient represents the derivative: ⟨G, X A⟩ = ⟨grad, A⟩ on the algebra
    assert inner(G, X @ A) == pytest.approx(inner(geometry.riemannian_gradient(X, G), A), rel=1e-4)
    assert "square" in geometry.unsupported_reason(torch.Size((4, 5)))


def test_special_linear_projection_fixes_sign_and_rank_and_refuses_zero():
    geometry = geo.SpecialLinear()
    flipped = torch.diag(torch.tensor([-2.0, 1.0, 1.0]))
    singular = torch.outer(torch.arange(1.0, 4.0), torch.ones(3))
    for X in (flipped, singular):
        P = geometry.project(X)
        # The projection is exact in float64; storing it in float32 moves each entry by at most
        # eps/2 relative, which moves log det P by |tr(P⁻¹ δP)| ≤ ‖P⁻¹‖₂ √n ‖δP‖_F (first order).
        # The lifted singular matrix has condition number 1e3, so its bound is ~1e-4, the rotation's ~1e-7.
        P64 = P.double()
        bound = 0.5 * torch.finfo(torch.float32).eps * math.sqrt(3) * float(P64.norm()) / float(
            torch.linalg.svdvals(P64)[-1])
        assert geometry.distance(P) <= 2 * bound
    with pytest.raises(ValueError, match="zero matrix.*nonzero"):
        geometry.project(torch.zeros(3, 3))


def test_symplectic_group():
    geometry = geo.SymplecticGroup()
    X = on_set(geometry, (6, 6))
    J = symplectic_form(6)
    assert float((X.double().mT @ J @ X.double() - J).abs().max()) <= 1e-6
    assert torch.allclose(X.mT @ X, torch.eye(6), atol=1e-5)  # the projection is orthogonal symplectic
    check_tangent(geometry, X, lambda P: float((P - P.mT).norm()), lambda N: float((N + N.mT).norm()))
    check_retraction(geometry, X, 1e-6, move=lambda X, S: X @ symplectic_form(6, dtype=torch.float32) @ S)
    G, S = randn(6, 6, seed=7), geometry.tangent(X, randn(6, 6, seed=8))
    JS = symplectic_form(6, dtype=torch.float32) @ S
    assert inner(G, X @ JS) == pytest.approx(inner(geometry.riemannian_gradient(X, G), S), rel=1e-4)
    assert "even size" in geometry.unsupported_reason(torch.Size((5, 5)))
    assert "even size" in geometry.unsupported_reason(torch.Size((4, 6)))


@pytest.mark.parametrize("X0", [torch.zeros(4, 4), torch.diag(torch.tensor([1.0, 0.0, 0.0, 0.0]))])
def test_symplectic_projection_of_rank_deficient_matrices_is_on_the_group(X0):
    assert geo.SymplecticGroup().distance(geo.SymplecticGroup().project(X0)) <= 1e-6


# -- Birkhoff polytope ------------------------------------------------------------------------------
def test_birkhoff():
    geometry = geo.Birkhoff()
    X = on_set(geometry, (6, 6))
    assert float(X.min()) > 0
    ones = torch.ones(6)
    centre = torch.eye(6) - torch.ones(6, 6) / 6
    check_tangent(geometry, X, lambda P: float((P @ ones).norm() + (P.mT @ ones).norm()),
                  lambda N: float((centre @ N @ centre).norm()))
    state = {}
    Y = geometry.retract(X, geometry.tangent(X, randn(6, 6, seed=5)), 0.5, state)
    assert geometry.distance(Y) <= 1e-6 and state["inner_iterations"] >= 1
    assert "square" in geometry.unsupported_reason(torch.Size((3, 4)))
    assert "single point" in geometry.unsupported_reason(torch.Size((1, 1)))
