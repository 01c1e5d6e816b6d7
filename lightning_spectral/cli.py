"""``python -m lightning_spectral fit|validate|test|predict --config FILE`` (also ``lightning-spectral``).

``python -m lightning_spectral study --config configs/studies/<name>.yaml`` runs a study (a grid of
such fits; see :mod:`lightning_spectral.experiments.cli`). A study is not a Trainer method, so it
is dispatched here, before LightningCLI parses the Trainer subcommands; each of its runs is an
ordinary ``fit`` of :class:`SpectralCLI` with its own config file and TensorBoard log.
"""

from __future__ import annotations

import sys

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

# Imported so that short class names (``SmallCNN``, ``MuonSGD``, ``SpectralNormMonitor``) resolve.
import lightning_spectral.callbacks  # noqa: F401
import lightning_spectral.models  # noqa: F401
import lightning_spectral.optim  # noqa: F401
from lightning_spectral.data import DatasetUnavailableError, ImageDataModule
from lightning_spectral.module import SpectralModule


class SpectralCLI(LightningCLI):
    """LightningCLI whose data module fills in the model's input shape and class count."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        for attribute in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(
                f"data.{attribute}", f"model.init_args.net.init_args.{attribute}", apply_on="instantiate"
            )


def cli_main(args: ArgsType = None) -> SpectralCLI | None:
    """Run the CLI on ``args`` (default: ``sys.argv``); a missing dataset ends it with a one-line error.

    ``study ...`` goes to :func:`lightning_spectral.experiments.cli.study_main` (returns ``None``).
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and argv and argv[0] == "study":
        from lightning_spectral.experiments.cli import study_main

        try:
            code = study_main(list(argv[1:]))
        except DatasetUnavailableError as err:
            raise SystemExit(f"error: {err}") from None
        if args is None and code:
            raise SystemExit(code)
        return None
    try:
        return SpectralCLI(
            SpectralModule,
            ImageDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            trainer_defaults={"default_root_dir": "logs"},
            args=args,
        )
    except DatasetUnavailableError as err:
        raise SystemExit(f"error: {err}") from None
