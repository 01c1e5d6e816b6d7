"""jsonargparse's parse errors, shortened to the lines that say what is wrong, with a "did you mean".

jsonargparse reports a bad value under a ``Union`` (``Optional[X]`` is one: every model, data
module, optimizer and scheduler of the CLI is) as a tree: the key, each alternative type, their
errors nested under the class paths tried, the given value's type and value. Of its 5 to 15 lines
one or two say what is wrong. :func:`shorten` keeps those, each prefixed by the key it concerns
(``model.optimizer.lrr``), and adds the closest valid names (:func:`difflib.get_close_matches`):

- an argument a class does not take (``Option 'lrr' is not accepted``, ``unrecognized arguments``):
  the class's arguments, read by jsonargparse itself (:meth:`ArgumentParser.add_class_arguments`);
- a class name that imports nothing (``Expected a dot import path string: Muonn``): the classes the
  key's type accepts (jsonargparse's own list of the subclasses it resolves short names among);
- an unknown top-level option (``--trainr.max_epochs``): the parser's options.

A message it cannot read is returned with only the ``Union`` bookkeeping lines removed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import typing
from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["shorten", "suggest"]

_KEY = re.compile(r'Parser key "([^"]+)":')
_CLASS = re.compile(r"Problem with given class_path '([^']+)':")
_GOT_CLASS = re.compile(r"Got value: Namespace\(class_path='([^']+)'")
_CALLABLE = re.compile(r"^Type .* expects a function or a callable class: ")
_UNKNOWN_OPTION = re.compile(r"Option '([^']+)' is not accepted|unrecognized arguments: --([^\s=]+)")
_UNKNOWN_CLASS = re.compile(r"Expected a dot import path string: (\S+)")
_NOISE = re.compile(
    r"^(- )?(Does not validate against any of the Union subtypes|Subtypes: .*|Errors:|Given value type: .*"
    r"|Expected a <class 'NoneType'>|Expected a path but .* either not accessible or invalid)$")
_GIVEN = re.compile(r"^Given value: (.*)$")


@dataclass
class _Frame:
    indent: int
    key: Optional[str] = None
    cls: Optional[str] = None


def suggest(name: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    """The (up to ``n``) ``candidates`` closest to ``name``, best first; for dotted candidates
    (class paths) the last component is compared, so ``Muonn`` finds ``lightning_spectral.optim.Muon``;
    of classes with the same name the package's come first, then the shortest paths."""
    short = name.rpartition(".")[2]
    by_short: dict[str, list[str]] = {}
    package_first = sorted(candidates, key=lambda c: (not c.startswith(f"{__package__}."), c.count(".")))
    for candidate in package_first:
        by_short.setdefault(candidate.rpartition(".")[2] if "." in candidate and "." not in name else candidate,
                            []).append(candidate)
    close = difflib.get_close_matches(short if "." not in name else name, list(by_short), n=n, cutoff=0.6)
    return [path for match in close for path in by_short[match]][:n]


def did_you_mean(name: str, candidates: Sequence[str]) -> str:
    close = suggest(name, candidates)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - a name that does not import has no arguments to offer
        return None


def _class_arguments(class_path: str) -> list[str]:
    """The argument names jsonargparse accepts for ``class_path``'s constructor."""
    from jsonargparse import ArgumentParser

    cls = _import(class_path)
    if cls is None:
        return []
    parser = ArgumentParser(exit_on_error=False)
    try:
        parser.add_class_arguments(cls, fail_untyped=False, sub_configs=True)
    except Exception:  # noqa: BLE001 - fall back to the bare signature
        return [p for p in inspect.signature(cls).parameters if p not in ("self", "params")]
    names = [a.dest for a in parser._actions if "." not in a.dest]
    return [n for n in dict.fromkeys(names) if n not in ("help", "config", "params") and not n.startswith("_")]


