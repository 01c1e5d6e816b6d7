"""Parameter-group rules, in one place.

Every optimizer of this package holds two kinds of group: groups with ``matrix=True`` follow
the optimizer's *matrix rule* (Muon's msign, a constraint, a spectral budget); groups with
``matrix=False`` follow its *fallback rule* (AdamW or SGD inside the same optimizer object).
Plain ``torch.optim`` optimizers ignore the extra keys, so the same groups work with
``torch.optim.SGD`` and ``AdamW``.

Where the model is known (:func:`build_param_groups`, and through it ``create_optimizer`` and
the LightningModule) each trainable parameter is routed by the first matching row:

| parameter (first matching row)                     | group         | rule     | to opt in to the matrix rule    |
|----------------------------------------------------|---------------|----------|---------------------------------|
| name matches an ``exclude`` glob                   | ``vector``    | fallback | remove the pattern              |
| ``ndim < 2`` (biases, norm gains, scalars)         | ``vector``    | fallback | never                           |
| weight of an ``nn.Embedding``/``nn.EmbeddingBag``  | ``embedding`` | fallback | ``embeddings_as_matrices=True`` |
| weight of a head module (below)                    | ``head``      | fallback | ``head_as_matrix=True``         |
| any other tensor with ``ndim >= 2`` (Linear, conv) | ``matrix``    | matrix   | (the default)                   |

The *head* is the modules named by ``head`` (glob patterns over module names); by default
(``head=None``) the last ``nn.Linear`` in module registration order, plus every ``nn.Linear``
whose weight is the same tensor as an embedding's (tied input/output embeddings: such a weight
takes the matrix rule only when both options opt in). Muon practice trains embeddings and the
output layer with AdamW (Jordan et al. 2024, "Muon"; Liu et al. 2025, "Muon is scalable for LLM
training"): an embedding row is updated only by the tokens that use it, so orthogonalising the
whole table mixes unrelated rows; a constrained classifier head (a unit spectral ball, or an
orthonormal ``10 × 128`` matrix) caps the logits and so the attainable loss.

Groups made by hand say which rule they want with ``"matrix"`` or, as in Keller Jordan's
``MuonWithAuxAdam``, ``"use_muon"`` (same meaning); a group with neither key is split by
``ndim`` when an optimizer of this package is built, so ``Muon(model.parameters())`` works.
What can and cannot be detected: from bare tensors an optimizer cannot tell an embedding table
or a classifier head from any other matrix, so ``Muon(model.parameters())`` gives them the
matrix rule silently. :func:`routing_table` with the model (which the LightningModule prints at
fit start) names each parameter's module and warns once about an embedding weight or the head
sitting in a matrix group it was not opted into.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

MATRIX_KEY = "matrix"
USE_MUON_KEY = "use_muon"
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
# A group key set by build_param_groups on a matrix group that holds parameters it was asked to
# give the matrix rule (the role names: "embedding", "head"); routing_table does not warn about them.
OPTED_IN_KEY = "opted_in"


def is_matrix(p: torch.Tensor) -> bool:
    """A tensor the matrix rule can take: 2-D, or N-D viewed as ``shape[0] × rest``."""
    return p.ndim >= 2


def parameter_roles(model: nn.Module, head: Optional[Sequence[str]] = None) -> dict[int, str]:
    """``id(parameter) → role`` for the model's embedding and head weights (see the module table).

    Roles: ``"embedding"`` (an ``nn.Embedding``/``nn.EmbeddingBag`` weight), ``"head"`` (a weight
    of a head module), ``"tied"`` (both: a head Linear sharing an embedding's weight). Other
    parameters are absent. ``head=None`` takes the last ``nn.Linear`` in registration order;
    ``head=["fc", "decoder.*"]`` the modules whose names match these globs; ``head=[]`` none.
    """
    modules = list(model.named_modules())
    embedding_weights = {
        id(m.weight) for _, m in modules if isinstance(m, EMBEDDING_TYPES) and isinstance(m.weight, torch.Tensor)
    }
    if head is None:
        linears = [(n, m) for n, m in modules if isinstance(m, nn.Linear)]
        head_modules = linears[-1:] + [(n, m) for n, m in linears if id(m.weight) in embedding_weights]
    else:
        if isinstance(head, str):
            raise TypeError(f"head must be a list of module-name patterns, got the string {head!r}: pass [{head!r}]")
        head_modules = [(n, m) for n, m in modules if any(fnmatch.fnmatchcase(n, pat) for pat in head)]
        unmatched = [pat for pat in head if not any(fnmatch.fnmatchcase(n, pat) for n, _ in modules)]
        if unmatched:
            raise ValueError(
                f"head patterns {unmatched} match no module of {type(model).__name__}; module names are "
                f"{[n for n, _ in modules if n][:12]}{'…' if len(modules) > 13 else ''}"
            )
    head_weights = {id(p) for _, m in head_modules for p in m.parameters(recurse=False) if is_matrix(p)}
    roles = {i: "embedding" for i in embedding_weights}
    for i in head_weights:
        roles[i] = "tied" if i in embedding_weights else "head"
    return roles


def build_param_groups(
    model: nn.Module,
    exclude: Sequence[str] = (),
    vector_weight_decay: float | None = 0.0,
    *,
    head: Optional[Sequence[str]] = None,
    head_as_matrix: bool = False,
    embeddings_as_matrices: bool = False,
) -> list[dict[str, Any]]:
    """Route ``model``'s trainable parameters into groups by the table of :mod:`.param_groups`.

    Args:
        model: the network.
        exclude: glob patterns over parameter names (``"fc.*"``, ``"*.downsample.*"``) whose
            tensors go to the ``vector`` group whatever their shape.
        vector_weight_decay: weight decay of the ``vector`` group; ``0.0`` (the default) is the
            usual "no decay on biases and norms"; ``None`` keeps the optimizer's own value. The
            ``head`` and ``embedding`` groups keep the optimizer's (or its fallback's) value.
        head: module-name globs of the output head; ``None``: the last ``nn.Linear`` (and any
            Linear tied to an embedding); ``[]``: no head.
        head_as_matrix: give the head's weight the matrix rule.
        embeddings_as_matrices: give embedding tables the matrix rule.

    Returns:
        The non-empty groups among ``matrix``, ``embedding``, ``head``, ``vector`` (in that
        order), each with ``params``, ``param_names``, ``name`` and ``matrix`` keys.
    """
    roles = parameter_roles(model, head)
    opted = {"embedding": embeddings_as_matrices, "head": head_as_matrix,
             "tied": embeddings_as_matrices and head_as_matrix}
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {"matrix": [], "embedding": [], "head": [], "vector": []}
    opted_in: set[str] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role = roles.get(id(p))
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude) or not is_matrix(p):
            buckets["vector"].append((name, p))
        elif role is None:
            buckets["matrix"].append((name, p))
        elif opted[role]:
            buckets["matrix"].append((name, p))
            opted_in.add("embedding" if role == "tied" else role)
        else:
            buckets["head" if role == "head" else "embedding"].append((name, p))
    groups: list[dict[str, Any]] = []
    for name, named in buckets.items():
        if not named:
            continue
        group = {"params": [p for _, p in named], "param_names": [n for n, _ in named], "name": name,
                 MATRIX_KEY: name == "matrix"}
        if name == "matrix" and opted_in:
            group[OPTED_IN_KEY] = sorted(opted_in)
        if name == "vector" and vector_weight_decay is not None:
            group["weight_decay"] = vector_weight_decay
        groups.append(group)
    return groups


def named_group(group: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``group`` whose ``params`` is a list of tensors, the names of ``(name, tensor)``
    pairs moved to ``param_names`` (torch.optim's rules and messages)."""
    group = dict(group)
    params = group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                        "tensors in sets will change between runs. Please use a list instead.")
    else:
        params = list(params)
    names = [p[0] for p in params if isinstance(p, tuple)]
    if names:
        if len(names) != len(params):
            raise ValueError("all optimizer params should be with/without names. Some param names are missing")
        group["param_names"] = names
        params = [p[1] for p in params]
    group["params"] = params
    return group


