r"""Per-layer spectral norms, stable ranks and singular-value spectra.

A Linear weight :math:`W\in\mathbb{R}^{m\times n}` reports :math:`\sigma_{\max}(W)=\|W\|_2`.
A convolution kernel :math:`K\in\mathbb{R}^{C_{out}\times C_{in}/g\times k_1\times\dots}`
reports, by default, the norm of the **reshaped kernel** :math:`\mathrm{mat}(K)\in
\mathbb{R}^{C_{out}\times C_{in}k_1k_2/g}` (what ``torch.nn.utils.parametrizations.spectral_norm``,
Miyato et al. and the Muon optimizers use). It is not the norm of the convolution as a
linear operator; with stride 1 the operator norm is at most :math:`\sqrt{k_1k_2}\,\|\mathrm{mat}(K)\|_2`.
Pass ``input_shape`` to :func:`compute_spectral_norms` (or call :func:`conv_operator_norm`)
for the true operator norm at a given input resolution.

Per-head norms (``blocks``): a layer split into equal blocks of ``d`` rows (the heads of a
query/key/value projection) or ``d`` columns (the heads an output projection reads) also reports
:math:`\|W_h\|_2` of each block :math:`W_h` as ``"<layer>/head<h>"``, all blocks of a layer in one
batched computation. Each :math:`\|W_h\|_2 \le \|W\|_2`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Literal, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_spectral.diagnostics._utils import isolated
from lightning_spectral.optim.linalg import power_iteration

#: Layer types whose weights are reported by default.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, _ConvNd)

#: ``{layer-name glob: rows per block}``, or ``"auto"`` for the heads of every GPT attention.
Blocks = Union[Mapping[str, int], Literal["auto"]]

#: A layer's split into heads: ``(block size, "rows" | "cols")``.
HeadSplit = tuple[int, Literal["rows", "cols"]]


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


def check_blocks(blocks: Blocks | None) -> None:
    """Raise ``ValueError`` unless ``blocks`` is ``None``, ``"auto"`` or ``{glob: positive int}``."""
    if blocks is None or blocks == "auto":
        return
    if not isinstance(blocks, Mapping):
        raise ValueError(f"blocks must be None, 'auto' or a dict {{layer-name glob: block size}}, got {blocks!r}")
    for pattern, size in blocks.items():
        if not isinstance(pattern, str):
            raise ValueError(f"blocks keys must be layer-name globs (str), got {pattern!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"blocks[{pattern!r}] must be a positive int (rows per block), got {size!r}")


def _is_attention(module: nn.Module) -> bool:
    """A multi-head attention with separate projections (duck-typed: diagnostics import no model)."""
    return isinstance(getattr(module, "head_dim", None), int) and all(
        isinstance(getattr(module, name, None), nn.Linear) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))


def head_splits(
    layers: Sequence[tuple[str, nn.Module]], model: nn.Module, blocks: Blocks | None
) -> dict[str, HeadSplit]:
    """``{layer name: (block size, "rows" | "cols")}`` for the ``layers`` of ``model`` that ``blocks`` splits.

    A mapping splits the rows (output dimension) of every layer whose name matches a glob
    (``fnmatch``, e.g. ``"*.q_proj"``); the first matching glob wins. ``"auto"`` splits every
    multi-head attention module into its heads, recognised by its attributes (``head_dim`` and
    ``q_proj``/``k_proj``/``v_proj``/``o_proj`` layers, as in
    :class:`~lightning_spectral.models.gpt.CausalSelfAttention`): rows of ``q_proj``/``k_proj``/
    ``v_proj``, columns of ``o_proj``, blocks of ``head_dim``.
    """
    check_blocks(blocks)
    if blocks is None:
        return {}
    weights = {name: weight_matrix(m).shape for name, m in layers}
    if blocks == "auto":
        splits: dict[str, HeadSplit] = {}
        for prefix, attn in model.named_modules():
            if _is_attention(attn):
                dot = f"{prefix}." if prefix else ""
                for proj, axis in (("q_proj", "rows"), ("k_proj", "rows"), ("v_proj", "rows"), ("o_proj", "cols")):
                    if dot + proj in weights:
                        splits[dot + proj] = (attn.head_dim, axis)
        if not splits:
            raise ValueError("blocks='auto' found no multi-head attention (a module with head_dim and q_proj, k_proj, "
                             "v_proj, o_proj layers, like lightning_spectral.models.GPT's) among the measured layers; "
                             "pass {layer-name glob: head size} instead")
    else:
        splits = {}
        for pattern, size in blocks.items():
            matched = [name for name in weights if fnmatchcase(name, pattern)]
            if not matched:
                raise ValueError(f"blocks glob {pattern!r} matches no measured layer; layer names are e.g. "
                                 f"{list(weights)[:4]}")
            for name in matched:
                splits.setdefault(name, (size, "rows"))
    for name, (size, axis) in splits.items():
        rows, cols = weights[name]
        length = rows if axis == "rows" else cols
        if length % size:
            raise ValueError(f"layer {name!r}: block size {size} does not divide its {length} {axis} "
                             f"(weight {rows}x{cols}); pick a divisor of {length}")
    return splits


def head_blocks(matrix: Tensor, split: HeadSplit) -> Tensor:
    """The blocks of ``matrix`` (``m, n``) as a stack: ``(m/d, d, n)`` for rows, ``(n/d, m, d)`` for columns."""
    size, axis = split
    rows, cols = matrix.shape
    if axis == "rows":
        return matrix.reshape(rows // size, size, cols)
    return matrix.reshape(rows, cols // size, size).transpose(0, 1)


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
    ``ddp_spawn`` workers). With ``blocks`` (see :func:`head_splits`) it also returns
    ``"<layer>/head<h>"`` for each block of the split layers, by one batched power iteration per
    layer (vectors kept under ``"<layer>/head"``, first drawn from ``seed + n_layers + i``).
    """

    def __init__(
        self,
        max_iter: int = 20,
        tol: float = 1e-4,
        seed: int = 0,
        layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
        max_layers: int | None = None,
        blocks: Blocks | None = None,
    ) -> None:
        self.max_iter = max_iter
        self.blocks = blocks
        self.tol = tol
        self.layer_types = tuple(layer_types)
        self.max_layers = max_layers
        self.seed = seed
        self.vectors: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        layers = spectral_layers(model, self.layer_types, self.max_layers)
        splits = head_splits(layers, model, self.blocks)
        norms = {}
        for index, (name, module) in enumerate(layers):
            matrix = weight_matrix(module)
            norms[name] = float(self._sigma(name, matrix, self.seed + index))
            if name in splits:
                sigmas = self._sigma(f"{name}/head", head_blocks(matrix, splits[name]), self.seed + len(layers) + index)
                norms.update({f"{name}/head{h}": s for h, s in enumerate(sigmas.tolist())})
        return norms

    def _sigma(self, key: str, matrix: Tensor, seed: int) -> Tensor:
        """Warm-started power iteration on ``matrix`` (or a stack), its left vectors kept under ``key``."""
        u = self.vectors.get(key)
        generator = None
        if u is None or u.shape != matrix.shape[:-1]:
            u, generator = None, torch.Generator().manual_seed(seed)
        sigma, self.vectors[key], _ = power_iteration(matrix, u, self.max_iter, self.tol, generator)
        return sigma

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
    blocks: Blocks | None = None,
) -> dict[str, float]:
    """Exact top singular value per layer, ``{layer name: sigma_max}``, in module order.

    Linear weights and reshaped conv kernels use ``torch.linalg.matrix_norm(ord=2)``. With
    ``input_shape`` (one example's shape, e.g. ``(3, 32, 32)``) conv layers report instead their
    operator norm at the resolution each one sees in a forward pass (:func:`conv_operator_norm`).
    All layers by default; ``max_layers`` keeps the first ones (``max_layers=8`` on a ResNet-18 stops
    before its classifier). With ``blocks`` (see :func:`head_splits`) the split layers also report
    ``"<layer>/head<h>"``: ``matrix_norm(ord=2)`` of each block, one call on the layer's stack.
    """
    layers = spectral_layers(model, layer_types, max_layers)
    splits = head_splits(layers, model, blocks)
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
        if name in splits:
            sigmas = torch.linalg.matrix_norm(head_blocks(weight_matrix(module), splits[name]), ord=2)
            norms.update({f"{name}/head{h}": s for h, s in enumerate(sigmas.tolist())})
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
