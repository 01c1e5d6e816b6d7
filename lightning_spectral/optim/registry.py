"""The package's optimizers, in one table: :data:`OPTIMIZERS`.

Every place that needs to know the optimizers reads it: :func:`~lightning_spectral.optim.create_optimizer`
(the ``optimizer_type`` names and which of its common arguments each class takes), the studies'
bare optimizer names, and every test catalogue (the contract tests, DDP, precision, sharding...),
which run each entry in its :attr:`OptimizerEntry.variants` and select by its features. Adding an
optimizer is one class plus one :func:`register` call (or one row below).

An entry says what its class takes and supports:

- ``factory_args``: which of ``create_optimizer``'s common arguments (``lr``, ``momentum``,
  ``weight_decay``, ``spectral_budget`` with ``inner_solver``) it is given;
- ``test_kwargs``: a configuration that trains the small problems of the tests (a few hundred
  weights) in a few steps; ``variants``: named configurations beside it (modes, solvers), each
  run by the test catalogues;
- ``takes``: which matrices its rule takes (the others go to the fallback), and ``example_shape``,
  one it takes (for the generic tests);
- ``package``: ``False`` for torch's own optimizers and for other code's names of ours (Keller
  Jordan's ``MuonWithAuxAdam``/``SingleDeviceMuon``), which the test catalogues leave out;
- features: ``constrained`` (weights moved onto a set when it is built), ``sharded`` (DTensor /
  FSDP2 parameters), ``lazy_finite`` (``check_finite="lazy"``), ``compile_variants`` (the variants
  whose ``torch.compile(opt.step)`` matches eager), ``complex`` and ``sparse`` (refused with an
  error naming the parameter: the matrix rules are for real dense matrices; an SGD fallback takes a
  sparse gradient, as ``torch.optim.SGD`` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping, Optional

import torch

from .baselines import SOAP, Kron
from .budgeted import MuonAdamW, MuonSGD
from .constrained.dual import ManifoldMuon, SpectralBall
from .constrained.riemannian import BlockStiefel, DoublyStochastic, Grassmann, L1Stiefel, Oblique, SLMuon, Symplectic
from .keller_jordan import MuonWithAuxAdam, SingleDeviceMuon
from .muon import Muon
from .solvers import SOLVER_REGISTRY, get_inner_solver

__all__ = ["OPTIMIZERS", "OptimizerEntry", "find_optimizer", "optimizer_entries", "register"]

FACTORY_ARGS = ("lr", "momentum", "weight_decay", "spectral_budget")


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer of the table (see the module docstring)."""

    name: str
    cls: type
    summary: str
    factory_args: tuple[str, ...] = ("lr",)
    test_kwargs: Mapping[str, Any] = field(default_factory=dict)
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    takes: str = "every matrix"
    example_shape: tuple[int, int] = (10, 5)
    package: bool = True
    constrained: bool = False
    sharded: bool = True
    lazy_finite: bool = True
    compile_variants: tuple[str, ...] = ()
    complex: bool = False
    sparse: bool = False

    def configurations(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(variant name, constructor kwargs)``: ``"default"`` (:attr:`test_kwargs`) and each variant
        (the test kwargs updated by the variant's)."""
        yield "default", dict(self.test_kwargs)
        for name, kwargs in self.variants.items():
            yield name, {**self.test_kwargs, **kwargs}

    def kwargs(self, variant: str = "default", **overrides: Any) -> dict[str, Any]:
        """The constructor kwargs of ``variant``, with ``solver_*`` keys turned into an inner solver."""
        configurations = dict(self.configurations())
        if variant not in configurations:
            raise ValueError(f"{self.name} has no variant {variant!r}; it has {sorted(configurations)}")
        kwargs = {**configurations[variant], **overrides}
        solver = {k[len("solver_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("solver_")}
        if solver:
            kwargs["inner_solver"] = get_inner_solver(kwargs.pop("inner_solver", "spectral_clip"), **solver)
        return kwargs

    def config(self, variant: str = "default", **overrides: Any) -> dict[str, Any]:
        """The same configuration as a config file's ``{class_path, init_args}`` (the solver too)."""
        kwargs = {**dict(self.configurations())[variant], **overrides}
        solver = {k[len("solver_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("solver_")}
        if solver:
            name = kwargs.pop("inner_solver", "spectral_clip")
            kwargs["inner_solver"] = {"class_path": _path(SOLVER_REGISTRY[name]), "init_args": solver}
        return {"class_path": _path(self.cls), "init_args": kwargs}

    def build(self, params: Iterable[Any], variant: str = "default", **overrides: Any) -> torch.optim.Optimizer:
        """``cls(params, **kwargs(variant, **overrides))``: the tests' way to make one."""
        return self.cls(params, **self.kwargs(variant, **overrides))

    @property
    def every_shape(self) -> bool:
        return self.takes == "every matrix"


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


OPTIMIZERS: dict[str, OptimizerEntry] = {}


def register(entry: OptimizerEntry) -> OptimizerEntry:
    """Add ``entry`` to :data:`OPTIMIZERS` (its ``name`` must be new, its ``factory_args`` known)."""
    if entry.name in OPTIMIZERS:
        raise ValueError(f"an optimizer named {entry.name!r} is registered already ({OPTIMIZERS[entry.name].cls})")
    unknown = set(entry.factory_args) - set(FACTORY_ARGS)
    if unknown:
        raise ValueError(f"{entry.name}: unknown factory arguments {sorted(unknown)}; they are {FACTORY_ARGS}")
    OPTIMIZERS[entry.name] = entry
    return entry


def optimizer_entries(package_only: bool = True, **features: Any) -> list[OptimizerEntry]:
    """The entries (the package's own with ``package_only``) whose attributes equal ``features``
    (``optimizer_entries(sharded=True)``, ``optimizer_entries(every_shape=True)``)."""
    return [e for e in OPTIMIZERS.values() if (e.package or not package_only)
            and all(getattr(e, k) == v for k, v in features.items())]


def find_optimizer(name: str) -> Optional[OptimizerEntry]:
    """The entry called ``name`` (``"muon_sgd"``) or whose class is called ``name`` (``"MuonSGD"``), else ``None``."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name]
    return next((e for e in OPTIMIZERS.values() if e.cls.__name__ == name), None)


# -- the table --------------------------------------------------------------------------------------
_GEOMETRIC = dict(factory_args=("lr", "momentum"), constrained=True)

for _entry in (
    OptimizerEntry("sgd", torch.optim.SGD, "torch.optim.SGD on every group", ("lr", "momentum", "weight_decay"),
                   package=False),
    OptimizerEntry("adamw", torch.optim.AdamW, "torch.optim.AdamW on every group", ("lr", "weight_decay"),
                   package=False),
    # Keller Jordan's muon.py names for Muon at his defaults (optim/keller_jordan.py): the same rule as
    # "muon", which the catalogues run; package=False keeps them out of the catalogues.
    OptimizerEntry("muon_with_aux_adam", MuonWithAuxAdam, "Muon groups (use_muon=True) and Adam groups, Keller "
                   "Jordan's defaults", ("lr", "momentum", "weight_decay"), package=False),
    OptimizerEntry("single_device_muon", SingleDeviceMuon, "Muon at Keller Jordan's defaults",
                   ("lr", "momentum", "weight_decay"), package=False),
    OptimizerEntry(
        "muon", Muon, "W <- (1 - lr wd) W - lr s msign(momentum)", ("lr", "momentum", "weight_decay"),
        test_kwargs=dict(lr=0.02), compile_variants=("default",)),
    OptimizerEntry(
        "muon_sgd", MuonSGD, "momentum SGD, each matrix step fitted to a spectral budget",
        ("lr", "momentum", "weight_decay", "spectral_budget"),
        test_kwargs=dict(lr=0.05, spectral_budget=0.05),
        variants={"dual_tangent": dict(inner_solver="dual_ascent", solver_tangent=True),
                  "admm_tangent": dict(inner_solver="admm", solver_tangent=True),
                  "quasi_newton": dict(inner_solver="quasi_newton")},
        compile_variants=("default",)),
    OptimizerEntry(
        "muon_adamw", MuonAdamW, "AdamW, each matrix step fitted to a spectral budget",
        ("lr", "weight_decay", "spectral_budget"),
        test_kwargs=dict(lr=1e-2, spectral_budget=0.05),
        variants={"frank_wolfe": dict(inner_solver="frank_wolfe", solver_max_iters=3),
                  "unbudgeted": dict(spectral_budget=None)},
        compile_variants=("default",)),
    OptimizerEntry(
        "manifold_muon", ManifoldMuon, "Stiefel manifold, msign(G + WX) tangent, polar retraction",
        test_kwargs=dict(lr=0.05), variants={"inner": dict(mode="inner")}, constrained=True,
        compile_variants=("default",)),
    OptimizerEntry(
        "spectral_ball", SpectralBall, "spectral sphere ||W||_2 = R (or ball <= R), msign(G + lambda u v^T)",
        test_kwargs=dict(lr=0.05),
        # muon_sphere: lambda = 0, msign(G) retracted to the sphere (the spectral-sphere optimizer's ablation)
        variants={"inner": dict(mode="inner"), "ball": dict(constraint="ball", sigma_tol=1e-5),
                  "ball_inner": dict(constraint="ball", mode="inner"), "muon_sphere": dict(multiplier=False)},
        constrained=True, compile_variants=("default",)),
    OptimizerEntry("oblique", Oblique, "unit-norm columns (or rows)", test_kwargs=dict(lr=0.05), **_GEOMETRIC),
    OptimizerEntry("sl_muon", SLMuon, "det W = 1 (volume preserving)", test_kwargs=dict(lr=0.01),
                   takes="square matrices", example_shape=(6, 6), **_GEOMETRIC),
    OptimizerEntry("symplectic", Symplectic, "W^T J W = J", test_kwargs=dict(lr=0.01),
                   takes="square matrices of even size", example_shape=(6, 6), **_GEOMETRIC),
    OptimizerEntry("l1_stiefel", L1Stiefel, "Stiefel manifold with an l1 penalty", test_kwargs=dict(lr=0.05),
                   **_GEOMETRIC),
    OptimizerEntry("block_stiefel", BlockStiefel, "each block of block_size rows (or columns) on a Stiefel manifold",
                   test_kwargs=dict(lr=0.05, block_size=4, unsupported="fallback"),
                   takes="matrices whose blocked side block_size divides", example_shape=(8, 4), **_GEOMETRIC),
    OptimizerEntry("doubly_stochastic", DoublyStochastic, "the Birkhoff polytope (non-negative, unit row and "
                   "column sums), entropic mirror steps", test_kwargs=dict(lr=0.5), takes="square matrices",
                   example_shape=(6, 6), **_GEOMETRIC),
    OptimizerEntry("grassmann", Grassmann, "subspaces (an orthonormal basis), horizontal steps",
                   test_kwargs=dict(lr=0.05), takes="non-square matrices", **_GEOMETRIC),
):
    register(_entry)

# Second-order baselines (pytorch-optimizer, the [baselines] extra; without it building one names the extra).
for _entry in (
    OptimizerEntry("soap", SOAP, "Adam in the eigenbasis of Shampoo's preconditioner (pytorch-optimizer)",
                   ("lr", "weight_decay"), test_kwargs=dict(lr=3e-3, precondition_frequency=2), package=False),
    OptimizerEntry("kron", Kron, "PSGD with Kronecker-factored preconditioners (pytorch-optimizer)",
                   ("lr", "momentum", "weight_decay"), test_kwargs=dict(lr=1e-3), package=False),
):
    register(_entry)
