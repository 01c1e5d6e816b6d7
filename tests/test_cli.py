from __future__ import annotations

import functools
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import ast
import csv
import math

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from lightning_spectral.module import SpectralModule
from lightning_spectral.optim import baselines_available

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")
RUN_CONFIGS = sorted(CONFIGS.glob("*.yaml"))  # complete runs
OVERLAYS = sorted(CONFIGS.glob("*/*.yaml"))  # configs/trainer/, configs/optim/, ...: added after a run


def printed_config(run_cli, capsys, *args: str) -> dict:
    with pytest.raises(SystemExit) as info:
        run_cli("fit", *args, "--print_config")
    assert info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def assert_applied(overlay: object, printed: object, key: str = "") -> None:
    """Every value of ``overlay`` is in ``printed`` (short class names come back as full paths)."""
    if isinstance(overlay, dict):
        for k, v in overlay.items():
            assert isinstance(printed, dict) and k in printed, f"{key}.{k} missing"
            assert_applied(v, printed[k], f"{key}.{k}")
    elif isinstance(overlay, list) and overlay and isinstance(overlay[0], dict):
        assert isinstance(printed, list) and len(printed) == len(overlay), key
        for i, (o, p) in enumerate(zip(overlay, printed)):
            assert_applied(o, p, f"{key}[{i}]")
    elif key.endswith(".class_path"):
        assert printed.split(".")[-1] == overlay.split(".")[-1], key
    else:
        assert printed == overlay, key


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: p.stem)
def test_every_run_config_parses(config: Path, run_cli, capsys) -> None:
    raw = yaml.safe_load(config.read_text())
    assert type(raw["seed_everything"]) is int  # explicit: `true` would mean 0
    printed = printed_config(run_cli, capsys, "--config", str(config))
    assert_applied(raw, printed)
    assert printed["model"]["init_args"]["net"]["class_path"].startswith("lightning_spectral.models.")


NEEDS_BASELINES = pytest.mark.skipif(not baselines_available(), reason="pytorch-optimizer ([baselines]) not installed")


