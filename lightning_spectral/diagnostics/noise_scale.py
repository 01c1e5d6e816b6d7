r"""Gradient noise scale :math:`B_{simple}=\mathrm{tr}(\Sigma)/\|G\|^2` (McCandlish et al. 2018).

A batch-of-:math:`B` gradient has :math:`E\|G_B\|^2=\|G\|^2+\mathrm{tr}(\Sigma)/B`, so squared
norms measured at two batch sizes :math:`b<B` give unbiased estimates (paper, appendix A.1)

.. math::
    \widehat{\|G\|^2}=\frac{B\|G_B\|^2-b\|G_b\|^2}{B-b},\qquad
    \widehat{\mathrm{tr}\,\Sigma}=\frac{\|G_b\|^2-\|G_B\|^2}{1/b-1/B}.

Their ratio is biased, so :class:`GradientNoiseScale` smooths numerator and denominator
separately and divides the averages. The loss must be a mean over the batch.

Data-parallel training gives both batch sizes for free: each rank's local gradient is a small
batch (:math:`b` examples) and the averaged gradient the big one (:math:`B=b\cdot` world size).
Under FSDP2 the local gradients exist only inside its reduce-scatter, where
:class:`ShardedGradientNorms` measures them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_spectral.diagnostics._utils import LossFn, isolated, local, trainable_parameters, xy_batch


def noise_components(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    r"""Unbiased ``(‖G‖², tr Σ)`` from :math:`\|G_b\|^2` (``small_sq``) and :math:`\|G_B\|^2` (``big_sq``)."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace


def grad_sq_norms(
    batch_loss: Callable[[Any], Tensor], params: Sequence[Tensor], batches: Sequence[Any]
) -> tuple[float, float]:
    r"""Mean over ``batches`` of :math:`\|\nabla L_i\|^2`, and :math:`\|\frac1m\sum_i\nabla L_i\|^2`.

    With ``m`` equal-size batches of ``b`` examples these are squared gradient norms at batch
    sizes ``b`` (averaged over the ``m`` small batches) and ``m*b``. Uses ``torch.autograd.grad``.
    """
    total: list[Tensor] | None = None
    small = 0.0
    for batch in batches:
        grads = torch.autograd.grad(batch_loss(batch), params, materialize_grads=True)
        small += float(sum(g.double().pow(2).sum() for g in grads))
        total = [g.double() for g in grads] if total is None else [t.add_(g) for t, g in zip(total, grads)]
    m = len(batches)
    big = float(sum(t.div_(m).pow(2).sum() for t in total))
    return small / m, big


class ShardedGradientNorms:
    r"""Squared norms of the ranks' local gradients under FSDP2, recorded in its reduce-scatter.

    :meth:`attach` installs it with ``FSDPModule.set_custom_reduce_scatter`` on every FSDP2 module
    of a network (it refuses one that already has another custom reduce-scatter). Rank :math:`r`'s
    reduce-scatter input is its local gradient :math:`g_r` times FSDP's pre-divide factor
    :math:`1/k` (zero-padded, concatenated over the module's parameters): the recorder sums
    :math:`\|u_r\|^2` of the inputs and, reducing by ``SUM`` itself (then dividing for ``AVG``,
    so the result FSDP receives is unchanged), :math:`\|\sum_r u_r\|^2`. Right after the backward,
    :meth:`record_reduced` reads the reduced gradient :math:`G=\frac1W\sum_r g_r` from ``.grad`` (before
    any clipping), which fixes :math:`k^2=\|G\|^2/\|\frac1W\sum_r u_r\|^2`; :meth:`norms` returns
    :math:`(\frac1W\sum_r\|g_r\|^2,\ \|G\|^2)`, the squared norms at batch sizes :math:`b` and
    :math:`Wb`. Plain torch; collective (:meth:`norms` on every rank).
    """

    def __init__(self) -> None:
        self.group: dist.ProcessGroup | None = None
        self.reset()

    def reset(self) -> None:
        self.local_sq: Tensor | float = 0.0
        self.sum_sq: Tensor | float = 0.0
        self.grad_sq: Tensor | float = 0.0
        self.calls = 0  # reduce-scatters recorded (one per FSDP2 module per backward)

    def attach(self, module: nn.Module) -> int:
        """Install on every FSDP2 module of ``module`` (``fully_shard``); returns how many."""
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for m in modules:
            for group in getattr(m._get_fsdp_state(), "_fsdp_param_groups", []):
                comm = getattr(group, "_reduce_scatter_comm", None)
                if not isinstance(comm, ShardedGradientNorms) and type(comm).__name__ != "DefaultReduceScatter":
                    raise ValueError(
                        f"{type(m).__name__} already has a custom reduce-scatter ({type(comm).__name__}); the "
                        "gradient noise scale records the local gradients in its own. Remove one of the two."
                    )
        for m in modules:
            m.set_custom_reduce_scatter(self)
        return len(modules)

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: Tensor, input_tensor: Tensor, group: dist.ProcessGroup, op,
                 async_op: bool = False) -> None:
        self.group, self.device = group, input_tensor.device
        self.local_sq = self.local_sq + input_tensor.detach().double().pow(2).sum()
        own = op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG)
        summed = output_tensor if own else torch.empty_like(output_tensor)
        dist.reduce_scatter_tensor(summed, input_tensor, op=dist.ReduceOp.SUM, group=group)
        self.sum_sq = self.sum_sq + summed.detach().double().pow(2).sum()
        if op == dist.ReduceOp.AVG:
            output_tensor.div_(group.size())
        elif not own:  # e.g. PREMUL_SUM, from set_gradient_divide_factor
            dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group)
        self.calls += 1

    def record_reduced(self, grads: Sequence[Tensor]) -> None:
        """Fold in this rank's share of ``‖G‖²``: ``grads``, the parameters' reduced ``.grad`` (``DTensor``
        shards), read right after the backward."""
        self.grad_sq = self.grad_sq + sum((local(g).detach().double().pow(2).sum() for g in grads),
                                          torch.zeros((), dtype=torch.float64))

    def norms(self) -> tuple[float, float]:
        r"""``(mean_r ‖g_r‖², ‖G‖²)`` of the backward recorded since :meth:`reset`. Collective over the
        recorded group."""
        if self.group is None:
            raise RuntimeError("ShardedGradientNorms.norms: no reduce-scatter recorded; attach() it and run backward")
        stats = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).to(self.device)
                             for v in (self.local_sq, self.sum_sq, self.grad_sq)])
        dist.all_reduce(stats, group=self.group)
        world = self.group.size()
        local_sq, mean_sq, big_sq = stats[0].item() / world, stats[1].item() / world**2, stats[2].item()
        return (local_sq * big_sq / mean_sq if mean_sq > 0 else 0.0), big_sq


