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
    diagnostics: {...}             # per-epoch callbacks (see runner.DIAGNOSTIC_DEFAULTS)
    report: {...}                  # figures and tables (see report.py)

A grid may also be ``{axes: {...}, seeds: [...]}`` to give it its own seeds.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RUN_ID_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


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


def apply_sets(config: dict[str, Any], sets: dict[str, Any] | None) -> dict[str, Any]:
    for key, value in (sets or {}).items():
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
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def axis_variants(axis: str, spec: Any) -> list[dict[str, Any]]:
    """Normalise an axis to ``[{"name", "set", "value"}]``."""
    if isinstance(spec, dict) and "values" in spec:
        keys = spec["key"] if isinstance(spec.get("key"), list) else [spec["key"]]
        return [
            {"name": _format_value(v), "value": v, "set": {k: v for k in keys}}
            for v in spec["values"]
        ]
    if not isinstance(spec, list):
        raise ValueError(f"axis {axis!r}: expected a list of variants or {{key, values}}, got {type(spec).__name__}")
    out = []
    for variant in spec:
        if not isinstance(variant, dict) or "name" not in variant:
            raise ValueError(f"axis {axis!r}: every variant needs a 'name', got {variant!r}")
        out.append({"name": str(variant["name"]), "value": variant.get("value", variant["name"]),
                    "set": variant.get("set", {})})
    return out


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    """Read a study file; ``overrides`` are dotted keys applied to the study file itself
    (``{"seeds": [0], "set": {"trainer.max_epochs": 2}}`` style, merged like ``set_dotted``)."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a study file must be a mapping")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    base = raw.get("base", {})
    if isinstance(base, str):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.exists():
            base_path = Path(base)
        base = yaml.safe_load(base_path.read_text())
    base = apply_sets(copy.deepcopy(base), raw.get("set"))
    kind = raw.get("kind", "train")
    if kind not in ("train", "lr_scan"):
        raise ValueError(f"{path}: kind must be 'train' or 'lr_scan', got {kind!r}")
    grids = raw.get("grids") or [{}]
    return Study(
        name=raw.get("name", path.stem), kind=kind, path=path, base=base, seeds=[int(s) for s in raw.get("seeds", [0])],
        grids=grids, diagnostics=raw.get("diagnostics", {}) or {}, report=raw.get("report", {}) or {},
        scan=raw.get("scan", {}) or {}, description=raw.get("description", ""), raw=raw,
    )


def expand(study: Study) -> list[Run]:
    """All runs of the study, in order: grid by grid, the cartesian product of its axes, then seeds.
    Duplicate run ids (the same variants in two grids) are kept once."""
    runs: list[Run] = []
    seen: set[str] = set()
    for grid in study.grids:
        if "axes" in grid:
            axes, seeds = grid["axes"], [int(s) for s in grid.get("seeds", study.seeds)]
        else:
            axes, seeds = grid, study.seeds
        names = list(axes)
        variants = [axis_variants(a, axes[a]) for a in names]
        for combo in itertools.product(*variants):
            for seed in seeds:
                parts = [f"{a}={v['name']}" for a, v in zip(names, combo)] + [f"seed={seed}"]
                run_id = RUN_ID_SAFE.sub("-", "__".join(parts))
                if run_id in seen:
                    continue
                seen.add(run_id)
                config = copy.deepcopy(study.base)
                for v in combo:
                    apply_sets(config, v["set"])
                config["seed_everything"] = seed
                runs.append(Run(run_id, {a: v["name"] for a, v in zip(names, combo)},
                                {a: v["value"] for a, v in zip(names, combo)}, seed, config))
    return runs


def config_hash(obj: Any) -> str:
    """A short content hash of a JSON-able object (key order ignored)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
