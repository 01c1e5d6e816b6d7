"""Study specifications: loading ``configs/studies/*.yaml`` and expanding their grids into runs.

A study file (see ``configs/studies/README.md``)::

    name: baseline                 # results go to <out_dir>/<name> (out_dir default logs/studies)
    kind: train                    # "train": Lightning fit runs; "lr_scan": lr_stability_scan runs
    base: ../quickstart.yaml       # a complete LightningCLI run config (path relative to this file) or a dict
    set: {trainer.max_epochs: 10}  # dotted overrides applied to every run
    seeds: [0, 1, 2]
    grids:                         # the runs: the union of these cartesian products (× seeds)
      - optimizer:                 # an axis: a list of named variants ...
          - {name: SGD, set: {model.init_args.optimizer: {class_path: torch.optim.SGD, init_args: {lr: 0.05}}}}
        lr: {key: model.init_args.optimizer.init_args.lr, values: [0.01, 0.1]}   # ... or key + values
    diagnostics: {...}             # per-epoch callbacks (see DIAGNOSTIC_DEFAULTS)
    report: {...}                  # figures and tables (see experiments/report/)

A grid may also be ``{axes: {...}, seeds: [...]}`` to give it its own seeds. Without ``grids``
the study is one run of the base config per seed.

The file is checked before any run starts (:class:`StudySpecError`): unknown keys (with the
closest known one), missing ones, dotted keys that would replace a value of the base config
that is not a mapping, two different labels that give the same run id, an empty ``grids:``,
a seed listed twice, and names that could leave the output directory or break a script
(:func:`check_name`).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RUN_ID_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")
# A study name or run id becomes a directory, a file name prefix, a SLURM job name and a command-line
# argument: only these characters, and never a leading "." (hidden, "." and "..") or "-" (an option).
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._=+-]{0,199}")
NAME_RULE = ("at most 200 letters, digits and . _ = + -, starting with a letter, digit or _ (no path separators, "
             "no '..', no spaces or control characters, no leading '.' or '-')")
# The per-run diagnostics a study's `diagnostics:` may set (the runner adds their callbacks).
DIAGNOSTIC_DEFAULTS: dict[str, Any] = {
    "every_n_epochs": 1,  # measure once per epoch, at its end
    "spectral": True,  # SpectralNormMonitor (exact svd), max over layers and per layer
    "sharpness": True,  # SharpnessMonitor: top Hessian eigenvalue on the epoch's last batch
    "noise_scale": True,  # GradientNoiseScaleMonitor (split mode) on the epoch's last batch
    "noise_scale_ema": 0.5,
    "constraint": True,  # ConstraintMonitor (TensorBoard) for optimizers with constraint_report()
    "final_train_eval": False,  # loss and accuracy on the whole training set (eval mode) after fit
    "keep_checkpoints": False,
}
STUDY_KEYS = ("name", "description", "kind", "base", "set", "seeds", "grids", "diagnostics", "report", "scan")
GRID_KEYS = ("axes", "seeds")  # a grid with its own seeds: {axes: {...}, seeds: [...]}
AXIS_KEYS = ("key", "values")  # an axis given as one dotted key (or a list of keys) and its values
VARIANT_KEYS = ("name", "set", "value")  # one named variant of an axis
CLASS_SPEC_KEYS = ("class_path", "init_args", "dict_kwargs")


class StudySpecError(ValueError):
    """A study file that cannot mean what it says: unknown or missing keys, colliding run ids."""


def check_name(value: Any, field: str, hint: str = "") -> str:
    """``value`` if it is safe as a directory name, a file name prefix, a SLURM job name and a
    command-line argument (:data:`NAME_RULE`); else :class:`StudySpecError` naming ``field``, the
    value and the rule. The one check every name that reaches a path or a script goes through."""
    if isinstance(value, int) and not isinstance(value, bool):  # `name: 2024` in YAML
        value = str(value)
    if not isinstance(value, str) or NAME.fullmatch(value) is None or ".." in value:
        raise StudySpecError(f"{field} {value!r} is not a safe name: it becomes a directory, a file name and part "
                             f"of generated scripts, so it may hold {NAME_RULE}" + (f"; {hint}" if hint else ""))
    return value


def check_label(value: Any, field: str) -> str:
    """``str(value)`` if it holds no control or format character (a newline, a tab, a bidirectional
    override, ...); labels reach run ids only through :data:`RUN_ID_SAFE`, but they are printed
    in tables, TensorBoard tags and logs as they are."""
    text = str(value)
    bad = next((c for c in text if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")),
               None)
    if bad is not None or not text.strip():
        what = f"the character {bad!r}" if bad is not None else "no visible character"
        raise StudySpecError(f"{field} {text!r} has {what}; a label is one line of visible text")
    return text


def check_keys(mapping: dict[str, Any], allowed: tuple[str, ...] | dict[str, Any], where: str,
               required: tuple[str, ...] = ()) -> None:
    """Raise :class:`StudySpecError` for a key of ``mapping`` not in ``allowed`` (naming the
    closest allowed key) or a ``required`` key missing."""
    allowed = tuple(allowed)
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise StudySpecError(f"{where}: unknown key {key!r}; {hint}the keys are {', '.join(allowed)}")
    missing = [k for k in required if k not in mapping]
    if missing:
        raise StudySpecError(f"{where}: missing key {missing[0]!r} (needs {', '.join(required)})")


@dataclass
class Run:
    """One run of a study: its id, the variant chosen on each axis, the seed and the full config."""

    run_id: str
    axes: dict[str, str]
    values: dict[str, Any]
    seed: int
    config: dict[str, Any]

    @property
    def group(self) -> str:
        """The run's series: its variants without the seed."""
        return ", ".join(f"{k}={v}" for k, v in self.axes.items()) or "all"


