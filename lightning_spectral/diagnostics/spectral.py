r"""Per-layer spectral norms, stable ranks and singular-value spectra.

A Linear weight :math:`W\in\mathbb{R}^{m\times n}` reports :math:`\sigma_{\max}(W)=\|W\|_2`.
A convolution kernel :math:`K\in\mathbb{R}^{C_{out}\times C_{in}/g\times k_1\times\dots}`
reports, by default, the norm of the **reshaped kernel** :math:`\mathrm{mat}(K)\in
\mathbb{R}^{C_{out}\times C_{in}k_1k_2/g}` (what ``torch.nn.utils.parametrizations.spectral_norm``,
Miyato et al. and the Muon optimizers use). It is not the norm of the convolution as a
linear operator; with stride 1 the operator norm is at most :math:`\sqrt{k_1k_2}\,\|\mathrm{mat}(K)\|_2`.
Pass ``input_shape`` to :func:`compute_spectral_norms` (or call :func:`conv_operator_norm`)
for the true operator norm at a given input resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_spectral.diagnostics._utils import isolated
from lightning_spectral.optim.linalg import power_iteration

#: Layer types whose weights are reported by default.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd)


def weight_matrix(module: nn.Module) -> Tensor:
    """The layer's weight as a detached fp32 matrix ``(out, -1)`` (conv kernels reshaped)."""
    weight = module.weight.detach()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        weight = weight.transpose(0, 1)  # stored (in, out/g, k...): put the output channels first
    return weight.reshape(weight.shape[0], -1).float()


def spectral_layers(
    model: nn.Module,
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    max_layers: int | None = None,
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers with a weight of the given types, in module order."""
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, tuple(layer_types)) and isinstance(getattr(m, "weight", None), Tensor)
    ]
    return layers if max_layers is None else layers[:max_layers]


def stable_rank(matrix: Tensor, sigma_max: float | None = None) -> float:
    r"""Stable rank :math:`\|W\|_F^2/\|W\|_2^2 \in [1, \mathrm{rank}\,W]` (0 for a zero matrix)."""
    sigma = float(torch.linalg.matrix_norm(matrix, ord=2)) if sigma_max is None else sigma_max
    return float(matrix.pow(2).sum()) / sigma**2 if sigma > 0 else 0.0


class SpectralNormTracker:
    """Warm-started power iteration over a model's layers, with persistent vectors per layer.

    ``tracker(model)`` returns ``{layer name: sigma_max}``; the left singular vectors are kept
    between calls (and in ``state_dict``), so after the first call 1-3 rounds usually reach ``tol``.
    The first vector of the ``i``-th layer is drawn from ``seed + i`` (a fresh generator, so the
    global RNG is never consumed and the tracker holds only tensors: it pickles, e.g. to
    ``ddp_spawn`` workers).
    """

    def __init__(
        self,
        max_iter: int = 20,
        tol: float = 1e-4,
        seed: int = 0,
        layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
        max_layers: int | None = None,
    ) -> None:
        self.max_iter = max_iter
        self.tol = tol
        self.layer_types = tuple(layer_types)
        self.max_layers = max_layers
        self.seed = seed
        self.vectors: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        norms = {}
        for index, (name, module) in enumerate(spectral_layers(model, self.layer_types, self.max_layers)):
            matrix = weight_matrix(module)
            u = self.vectors.get(name)
            generator = None
            if u is None or u.shape[0] != matrix.shape[0]:
                u, generator = None, torch.Generator().manual_seed(self.seed + index)
            sigma, self.vectors[name], _ = power_iteration(matrix, u, self.max_iter, self.tol, generator)
            norms[name] = float(sigma)
        return norms

    def state_dict(self) -> dict[str, dict[str, Tensor]]:
        return {"vectors": {k: v.detach().cpu().clone() for k, v in self.vectors.items()}}

    def load_state_dict(self, state: dict[str, dict[str, Tensor]]) -> None:
        self.vectors = {k: v.clone() for k, v in state["vectors"].items()}


def conv_operator_norm(
    conv: _ConvNd,
    input_shape: Sequence[int],
    max_iter: int = 100,
    tol: float = 1e-6,
    seed: int = 0,
) -> float:
    r"""Operator norm of ``conv`` (without bias) on inputs of shape ``(C_in, *spatial)``.

    Power iteration on :math:`A^\top A`, with :math:`A^\top` from ``torch.func.vjp`` (padding,
    stride, dilation, groups and padding mode are those of the layer). Exact for that input size.
    """
    weight = conv.weight.detach().float()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *input_shape, generator=generator).to(weight.device)

    def apply(inp: Tensor) -> Tensor:
        return conv._conv_forward(inp, weight, None)

    sigma = 0.0
    with torch.no_grad():
        for _ in range(max_iter):
            x = x / x.norm()
            y, vjp_fn = torch.func.vjp(apply, x)
            new_sigma = float(y.norm())
            (x,) = vjp_fn(y)  # A^T A x
            converged = abs(new_sigma - sigma) <= tol * new_sigma
            sigma = new_sigma
            if converged:
                break
    return sigma


def _conv_input_shapes(model: nn.Module, input_shape: Sequence[int]) -> dict[nn.Module, tuple[int, ...]]:
    """Per-conv input shapes (without batch) from one forward of a zero input in eval mode."""
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def record(mod: nn.Module, args: tuple[Tensor, ...]) -> None:
        shapes.setdefault(mod, tuple(args[0].shape[1:]))

    handles = [
        m.register_forward_pre_hook(record)
        for m in model.modules()
        if isinstance(m, _ConvNd)
    ]
    device = next(model.parameters()).device
    try:
        with isolated(model), torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return shapes


def compute_spectral_norms(
    model: nn.Module,
    max_layers: int | None = None,
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    input_shape: Sequence[int] | None = None,
) -> dict[str, float]:
    """Exact top singular value per layer, ``{layer name: sigma_max}``, in module order.

    Linear weights and reshaped conv kernels use ``torch.linalg.matrix_norm(ord=2)``. With
    ``input_shape`` (one example's shape, e.g. ``(3, 32, 32)``) conv layers report instead their
    operator norm at the resolution each one sees in a forward pass (:func:`conv_operator_norm`).
    All layers by default; ``max_layers`` keeps the first ones (``max_layers=8`` on a ResNet-18 stops
    before its classifier).
    """
    layers = spectral_layers(model, layer_types, max_layers)
    shapes = _conv_input_shapes(model, input_shape) if input_shape is not None else {}
    norms = {}
    for name, module in layers:
        if input_shape is not None and isinstance(module, _ConvNd) and not isinstance(
            module, nn.modules.conv._ConvTransposeNd
        ):
            if module not in shapes:
                raise ValueError(f"conv layer {name!r} was not reached by a forward of shape {tuple(input_shape)}")
            norms[name] = conv_operator_norm(module, shapes[module])
        else:
            norms[name] = float(torch.linalg.matrix_norm(weight_matrix(module), ord=2))
    return norms


def compute_singular_values(
    model: nn.Module,
    max_layers: int | None = None,
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
) -> dict[str, Tensor]:
    """Full singular-value spectra (descending, CPU) of each layer's weight matrix, by ``svdvals``."""
    return {
        name: torch.linalg.svdvals(weight_matrix(m)).cpu()
        for name, m in spectral_layers(model, layer_types, max_layers)
    }
