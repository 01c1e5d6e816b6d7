"""Packaging: the optimizers need only torch, the wheel ships the configs, the quick start runs
from an empty directory after a wheel install, and ``--config`` finds the shipped configs."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lightning_spectral.config_files import CONFIG_DIR, find_config, list_configs, resolve_config, resolve_config_args

ROOT = Path(__file__).resolve().parents[1]
TRAINING_ONLY = ("lightning", "torchvision", "torchmetrics", "tensorboard", "jsonargparse", "sklearn", "matplotlib")


def _run(args, cwd, env=None, timeout=240):
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_core_dependencies_are_torch_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {dep.split(">")[0].split("=")[0].split("[")[0].split("!")[0].strip() for dep in project["dependencies"]}
    assert names == {"torch", "numpy"}
    train = " ".join(project["optional-dependencies"]["train"])
    assert "lightning>=" in train and "!=2.6.2" in train and "!=2.6.3" in train
    assert "lightning_spectral[train]" in project["optional-dependencies"]["dev"]


def test_optim_and_diagnostics_import_without_the_training_extra(tmp_path):
    """Blocks every training-only package, then builds and steps the optimizers and runs a diagnostic."""
    script = f"""
import sys, importlib.machinery
class Block:  # finds the training-only packages, and fails to load them (as if not installed)
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {TRAINING_ONLY!r}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError('blocked: ' + spec.name)
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Block())
import torch
from torch import nn
import lightning_spectral.optim as O
from lightning_spectral.diagnostics import compute_spectral_norms
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
for opt in (O.Muon(net.parameters(), lr=0.02), O.MuonSGD(net.parameters(), lr=0.1, spectral_budget=0.1),
            O.ManifoldMuon(net.parameters(), lr=0.05)):
    net.zero_grad(); net(torch.randn(5, 8)).square().sum().backward(); opt.step()
norms = compute_spectral_norms(net)
assert all(torch.isfinite(torch.tensor(float(v))) for v in norms.values()), norms
assert not any(m.split('.')[0] in {TRAINING_ONLY!r} for m in sys.modules)
print('ok')
"""
    result = _run([sys.executable, "-c", script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_the_cli_without_the_training_extra_names_the_install_command(tmp_path):
    script = f"""
import sys, importlib.machinery
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {TRAINING_ONLY!r}:
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        raise ImportError('No module named ' + repr(spec.name))
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, Block())
sys.argv = ['lightning-spectral', 'fit', '--config', 'quickstart']
from lightning_spectral.cli import cli_main
"""
    result = _run([sys.executable, "-c", script], cwd=tmp_path)
    assert result.returncode == 1
    assert "pip install 'lightning_spectral[train]'" in result.stderr and "Traceback" not in result.stderr


def test_shipped_configs_are_found_by_name(tmp_path, monkeypatch):
    names = list_configs()
    assert "quickstart" in names and "optim/muon" in names and "studies/digits/baseline" in names
    assert len(names) == len(list(CONFIG_DIR.rglob("*.yaml")))
    monkeypatch.chdir(tmp_path)  # nothing relative to the working directory
    assert find_config("quickstart") == CONFIG_DIR / "quickstart.yaml"
    assert resolve_config("configs/optim/muon.yaml") == str(CONFIG_DIR / "optim" / "muon.yaml")
    assert resolve_config_args(["fit", "--config", "quickstart", "-c=optim/muon", "--trainer.max_epochs", "1"]) == [
        "fit", "--config", str(CONFIG_DIR / "quickstart.yaml"), f"-c={CONFIG_DIR / 'optim' / 'muon.yaml'}",
        "--trainer.max_epochs", "1"]
    (tmp_path / "mine.yaml").write_text("seed_everything: 1\n")
    assert resolve_config("mine.yaml") == "mine.yaml"  # a file of the user's wins
    assert resolve_config("{trainer: {max_epochs: 1}}") == "{trainer: {max_epochs: 1}}"  # inline YAML
    with pytest.raises(FileNotFoundError, match="quickstart.*lightning-spectral configs|lightning-spectral configs"):
        resolve_config("quikstart")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory):
    """The package built as a wheel and installed (no dependencies) into a fresh target folder."""
    work = tmp_path_factory.mktemp("wheel")
    # As a newcomer's pip builds it: in an isolated environment with the build backend pyproject.toml names.
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(work / "dist"), str(ROOT)], cwd=work)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (work / "dist").glob("lightning_spectral-*.whl")
    target = work / "site"
    install = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)], cwd=work)
    assert install.returncode == 0, install.stderr[-2000:]
    return target


def test_wheel_runs_the_quick_start_from_an_empty_directory(installed_wheel, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(installed_wheel))
    where = _run([sys.executable, "-c", "import lightning_spectral as m; print(m.__file__)"], cwd=tmp_path, env=env)
    assert where.stdout.strip().startswith(str(installed_wheel)), where.stdout  # the wheel, not the source tree
    assert (installed_wheel / "lightning_spectral" / "py.typed").is_file()
    listing = _run([sys.executable, "-m", "lightning_spectral", "configs"], cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    assert "quickstart" in listing.stdout and "studies/digits/baseline" in listing.stdout
    fit = _run([sys.executable, "-m", "lightning_spectral", "fit", "--config", "quickstart",
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "2",
                "--trainer.enable_progress_bar", "false"], cwd=tmp_path, env=env)
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert list(tmp_path.glob("logs/quickstart/version_*/checkpoints/last.ckpt"))
