"""The run configs that ship inside the package, found by name from any directory.

The repository's ``configs/`` folder is installed as ``lightning_spectral/configs`` (package data),
so after ``pip install lightning_spectral[train]`` these all work from an empty directory::

    lightning-spectral configs                       # list them
    lightning-spectral fit --config quickstart       # a bare name
    lightning-spectral fit --config configs/quickstart.yaml --config optim/muon

A ``--config`` value is used as given when that file exists (relative to the working directory,
as LightningCLI reads it); otherwise it is looked up among the shipped configs, with or without
the ``configs/`` prefix and the ``.yaml`` suffix. A name found in neither place is an error that
lists the shipped names; inline YAML (``--config '{trainer: {max_epochs: 1}}'``) passes untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_FLAGS = ("--config", "-c")


def list_configs() -> list[str]:
    """Names of the shipped configs (``quickstart``, ``optim/muon``, ``studies/digits/baseline``, ...)."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(str(p.relative_to(CONFIG_DIR).with_suffix("")) for p in CONFIG_DIR.rglob("*.yaml"))


def find_config(value: str) -> Optional[Path]:
    """The shipped config that ``value`` names, or ``None`` (see the module docstring)."""
    name = value[len("configs/"):] if value.startswith("configs/") else value
    for candidate in (name, f"{name}.yaml"):
        path = CONFIG_DIR / candidate
        if path.is_file():
            return path
    return None


def resolve_config(value: str) -> str:
    """``value`` itself if that file exists, else the shipped config it names.

    Raises:
        FileNotFoundError: neither exists; the message lists the shipped configs.
    """
    if Path(value).exists() or not _looks_like_path(value):
        return value  # an existing file, or inline YAML/JSON (which LightningCLI also accepts)
    found = find_config(value)
    if found is not None:
        return str(found)
    names = list_configs()
    raise FileNotFoundError(
        f"config {value!r} is neither a file (relative to {Path.cwd()}) nor a config shipped with the package. "
        f"Shipped configs ({len(names)}; `lightning-spectral configs` lists them): "
        + (", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none found")
    )


def _looks_like_path(value: str) -> bool:
    return not any(c in value for c in "{}[]:\n ") and value != ""


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--config X`` / ``--config=X`` / ``-c X`` value passed through
    :func:`resolve_config` (other arguments untouched)."""
    out: list[str] = []
    expect_value = False
    for arg in argv:
        if expect_value:
            out.append(resolve_config(arg))
            expect_value = False
            continue
        flag, sep, value = arg.partition("=")
        if flag in _FLAGS and sep:
            out.append(f"{flag}={resolve_config(value)}")
        else:
            expect_value = arg in _FLAGS
            out.append(arg)
    return out


def print_configs() -> None:
    """``lightning-spectral configs``: the shipped configs, one per line, with their first comment line."""
    for name in list_configs():
        first = ""
        with open(CONFIG_DIR / f"{name}.yaml", encoding="utf-8") as handle:
            line = handle.readline().strip()
            if line.startswith("#"):
                first = line.lstrip("# ")
        print(f"{name:48s} {first}".rstrip())
