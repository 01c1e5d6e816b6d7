"""What a config, a study file or a checkpoint's saved hyperparameters may cause to run.

A value that names an import path (``class_path: ...``, ``optimizer: MuonSGD``,
``--trainer.callbacks+=...``, a study variant's ``set:``) may name

- any **class** of the kind its key expects (an ``Optimizer`` for ``optimizer:``, an
  ``LRScheduler`` for ``scheduler:``, an ``nn.Module`` for ``net:``, a ``LightningDataModule``
  for ``data:``, a ``Callback`` in ``trainer.callbacks``, ...), from any module;
- a **function** or any other callable object only when code registered it with
  :func:`register_config_function` (the package registers none).

Anything else is refused while the config is parsed, before any object is built, with
:class:`ConfigObjectRefused` naming the value, the rule and the fix. Under jsonargparse (the
LightningCLI, every run of a study, ``load_from_checkpoint`` of a CLI-trained module) the rule is
one hook, :func:`enforce_in_jsonargparse`, on the import that jsonargparse does for every path a
value names (paths from code, such as annotations and defaults, are not checked); jsonargparse
itself checks that a class is of the expected kind. A ``{class_path, init_args}`` given for a
parameter typed ``Any`` names no kind, so it stays a plain dict (jsonargparse's
``instantiate_subclass_spec_in_any=False``). The lr scan's builder without jsonargparse
(:mod:`lightning_spectral.experiments.build`) checks the same rule with the kind it needs.

Naming a module imports it, as Python's ``import`` does; nothing named is called before the
config is accepted.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

__all__ = ["ConfigObjectRefused", "check_named_object", "enforce_in_jsonargparse", "register_config_function"]

F = TypeVar("F", bound=Callable[..., Any])

_registered: dict[int, Any] = {}  # id -> the object (held, so that an id is never reused)


class ConfigObjectRefused(ImportError):
    """A config names a function or callable object that no code registered, or a class of another kind.

    An ``ImportError``, so that jsonargparse reports it as the error of the key that names it."""


def register_config_function(function: F) -> F:
    """Allow configs to name ``function`` (any callable that is not a class: a function, a
    ``functools.partial``, a callable object) wherever its key accepts a callable, e.g. an
    optimizer factory ``def my_muon(params) -> Optimizer`` named as ``optimizer: my_pkg.my_muon``.

    Usable as a decorator in the module that defines it: a config that names the function imports
    that module first, so the registration is in place before the check. Returns ``function``.
    """
    if inspect.isclass(function) or not callable(function):
        raise TypeError(f"register_config_function takes a function or callable object, got {function!r}: "
                        "classes need no registration")
    _registered[id(function)] = function
    return function


def _describe(obj: Any) -> str:
    if inspect.isbuiltin(obj):
        return "a built-in function"
    if inspect.isroutine(obj):
        return "a function"
    return f"an object of type {type(obj).__module__}.{type(obj).__qualname__}"


def check_named_object(path: str, obj: Any, kind: type | tuple[type, ...] | None = None) -> Any:
    """``obj`` (what the import path ``path`` of a config gives) if the rule of the module
    docstring allows it; ``kind``, when given, is the class (or classes) a class must derive from.

    Raises:
        ConfigObjectRefused: ``obj`` is neither a class (of ``kind``), a module, nor registered.
    """
    if inspect.isclass(obj):
        if kind is not None and not issubclass(obj, kind):
            kinds = " or ".join(f"{k.__module__}.{k.__qualname__}" for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ConfigObjectRefused(f"{path!r} is a class, but not a {kinds}: a config may name only a class of the "
                                      f"kind its key expects. Name a subclass of {kinds}.")
        return obj
    if inspect.ismodule(obj) or _registered.get(id(obj)) is obj:
        return obj
    raise ConfigObjectRefused(
        f"{path!r} is {_describe(obj)}, not a class. A config, a study file or a checkpoint may name any class of "
        "the kind its key expects (an Optimizer, an LRScheduler, an nn.Module, a LightningDataModule, a Callback, "
        "...), but a function or other callable only when code registered it, since calling it could run anything. "
        "Fix: name a class (with its arguments under init_args), or, if you trust this function, register it with "
        "lightning_spectral.register_config_function (as a decorator in the module that defines it, or called "
        "before the CLI parses)")


def enforce_in_jsonargparse() -> None:
    """Put the rule of the module docstring into jsonargparse (process-wide, idempotent): every
    import path a parsed value names goes through :func:`check_named_object`, and a subclass spec
    given for an ``Any`` parameter stays a dict."""
    import jsonargparse
    from jsonargparse import _typehints, set_parsing_settings

    # jsonargparse (4.53) has no public hook that can say this rule: its public
    # set_parsing_settings(import_path_denylist=..., import_path_allowlist=...) takes dotted-path
    # prefixes, which cannot allow any class of the expected kind from any module while refusing
    # functions that code did not register. So the private function through which jsonargparse's
    # type hints import every path a value names is wrapped; if a release renames it or changes its
    # signature, this fails here (and tests/test_config_policy.py) instead of parsing unchecked.
    imported = getattr(_typehints, "import_object", None)
    if getattr(imported, "checks_config_policy", False):
        return
    parameters = list(inspect.signature(imported).parameters) if callable(imported) else None
    if parameters != ["name", "check_path"]:
        raise RuntimeError(
            f"jsonargparse {getattr(jsonargparse, '__version__', '?')} has no jsonargparse._typehints."
            f"import_object(name, check_path) (found {parameters or imported!r}): lightning_spectral's config "
            "rule (lightning_spectral.config_policy) cannot be put into it, and configs would be parsed "
            "unchecked. Install the jsonargparse version the package pins (pip install 'jsonargparse>=4.52,<5'), "
            "or update config_policy.enforce_in_jsonargparse to this release.")

    def import_object(name: str, check_path: bool = True) -> Any:
        obj = imported(name, check_path)
        return check_named_object(name, obj) if check_path else obj  # check_path=False: a path from code

    import_object.checks_config_policy = True  # type: ignore[attr-defined]
    _typehints.import_object = import_object
    set_parsing_settings(instantiate_subclass_spec_in_any=False)
