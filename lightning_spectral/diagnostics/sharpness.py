r"""Sharpness: the top eigenvalue of the loss Hessian, from Hessian-vector products.

:math:`Hv = \nabla_\theta(\nabla_\theta L\cdot v)` (Pearlmutter) by double backward with
``torch.autograd.grad``, so parameters' ``.grad`` is never touched. Gradient descent with step
size :math:`\eta` is stable on a quadratic only while :math:`\lambda_{\max} < 2/\eta`
(Cohen et al. 2021, edge of stability).

Under FSDP2 (``fully_shard``) there is no double backward to the sharded parameters: the
all-gathered parameters are new leaves made under ``no_grad`` and the gradients are reduce-scattered
under ``no_grad``, so ``torch.autograd.grad(loss, sharded_params)`` raises "appears to not have
been used in the graph" and ``backward(create_graph=True)`` leaves ``.grad`` without a graph.
Sharded networks use
exact products on the network held unsharded for the measurement
(:class:`ShardedHessianVectorProduct`), or, keeping everything sharded, the central difference of
first-order gradients (:class:`FiniteDifferenceHVP`, for smooth losses); in both the vectors are
held as local shards and their inner products summed over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_spectral.diagnostics._utils import (
    LossFn,
    Reduce,
    backward_gradient,
    flat_grad,
    isolated,
    kept_grads,
    local,
    no_reduce,
    random_vector,
    shard_reduce,
    trainable_parameters,
)
from lightning_spectral.optim.sharded import is_sharded

SharpnessMethod = Literal["power", "lanczos"]
ShardedHVP = Literal["exact", "finite_difference"]


class HessianVectorProduct:
    """``v ↦ H v`` for the Hessian of ``loss`` w.r.t. ``params`` (flat vectors); the gradient graph is built once."""

    reduce: Reduce = staticmethod(no_reduce)

    def __init__(self, loss: Tensor, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.grad = flat_grad(loss, self.params, create_graph=True)
        self.numel = self.grad.numel()
        self.like = self.grad.detach()

    def __call__(self, v: Tensor) -> Tensor:
        if not self.grad.requires_grad:  # loss linear in the parameters
            return torch.zeros_like(v)
        hv = torch.autograd.grad(self.grad, self.params, grad_outputs=v, retain_graph=True, materialize_grads=True)
        return torch.cat([h.reshape(-1) for h in hv]).detach()


class FiniteDifferenceHVP:
    r"""``v ↦ H v`` by the central difference of gradients, :math:`Hv \approx \|v\|\,
    (\nabla L(\theta+\epsilon\hat v)-\nabla L(\theta-\epsilon\hat v))/(2\epsilon)`, :math:`\hat v=v/\|v\|`.

    Needs first-order gradients only, so it runs through any sharding (FSDP2). ``gradient()``
    returns the flat gradient (local shards) at the current parameters, e.g.
    :func:`~lightning_spectral.diagnostics._utils.backward_gradient`; ``reduce`` sums inner
    products over the ranks. The local parameter shards are shifted in place under ``no_grad`` and
    restored bit for bit. Error: truncation :math:`\epsilon^2\|\nabla^3L\|/6` plus round-off
    :math:`\sim\mathrm{eps}\,(\|\nabla L\|+\|H\|\,\theta_{rms})/\epsilon`; the default
    :math:`\epsilon=\mathrm{eps}^{1/3}\max(1,\theta_{rms})` balances them (Press et al.,
    *Numerical Recipes*, 3rd ed., §5.7), an error :math:`O(\mathrm{eps}^{2/3})` relative
    (about :math:`2\cdot10^{-5}` in float32, :math:`4\cdot10^{-11}` in float64), ``eps`` that of
    the parameters' dtype. The operator is symmetric only to that error.
    """

    def __init__(self, gradient: Callable[[], Tensor], params: Sequence[Tensor], reduce: Reduce = no_reduce,
                 epsilon: float | None = None) -> None:
        self.params = list(params)
        self.gradient = gradient
        self.reduce = reduce
        with torch.no_grad():
            self._shards = [local(p.detach()).view(-1) for p in self.params]
        self.numel = sum(s.numel() for s in self._shards)
        self.like = self._shards[0] if self._shards else torch.zeros(0)
        if epsilon is None:
            total = sum(p.numel() for p in self.params)
            square = reduce(sum((s.double().pow(2).sum() for s in self._shards), torch.zeros((), dtype=torch.float64,
                                                                                           device=self.like.device)))
            rms = float(square.sqrt()) / max(total, 1) ** 0.5
            epsilon = torch.finfo(self.like.dtype).eps ** (1 / 3) * max(1.0, rms)
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.epsilon = float(epsilon)

    def __call__(self, v: Tensor) -> Tensor:
        norm = float(self.reduce(v @ v).sqrt())
        if norm == 0:
            return torch.zeros_like(v)
        step = (v * (self.epsilon / norm)).to(self.like.dtype)
        saved = [s.clone() for s in self._shards]
        try:
            self._shift(step, saved, 1.0)
            plus = self.gradient()
            self._shift(step, saved, -1.0)
            minus = self.gradient()
        finally:
            self._shift(step, saved, 0.0)
        return ((plus - minus) * (norm / (2 * self.epsilon))).to(v.dtype)

    @torch.no_grad()
    def _shift(self, step: Tensor, saved: list[Tensor], sign: float) -> None:
        """Local shards ← saved + sign·step (``sign=0``: the saved values, bit for bit)."""
        start = 0
        for shard, original in zip(self._shards, saved):
            shard.copy_(original)
            if sign:
                shard.add_(step[start : start + shard.numel()], alpha=sign)
            start += shard.numel()


class ShardedHessianVectorProduct:
    r"""Exact ``v ↦ H v`` (Pearlmutter, double backward) for FSDP2-sharded ``params``, the vectors held as
    local shards: each product gathers ``v`` (``full_tensor``), differentiates this rank's loss through
    the unsharded parameters ``full`` (the leaves FSDP2 registers while a module is unsharded, see
    :func:`fsdp_unsharded`), sums the ranks' products (``all_reduce``, divided by the world size: the
    Hessian of the ranks' mean loss) and keeps this rank's shard."""

    def __init__(self, loss: Tensor, params: Sequence[Tensor], full: Sequence[Tensor], reduce: Reduce) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        self._dtensor, self._distribute = DTensor, distribute_tensor
        self.params, self.full, self.reduce = list(params), list(full), reduce
        self.grad = flat_grad(loss, self.full, create_graph=True)
        self._sizes = [local(p).numel() for p in self.params]
        self.numel = sum(self._sizes)
        self.like = local(self.params[0].detach())
        self._group = self.params[0].device_mesh.get_group()

    def __call__(self, v: Tensor) -> Tensor:
        pieces = [self._dtensor.from_local(piece.view(local(p).shape), p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride()).full_tensor()
                  for piece, p in zip(v.split(self._sizes), self.params)]
        if self.grad.requires_grad:
            hv = torch.autograd.grad(self.grad, self.full, grad_outputs=torch.cat([q.reshape(-1) for q in pieces]),
                                     retain_graph=True, materialize_grads=True)
            flat = torch.cat([h.reshape(-1) for h in hv]).detach()
        else:  # loss linear in the parameters
            flat = torch.zeros(sum(p.numel() for p in self.params), dtype=v.dtype, device=v.device)
        dist.all_reduce(flat, group=self._group)
        flat /= dist.get_world_size(self._group)
        out, start = [], 0
        for p in self.params:
            full = flat[start : start + p.numel()].view(p.shape)
            start += p.numel()
            out.append(self._distribute(full, p.device_mesh, p.placements, src_data_rank=None).to_local().reshape(-1))
        return torch.cat(out).to(v.dtype)


@contextmanager
def fsdp_unsharded(module: nn.Module) -> Iterator[None]:
    """Every FSDP2 module of ``module`` kept unsharded (whole parameters on every rank) through forward and
    backward (``set_reshard_after_forward(False)``, ``set_reshard_after_backward(False)``), then resharded and
    its settings put back. The memory of the whole network on every rank, for the block."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
    saved = [(m._get_fsdp_state(), [(g, g.post_forward_mesh_info, g.reshard_after_backward)
                                    for g in m._get_fsdp_state()._fsdp_param_groups]) for m in modules]
    auto = [state._auto_reshard_after_forward for state, _ in saved]
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
        yield
    finally:
        for m in modules:
            m.reshard()
        for (state, groups), flag in zip(saved, auto):
            state._auto_reshard_after_forward = flag
            for group, post_forward, after_backward in groups:
                group.post_forward_mesh_info, group.reshard_after_backward = post_forward, after_backward


