"""``python -m lightning_spectral fit|validate|test|predict --config FILE`` (also ``lightning-spectral``).

``python -m lightning_spectral study --config configs/studies/<name>.yaml`` runs a study (a grid of
such fits; see :mod:`lightning_spectral.experiments.cli`): a study is not a Trainer method, so it
is dispatched here, before LightningCLI parses the Trainer subcommands; each of its runs is an
ordinary ``fit`` built by :func:`~lightning_spectral.spectral_cli.build_cli`.
``python -m lightning_spectral configs`` lists the configs shipped with the package;
``--config quickstart`` finds one by name from any directory.
"""

from __future__ import annotations

import sys

try:
    import lightning  # noqa: F401
except ImportError as err:  # an optimizer-only install: `pip install lightning_spectral`
    raise SystemExit(
        f"error: the training CLI needs the [train] extra ({err}); install it with "
        "pip install 'lightning_spectral[train]'. The optimizers and diagnostics "
        "(lightning_spectral.optim, lightning_spectral.diagnostics) work without it."
    ) from None

from lightning.pytorch.cli import ArgsType
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_spectral.config_files import print_configs
from lightning_spectral.data import DatasetUnavailableError
from lightning_spectral.launch import MainPortInUseError
from lightning_spectral.signals import exit_code
from lightning_spectral.spectral_cli import SpectralCLI, build_cli, resolve_configs

__all__ = ["SpectralCLI", "build_cli", "cli_main"]


def cli_main(args: ArgsType = None) -> SpectralCLI | None:
    """Run the CLI on ``args`` (default: ``sys.argv[1:]``); a missing dataset or a busy ``MASTER_PORT`` ends it
    with a one-line error, SIGTERM (Lightning stops at the next batch) with status 143, so schedulers
    see an interrupted run.

    ``study ...`` goes to :func:`lightning_spectral.experiments.cli.study_main` (on the command
    line its status is the exit status: 1 when a run failed, 2 for a bad study file) and
    ``configs`` lists the shipped configs; both return ``None``.
    """
    argv = sys.argv[1:] if args is None else args
    command = argv[0] if isinstance(argv, (list, tuple)) and argv else None
    try:
        if command == "configs":
            print_configs()
            return None
        if command == "study":
            from lightning_spectral.experiments.cli import study_main

            code = study_main(resolve_configs(argv[1:]))
            if args is None and code:
                raise SystemExit(code)
            return None
        return build_cli(argv)
    except (DatasetUnavailableError, MainPortInUseError) as err:
        raise SystemExit(f"error: {err}") from None
    except SIGTERMException as err:
        raise SystemExit(exit_code(err)) from None
