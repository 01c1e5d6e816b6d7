"""The registry is the one table of the package's optimizers: every class of ``lightning_spectral.optim``
that is an optimizer has an entry, every entry builds and steps in each of its configurations, the
factory, the CLI's short class names and the studies' bare names resolve through it, and one new
entry is all a new optimizer needs to be found by all of them."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from jsonargparse._typehints import resolve_class_path_by_name
from torch import nn

import lightning_spectral.optim as optim
from lightning_spectral.experiments.build import resolve
from lightning_spectral.optim import (OPTIMIZERS, MatrixOptimizer, Muon, OptimizerEntry, create_optimizer,
                                      find_optimizer, optimizer_entries, register)
from lightning_spectral.optim.base import FALLBACK_ARGUMENTS

CONFIGURATIONS = [(entry.name, variant) for entry in optimizer_entries() for variant, _ in entry.configurations()]


def test_every_optimizer_class_of_the_package_has_an_entry():
    classes = {obj for obj in vars(optim).values() if inspect.isclass(obj) and issubclass(obj, MatrixOptimizer)}
    ours = {entry.cls for entry in optimizer_entries(package_only=False) if entry.cls.__module__.startswith("lightning_spectral")}
    assert classes - {MatrixOptimizer, optim.GeometricOptimizer} == ours
    assert len({entry.cls for entry in OPTIMIZERS.values()}) == len(OPTIMIZERS)  # one entry per class


@pytest.mark.parametrize("name, variant", CONFIGURATIONS)
def test_every_configuration_builds_on_a_shape_it_takes_and_steps(name, variant):
    entry = OPTIMIZERS[name]
    torch.manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(entry.example_shape)), nn.Parameter(torch.randn(entry.example_shape[0]))
    opt = entry.build([weight, bias], variant)
    assert isinstance(opt, entry.cls)
    assert [g["matrix"] for g in opt.param_groups] == [True, False]
    before = weight.detach().clone()
    weight.grad, bias.grad = torch.randn_like(weight), torch.randn_like(bias)
    opt.step()
    assert not torch.equal(before, weight) and torch.isfinite(weight).all()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_create_optimizer_the_cli_and_the_studies_find_every_entry(name):
    entry = OPTIMIZERS[name]
    assert find_optimizer(name) is entry and find_optimizer(entry.cls.__name__) is entry
    # the studies' bare names and the CLI's short class names (jsonargparse's resolution of an Optimizer)
    assert resolve(name) is entry.cls and resolve(entry.cls.__name__) is entry.cls
    if hasattr(torch.optim, entry.cls.__name__) and entry.package:  # Muon: torch has one of that name
        with pytest.raises(ValueError, match=f"torch.optim.{entry.cls.__name__}, lightning_spectral.optim"):
            resolve_class_path_by_name(torch.optim.Optimizer, entry.cls.__name__)
    else:
        assert resolve_class_path_by_name(torch.optim.Optimizer, entry.cls.__name__).endswith(f".{entry.cls.__name__}")
    model = nn.Sequential(nn.Linear(*reversed(entry.example_shape)), nn.Tanh(), nn.Linear(entry.example_shape[0], 2))
    opt = create_optimizer(model, name, **{k: v for k, v in entry.test_kwargs.items() if k != "lr"}, lr=0.01)
    assert type(opt) is entry.cls
    # only the common arguments its entry lists reach it: the others keep the class's own defaults
    signature = inspect.signature(entry.cls).parameters
    for arg in ("momentum", "weight_decay"):
        if arg not in entry.factory_args and arg in signature:
            groups = [g for g in opt.param_groups if g.get("matrix", True)]
            assert all(g[arg] == signature[arg].default for g in groups), arg


def test_every_entry_takes_the_fallback_arguments():
    for entry in optimizer_entries():
        parameters = inspect.signature(entry.cls).parameters
        explicit = [a for a in FALLBACK_ARGUMENTS if a in parameters]
        assert not explicit, f"{entry.cls.__name__} redeclares {explicit}: they are declared once, in MatrixOptimizer"
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()), entry.name


def test_configurations_as_config_files_build_the_same_optimizer():
    from lightning_spectral.experiments.build import instantiate

    entry = OPTIMIZERS["muon_sgd"]
    p, q = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(6, 4))
    a, b = entry.build([p], "dual_tangent"), instantiate(entry.config("dual_tangent"), [q])
    assert type(a.inner_solver) is type(b.inner_solver) and b.inner_solver.tangent
    assert {k: v for k, v in a.defaults.items()} == {k: v for k, v in b.defaults.items()}


def test_one_new_entry_is_all_a_new_optimizer_needs():
    class SignSGD(MatrixOptimizer):
        """``W ← W − lr·sign(G)``: a stand-in for a new optimizer."""

        def __init__(self, params, lr=0.01, **kwargs):
            super().__init__(params, dict(lr=lr, weight_decay=0.0), **kwargs)

        def _matrix_step(self, group, params):
            for p in params:
                p.add_(p.grad.sign(), alpha=-group["lr"])

    register(OptimizerEntry("sign_sgd", SignSGD, "sign descent", test_kwargs=dict(lr=0.01)))
    try:
        assert any(e.cls is SignSGD for e in optimizer_entries())
        net = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
        opt = create_optimizer(net, "sign_sgd", lr=0.5)
        assert type(opt) is SignSGD and [(g["name"], g["lr"]) for g in opt.param_groups][0] == ("matrix", 0.5)
        assert resolve("sign_sgd") is SignSGD
        with pytest.raises(ValueError, match="registered already"):
            register(OptimizerEntry("sign_sgd", SignSGD, "again"))
    finally:
        del OPTIMIZERS["sign_sgd"]
    with pytest.raises(ValueError, match="unknown factory arguments"):
        register(OptimizerEntry("bad", SignSGD, "x", factory_args=("lr", "beta")))
    with pytest.raises(ValueError, match="unknown optimizer_type 'sign_sgd'"):
        create_optimizer(nn.Linear(4, 3), "sign_sgd")


def test_features_select_entries():
    assert {e.name for e in optimizer_entries(constrained=True)} >= {"manifold_muon", "spectral_ball", "oblique"}
    assert "muon" not in {e.name for e in optimizer_entries(constrained=True)}
    assert {e.name for e in optimizer_entries(package_only=False)} - {e.name for e in optimizer_entries()} == {
        "sgd", "adamw", "muon_with_aux_adam", "single_device_muon", "soap", "kron"}  # not the package's own
    assert all(not e.complex and not e.sparse for e in OPTIMIZERS.values() if e.package)
    with pytest.raises(ValueError, match="no variant"):
        OPTIMIZERS["muon"].kwargs("fast")
    assert isinstance(OPTIMIZERS["muon"].build([nn.Parameter(torch.randn(3, 3))]), Muon)


def test_muon_sphere_is_the_spectral_ball_variant_without_multiplier():
    """MuonSphere (λ = 0): the registry's spectral_ball variant, the CLI overlay and both studies' entries are the
    same setting, SpectralBall(multiplier=False); its steps keep λ = 0 and ‖W‖₂ = √(out/in) (float32 eps)."""
    import yaml

    entry = OPTIMIZERS["spectral_ball"]
    assert entry.kwargs("muon_sphere")["multiplier"] is False
    torch.manual_seed(0)
    W = nn.Parameter(torch.randn(6, 4))
    opt = entry.build([W], "muon_sphere", sigma_tol=1e-7)
    for _ in range(3):
        W.grad = torch.randn_like(W)
        opt.step()
    assert opt.state[W]["dual"] == 0.0
    radius = (6 / 4) ** 0.5
    assert abs(torch.linalg.matrix_norm(W.detach(), ord=2).item() - radius) <= 16 * torch.finfo(torch.float32).eps * radius
    made = create_optimizer(nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)), "spectral_ball", multiplier=False)
    assert [g["multiplier"] for g in made.param_groups if g["matrix"]] == [False]
    root = Path(__file__).resolve().parents[1] / "configs"
    overlay = yaml.safe_load((root / "optim" / "muon_sphere.yaml").read_text())["model"]["init_args"]["optimizer"]
    studied = [v["set"]["model.init_args.optimizer"] for study in ("digits/optimizer_table.yaml", "text/lm.yaml")
               for grid in yaml.safe_load((root / "studies" / study).read_text())["grids"]
               for v in (grid.get("axes", grid).get("optimizer") or []) if v["name"] == "MuonSphere"]
    assert len(studied) >= 2
    for spec in [overlay, *studied]:
        assert spec["class_path"].endswith(".SpectralBall") and spec["init_args"]["multiplier"] is False