class GradientNoiseScale:
    r"""Exponential moving averages of the unbiased :math:`\|G\|^2` and :math:`\mathrm{tr}\,\Sigma` estimates.

    ``update(small_sq, big_sq, b_small, b_big)`` folds in one measurement. The averages are
    debiased (divided by :math:`1-\beta^n`); :attr:`noise_scale` is their ratio (NaN while the
    smoothed :math:`\|G\|^2` is not positive). ``decay=0`` keeps only the last measurement.
    """

    def __init__(self, decay: float = 0.95) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self._grad_sq = 0.0
        self._trace = 0.0
        self._weight = 0.0
        self.count = 0

    def update(self, small_sq: float, big_sq: float, b_small: float, b_big: float) -> None:
        grad_sq, trace = noise_components(small_sq, big_sq, b_small, b_big)
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            return
        d = self.decay
        self._grad_sq = d * self._grad_sq + (1 - d) * grad_sq
        self._trace = d * self._trace + (1 - d) * trace
        self._weight = d * self._weight + (1 - d)
        self.count += 1

    @property
    def grad_sq(self) -> float:
        """Smoothed :math:`\\|G\\|^2` (NaN before the first update)."""
        return self._grad_sq / self._weight if self._weight else math.nan

    @property
    def trace(self) -> float:
        """Smoothed :math:`\\mathrm{tr}\\,\\Sigma` (NaN before the first update)."""
        return self._trace / self._weight if self._weight else math.nan

    @property
    def noise_scale(self) -> float:
        """:math:`B_{simple}` = smoothed trace / smoothed squared gradient norm."""
        return self._trace / self._grad_sq if self._weight and self._grad_sq > 0 else math.nan

    def state_dict(self) -> dict[str, float | int]:
        return {
            "decay": self.decay,
            "grad_sq": self._grad_sq,
            "trace": self._trace,
            "weight": self._weight,
            "count": self.count,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.decay = float(state["decay"])
        self._grad_sq = float(state["grad_sq"])
        self._trace = float(state["trace"])
        self._weight = float(state["weight"])
        self.count = int(state["count"])


def estimate_gradient_noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    batch1: Sequence[Tensor],
    batch2: Sequence[Tensor],
    *more_batches: Sequence[Tensor],
    eval_mode: bool = True,
) -> float:
    r"""One-shot :math:`B_{simple}` from two or more equal-size ``(x, y)`` batches.

    Each batch gives a small-batch gradient (:math:`b` examples), their mean the big one
    (:math:`mb`). A single estimate is noisy and its ratio biased; average many with
    :class:`GradientNoiseScale` for a usable value. Returns NaN if the :math:`\|G\|^2` estimate
    is not positive.
    """
    batches = [batch1, batch2, *more_batches]
    sizes = {len(xy_batch(b)[0]) for b in batches}
    if len(sizes) != 1:
        raise ValueError(f"batches must have equal sizes, got {sorted(sizes)}")
    (b,) = sizes
    with isolated(model, eval_mode):
        small, big = grad_sq_norms(
            lambda batch: loss_fn(model, *xy_batch(batch)), trainable_parameters(model), batches
        )
    estimator = GradientNoiseScale(decay=0.0)
    estimator.update(small, big, b, b * len(batches))
    return estimator.noise_scale