@dataclass
class Study:
    name: str
    kind: str
    path: Path | None
    base: dict[str, Any]
    seeds: list[int]
    grids: list[dict[str, Any]]
    diagnostics: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    scan: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """``config[a][b][c] = value`` for ``key = "a.b.c"``. A dict value is merged into an existing
    dict, except that a dict naming a ``class_path`` replaces the old value whole (a complete
    class spec: none of the base's ``init_args`` leak into it)."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    last = parts[-1]
    old = node.get(last)
    if isinstance(value, dict) and isinstance(old, dict) and "class_path" not in value:
        merged = copy.deepcopy(old)
        for k, v in value.items():
            set_dotted(merged, k, copy.deepcopy(v))
        node[last] = merged
    else:
        node[last] = copy.deepcopy(value)


def check_dotted(config: dict[str, Any], key: str, where: str) -> None:
    """Raise :class:`StudySpecError` if ``set_dotted(config, key, ...)`` would not do what ``key``
    says: replace a value that is not a mapping (a class name string, a number) by a dict of the
    remaining parts, create a misspelt branch beside a close existing one, or put an argument
    beside ``class_path`` instead of under ``init_args``."""
    node: Any = config
    parts = str(key).split(".")
    for depth, part in enumerate(parts):
        here = ".".join(parts[:depth]) or "the config"
        if "class_path" in node and part not in CLASS_SPEC_KEYS:
            raise StudySpecError(f"{where}: {key!r} puts {part!r} beside class_path in {here}; arguments of a class "
                                 f"go under init_args: {'.'.join([*parts[:depth], 'init_args', *parts[depth:]])!r}")
        if depth == len(parts) - 1:
            return
        if part not in node:
            close = difflib.get_close_matches(part, [str(k) for k in node], n=1, cutoff=0.8)
            if close:
                raise StudySpecError(f"{where}: {key!r}: {here} has no {part!r}; did you mean {close[0]!r}?")
            return  # a new branch: nothing to check below it
        if not isinstance(node[part], dict):
            if node[part] is None:
                return
            raise StudySpecError(
                f"{where}: {key!r} goes inside {'.'.join(parts[:depth + 1])!r}, which is {node[part]!r}, not a "
                f"mapping; set it whole (e.g. {{class_path: ..., init_args: {{...}}}})")
        node = node[part]


def apply_sets(config: dict[str, Any], sets: dict[str, Any] | None, where: str = "set") -> dict[str, Any]:
    """Apply dotted overrides in order, each checked by :func:`check_dotted` first."""
    if sets is not None and not isinstance(sets, dict):
        raise StudySpecError(f"{where}: expected a mapping of dotted keys to values, got {type(sets).__name__}")
    for key, value in (sets or {}).items():
        check_dotted(config, key, where)
        set_dotted(config, key, value)
    return config


def get_dotted(config: dict[str, Any], key: str, default: Any = None) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _format_value(value: Any) -> str:
    """A label for an axis value: ``%g`` when that reads back as the same number, else every digit."""
    if isinstance(value, float):
        short = f"{value:g}"
        return short if float(short) == value else repr(value)
    return str(value)


def axis_variants(axis: str, spec: Any) -> list[dict[str, Any]]:
    """Normalise an axis to ``[{"name", "set", "value"}]``, checking its keys and that no two of
    its labels are the same."""
    where = f"axis {axis!r}"
    check_label(axis, "the axis name")
    if isinstance(spec, dict):
        check_keys(spec, AXIS_KEYS, where, required=AXIS_KEYS)
        keys = spec["key"] if isinstance(spec["key"], list) else [spec["key"]]
        if not isinstance(spec["values"], list) or not spec["values"]:
            raise StudySpecError(f"{where}: 'values' must be a non-empty list, got {spec['values']!r}")
        out = [{"name": _format_value(v), "value": v, "set": {k: v for k in keys}} for v in spec["values"]]
    elif isinstance(spec, list) and spec:
        out = []
        for variant in spec:
            if not isinstance(variant, dict):
                raise StudySpecError(f"{where}: every variant is a mapping with a 'name', got {variant!r}")
            check_keys(variant, VARIANT_KEYS, f"{where}, variant {variant.get('name', len(out))!r}",
                       required=("name",))
            out.append({"name": str(variant["name"]), "value": variant.get("value", variant["name"]),
                        "set": variant.get("set") or {}})
    else:
        raise StudySpecError(f"{where}: expected a non-empty list of variants or {{key: ..., values: [...]}}, "
                             f"got {spec!r}")
    labels: dict[str, str] = {}
    for variant in out:
        check_label(variant["name"], f"{where}: the label")
        safe = RUN_ID_SAFE.sub("-", variant["name"])
        if safe in labels:
            same = "twice" if labels[safe] == variant["name"] else f"and {labels[safe]!r} give the same run id {safe!r}"
            raise StudySpecError(f"{where}: the labels {variant['name']!r} {same}; make them distinct "
                                 f"(letters, digits and . _ = + - are kept in run ids)")
        labels[safe] = variant["name"]
    return out


def _seeds(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in value):
        raise StudySpecError(f"{where}: seeds must be a non-empty list of integers, got {value!r}")
    repeated = sorted({s for s in value if value.count(s) > 1})
    if repeated:
        raise StudySpecError(f"{where}: seeds {value!r} list {', '.join(map(str, repeated))} more than once; each "
                             "seed is one run, so a repeated seed would silently run once: list each seed once")
    return list(value)


def _load_base(path: Path, base: Any) -> dict[str, Any]:
    if isinstance(base, str):
        candidates = [Path(base)] if Path(base).is_absolute() else [path.parent / base, Path(base)]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise StudySpecError(f"{path}: base {base!r} not found (looked for "
                                 f"{' and '.join(str(c) for c in candidates)}); it is relative to the study file")
        base = yaml.safe_load(found.read_text())
    if not isinstance(base, dict):
        raise StudySpecError(f"{path}: base must be a run config (a mapping or the path of a YAML file), got {base!r}")
    return copy.deepcopy(base)


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    """Read and check a study file (see the module docstring); ``overrides`` are dotted keys
    applied to the study file itself (``{"seeds": [0], "set.trainer.max_epochs": 2}``), merged
    like ``set_dotted``. Every run is expanded once here, so that a bad grid fails before any run."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise StudySpecError(f"{path}: a study file must be a mapping")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    check_keys(raw, STUDY_KEYS, str(path), required=("base",))
    base = apply_sets(_load_base(path, raw["base"]), raw.get("set"), f"{path}: set")
    kind = raw.get("kind", "train")
    if kind not in ("train", "lr_scan"):
        raise StudySpecError(f"{path}: kind must be 'train' or 'lr_scan', got {kind!r}")
    grids = raw.get("grids", [{}])
    if grids is None or grids == []:
        raise StudySpecError(f"{path}: grids is empty, so the study has no runs; give at least one grid (axis name: "
                             "variants), or leave grids out for one run of the base config per seed")
    if not isinstance(grids, list) or not all(isinstance(g, dict) for g in grids):
        raise StudySpecError(f"{path}: grids must be a list of mappings (axis name: variants), got {grids!r}")
    for i, grid in enumerate(grids):
        if "axes" in grid:
            check_keys(grid, GRID_KEYS, f"{path}: grid {i}")
        elif "seeds" in grid:
            raise StudySpecError(f"{path}: grid {i} has 'seeds' but no 'axes'; a grid with its own seeds is "
                                 "{axes: {<axis>: ...}, seeds: [...]}")
    for key in ("diagnostics", "report", "scan", "set"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise StudySpecError(f"{path}: {key} must be a mapping, got {raw[key]!r}")
    check_keys(raw.get("diagnostics") or {}, DIAGNOSTIC_DEFAULTS, f"{path}: diagnostics")
    name = check_name(raw.get("name", path.stem), f"{path}: the study name",
                      "" if "name" in raw else "it is the file's stem: give the study a name: in the file")
    study = Study(
        name=name, kind=kind, path=path, base=base,
        seeds=_seeds(raw.get("seeds", [0]), str(path)), grids=grids, diagnostics=raw.get("diagnostics") or {},
        report=raw.get("report") or {}, scan=raw.get("scan") or {}, description=raw.get("description", ""), raw=raw,
    )
    expand(study)  # label collisions are errors before any run starts
    return study


def expand(study: Study) -> list[Run]:
    """All runs of the study, in order: grid by grid, the cartesian product of its axes, then seeds.
    A run's overrides apply shallow keys before deeper ones (``model.init_args.optimizer`` before
    ``model.init_args.optimizer.init_args.lr``), whatever the order of the axes.

    The same labels in two grids with the same config are the same run, kept once; the same labels
    with another config, or two different labels that give the same run id, raise (one of them
    would silently not run)."""
    runs: list[Run] = []
    seen: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}
    for g, grid in enumerate(study.grids):
        if "axes" in grid:
            axes, seeds = grid["axes"], _seeds(grid.get("seeds", study.seeds), f"grid {g}")
        else:
            axes, seeds = grid, study.seeds
        if not isinstance(axes, dict):
            raise StudySpecError(f"grid {g}: axes must be a mapping of axis names to variants, got {axes!r}")
        names = list(axes)
        variants = [axis_variants(a, axes[a]) for a in names]
        for combo in itertools.product(*variants):
            for seed in seeds:
                parts = [f"{a}={v['name']}" for a, v in zip(names, combo)] + [f"seed={seed}"]
                run_id = check_name(RUN_ID_SAFE.sub("-", "__".join(parts)), f"grid {g}: the run id",
                                    "it is made from the axis names, labels and seed: rename the first axis")
                config = copy.deepcopy(study.base)
                # Shallow keys first, whatever the order of the axes: a variant that sets the whole
                # optimizer must not erase the learning rate another axis sets inside it.
                sets = [(k.count("."), i, k, value, f"grid {g}, axis {a!r}, variant {v['name']!r}")
                        for i, (a, v) in enumerate(zip(names, combo)) for k, value in v["set"].items()]
                for _, _, key, value, where in sorted(sets, key=lambda item: item[:2]):
                    apply_sets(config, {key: value}, where)
                config["seed_everything"] = seed
                if run_id in seen:
                    labels, first = seen[run_id]
                    if labels != tuple(parts):
                        raise StudySpecError(f"grid {g}: the runs {' '.join(labels)!r} and {' '.join(parts)!r} get "
                                             f"the same run id {run_id!r}; make their labels distinct")
                    if first != config:
                        raise StudySpecError(f"grid {g}: run {run_id} is also in an earlier grid, with another "
                                             "config; only one could run: give the variants distinct names")
                    continue
                seen[run_id] = (tuple(parts), config)
                runs.append(Run(run_id, {a: v["name"] for a, v in zip(names, combo)},
                                {a: v["value"] for a, v in zip(names, combo)}, seed, config))
    return runs


def config_hash(obj: Any) -> str:
    """A short content hash of a JSON-able object (key order ignored)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
