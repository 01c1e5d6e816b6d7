"""``python -m lightning_spectral fit|validate|test|predict --config FILE`` (also ``lightning-spectral``)."""

from __future__ import annotations

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


def cli_main(args: ArgsType = None) -> SpectralCLI:
    """Run the CLI on ``args`` (default: ``sys.argv``); a missing dataset ends it with a one-line error."""
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