@pytest.mark.parametrize("overlay", [pytest.param(p, marks=NEEDS_BASELINES) if p.stem in ("soap", "kron") else p
                                     for p in OVERLAYS], ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_overlay_config_applies_to_a_run(overlay: Path, run_cli, capsys) -> None:
    printed = printed_config(run_cli, capsys, "--config", QUICKSTART, "--config", str(overlay))
    assert_applied(yaml.safe_load(overlay.read_text()), printed)
    assert printed["data"]["class_path"] == "lightning_spectral.data.DigitsDataModule"  # the run's own part stays


def test_short_class_names_resolve(run_cli, capsys) -> None:
    printed = printed_config(
        run_cli, capsys,
        "--model", "SpectralModule", "--model.net", "ResNet18", "--model.net.width_mult", "0.5",
        "--model.optimizer", "AdamW", "--model.optimizer.lr", "0.003", "--data", "MNISTDataModule",
    )  # fmt: skip
    model = printed["model"]["init_args"]
    assert printed["model"]["class_path"] == "lightning_spectral.module.SpectralModule"
    assert model["net"] == {"class_path": "lightning_spectral.models.ResNet18",  # sized by MNIST's attributes
                            "init_args": {"num_classes": 10, "in_channels": 1, "image_size": 28, "width_mult": 0.5}}
    assert model["num_classes"] == 10
    assert model["optimizer"]["class_path"] == "torch.optim.AdamW" and model["optimizer"]["init_args"]["lr"] == 0.003
    assert model["scheduler"]["class_path"] == "lightning_spectral.module.CosineSchedule"
    assert printed["data"]["class_path"] == "lightning_spectral.data.MNISTDataModule"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.optimzer.lr", "0.1"], "model: lightning_spectral.module.SpectralModule takes no argument "
                                                   "'optimzer'; did you mean 'optimizer'?"),
        (["--model.optimizer.lrr", "0.1"], "model.optimizer: torch.optim.SGD takes no argument 'lrr'; did you mean 'lr'?"),
        (["--trainer.max_epochs", "many"], "trainer.max_epochs: Expected a <class 'int'> (given: many)"),
        (["--model.net", "NoSuchNet"], "model.net: 'NoSuchNet' imports no class"),
        pytest.param(["--model.net", "MPL"], "model.net: 'MPL' imports no class; did you mean "
                     "'lightning_spectral.models.MLP'", marks=pytest.mark.slow),
        # the closest first; other imported optimizers of that name follow (torch's, pytorch-optimizer's with [baselines])
        (["--model.optimizer", "Muonn"], "'Muonn' imports no class; did you mean 'lightning_spectral.optim.Muon' or '"),
        pytest.param(["--model.scheduler", "CosineSchedul"], "did you mean 'lightning_spectral.module.CosineSchedule'",
                     marks=pytest.mark.slow),
        pytest.param(["--data", "DigitDataModule"], "data: 'DigitDataModule' imports no class; did you mean "
                     "'lightning_spectral.data.DigitsDataModule'", marks=pytest.mark.slow),
        pytest.param(["--trainer.callbacks+", "SpectralNormMonitr"],
                     "did you mean 'lightning_spectral.callbacks.SpectralNormMonitor'", marks=pytest.mark.slow),
        (["--trainr.max_epochs", "3"], "unknown option --trainr.max_epochs; did you mean 'trainer.max_epochs'"),
        # no abbreviations: argparse would read --trainer.max_epoc as --trainer.max_epochs without a word
        (["--trainer.max_epoc", "3"], "unknown option --trainer.max_epoc; did you mean 'trainer.max_epochs'"),
        (["--model.net.init_args.depth", "3"], "lightning_spectral.models.SmallCNN takes no argument 'depth'. Its "
                                               "arguments: num_classes, in_channels, image_size, width_mult."),
    ],
)
def test_wrong_key_or_type_gets_a_clear_error(args: list[str], expected: str, run_cli, capsys) -> None:
    """jsonargparse's 5-15 lines under a Union are one line naming the key, with the closest valid names."""
    with pytest.raises(SystemExit) as info:
        run_cli("fit", "--config", QUICKSTART, *args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    message = err[err.index("error: "):].splitlines()
    assert expected in message[0] and "Traceback" not in err and "Union" not in err
    if "model.net" in expected:  # the message lists the networks there are, once
        assert len(message) == 2 and "MLP, SmallCNN, ResNet18" in message[1]
    else:
        assert len(message) == 1


def test_help_lists_every_command_on_one_line(run_cli, capsys) -> None:
    from lightning_spectral.spectral_cli import OTHER_COMMANDS, SUBCOMMANDS

    with pytest.raises(SystemExit) as info:
        run_cli("--help")
    assert info.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    for command, line in {**SUBCOMMANDS, **OTHER_COMMANDS}.items():
        assert any(row.split() == [command, *line.split()] for row in lines), command


@pytest.mark.skipif(importlib.util.find_spec("argcomplete") is None,
                    reason="the [completion] extra (argcomplete) is not installed")
def test_shell_completion_offers_the_commands(tmp_path: Path) -> None:
    line = "lightning-spectral st"
    env = {**os.environ, "_ARGCOMPLETE": "1", "COMP_LINE": line, "COMP_POINT": str(len(line)), "COMP_TYPE": "9",
           "_ARGCOMPLETE_STDOUT_FILENAME": str(tmp_path / "completions")}
    subprocess.run([sys.executable, "-m", "lightning_spectral"], env=env, stdin=subprocess.DEVNULL, check=False,
                   capture_output=True, timeout=240)
    assert (tmp_path / "completions").read_text().split() == ["study"]


def test_yaml_syntax_error_names_the_file(tmp_path: Path, run_cli, capsys) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  class_path: x\n   init_args: [\n")
    with pytest.raises(SystemExit) as info:
        run_cli("fit", "--config", str(bad))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {bad} is not valid YAML" in err and "line 3" in err


def test_a_shape_stated_against_the_data_is_an_error(run_cli, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("fit", "--config", QUICKSTART, "--model.net.init_args.image_size", "28")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.net.init_args.image_size=28" in err and "DigitsDataModule gives image_size=8" in err


class ShapeEcho(LightningModule):
    """Any LightningModule: the CLI fills its arguments named like the data module's attributes."""

    def __init__(self, num_classes: int = 2, input_shape: list[int] | None = None, in_channels: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(math.prod(input_shape), num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_any_lightning_module_is_sized_by_the_data(run_cli) -> None:
    cli = run_cli("fit", "--model", f"{__name__}.ShapeEcho", "--data", "DigitsDataModule",
                  "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu")
    hparams = cli.model.hparams
    assert (hparams["num_classes"], hparams["input_shape"], hparams["in_channels"]) == (10, [1, 8, 8], 1)
    assert cli.trainer.global_step == 1


class Terminate(Callback):
    """Raises what Lightning raises when the process receives SIGTERM."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        raise SIGTERMException


def test_sigterm_exits_with_143(run_cli) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("fit", "--config", QUICKSTART, "--trainer.callbacks+", f"{__name__}.Terminate",
                "--trainer.max_epochs=1", "--trainer.logger=false")
    assert info.value.code == 143


def test_configs_subcommand_lists_the_shipped_configs(run_cli, capsys) -> None:
    assert run_cli("configs") is None
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "quickstart" in names and "optim/muon" in names


def test_wrong_key_in_a_config_file(tmp_path: Path, run_cli, capsys) -> None:
    config = yaml.safe_load(Path(QUICKSTART).read_text())
    config["model"]["init_args"]["learning_rate"] = 0.1
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as info:
        run_cli("fit", "--config", str(tmp_path / "typo.yaml"))
    assert info.value.code == 2 and "learning_rate" in capsys.readouterr().err


def last_logged(run_dir: Path, tag: str) -> float:
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return events.Scalars(tag)[-1].value


def test_quickstart_trains_and_the_checkpoint_reproduces_it(tmp_path: Path, run_cli) -> None:
    fit = run_cli("fit", "--config", QUICKSTART, "--trainer.max_epochs=2")
    run_dir = tmp_path / "logs" / "quickstart" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    assert Path(fit.trainer.log_dir).resolve() == run_dir and (run_dir / "config.yaml").exists() and last.exists()
    assert fit.trainer.global_step == 2 * (1438 // 64)
    logged = last_logged(run_dir, "val/acc")
    assert logged > 0.6  # chance is 0.1; 15 epochs reach about 0.99 (README)
    assert last_logged(run_dir, "lr/matrix") > 0
    events = EventAccumulator(str(run_dir))  # every fit's HParams entry: resolved settings, final metrics
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    assert (start["optimizer"].string_value, start["scheduler"].string_value) == ("SGD", "CosineSchedule")
    assert start["batch_size"].number_value == 64 and start["model/net"].string_value == "SmallCNN"
    assert last_logged(run_dir, "hparams/final_val_acc") == logged

    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["hyper_parameters"]["net"]["init_args"]["in_channels"] == 1  # linked from the data

    validate = run_cli("validate", "--config", QUICKSTART, "--ckpt_path", str(last))
    assert validate.trainer.callback_metrics["val/acc"].item() == logged
    test = run_cli("test", "--config", QUICKSTART, "--ckpt_path", str(last))
    assert test.trainer.callback_metrics["test/acc"].item() == logged  # the held-out split serves both
    predict = run_cli("predict", "--config", QUICKSTART, "--ckpt_path", str(last))
    predictions = torch.cat(predict.trainer.predict_loop.predictions)
    labels = predict.datamodule.eval_set.tensors[1]
    assert (predictions == labels).float().mean().item() == pytest.approx(logged, abs=1e-6)
    with open(Path(predict.trainer.log_dir) / "predictions.csv", newline="") as handle:  # the file predict writes
        rows = list(csv.reader(handle))
    assert rows[0] == ["index", "prediction"] and len(rows) == len(labels) + 1
    assert [int(i) for i, _ in rows[1:]] == list(range(len(labels)))  # the held-out set, in order
    assert torch.equal(torch.tensor([int(p) for _, p in rows[1:]]), predictions)
    run_cli("predict", "--config", QUICKSTART, "--ckpt_path", str(last), "--out", str(tmp_path / "p.pt"))
    (written,) = torch.load(tmp_path / "p.pt", weights_only=True)
    assert torch.equal(written["predictions"], predictions) and torch.equal(written["indices"], torch.arange(len(labels)))

    rebuilt = SpectralModule.load_from_checkpoint(last).eval()
    x = predict.datamodule.eval_set.tensors[0][:16]
    assert torch.equal(rebuilt(x).argmax(1), predictions[:16])


def fit_one_epoch_on(run_cli, config: str, data_dir: Path, batch_size: int):
    return run_cli(
        "fit", "--config", str(CONFIGS / config), f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.num_workers=0", f"--data.init_args.batch_size={batch_size}",
        "--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.log_every_n_steps=1",
    )  # fmt: skip


def test_cifar10_config_trains_on_files_in_real_format(fake_cifar10, run_cli) -> None:
    cli = fit_one_epoch_on(run_cli, "cifar10_small_cnn_sgd.yaml", fake_cifar10.root, batch_size=8)
    assert cli.trainer.global_step == 5  # 40 images in batches of 8
    assert cli.model.net.features[0].in_channels == 3 and cli.model.net.fc2.out_features == 10
    assert 0.0 <= cli.trainer.callback_metrics["val/acc"].item() <= 1.0


def test_mnist_config_links_the_shape(fake_mnist, run_cli) -> None:
    cli = fit_one_epoch_on(run_cli, "mnist_mlp_sgd.yaml", fake_mnist.root, batch_size=16)
    assert cli.model.net.layers[1].in_features == 28 * 28 and cli.trainer.global_step == 2
    assert cli.model.lr_schedulers() is None  # the MNIST configs keep the learning rate constant


def test_offline_download_ends_the_cli_with_one_line(tmp_path: Path, run_cli, unreachable_downloads) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli("fit", "--config", str(CONFIGS / "cifar10_resnet18_sgd.yaml"), f"--data.init_args.data_dir={tmp_path}")
    assert str(info.value.code).startswith(f"error: CIFAR-10 is missing or incomplete in '{tmp_path}'")


def test_module_entry_point_reports_missing_data_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_spectral", "fit", "--config", str(CONFIGS / "mnist_mlp_sgd.yaml"),
         f"--data.init_args.data_dir={tmp_path}", "--data.init_args.download=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: MNIST is missing or incomplete in '{tmp_path}'")


def test_console_script() -> None:
    script = Path(sys.executable).parent / "lightning-spectral"
    result = subprocess.run(
        [str(script), "fit", "--config", QUICKSTART, "--print_config"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    net = yaml.safe_load(result.stdout)["model"]["init_args"]["net"]
    assert net["class_path"] == "lightning_spectral.models.SmallCNN"


@pytest.mark.slow
def test_ddp_config_runs_two_cpu_processes(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_spectral", "fit", "--config", QUICKSTART,
         "--config", str(CONFIGS / "trainer" / "ddp.yaml"), "--trainer.accelerator=cpu", "--trainer.devices=2",
         "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "logs" / "quickstart" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    # Each of the 2 ranks sees half of the 1438 training images: 11 batches of 64, not 22.
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1438 // 2 // 64


def test_the_study_runner_builds_runs_without_the_command_line_module() -> None:
    """One builder, no import circle: the study code uses ``spectral_cli.build_cli``; only the
    command line (``cli.py``) imports the study command, and only ``__main__`` imports ``cli.py``."""
    package = ROOT / "lightning_spectral"
    importers = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                importers.setdefault(node.module, set()).add(path.relative_to(package).as_posix())
    assert importers["lightning_spectral.cli"] == {"__main__.py"}
    assert "experiments/runner.py" in importers["lightning_spectral.spectral_cli"]
    assert "cli.py" in importers["lightning_spectral.experiments.cli"]


def _distributed_checkpoint(path: Path, optimizer: str) -> Path:
    """A directory like the one ``ModelParallelStrategy.save_checkpoint`` writes: torch's distributed
    checkpoint files beside ``meta.pt``, the checkpoint dict without ``state_dict``/``optimizer_states``
    (only ``meta.pt`` is read before the fit)."""
    path.mkdir()
    (path / ".metadata").write_bytes(b"")
    meta = {"epoch": 0, "global_step": 22, "pytorch-lightning_version": "2.6.6", "loops": {}, "callbacks": {},
            "lr_schedulers": [], "hyper_parameters": {},
            "spectral_module": {"net": "lightning_spectral.models.cnn.SmallCNN", "optimizer": optimizer,
                                "skipped_steps": 0}}
    torch.save(meta, path / "meta.pt")
    return path


def test_resuming_a_distributed_checkpoint_with_another_optimizer_is_refused_first(tmp_path: Path, run_cli) -> None:
    """The CLI reads a distributed checkpoint's meta.pt before the fit: another optimizer class raises the
    module's CheckpointMismatchError instead of torch's 'Missing key in checkpoint state_dict'."""
    from lightning_spectral.module import CheckpointMismatchError
    from lightning_spectral.spectral_cli import _check_distributed_checkpoint_optimizer

    adamw = _distributed_checkpoint(tmp_path / "adamw.ckpt", "torch.optim.adamw.AdamW")
    with pytest.raises(CheckpointMismatchError, match=r"trained with torch\.optim\.adamw\.AdamW, the requested "
                                                      r"optimizer is torch\.optim\.sgd\.SGD.*Start a new run"):
        run_cli("fit", "--config", QUICKSTART, "--trainer.max_epochs=1", "--ckpt_path", str(adamw))
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("*.ckpt"))  # refused before fitting

    from jsonargparse import Namespace

    sgd = _distributed_checkpoint(tmp_path / "sgd.ckpt", "torch.optim.sgd.SGD")
    model = Namespace(class_path="lightning_spectral.module.SpectralModule",
                      init_args=Namespace(optimizer=Namespace(class_path="torch.optim.SGD")))
    _check_distributed_checkpoint_optimizer(str(sgd), model, "fit")  # the same class: no error
    _check_distributed_checkpoint_optimizer(str(adamw), model, "validate")  # no optimizer state is loaded
    with pytest.raises(CheckpointMismatchError, match="adamw"):
        _check_distributed_checkpoint_optimizer(str(adamw), model, "fit")


class Foreign(LightningModule):
    """A LightningModule not of the package, with saved hyperparameters."""

    def __init__(self, width: int = 4, num_classes: int = 2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hidden, self.out = nn.Linear(64, width), nn.Linear(width, num_classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.out(self.hidden(x.flatten(1))), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _lightning_cli(args: list[str]):
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(None, None, subclass_mode_model=True, subclass_mode_data=True, args=args,
                        save_config_callback=None)


def _outcome(build, args: list[str]) -> tuple:
    """What a resumed fit gave: the model's width, the checkpoint and step resumed; or the error."""
    try:
        cli = build(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        return type(err).__name__, str(err).splitlines()[0]
    return cli.model.hparams.width, cli.trainer.ckpt_path, cli.trainer.global_step


def _fit_foreign(directory: Path) -> tuple[list[str], Path]:
    """The options of a Foreign fit through SpectralCLI (2 steps, ModelCheckpoint with last.ckpt),
    run once in ``directory`` with width 4; and its last.ckpt."""
    from lightning_spectral.spectral_cli import build_cli

    common = ["--model", f"{__name__}.Foreign", "--data", "lightning_spectral.data.DigitsDataModule",
              "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=0",
              "--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", '--trainer.callbacks+={"class_path": '
              '"lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "ckpt", "save_last": true}}']
    assert build_cli(["fit", *common, "--model.width=4"], save_config_callback=None).trainer.global_step == 2
    return common, directory / "ckpt" / "last.ckpt"


def _ours(args: list[str]):
    from lightning_spectral.spectral_cli import build_cli

    return build_cli(args, save_config_callback=None)


def test_a_foreign_module_resumes_as_under_lightnings_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A LightningModule not of the package resumed through SpectralCLI behaves as under Lightning's
    LightningCLI: a checkpoint file's saved hyperparameters replace the config's model arguments
    (width 8 asked, the checkpoint's 4 built, resumed at step 2); for 'last' the Trainer finds the
    file and its hyperparameters are not read (the config's width 8 does not fit its weights)."""
    monkeypatch.chdir(tmp_path)
    common, last = _fit_foreign(tmp_path)
    resumed = ["fit", *common, "--model.width=8", "--ckpt_path"]
    assert _outcome(_ours, [*resumed, str(last)]) == _outcome(_lightning_cli, [*resumed, str(last)]) \
        == (4, str(last), 2)
    assert _outcome(_ours, [*resumed, "last"]) == _outcome(_lightning_cli, [*resumed, "last"])
    assert _outcome(_ours, [*resumed, "last"])[0] == "RuntimeError"  # Lightning's: size mismatch for hidden.weight


@pytest.mark.parametrize("ckpt_path", ["best", "hpc", "registry"])
def test_a_foreign_module_resolves_special_ckpt_paths_as_under_lightnings_cli(
        ckpt_path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """'best' (no monitor: not saved), 'hpc' (none found) and 'registry' (not a file) end a foreign
    module's resume with the error Lightning's CLI gives."""
    monkeypatch.chdir(tmp_path)
    common, _ = _fit_foreign(tmp_path)
    args = ["fit", *common, "--model.width=8", "--ckpt_path", ckpt_path]
    assert _outcome(_ours, args) == _outcome(_lightning_cli, args)
    assert _outcome(_ours, args)[0] in ("ValueError", "FileNotFoundError")


def test_the_private_lightning_hook_spectral_cli_overrides_is_still_called() -> None:
    """SpectralCLI keeps the package modules' config on resume by overriding LightningCLI's
    private ``_parse_ckpt_path()`` (Lightning offers no public hook: ``__init__`` calls it right
    after the public ``parse_arguments``). If a Lightning upgrade renames or changes it, the override
    would be skipped silently and a checkpoint's hyperparameters would replace the config's."""
    from lightning.pytorch.cli import LightningCLI

    source = inspect.getsource(LightningCLI.__init__)
    assert "self._parse_ckpt_path()" in source, (
        "LightningCLI.__init__ no longer calls self._parse_ckpt_path(): update SpectralCLI._parse_ckpt_path "
        "(lightning_spectral/spectral_cli.py) to the hook Lightning now uses to read a ckpt_path's hyperparameters")
    assert list(inspect.signature(LightningCLI._parse_ckpt_path).parameters) == ["self"], (
        "LightningCLI._parse_ckpt_path changed its signature: update SpectralCLI._parse_ckpt_path")