def _key_hint(key: str, owner: Optional[str], parser: Any) -> Any:
    """The type hint of ``key``: an argument of the class ``owner``, else an option of ``parser``."""
    if owner is not None:
        cls = _import(owner)
        try:
            return typing.get_type_hints(cls.__init__ if inspect.isclass(cls) else cls).get(key)
        except Exception:  # noqa: BLE001 - unresolvable annotations: no suggestion
            return None
    action = getattr(parser, "_option_string_actions", {}).get(f"--{key}")
    return getattr(action, "_typehint", None)


def _classes_for(hint: Any) -> list[str]:
    from jsonargparse._typehints import get_all_subclass_paths

    if hint is None:
        return []
    try:
        return get_all_subclass_paths(hint)
    except Exception:  # noqa: BLE001 - a hint jsonargparse takes no class for
        return []


def _explain(leaf: str, keys: list[str], owner: Optional[str], parser: Any) -> str:
    where = ".".join(keys)
    option = _UNKNOWN_OPTION.search(leaf)
    if option:
        name = option.group(1) or option.group(2)
        if owner is not None:
            name = name.split(".")[0]  # optimzer.lr: the argument is optimzer
            valid = _class_arguments(owner)
            text = f"{where + ': ' if where else ''}{owner} takes no argument {name!r}{did_you_mean(name, valid)}"
            return f"{text.rstrip('?')}{'?' if text.endswith('?') else '.'} Its arguments: {', '.join(valid)}." \
                if valid else text
        options = [o[2:] for o in getattr(parser, "_option_string_actions", {}) if o.startswith("--")]
        return f"unknown option --{name}{did_you_mean(name, options)}"
    missing = _UNKNOWN_CLASS.search(leaf)
    if missing and keys:
        name = missing.group(1)
        classes = _classes_for(_key_hint(keys[-1], owner, parser))
        return f"{where}: {name!r} imports no class{did_you_mean(name, classes)}"
    return f"{where}: {leaf}" if where else leaf


def shorten(message: str, parser: Any = None) -> str:
    """``message`` (a jsonargparse error) as the lines that say what is wrong (see the module docstring);
    ``parser`` (the one raising) gives the top-level options and their types. A message of another
    form than jsonargparse's comes back unchanged."""
    try:
        return _shorten(message, parser)
    except Exception:  # noqa: BLE001 - the error being reported matters more than its shortening
        return message


def _shorten(message: str, parser: Any) -> str:
    stack: list[_Frame] = []
    leaves: list[str] = []
    given: Optional[str] = None
    lines = message.splitlines()
    for raw in lines:
        text = raw.strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip())
        while stack and stack[-1].indent >= indent:
            stack.pop()
        text = _CALLABLE.sub("", text.lstrip("- ").strip())
        key, cls = _KEY.match(text), _CLASS.match(text)
        if key:
            stack.append(_Frame(indent, key=key.group(1)))
            text = text[key.end():].strip()
            if not text:
                continue
            indent += 1  # an inline error under the key just read
        if cls:
            stack.append(_Frame(indent, cls=cls.group(1)))
            continue
        value = _GIVEN.match(text)
        if value:
            given = given or value.group(1)
            continue
        if _NOISE.match(text):
            continue
        got_class = _GOT_CLASS.search(text)
        text = re.sub(r"\. Got value: Namespace\(.*$", ".", text)
        keys = [f.key for f in stack if f.key]
        owners = [f.cls for f in stack if f.cls]
        owner = got_class.group(1) if got_class else (owners[-1] if owners else None)
        leaves.append(_explain(text, keys, owner, parser))
    if not leaves:  # only bookkeeping: nothing to shorten to
        return message
    if given is not None and not given.startswith(("NestedArg(", "{", "Namespace(")) \
            and all("Got value" not in leaf and repr(given) not in leaf for leaf in leaves):
        leaves = [f"{leaf} (given: {given})" for leaf in leaves]
    return "\n".join(dict.fromkeys(leaves))
