"""The package's LightningCLI, assembled in one place: :func:`build_cli` serves the command line
(:func:`lightning_spectral.cli.cli_main`) and every run of a study alike.

The model is any ``LightningModule`` (default :class:`~lightning_spectral.module.SpectralModule`),
the data any ``LightningDataModule``. Before the model is built, the data module sizes it: the
arguments of the model and of its ``net`` named in
:data:`~lightning_spectral.data.DATA_ATTRIBUTES` (``num_classes``, ``input_shape``,
``in_channels``, ``image_size``, ...) are filled by :func:`~lightning_spectral.data.data_arguments`,
so a config never states them.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence

import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from torch import nn
from torch.optim import Optimizer

# Imported so that short class names (``SmallCNN``, ``MuonSGD``, ``SpectralNormMonitor``) resolve.
import lightning_spectral.callbacks  # noqa: F401
import lightning_spectral.models  # noqa: F401
import lightning_spectral.optim  # noqa: F401
from lightning_spectral.callbacks import PredictionWriter
from lightning_spectral.callbacks.hparams import HParamsSummary, flat_hparams
from lightning_spectral.checkpoint import load_checkpoint_safely
from lightning_spectral.config_files import resolve_config_args
from lightning_spectral.data import DataDescription, DataShapeError, data_arguments
from lightning_spectral.launch import ReapLaunchedRanks, check_main_port
from lightning_spectral.models import MODEL_REGISTRY
from lightning_spectral.module import ManualOptimizationModule, SpectralModule
from lightning_spectral.parser_errors import shorten
from lightning_spectral.resume import optimizer_mismatch, same_class

DEFAULT_MODEL = f"{SpectralModule.__module__}.{SpectralModule.__qualname__}"
_CONFIG_FLAGS = ("--config", "-c")


class SpectralArgumentParser(LightningArgumentParser):
    """A parser whose error for an unknown network lists the networks there are, and whose
    ``--print_config`` shows the model sized by what the data module declares.

    Long options are never abbreviated (``allow_abbrev=False``): argparse would take
    ``--trainer.max_epoc`` for ``--trainer.max_epochs`` silently, and a prefix that is unique today
    would change meaning when Lightning adds an option; the error names the option meant."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def _printing(self) -> bool:
        """Whether this dump answers ``--print_config`` (jsonargparse keeps the request on the
        parser that received it, this one or the main parser above a subcommand's)."""
        parser: Any = self
        while parser is not None:
            if isinstance(getattr(parser, "print_config", None), dict):
                return True
            parser = getattr(parser, "parent_parser", None)
        return False

    def dump(self, cfg: Namespace, *args: Any, **kwargs: Any) -> str:
        if isinstance(cfg, Namespace) and cfg.get("data") and cfg.get("model") and self._printing():
            cfg = cfg.clone()
            try:
                datamodule = self.instantiate(Namespace(data=cfg.data)).data
            except Exception:  # noqa: BLE001 - a data module that cannot be built here is printed unsized
                datamodule = None
            if datamodule is not None:
                try:
                    fill_from_data(cfg.model, DataDescription(datamodule, infer=False))
                except DataShapeError as err:
                    self.error(str(err))
        return super().dump(cfg, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """The message shortened to what is wrong, with the closest valid names
        (:func:`~lightning_spectral.parser_errors.shorten`), once: where the error ends the parse."""
        if self.exit_on_error:
            message = shorten(message, self)
            if re.search(r"^model\.net: .* imports no class", message, re.MULTILINE):
                names = ", ".join(cls.__name__ for cls in MODEL_REGISTRY.values())
                message += (f"\nNetworks of the package: {names} (lightning_spectral.models); or the import path "
                            "of any torch.nn.Module (my_package.MyNet).")
        super().error(message, ex)


SUBCOMMANDS = {
    "fit": "Train (--ckpt_path resumes a run).",
    "validate": "One pass over the validation set.",
    "test": "One pass over the test set.",
    "predict": "Write the model's predictions to a file.",
}
"""One line of ``--help`` for each Trainer subcommand."""

OTHER_COMMANDS = {
    "study": "Run a study file: a grid of fits (study --help).",
    "configs": "List the configs shipped with the package.",
}
"""The commands :func:`lightning_spectral.cli.cli_main` runs before LightningCLI parses (no Trainer method)."""


def add_hparams_summary(trainer: Any, data: Any, settings: Optional[dict[str, Any]] = None) -> None:
    """Give ``trainer`` its fit's HParams entry (:class:`~lightning_spectral.callbacks.HParamsSummary`) unless a
    callback of the config gives one: the data module's config as ``data/<key>`` (and ``batch_size``) and
    ``settings`` (a study's axis labels). The one form of the entry, for ``fit`` and every study run alike."""
    if any(isinstance(c, HParamsSummary) for c in trainer.callbacks):
        return
    shown = dict(flat_hparams("data", data)) if isinstance(data, dict) else {}
    if "data/batch_size" in shown:
        shown["batch_size"] = shown["data/batch_size"]
    trainer.callbacks.append(HParamsSummary({**shown, **(settings or {})}))


class SpectralCLI(LightningCLI):
    """LightningCLI whose data module sizes the model (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})

    def _before_launch(self) -> None:
        """A busy ``MASTER_PORT`` fails before any rank starts; a failing rank 0 takes the ranks it
        launched along (:mod:`lightning_spectral.launch`)."""
        check_main_port(self.trainer)
        if not any(isinstance(c, ReapLaunchedRanks) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(ReapLaunchedRanks())

    before_validate = before_test = before_predict = _before_launch

    def before_fit(self) -> None:
        """:meth:`_before_launch`, then: every fit gets an HParams entry (:class:`~lightning_spectral.callbacks.HParamsSummary`, with the
        data module's config and ``batch_size`` as the studies name it), unless its config adds one."""
        self._before_launch()
        data = self.config[self.subcommand].get("data")
        add_hparams_summary(self.trainer, data.as_dict() if isinstance(data, Namespace) else data)

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands with one line of help each, and :data:`OTHER_COMMANDS` beside them
        (in ``--help`` and shell completion; :func:`~lightning_spectral.cli.cli_main` runs them
        before this parser does)."""
        super()._add_subcommands(parser, **kwargs)
        action = parser._subcommands_action
        for choice in action._choices_actions:
            choice.help = SUBCOMMANDS.get(choice.dest, choice.help)
        for name, line in OTHER_COMMANDS.items():
            action.add_subcommand(name, LightningArgumentParser(description=line), help=line)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            parser.add_argument("--out", type=Optional[str], default=None,
                                help="File of the predictions (.csv or .pt); default predictions.csv in the run's "
                                     "directory. Used when the config has no prediction writer of its own.")
        return parser

    def before_predict(self) -> None:
        """Add a :class:`~lightning_spectral.callbacks.PredictionWriter` (at ``--out``) unless the
        config has a ``BasePredictionWriter``: without one ``predict`` writes nothing."""
        if not any(isinstance(c, BasePredictionWriter) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter(self.config[self.subcommand].get("out")))

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces the config's model arguments by those saved in a ``ckpt_path``
        that is a local file (read with ``torch.load(weights_only=True)``; ``last``, ``best``,
        ``hpc``, ``registry`` and URLs are left to the Trainer, which resolves them and loads the
        weights only), which would silently drop what the user asked for. The package's modules
        (:class:`~lightning_spectral.module.ManualOptimizationModule`: ``SpectralModule``,
        ``LanguageModule``) keep the config as given and compare it with the checkpoint themselves
        (differences that cannot be applied raise, changed hyperparameters are applied and
        listed); other modules keep Lightning's behaviour, by calling it.

        This overrides a private method of LightningCLI: ``__init__`` calls it right after the
        public ``parse_arguments``, and Lightning offers no public hook between the two
        (tests/test_cli.py fails if a Lightning release stops calling it)."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        class_path = model.get("class_path") if isinstance(model, Namespace) else None
        try:
            cls = _import(class_path) if class_path else None
        except (ImportError, AttributeError, ValueError):
            cls = None
        if isinstance(cls, type) and issubclass(cls, ManualOptimizationModule):
            _check_distributed_checkpoint_optimizer(self.config[subcommand].get("ckpt_path"), model, subcommand)
            return
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        spec = config.get("data")
        if spec is None or config.get("model") is None:
            super().instantiate_classes()
            return
        parser = self._parser(self.subcommand)
        datamodule = parser.instantiate(Namespace(data=spec)).data
        try:
            fill_from_data(config.model, DataDescription(datamodule))
        except DataShapeError as err:
            parser.error(str(err))
        if hasattr(self, "config_dump"):  # the hyperparameters are dumped once: from the filled config
            del self.config_dump
            self._dump_config()
        config.data = datamodule  # built once: the filling may have set it up already
        try:
            super().instantiate_classes()
        finally:
            config.data = spec


def _check_distributed_checkpoint_optimizer(ckpt_path: Any, model: Namespace, subcommand: str) -> None:
    """Refuse resuming a distributed checkpoint (a directory with ``meta.pt``, written by
    ``ModelParallelStrategy``) with another optimizer class, before torch's loader fails on the
    missing optimizer state. The module compares a checkpoint file itself, on load
    (:meth:`~lightning_spectral.module.ManualOptimizationModule.on_load_checkpoint`); a
    distributed checkpoint's optimizer state is loaded before that hook runs."""
    if subcommand != "fit" or not ckpt_path or not (Path(ckpt_path) / "meta.pt").is_file():
        return
    saved = (load_checkpoint_safely(Path(ckpt_path) / "meta.pt").get("spectral_module") or {}).get("optimizer")
    spec = (model.get("init_args") or Namespace()).get("optimizer")
    class_path = spec.get("class_path") if isinstance(spec, Namespace) else spec if isinstance(spec, str) else None
    try:
        requested = _import(class_path) if class_path else None
    except (ImportError, AttributeError, ValueError):
        return
    if not (saved and isinstance(requested, type) and issubclass(requested, Optimizer)):
        return  # a factory: the module compares the optimizer it builds
    name = f"{requested.__module__}.{requested.__qualname__}"
    if not same_class(saved, name):
        raise optimizer_mismatch(ckpt_path, saved, name)


def _import(class_path: str) -> Any:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def fill_from_data(model: Namespace, data: DataDescription, key: str = "model") -> None:
    """Set the data module's values (:func:`~lightning_spectral.data.data_arguments`) into the
    parsed ``{class_path, init_args}`` of the model and of each network among its arguments.

    Raises:
        DataShapeError: the config sets one of them to another value than the data module's,
            or the data module cannot give one the model needs.
    """
    if not isinstance(model, Namespace) or "class_path" not in model:
        return
    cls = _import(model.class_path)
    if model.get("init_args") is None:
        model.init_args = Namespace()
    params = inspect.signature(cls).parameters
    for name, value in data_arguments(cls, data).items():
        given = model.init_args.get(name)
        if given is not None and not _same(given, params[name].default) and not _same(given, value):
            raise DataShapeError(
                f"{key}.init_args.{name}={given!r} in the config, but {type(data.datamodule).__name__} gives "
                f"{name}={value!r}: the data module sizes the network, so leave {name} out of the config")
        model.init_args[name] = list(value) if isinstance(value, tuple) else value
    if key == "model":
        for name, value in vars(model.init_args).items():
            if isinstance(value, Namespace) and "class_path" in value:
                nested = _import(value.class_path)
                if isinstance(nested, type) and issubclass(nested, nn.Module):
                    fill_from_data(value, data, f"model.init_args.{name}")


def _check_yaml(argv: Sequence[str]) -> None:
    """Read every ``--config`` file once, so that a YAML syntax error names the file."""
    for i, arg in enumerate(argv):
        flag, sep, value = arg.partition("=")
        if flag not in _CONFIG_FLAGS:
            continue
        path = value if sep else (argv[i + 1] if i + 1 < len(argv) else "")
        if path and Path(path).is_file():
            try:
                yaml.safe_load(Path(path).read_text())
            except yaml.YAMLError as err:
                print(f"error: {path} is not valid YAML: {err}", file=sys.stderr)
                raise SystemExit(2) from None


def resolve_configs(argv: Sequence[Any]) -> list[str]:
    """``--config`` values as files: a shipped config's name becomes its path."""
    try:
        return resolve_config_args([str(a) for a in argv])
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None


def build_cli(args: ArgsType = None, *, run: bool = True, **kwargs: Any) -> SpectralCLI:
    """The package's :class:`SpectralCLI` on ``args`` (a list of command-line arguments; default
    ``sys.argv[1:]``): ``fit|validate|test|predict`` with ``run=True``, else the config alone
    (``--config X ...``, classes built, nothing run). ``kwargs`` go to ``LightningCLI``."""
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)):
        argv = resolve_configs(argv)
        _check_yaml(argv)
    options: dict[str, Any] = {
        "model_class": None,  # any LightningModule (default SpectralModule)
        "datamodule_class": None,  # any LightningDataModule
        "subclass_mode_model": True,
        "subclass_mode_data": True,
        "auto_configure_optimizers": False,  # the modules build their own optimizers
        "parser_class": SpectralArgumentParser,
        "trainer_defaults": {"default_root_dir": "logs"},
        **kwargs,
    }
    with warnings.catch_warnings():  # the arguments are always passed explicitly: no clash with sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        return SpectralCLI(args=argv, run=run, **options)