@contextmanager
def hessian_vector_products(
    module: nn.Module, loss: Callable[[], Tensor], params: Sequence[Tensor], sharded_hvp: ShardedHVP = "exact",
    epsilon: float | None = None,
) -> Iterator[HessianVectorProduct | ShardedHessianVectorProduct | FiniteDifferenceHVP]:
    r"""The Hessian-vector products of ``loss()`` (a forward of ``module``) for ``params``, valid in the block.

    Plain parameters: :class:`HessianVectorProduct`. FSDP2-sharded ones (every rank enters, with its
    batch: the Hessian of the ranks' mean loss; ``.grad`` put back afterwards): ``sharded_hvp="exact"``,
    :class:`ShardedHessianVectorProduct` on the network unsharded for the block (the memory of the whole
    parameters and of a double-backward graph on every rank); ``"finite_difference"``,
    :class:`FiniteDifferenceHVP`, parameters and vectors sharded throughout, first-order backward only,
    but only for smooth losses: a ReLU network's kinks within ``ε`` of the batch's pre-activations
    enter the difference (on the ReLU MLP of the tests it reads 8 times the exact :math:`\lambda_{\max}`).
    """
    if sharded_hvp not in ("exact", "finite_difference"):
        raise ValueError(f"sharded_hvp must be 'exact' or 'finite_difference', got {sharded_hvp!r}")
    params = list(params)
    reduce = shard_reduce(params)
    if reduce is None:
        yield HessianVectorProduct(loss(), params)
        return
    with kept_grads(params):
        if sharded_hvp == "finite_difference":
            yield FiniteDifferenceHVP(lambda: backward_gradient(loss, params), params, reduce, epsilon)
            return
        with fsdp_unsharded(module):
            value = loss()
            full = [p for p in module.parameters() if p.requires_grad]
            if [tuple(f.shape) for f in full] != [tuple(p.shape) for p in params] or any(map(is_sharded, full)):
                raise ValueError("the forward of the FSDP2 module did not unshard every trainable parameter; "
                                 "run the forward of the module whose parameters are measured")
            yield ShardedHessianVectorProduct(value, params, full, reduce)


