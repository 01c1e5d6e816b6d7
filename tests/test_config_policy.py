"""lightning_spectral.config_policy: a config names classes of the expected kind, and functions only
when code registered them (the refusals of each way in are rows of tests/test_failures.py)."""

from __future__ import annotations

import functools
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_spectral import register_config_function
from lightning_spectral.config_policy import ConfigObjectRefused, check_named_object
from lightning_spectral.module import SpectralModule
from lightning_spectral.spectral_cli import build_cli

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

REGISTERED = textwrap.dedent(
    '''
    """Written by tests/test_config_policy.py: an optimizer factory that registers itself."""
    import torch

    from lightning_spectral import register_config_function


    @register_config_function
    def nesterov_sgd(params, lr: float = 0.1) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)


    @register_config_function
    def mlp(width: int = 16, num_classes: int = 10) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, width), torch.nn.ReLU(),
                                   torch.nn.Linear(width, num_classes))
    '''
)


@pytest.fixture
def registered_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "ls_registered.py").write_text(REGISTERED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield "ls_registered"
    sys.modules.pop("ls_registered", None)


def test_registered_functions_are_accepted(registered_module) -> None:
    """An optimizer factory named where a callable is expected; a network factory given as a class
    spec (jsonargparse calls it with its ``init_args``)."""
    net = json.dumps({"class_path": "ls_registered.mlp", "init_args": {"width": 24}})
    cli = build_cli(["--config", str(QUICKSTART), "--model.init_args.optimizer=ls_registered.nesterov_sgd",
                     f"--model.init_args.net={net}", "--trainer.logger=false"], run=False)
    optimizer = cli.model.optimizer(cli.model.parameters())  # what configure_optimizers calls
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["nesterov"] is True
    assert [tuple(p.shape) for p in cli.model.net.parameters()] == [(24, 64), (24,), (10, 24), (10,)]


def test_register_refuses_a_class_and_a_non_callable() -> None:
    with pytest.raises(TypeError, match="classes need no registration"):
        register_config_function(torch.optim.SGD)
    with pytest.raises(TypeError, match="takes a function"):
        register_config_function(3)


def test_the_rule_on_objects() -> None:
    assert check_named_object("torch.optim.SGD", torch.optim.SGD, torch.optim.Optimizer) is torch.optim.SGD
    assert check_named_object("os.path", os.path) is os.path  # a module: imported, nothing called
    with pytest.raises(ConfigObjectRefused, match="not a torch.optim.optimizer.Optimizer"):
        check_named_object("torch.nn.Linear", torch.nn.Linear, torch.optim.Optimizer)
    partial = functools.partial(os.system, "true")
    with pytest.raises(ConfigObjectRefused, match="an object of type functools.partial, not a class"):
        check_named_object("m.p", partial)
    assert check_named_object("m.p", register_config_function(partial)) is partial


def test_a_class_spec_for_an_any_parameter_stays_a_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter typed ``Any`` names no kind: its ``{class_path, init_args}`` is not instantiated
    (jsonargparse's default until v5 would build this class, which writes a file)."""
    (tmp_path / "ls_toucher.py").write_text("from pathlib import Path\n\n\nclass Toucher:\n"
                                            "    def __init__(self, path: str) -> None:\n        Path(path).touch()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "ran"
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--anything", type=Any)
    spec = {"class_path": "ls_toucher.Toucher", "init_args": {"path": str(marker)}}
    init = parser.instantiate(parser.parse_args([f"--anything={json.dumps(spec)}"]))
    assert init.anything["class_path"] == "ls_toucher.Toucher" and not marker.exists()  # the spec, as given


def test_load_from_checkpoint_refuses_a_function_in_the_saved_config(tmp_path: Path, monkeypatch) -> None:
    """A CLI-trained checkpoint is rebuilt from its saved config through jsonargparse: the same rule."""
    monkeypatch.chdir(tmp_path)
    hparams = {"_instantiator": "lightning.pytorch.cli.instantiate_module",
               "_class_path": "lightning_spectral.module.SpectralModule",
               "net": {"class_path": "lightning_spectral.models.SmallCNN",
                       "init_args": {"num_classes": 10, "in_channels": 1, "image_size": 8}},
               "optimizer": {"class_path": "os.system", "init_args": {"command": "touch ran"}}}
    torch.save({"state_dict": {}, "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"},
               tmp_path / "evil.ckpt")
    with pytest.raises(Exception, match="'os.system' is a built-in function, not a class"):
        SpectralModule.load_from_checkpoint(tmp_path / "evil.ckpt")
    assert not (tmp_path / "ran").exists()


def test_the_rule_is_in_the_jsonargparse_import_every_parsed_path_goes_through() -> None:
    """The policy wraps jsonargparse's private ``_typehints.import_object(name, check_path)`` (no
    public hook can say the rule): it is in place, and a plain jsonargparse parser refuses a function
    named for a callable and for a class spec, through that import, and accepts a class."""
    from collections.abc import Callable

    from jsonargparse import _typehints

    assert getattr(_typehints.import_object, "checks_config_policy", False), (
        "jsonargparse._typehints.import_object is not the config policy's wrapper: see "
        "lightning_spectral.config_policy.enforce_in_jsonargparse")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--factory", type=Callable[..., torch.optim.Optimizer])
    parser.add_argument("--net", type=torch.nn.Module)
    for given in ("--factory=os.path.join", '--net={"class_path": "os.path.join", "init_args": {}}'):
        with pytest.raises(Exception, match="'os.path.join' is a function, not a class"):
            parser.parse_args([given])
    assert parser.parse_args(["--factory=torch.optim.SGD"]).factory.class_path == "torch.optim.SGD"


@pytest.mark.parametrize("private", ["missing", lambda name: name, lambda path, check=True: path])
def test_a_jsonargparse_without_the_private_import_fails_loudly(private: Any, monkeypatch) -> None:
    """If a jsonargparse release drops ``_typehints.import_object`` or changes its signature, putting
    the rule in raises naming the problem and the fix, instead of leaving configs unchecked."""
    from jsonargparse import _typehints

    from lightning_spectral.config_policy import enforce_in_jsonargparse

    if private == "missing":
        monkeypatch.delattr(_typehints, "import_object")
    else:
        monkeypatch.setattr(_typehints, "import_object", private)
    with pytest.raises(RuntimeError, match=r"has no jsonargparse\._typehints\.import_object\(name, check_path\).*"
                                           r"configs would be parsed unchecked.*jsonargparse>=4.52,<5"):
        enforce_in_jsonargparse()
