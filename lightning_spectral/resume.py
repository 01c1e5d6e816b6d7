"""Resuming a checkpoint with the model a config requests: what must agree, what is applied.

:class:`ResumeCheck` is the resume policy of
:class:`~lightning_spectral.module.ManualOptimizationModule` (``SpectralModule``,
``LanguageModule``), kept beside the checkpoint files' code
(:mod:`lightning_spectral.checkpoint`) rather than in the training step:

* another network, ``exclude``, head/embedding routing, optimizer or scheduler class than the
  checkpoint's, a missing, extra or reshaped weight, another number of parameter groups: refused
  with :class:`CheckpointMismatchError`, listing the differences;
* NaN or Inf in a weight or an optimizer state: refused with
  :class:`~lightning_spectral.checkpoint.NonFiniteCheckpointError`, whichever ``CheckpointIO`` read it;
* changed optimizer hyperparameters (learning rate at the same point of its schedule, weight
  decay, budget, ...) and scheduler arguments: applied to the restored optimizer and scheduler,
  and listed in a warning.

Checkpoints carry the network and optimizer classes under :data:`META_KEY`
(:func:`checkpoint_metadata`), whatever the subclass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.optim import Optimizer

import lightning_spectral.optim as spectral_optim
from lightning_spectral.checkpoint import io_allows_nonfinite, last_good_checkpoint, refuse_nonfinite
from lightning_spectral.optim.param_groups import unsharded_class

META_KEY = "spectral_module"  # the checkpoint entry of the classes and the skipped-step count
# Entries of an optimizer's parameter group that describe the grouping or belong to the
# scheduler; every other plain entry (lr, weight decay, momentum, budget, ...) was asked for.
_GROUP_BOOKKEEPING = frozenset({"params", "param_names", "name", "matrix", "initial_lr"})


class CheckpointMismatchError(ValueError):
    """The checkpoint holds another network or optimizer than the one requested."""


def qualname(obj: Any) -> str:
    """The import path of ``obj``'s class; a module sharded by FSDP2 is named by its own class."""
    cls = unsharded_class(obj) if isinstance(obj, nn.Module) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def same_class(saved: str, requested: str) -> bool:
    """Whether the class path a checkpoint saved names the requested class. An optimizer that
    :mod:`lightning_spectral.optim` exports is matched by its public name
    (``lightning_spectral.optim.<Name>``), whichever module of the package defined it when the
    checkpoint was written (``optim.manifold.ManifoldMuon`` is now ``optim.constrained.dual``'s)."""
    return _public(saved) == _public(requested)


def _public(path: str) -> str:
    prefix, name = "lightning_spectral.optim.", path.rpartition(".")[2]
    exported = getattr(spectral_optim, name, None) if name in spectral_optim.__all__ else None
    if path.startswith(prefix) and isinstance(exported, type) and issubclass(exported, Optimizer):
        return prefix + name
    return path


def checkpoint_metadata(net: nn.Module, optimizer: Optimizer | None, skipped_steps: int) -> dict[str, Any]:
    """The :data:`META_KEY` entry of a checkpoint: what a resume compares against."""
    return {"net": qualname(net), "optimizer": qualname(optimizer) if optimizer is not None else None,
            "skipped_steps": skipped_steps}


def optimizer_mismatch(ckpt_path: Any, saved: str, requested: str) -> CheckpointMismatchError:
    """The error for resuming a checkpoint trained with optimizer class ``saved`` with ``requested``."""
    return CheckpointMismatchError(
        f"the checkpoint {ckpt_path} was trained with {saved}, the requested optimizer is {requested}: its state "
        "cannot be restored into another optimizer. Start a new run, or resume with the checkpoint's optimizer.")