def split_group(group: dict[str, Any], index: int = 0) -> list[dict[str, Any]]:
    """The parts of one group (tensors in ``params``, see :func:`named_group`) that each carry
    ``"matrix"``: ``"use_muon"`` is read as ``"matrix"``, and a group with neither key is split by
    ``ndim`` (an empty group stays one, with ``matrix=False``).

    Raises:
        ValueError: a group marked ``matrix=True`` holds a tensor with fewer than two
            dimensions (a matrix rule cannot take a bias or a scalar), or has ``matrix`` and
            ``use_muon`` keys that disagree.
    """
    group = dict(group)
    if USE_MUON_KEY in group:
        flag = bool(group[USE_MUON_KEY])
        if MATRIX_KEY in group and bool(group[MATRIX_KEY]) != flag:
            raise ValueError(
                f"param group {index} has matrix={group[MATRIX_KEY]!r} and use_muon={group[USE_MUON_KEY]!r}: "
                "they mean the same thing (the matrix rule); keep one of them"
            )
        group[MATRIX_KEY] = flag
    if MATRIX_KEY in group:
        if group[MATRIX_KEY]:
            for i, p in enumerate(group["params"]):
                if not is_matrix(p):
                    key = USE_MUON_KEY if USE_MUON_KEY in group else MATRIX_KEY
                    raise ValueError(
                        f"param group {index} is marked {key}=True but {_name_of(group, i)} has shape "
                        f"{tuple(p.shape)}: the matrix rule needs tensors with ndim >= 2. "
                        f"Move it to a group with {key}=False (the AdamW/SGD fallback), "
                        f"or leave out the '{key}' key to split by ndim."
                    )
        return [group]
    if not group["params"]:
        return [dict(group, **{MATRIX_KEY: False})]
    parts = []
    for flag in (True, False):
        keep = [i for i, p in enumerate(group["params"]) if is_matrix(p) == flag]
        if not keep:
            continue
        part = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        part["params"] = [group["params"][i] for i in keep]
        if "param_names" in group:
            part["param_names"] = [group["param_names"][i] for i in keep]
        part[MATRIX_KEY] = flag
        parts.append(part)
    return parts