def _norm(v: Tensor, reduce: Reduce) -> Tensor:
    return reduce(v @ v).sqrt()


def _power(matvec: Callable[[Tensor], Tensor], v: Tensor, max_iter: int, tol: float,
           reduce: Reduce = no_reduce) -> tuple[float, Tensor, int]:
    """Eigenvalue of largest magnitude (Rayleigh quotient), its vector, and the iterations used."""
    v = v / _norm(v, reduce)
    lam = None
    for it in range(1, max_iter + 1):
        w = matvec(v)
        new_lam = float(reduce(v @ w))
        norm = _norm(w, reduce)
        if norm == 0:
            return 0.0, v, it
        v = w / norm
        if lam is not None and abs(new_lam - lam) <= tol * max(abs(new_lam), 1e-12):
            return new_lam, v, it
        lam = new_lam
    return float(lam), v, max_iter


def _lanczos(matvec: Callable[[Tensor], Tensor], v: Tensor, max_iter: int, tol: float,
             reduce: Reduce = no_reduce) -> tuple[float, Tensor, int]:
    """Largest (algebraic) Ritz value by Lanczos with full reorthogonalisation; keeps ``max_iter`` vectors."""
    basis = [v / _norm(v, reduce)]
    alphas: list[float] = []
    betas: list[float] = []
    top = None
    for it in range(1, max_iter + 1):
        w = matvec(basis[-1])
        alphas.append(float(reduce(w @ basis[-1])))
        q = torch.stack(basis)
        for _ in range(2):  # twice is enough (Kahan)
            w = w - q.T @ reduce(q @ w)
        beta = float(_norm(w, reduce))
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
    reduce: Reduce = no_reduce,
) -> tuple[float, Tensor, int]:
    r"""Algebraically largest Hessian eigenvalue :math:`\lambda_{\max}` from ``v0``.

    ``"power"``: power iteration finds the eigenvalue of largest magnitude :math:`\lambda_d`;
    if it is negative, a second run on :math:`H-\lambda_d I` (positive semi-definite) gives
    :math:`\lambda_{\max}`. Stops when the Rayleigh quotient changes by less than ``tol``
    relative. ``"lanczos"``: Lanczos with full reorthogonalisation (``max_iter`` stored vectors),
    the top Ritz value. Returns ``(lambda_max, eigenvector, Hessian-vector products used)``.
    With sharded parameters ``v0`` holds this rank's shards and ``reduce`` sums inner products
    over the ranks (``hvp.reduce``), so every rank gets the same eigenvalue.
    """
    if method == "lanczos":
        return _lanczos(hvp, v0, max_iter, tol, reduce)
    if method != "power":
        raise ValueError(f"method must be 'power' or 'lanczos', got {method!r}")
    lam, v, used = _power(hvp, v0, max_iter, tol, reduce)
    if lam >= 0:
        return lam, v, used
    mu, v, more = _power(lambda x: hvp(x) - lam * x, v0, max_iter, tol, reduce)
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
    sharded_hvp: ShardedHVP = "exact",
) -> float:
    r"""Top eigenvalue :math:`\lambda_{\max}` of the Hessian of ``loss_fn(model, x, y)`` w.r.t. the trainable parameters.

    Runs :func:`hessian_top_eigenvalue` under :func:`~lightning_spectral.diagnostics.isolated`
    (eval mode by default, RNG forked, ``.grad`` untouched); the start vector is drawn from
    ``seed``. Compare it with ``2 / lr``. With FSDP2-sharded parameters call it on every rank
    with that rank's batch: it is the top eigenvalue of the Hessian of the ranks' mean loss, by the
    products ``sharded_hvp`` names (:func:`hessian_vector_products`).

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
    with isolated(model, eval_mode), hessian_vector_products(model, lambda: loss_fn(model, x, y), params,
                                                             sharded_hvp) as hvp:
        v0 = random_vector(params, torch.Generator().manual_seed(seed)).to(hvp.like)
        return hessian_top_eigenvalue(hvp, v0, method, max_iter, tol, hvp.reduce)[0]


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