def resume_hint(trainer: Any) -> str:
    """What to do after a non-finite step stopped ``trainer``: the cause to look for, and the
    newest checkpoint that is finite (:func:`~lightning_spectral.checkpoint.last_good_checkpoint`
    over the checkpoint callback's last, best and other files, then the one resumed from; each
    is loaded and checked, so a poisoned checkpoint is never named as good)."""
    callback = trainer.checkpoint_callback
    candidates: list[Any] = []
    if callback is not None:
        candidates += [getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
        directory = getattr(callback, "dirpath", None)
        if directory and Path(directory).is_dir():
            candidates += sorted(Path(directory).glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    candidates.append(trainer.ckpt_path)
    seen = set()
    unique = [c for c in candidates if c and str(c) not in seen and not seen.add(str(c))]
    good = last_good_checkpoint(unique)
    fix = ("find the cause (learning rate too large? bad data?) or set model.init_args.nonfinite=skip "
           "to skip such steps")
    if good is not None:
        return f"The last good (finite) checkpoint is {good}: {fix}, then resume with --ckpt_path {good}."
    return f"No finite checkpoint was written yet: {fix}, then start again."


def _plain(value: Any) -> Any:
    """A config value (jsonargparse ``Namespace``, dicts, lists) as plain dicts and lists."""
    if callable(getattr(value, "as_dict", None)):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _group_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in _GROUP_BOOKKEEPING and not torch.is_tensor(v)}


def _scheduler_changes(checkpoint: dict[str, Any], hparams: dict[str, Any]) -> list[tuple[None, str, str, Any, Any]]:
    """The scheduler arguments of the config that differ from the checkpoint's (LightningCLI
    hyperparameters only; the restored scheduler state would silently replace them)."""
    old = _plain((checkpoint.get("hyper_parameters") or {}).get("scheduler"))
    new = _plain(hparams.get("scheduler"))
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return []
    before, after = old.get("init_args") or {}, new.get("init_args") or {}
    return [(None, "scheduler", key, before.get(key), value) for key, value in after.items()
            if key != "last_epoch" and value is not None and before.get(key) != value]


def incompatibilities(module: Any, checkpoint: dict[str, Any], fitting: bool) -> list[str]:
    """What ``checkpoint`` and the requested ``module`` disagree on beyond a hyperparameter that
    can be applied to the restored state: network, classes, grouping, optimizer class."""
    saved = _plain(checkpoint.get("hyper_parameters") or {})
    requested = _plain(dict(module.hparams))
    problems = []
    old_net, new_net = saved.get("net"), requested.get("net")
    if isinstance(old_net, dict) and isinstance(new_net, dict):
        # Arguments given on one side only are defaults or filled in from the data: the
        # weights' shapes below show whether they matter.
        old_args, new_args = old_net.get("init_args") or {}, new_net.get("init_args") or {}
        if old_net.get("class_path") != new_net.get("class_path") or any(
                old_args[k] != new_args[k] for k in old_args.keys() & new_args.keys()):
            problems.append(f"net: checkpoint {old_net}, requested {new_net}")
    if "exclude" in saved and (saved["exclude"] or []) != (requested.get("exclude") or []):
        problems.append(f"exclude: checkpoint {saved['exclude']}, requested {requested.get('exclude')}")
    for key in ("head", "head_as_matrix", "embeddings_as_matrices"):  # they move parameters between groups
        if key in saved and saved[key] != requested.get(key):
            problems.append(f"{key}: checkpoint {saved[key]}, requested {requested.get(key)}")
    for key in ("optimizer", "scheduler") if fitting else ():
        if key not in saved or key not in requested:
            continue
        old, new = (v.get("class_path") if isinstance(v, dict) else v for v in (saved[key], requested[key]))
        if old != new:  # another class, or a schedule added or removed
            problems.append(f"{key} class: checkpoint {old}, requested {new}")
    meta = checkpoint.get(META_KEY, {})
    if meta.get("net") and meta["net"] != qualname(module.net):
        problems.append(f"network class: checkpoint {meta['net']}, requested {qualname(module.net)}")
    # A distributed checkpoint (a directory) holds no "state_dict" here: the strategy has
    # loaded the weights already, itself refusing missing, unexpected or reshaped ones.
    if module.strict_loading and "state_dict" in checkpoint:
        theirs, ours = checkpoint["state_dict"], module.state_dict()
        missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        shapes = [f"{k}: checkpoint {tuple(theirs[k].shape)}, requested {tuple(ours[k].shape)}"
                  for k in ours.keys() & theirs.keys()
                  if torch.is_tensor(theirs[k]) and theirs[k].shape != ours[k].shape]
        if missing:
            problems.append(f"{len(missing)} weights missing from the checkpoint (e.g. {missing[0]})")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint weights the model lacks (e.g. {unexpected[0]})")
        problems += sorted(shapes)[:5]
    return problems


class ResumeCheck:
    """The resume policy of one module (see the module docstring), called from three of its hooks:
    :meth:`on_load_checkpoint` (the checkpoint's dict), :meth:`on_optimizer` (the optimizer built
    by ``configure_optimizers``, before Lightning restores its state into it) and
    :meth:`on_train_start` (once restored: the requested hyperparameters are applied)."""

    def __init__(self) -> None:
        self._resumed: dict[str, Any] = {}  # what on_load_checkpoint read, for on_optimizer
        self._overrides: list[tuple] = []  # (group index or None for the scheduler, name, key, checkpoint's, requested)

    def on_load_checkpoint(self, module: Any, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that does not fit ``module`` or holds NaN/Inf (read by a
        ``CheckpointIO`` that did not check, :func:`~lightning_spectral.checkpoint.io_allows_nonfinite`);
        keep what :meth:`on_optimizer` compares."""
        trainer = module.trainer
        if not io_allows_nonfinite(trainer.strategy.checkpoint_io):
            refuse_nonfinite(checkpoint, trainer.ckpt_path)
        fitting = trainer.state.fn == TrainerFn.FITTING
        problems = incompatibilities(module, checkpoint, fitting)
        if problems:
            raise CheckpointMismatchError(
                f"the checkpoint {trainer.ckpt_path} does not fit the requested model:\n  - "
                + "\n  - ".join(problems)
                + "\nStart a new run (without --ckpt_path, or in another log directory), or use the configuration "
                "the checkpoint was trained with (its config.yaml / hparams.yaml beside the logs)."
            )
        meta = checkpoint.get(META_KEY, {})
        states = checkpoint.get("optimizer_states") or [{}]
        self._resumed = {"optimizer": meta.get("optimizer"), "groups": states[0].get("param_groups"),
                         "scheduler": _scheduler_changes(checkpoint, module.hparams)} if fitting else {}
        if fitting and trainer.strategy.restore_checkpoint_after_setup and trainer.optimizers:
            # ModelParallelStrategy built the optimizer (configure_optimizers) and loaded its state
            # before this hook: compare now. Its distributed checkpoint keeps the optimizer state
            # apart from this dict, so only the optimizer class and the scheduler are checked.
            self.on_optimizer(module, trainer.optimizers[0])

    def on_optimizer(self, module: Any, optimizer: Optimizer) -> None:
        """On resume: refuse another optimizer class; record the requested hyperparameters that
        differ from the checkpoint's, to apply them once Lightning has restored its state."""
        resumed, self._resumed = self._resumed, {}
        self._overrides = list(resumed.get("scheduler") or [])
        if resumed.get("optimizer") and not same_class(resumed["optimizer"], qualname(optimizer)):
            raise optimizer_mismatch(module.trainer.ckpt_path, resumed["optimizer"], qualname(optimizer))
        saved_groups = resumed.get("groups")
        if saved_groups is None:
            return
        # Checkpoints of the constrained optimizers from before their unsupported matrices had
        # a group of their own hold one group fewer; the optimizer converts them on load.
        saved_groups = getattr(optimizer, "upgrade_param_groups", lambda groups: groups)(saved_groups)
        if len(saved_groups) != len(optimizer.param_groups):
            raise CheckpointMismatchError(
                f"the checkpoint {module.trainer.ckpt_path} has {len(saved_groups)} parameter groups, the requested "
                f"optimizer {len(optimizer.param_groups)}. Start a new run, or resume with the checkpoint's config "
                "(checkpoints written before the output head had a group of its own need "
                "model.init_args.head_as_matrix: true)."
            )
        for i, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
            old = _group_hyperparameters(saved)
            if "initial_lr" in saved:  # the scheduler's base learning rate, not the scheduled value
                old["lr"] = saved["initial_lr"]
            for key, value in _group_hyperparameters(group).items():
                if key in old and _plain(old[key]) != _plain(value):
                    self._overrides.append((i, group.get("name", f"group{i}"), key, old[key], value))

    def on_train_start(self, module: Any) -> None:
        """Put the requested hyperparameters into the optimizer state Lightning restored."""
        if not self._overrides:
            return
        optimizer = module.optimizers().optimizer
        scheduler = module.lr_schedulers()
        for i, _, key, _, value in self._overrides:
            if i is None:  # a scheduler argument
                if scheduler is not None and hasattr(scheduler, key):
                    setattr(scheduler, key, value)
                continue
            group = optimizer.param_groups[i]
            if key == "lr" and group.get("initial_lr"):
                group["lr"] = value * group["lr"] / group["initial_lr"]  # the same point of the schedule
                group["initial_lr"] = value
                if scheduler is not None and hasattr(scheduler, "base_lrs"):
                    scheduler.base_lrs[i] = value
            else:
                group[key] = value
        if scheduler is not None and hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        changes = ", ".join(f"{name}.{key}: {old} -> {new}" for _, name, key, old, new in self._overrides)
        rank_zero_warn(f"resuming from {module.trainer.ckpt_path} with hyperparameters that differ from the "
                       f"checkpoint's; the requested values are applied to the restored optimizer: {changes}")
        self._overrides = []