def split_by_rule(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Normalise ``params`` (tensors, ``(name, tensor)`` pairs or group dicts) into the groups a
    package optimizer would hold before its own routing (:func:`split_group` on each)."""
    out = [part for index, group in enumerate(_as_groups(params)) for part in split_group(group, index)]
    if not any(g["params"] for g in out):
        raise ValueError("optimizer got an empty parameter list")
    return out


# Names of embedding tables in common models (nn.Embedding attributes: embed_tokens, tok_embeddings,
# wte/wpe of GPT-2, word_embeddings of BERT, pos_emb...).
EMBEDDING_NAMES = ("emb", "wte", "wpe")


# Names of output heads (lm_head, head, classifier, fc of torchvision's ResNet, out, logits).
HEAD_NAMES = ("head", "classifier", "fc", "out", "logits")


def misrouted_by_name(names: Sequence[str]) -> list[str]:
    """Of the named matrices an optimizer routed by shape alone (in the order given), those that
    look like an embedding (a module name containing one of :data:`EMBEDDING_NAMES`) or the output
    head (the last one, as :func:`parameter_roles` takes a model's last ``nn.Linear``, when its
    module name contains one of :data:`HEAD_NAMES`: a head tied to the embedding is not in a
    model's named parameters, and the last one is then a hidden matrix), each with its role."""
    def named(n: str, keys: tuple[str, ...]) -> bool:
        return any(key in part.lower() for part in (n.split(".")[:-1] or [n]) for key in keys)

    found = [f"{n} (embedding)" for n in names if named(n, EMBEDDING_NAMES)]
    if names and named(names[-1], HEAD_NAMES) and not named(names[-1], EMBEDDING_NAMES):
        found.append(f"{names[-1]} (output head)")
    return found


def warn_misrouted(owner: str, names: Sequence[str]) -> None:
    """One warning naming each embedding or head :func:`misrouted_by_name` finds among ``names``."""
    found = misrouted_by_name(names)
    if found:
        warnings.warn(
            f"{owner}: the matrix rule was given {', '.join(found)}, routed by shape alone: embeddings and the output "
            "head usually take the AdamW/SGD fallback. Pass the model to create_optimizer (or build_param_groups(model)), "
            "or put them in a group with matrix=False (use_muon=False); a group with matrix=True (use_muon=True) "
            "keeps its tensors on the matrix rule without this warning.",
            UserWarning,
            stacklevel=4,
        )


def unsharded_class(module: nn.Module) -> type:
    """The module's own class: FSDP2's ``fully_shard`` swaps it for a dynamic subclass of ``FSDPModule``
    and the original (``FSDPLinear`` -> ``Linear``), whose first base outside FSDP is the original."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without torch.distributed
        return type(module)
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def routing_table(optimizer_or_groups: torch.optim.Optimizer | Iterable[Any], model: Optional[nn.Module] = None) -> str:
    """A Markdown table: which group and rule takes each parameter, with its shape, lr and weight decay.

    ``optimizer_or_groups`` is a built optimizer (its ``param_groups``, after any split; a wrapper
    with an ``optimizer`` attribute, such as ``LightningModule.optimizers()``, is unwrapped) or the
    groups/parameters one would be given (split as a package optimizer would split them).
    With ``model`` the names come from ``model.named_parameters()`` where the groups carry none,
    a ``module`` column gives each parameter's module type (``Linear (head)``, ``Embedding``; the
    original class under FSDP2, not its ``FSDPLinear``), and
    one warning lists the embedding and head weights that sit in a matrix group without being
    opted in (see :func:`build_param_groups`); from bare tensors this cannot be detected.
    """
    wrapped = getattr(optimizer_or_groups, "optimizer", None)  # Lightning's LightningOptimizer wrapper
    if isinstance(wrapped, torch.optim.Optimizer):
        optimizer_or_groups = wrapped
    if isinstance(optimizer_or_groups, torch.optim.Optimizer):
        groups, owner = optimizer_or_groups.param_groups, optimizer_or_groups
    else:
        groups, owner = split_by_rule(optimizer_or_groups), None
    names: dict[int, str] = {}
    modules: dict[int, str] = {}
    roles: dict[int, str] = {}
    if model is not None:
        roles = parameter_roles(model)
        for module_name, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                full = f"{module_name}.{pname}" if module_name else pname
                names.setdefault(id(p), full)
                kind = unsharded_class(module).__name__
                modules.setdefault(id(p), f"{kind} ({roles[id(p)]})" if roles.get(id(p)) in ("head", "tied") else kind)
    header = ["parameter", "shape", "group", "rule", "lr", "weight_decay"] + (["module"] if model is not None else [])
    rows = [header, ["---"] * len(header)]
    misrouted: list[str] = []
    for index, group in enumerate(groups):
        opted_in = set(group.get(OPTED_IN_KEY, ()))
        for i, p in enumerate(group["params"]):
            given = group.get("param_names")
            name = given[i] if given else names.get(id(p), f"#{index}.{i}")
            matrix = bool(group.get(MATRIX_KEY, is_matrix(p)))
            row = [name, "×".join(map(str, p.shape)) or "scalar", str(group.get("name", f"group{index}")),
                   _rule(owner, group, matrix), _fmt(group.get("lr")), _fmt(group.get("weight_decay"))]
            if model is not None:
                row.append(modules.get(id(p), "?"))
                role = {"tied": "embedding"}.get(roles.get(id(p), ""), roles.get(id(p)))
                if matrix and role is not None and role not in opted_in:
                    misrouted.append(f"{name} ({role})")
            rows.append(row)
    if misrouted and (owner is None or _is_package_optimizer(owner)):
        warnings.warn(
            f"the matrix rule was given {', '.join(misrouted)}: embeddings and the output head usually take the "
            "AdamW/SGD fallback. Build the groups with build_param_groups(model) (embeddings_as_matrices=True / "
            "head_as_matrix=True to opt in), or put them in a group with matrix=False.",
            UserWarning,
            stacklevel=2,
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    rows[1] = ["-" * w for w in widths]
    return "\n".join("| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths)) + " |" for r in rows)


def _rule(owner: Optional[torch.optim.Optimizer], group: dict[str, Any], matrix: bool) -> str:
    if owner is None:
        return "matrix" if matrix else "fallback"
    if not _is_package_optimizer(owner):  # a plain torch optimizer: one rule for every group
        return type(owner).__name__
    return type(owner).__name__ if matrix else f"fallback {group.get('algorithm', type(owner).__name__)}"


def _is_package_optimizer(optimizer: Optional[torch.optim.Optimizer]) -> bool:
    from .base import MatrixOptimizer  # base imports this module

    return isinstance(optimizer, MatrixOptimizer)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def _as_groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    """torch.optim.Optimizer's reading of ``params``: one group of tensors (or of ``(name, tensor)``
    pairs), or a list of group dicts; each through :func:`named_group`."""
    if isinstance(params, torch.Tensor):
        raise TypeError(
            "params argument given to the optimizer should be an iterable of Tensors or dicts, but got a single "
            f"{torch.typename(params)}: pass [tensor] or model.parameters()"
        )
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    groups = items if isinstance(items[0], dict) else [{"params": items}]
    return [named_group(g) for g in groups]


def _name_of(group: dict[str, Any], i: int) -> str:
    names = group.get("param_names")
    return f"parameter '{names[i]}'" if names else f"parameter #{i}"
