"""Which matrices a constrained optimizer keeps on its set (:class:`ConstrainedGroups`, the base of
:class:`~.skeleton.GeometricOptimizer`): the matrices of a group that the set cannot hold routed
into a fallback group of their own, every new matrix moved onto its set, and checkpoints of the
older layout (unsupported matrices inside their matrix group) split into this one."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from ..base import ON_CONSTRAINT_TOL, MatrixOptimizer, describe_param
from ..linalg import as_matrix
from ..param_groups import MATRIX_KEY
from ..sharded import whole
from . import geometry as geo

__all__ = ["ConstrainedGroups"]

UNSUPPORTED = ("fallback", "error")


class ConstrainedGroups(MatrixOptimizer):
    """The parameter groups of an optimizer that keeps each matrix on the set :meth:`geometry`
    gives its group: a matrix of a shape the set cannot hold goes to a ``<name>_fallback`` group
    right after its own (or is refused, with the group's ``unsupported="error"``), and an
    optimizer none of whose matrices fits refuses to be built."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], **kwargs: Any):
        # Where each group came from (see _route), the matrices that fit the set, and those that did not.
        self._sources: list[tuple[int, list[int], bool]] = []
        self._supported, self._unfit = 0, []
        super().__init__(params, defaults, **kwargs)
        if self._supported == 0:
            detail = "; ".join(self._unfit[:4]) + ("; ..." if len(self._unfit) > 4 else "")
            raise ValueError(f"{type(self).__name__}: no matrix parameter fits the manifold, so nothing would be "
                             f"constrained ({detail or 'there are no matrix parameters'})")

    @staticmethod
    def geometry(group: dict[str, Any]) -> geo.Geometry:
        """The constraint set of a matrix group, from its hyperparameters."""
        raise NotImplementedError

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Routed as at construction (matrices the set cannot hold go to a ``<name>_fallback`` group),
        and the new matrices moved onto their set, as the constructor moves the first ones."""
        start = len(self.param_groups)
        super().add_param_group(param_group)
        for index in range(start, len(self.param_groups)):
            self._project_group(index)

    def _route(self, parts: list[dict[str, Any]], index: int) -> list[dict[str, Any]]:
        """Move each matrix the set cannot hold into a fallback group right after its own (or
        raise, with ``unsupported="error"``); refuse meta tensors. ``self._sources[k]`` says where
        group ``k`` came from: ``(index of the part it was split from, positions there, whether it
        is the fallback part)``, the parts counted over every group added (the layout of
        checkpoints written before unsupported matrices had groups of their own)."""
        owner, out = type(self).__name__, []
        for part in parts:
            source = len({k for k, _, _ in self._sources})
            if not part[MATRIX_KEY]:
                out.append(part)
                self._sources.append((source, list(range(len(part["params"]))), False))
                continue
            settings = {**self.defaults, **part}
            geometry = self.geometry(settings)
            keep, off = [], []
            for i, p in enumerate(part["params"]):
                if p.is_meta:
                    raise ValueError(
                        f"{owner}: {describe_param(part, index, i)} is on the meta device, but the optimizer "
                        "moves every matrix onto its constraint set when it is built and needs its values. "
                        "Materialise and initialise the model first (e.g. model.to_empty(device=...) then its "
                        "reset_parameters()), then build the optimizer."
                    )
                reason = geometry.unsupported_reason(as_matrix(p).shape)
                if reason is None:
                    keep.append(i)
                    continue
                if settings.get("unsupported") == "error":
                    raise ValueError(
                        f"{owner}: {describe_param(part, index, i)} cannot be kept on the manifold ({reason}). "
                        "Pass unsupported='fallback' to train such matrices with the fallback rule, or put "
                        "them in a group with matrix=False."
                    )
                off.append(i)
                self._unfit.append(f"{describe_param(part, index, i)}: {reason}")
            self._supported += len(keep)
            names = part.get("param_names")
            if keep:
                kept = dict(part, params=[part["params"][i] for i in keep])
                if names:
                    kept["param_names"] = [names[i] for i in keep]
                out.append(kept)
                self._sources.append((source, keep, False))
            if off:
                fallback = {"params": [part["params"][i] for i in off], "name": f"{part.get('name', 'matrix')}_fallback",
                            MATRIX_KEY: False}
                if names:
                    fallback["param_names"] = [names[i] for i in off]
                out.append(fallback)
                self._sources.append((source, off, True))
            if not keep and not off:
                out.append(part)
                self._sources.append((source, [], False))
        return out

    @torch.no_grad()
    def _project_group(self, index: int) -> None:
        """Start on the set (when a group is added), unless already there (see
        :data:`~lightning_spectral.optim.base.ON_CONSTRAINT_TOL`)."""
        group = self.param_groups[index]
        if not group[MATRIX_KEY]:
            return
        geometry = self.geometry(group)
        for i, param in enumerate(group["params"]):
            if param.numel() == 0:  # a 0 × n matrix: nothing to move
                continue
            with whole(self.state, param) as p:  # a DTensor shard: its full matrix
                W = as_matrix(p).float()
                X = geometry.view(W)
                if not geometry.contains(X, ON_CONSTRAINT_TOL):
                    try:
                        # (no inner statistics kept: a fresh optimizer's state stays empty, which torch's
                        # distributed checkpoint reads as not initialised, and so initialises it before loading)
                        X = geometry.project(X)
                    except ValueError as error:
                        raise ValueError(f"{type(self).__name__}: {self.param_name(index, i)}: {error}") from None
                    p.copy_(geometry.unview(X, W.shape).view_as(p))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(dict(state_dict, param_groups=self.upgrade_param_groups(state_dict["param_groups"])))

    def upgrade_param_groups(self, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """A checkpoint's ``param_groups`` in this optimizer's layout. Checkpoints written before
        unsupported matrices had a group of their own (they sat in their matrix group, with the
        fallback's hyperparameters under ``fallback_rule``) are split the way this optimizer was;
        others are returned as they are."""
        original = len({index for index, _, _ in self._sources})
        if len(saved) == original != len(self.param_groups):
            return [self._split_saved(saved, k) for k in range(len(self._sources))]
        return saved

    def _split_saved(self, saved: list[dict[str, Any]], k: int) -> dict[str, Any]:
        """Group ``k`` of this optimizer, cut out of the old layout's groups ``saved``."""
        index, positions, is_fallback = self._sources[k]
        old = saved[index]
        if is_fallback:
            group = {key: v for key, v in self.param_groups[k].items() if key not in ("params", "param_names")}
            group.update(old.get("fallback_rule", {}))
        else:
            group = {key: v for key, v in old.items() if key != "fallback_rule"}
        group["params"] = [old["params"][i] for i in positions]
        if "param_names" in old:
            group["param_names"] = [old["param_names"][i] for i in positions]
        return group
