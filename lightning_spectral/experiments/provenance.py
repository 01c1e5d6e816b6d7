"""Where a result came from: the commit, whether the tree was dirty, the versions and the command.

:func:`provenance` is recorded in every run's ``result.json`` and on every report page (a
``<!-- provenance: {...} -->`` line that :func:`read_page_provenance` reads back);
:func:`changed_since` lists the files that changed since a recorded commit, which is how
``study --check`` tells a stale page from a current one. Git is asked through ``subprocess``;
without git, or outside a checkout (an installed wheel), the commit is ``None``.
"""

from __future__ import annotations

import json
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGE_MARK = "<!-- provenance: "
_PAGE_LINE = re.compile(r"^<!-- provenance: (\{.*\}) -->$", re.MULTILINE)


def git(*args: str, cwd: str | Path = REPO_ROOT) -> str | None:
    """``git <args>`` in ``cwd``; its stripped stdout, or ``None`` when git is missing or fails."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def in_checkout() -> bool:
    """Whether the package runs from its own git checkout (not an installed copy that merely sits
    inside some other repository, such as a virtual environment in a project folder)."""
    top = git("rev-parse", "--show-toplevel")
    return top is not None and Path(top).resolve() == REPO_ROOT


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def provenance(command: str | Sequence[str] | None = None) -> dict[str, Any]:
    """``commit`` (``None`` outside a git checkout), ``dirty`` (files differ from the commit or
    are not yet in git, ignored ones aside; ``None`` when unknown), the versions of the package, torch, lightning and Python,
    the ``command`` (default: this process's ``sys.argv``) and the UTC time."""
    commit = git("rev-parse", "HEAD") if in_checkout() else None
    status = git("status", "--porcelain") if commit else None  # untracked files count: a new module changes runs
    if command is None:
        argv = list(sys.argv)
        if argv and Path(argv[0]).name == "__main__.py":  # python -m <package>
            argv[:1] = ["-m", Path(argv[0]).parent.name]
        command = ["python", *argv]
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "lightning_spectral": _version("lightning_spectral"),
        "torch": _version("torch"),
        "lightning": _version("lightning"),
        "python": platform.python_version(),
        "command": command if isinstance(command, str) else shlex.join(command),
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def page_line(record: dict[str, Any]) -> str:
    """The one-line HTML comment a report page carries (invisible when rendered)."""
    return PAGE_MARK + json.dumps(record, sort_keys=True, default=str) + " -->"


def read_page_provenance(text: str) -> dict[str, Any] | None:
    """The record :func:`page_line` wrote into a page, or ``None`` for a page without one."""
    match = _PAGE_LINE.search(text)
    return json.loads(match.group(1)) if match else None


def changed_since(commit: str, paths: Sequence[str | Path]) -> list[str] | None:
    """The files under ``paths`` that differ between ``commit`` and the working tree (committed
    or not, and new files git does not ignore), relative to the repository root; ``None`` when
    git cannot tell (no git, not the package's checkout, or an unknown commit)."""
    if not in_checkout() or git("cat-file", "-e", f"{commit}^{{commit}}") is None:
        return None
    paths = [str(p) for p in paths]
    changed = git("diff", "--name-only", commit, "--", *paths)
    new = git("ls-files", "--others", "--exclude-standard", "--", *paths)
    if changed is None or new is None:
        return None
    return sorted({line for line in (changed + "\n" + new).splitlines() if line})
