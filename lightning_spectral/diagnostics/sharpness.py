r"""Sharpness: the top eigenvalue of the loss Hessian, from Hessian-vector products.

:math:`Hv = \nabla_\theta(\nabla_\theta L\cdot v)` (Pearlmutter) by double backward with
``torch.autograd.grad``, so parameters' ``.grad`` is never touched. Gradient descent with step
size :math:`\eta` is stable on a quadratic only while :math:`\lambda_{\max} < 2/\eta`
(Cohen et al. 2021, edge of stability).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_spectral.diagnostics._utils import LossFn, flat_grad, isolated, trainable_parameters

SharpnessMethod = Literal["power", "lanczos"]


class HessianVectorProduct:
    """``v ↦ H v`` for the Hessian of ``loss`` w.r.t. ``params`` (flat vectors); the gradient graph is built once."""

    def __init__(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.grad = flat_grad(loss, self.params, create_graph=True)
        self.numel = self.grad.numel()

    def __call__(self, v: Tensor) -> Tensor:
        if not self.grad.requires_grad:  # loss linear in the parameters
            return torch.zeros_like(v)
        hv = torch.autograd.grad(self.grad, self.params, grad_outputs=v, retain_graph=True, materialize_grads=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach()


def _power(matvec: Callable[[Tensor], Tensor], v: Tensor, max_iter: int, tol: float) -> tuple[float, Tensor, int]:
    """Eigenvalue of largest magnitude (Rayleigh quotient), its vector, and the iterations used."""
    v = v / v.norm()
    lam = None
    for it in range(1, max_iter + 1):
        w = matvec(v)
        new_lam = float(v @ w)
        norm = w.norm()
        if norm == 0:
            return 0.0, v, it
        v = w / norm
        if lam is not None and abs(new_lam - lam) <= tol * max(abs(new_lam), 1e-12):
            return new_lam, v, it
        lam = new_lam
    return float(lam), v, max_iter


def _lanczos(matvec: Callable[[Tensor], Tensor], v: Tensor, max_iter: int, tol: float) -> tuple[float, Tensor, int]:
    """Largest (algebraic) Ritz value by Lanczos with full reorthogonalisation; keeps ``max_iter`` vectors."""
    basis = [v / v.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    top = None
    for it in range(1, max_iter + 1):
        w = matvec(basis[-1])
        alphas.append(float(w @ basis[-1]))
        q = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan)
            w = w - q.T @ (q @ w)
        beta = float(w.norm())
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(tri)
        new_top = float(evals[-1])
        done = beta <= 1e-10 * max(abs(new_top), 1.0) or it == max_iter
        done = done or (top is not None and abs(new_top - top) <= tol * max(abs(new_top), 1e-12))
        top = new_top
        if done:
            return top, evecs[:, -1].to(q) @ q, it
        betas.append(beta)
        basis.append(w / beta)
    raise AssertionError("unreachable")


def hessian_top_eigenvalue(
    hvp: Callable[[Tensor], Tensor],
    v0: Tensor,
    method: SharpnessMethod = "power",
    max_iter: int = 100,
    tol: float = 1e-4,
) -> tuple[float, Tensor, int]:
    r"""Algebraically largest Hessian eigenvalue :math:`\lambda_{\max}` from ``v0``.

    ``"power"``: power iteration finds the eigenvalue of largest magnitude :math:`\lambda_d`;
    if it is negative, a second run on :math:`H-\lambda_d I` (positive semi-definite) gives
    :math:`\lambda_{\max}`. Stops when the Rayleigh quotient changes by less than ``tol``
    relative. ``"lanczos"``: Lanczos with full reorthogonalisation (``max_iter`` stored vectors),
    the top Ritz value. Returns ``(lambda_max, eigenvector, Hessian-vector products used)``.
    """
    if method == "lanczos":
        return _lanczos(hvp, v0, max_iter, tol)
    if method != "power":
        raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
    lam, v, used = _power(hvp, v0, max_iter, tol)
    if lam >= 0:
        return lam, v, used
    mu, v, more = _power(lambda x: hvp(x) - lam * x, v0, max_iter, tol)
    return mu + lam, v, used + more


def estimate_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    method: SharpnessMethod = "power",
    max_iter: int = 100,
    tol: float = 1e-4,
    eval_mode: bool = True,
    seed: int = 0,
    *,
    epsilon: float | None = None,
    normalize: bool = True,
) -> float:
    r"""Top eigenvalue :math:`\lambda_{\max}` of the Hessian of ``loss_fn(model, x, y)`` w.r.t. the trainable parameters.

    Runs :func:`hessian_top_eigenvalue` under :func:`~lightning_spectral.diagnostics.isolated`
    (eval mode by default, RNG forked, ``.grad`` untouched); the start vector is drawn from
    ``seed``. Compare it with ``2 / lr``.

    With ``epsilon`` (``estimate_sharpness(model, loss_fn, x, y, epsilon=1e-3)``) it is instead
    the finite-difference ascent proxy :math:`L(\theta+\epsilon\,\hat g)-L(\theta)` of
    :func:`estimate_sam_sharpness` (``normalize=False``: the step :math:`\epsilon\,\mathrm{sign}(g)`),
    a different quantity, dominated by :math:`\epsilon\|g\|`; the eigenvalue's arguments
    (``method``, ``max_iter``, ``tol``, ``seed``) do not apply to it.
    """
    if epsilon is not None:
        if (method, max_iter, tol, seed) != ("power", 100, 1e-4, 0):
            raise TypeError(
                "estimate_sharpness: epsilon= asks for the finite-difference proxy, which takes no method, "
                "max_iter, tol or seed; call estimate_sharpness(model, loss_fn, x, y, method=..., ...) without "
                "epsilon for the Hessian eigenvalue, or estimate_sam_sharpness(model, loss_fn, x, y, epsilon) "
                "for the proxy"
            )
        return estimate_sam_sharpness(model, loss_fn, x, y, epsilon, eval_mode, normalize=normalize)
    params = trainable_parameters(model)
    with isolated(model, eval_mode):
        hvp = HessianVectorProduct(loss_fn(model, x, y), params)
        v0 = torch.randn(hvp.numel, generator=torch.Generator().manual_seed(seed)).to(hvp.grad)
        return hessian_top_eigenvalue(hvp, v0, method, max_iter, tol)[0]


def estimate_sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    epsilon: float = 1e-3,
    eval_mode: bool = True,
    normalize: bool = True,
) -> float:
    r"""A SAM-style ascent sharpness (Foret et al. 2021): :math:`L(\theta+\epsilon\,g/\|g\|)-L(\theta)`,
    or with ``normalize=False`` :math:`L(\theta+\epsilon\,\mathrm{sign}(g))-L(\theta)`.

    **Not** a Hessian eigenvalue: to second order the normalised form is
    :math:`\epsilon\|g\| + \tfrac{\epsilon^2}{2}\hat g^\top H\hat g`, dominated by the gradient norm.
    Parameters are perturbed in place under ``no_grad`` and restored bit for bit.
    """
    params = trainable_parameters(model)
    with isolated(model, eval_mode):
        loss = loss_fn(model, x, y)
        grads = torch.autograd.grad(loss, params, materialize_grads=True)
        if normalize:
            scale = epsilon / torch.sqrt(sum(g.pow(2).sum() for g in grads)).clamp_min(1e-12)
            steps = [g * scale for g in grads]
        else:
            steps = [epsilon * g.sign() for g in grads]
        saved = [p.detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, step in zip(params, steps):
                    p.add_(step)
                return float(loss_fn(model, x, y) - loss.detach())
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
