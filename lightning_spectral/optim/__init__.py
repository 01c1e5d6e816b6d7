"""Spectral-norm optimizers in pure PyTorch (no Lightning import): msign, Muon, MuonSGD and
MuonAdamW with five inner solvers, manifold Muon, the spectral sphere/ball, the geometric
variants (Oblique, SL, Symplectic, L1-/Block-Stiefel, Doubly-Stochastic, Grassmann), the
second-order baselines SOAP and Kron (pytorch-optimizer's, the ``[baselines]`` extra), the table
of them all (:mod:`.registry`) and the factory."""

from .base import MatrixOptimizer, NonFiniteGradientError
from .baselines import SOAP, Kron, baselines_available
from .budgeted import MuonAdamW, MuonSGD
from .constrained.directions import (DirectionInfo, orthogonal_direction, spectral_ball_direction, stiefel_amortized,
                                     stiefel_direction)
from .constrained.dual import ManifoldMuon, SpectralBall
from .constrained.geometry import sinkhorn, symplectic_form
from .constrained.riemannian import BlockStiefel, DoublyStochastic, Grassmann, L1Stiefel, Oblique, SLMuon, Symplectic
from .constrained.skeleton import GeometricOptimizer
from .factory import OPTIMIZER_TYPES, create_optimizer
from .linalg import TangentSpace, spectral_clip
from .msign import SCHEDULES, msign, msign_svd
from .keller_jordan import MuonWithAuxAdam, SingleDeviceMuon, SingleDeviceMuonWithAuxAdam
from .muon import Muon, torch_muon_state_dict
from .param_groups import build_param_groups, routing_table
from .registry import OPTIMIZERS, OptimizerEntry, find_optimizer, optimizer_entries, register
from .solvers import (
    SOLVER_REGISTRY,
    ADMMSolver,
    DualAscentSolver,
    FrankWolfeSolver,
    InnerSolver,
    QuasiNewtonDualSolver,
    SolveInfo,
    SpectralClipSolver,
    get_inner_solver,
)

__all__ = [
    "ADMMSolver", "Kron", "SOAP", "baselines_available", "BlockStiefel", "DoublyStochastic", "GeometricOptimizer", "Grassmann", "L1Stiefel", "Oblique",
    "SLMuon", "Symplectic", "sinkhorn", "symplectic_form", "DirectionInfo", "DualAscentSolver", "FrankWolfeSolver", "InnerSolver", "ManifoldMuon",
    "MatrixOptimizer", "Muon", "MuonAdamW", "MuonSGD", "MuonWithAuxAdam", "SingleDeviceMuon",
    "SingleDeviceMuonWithAuxAdam", "NonFiniteGradientError", "OPTIMIZERS", "OPTIMIZER_TYPES",
    "OptimizerEntry", "find_optimizer", "optimizer_entries", "register",
    "QuasiNewtonDualSolver", "SCHEDULES", "SOLVER_REGISTRY", "SolveInfo", "SpectralBall", "SpectralClipSolver",
    "TangentSpace", "build_param_groups", "create_optimizer", "get_inner_solver", "msign", "msign_svd", "routing_table",
    "orthogonal_direction", "torch_muon_state_dict", "spectral_ball_direction", "spectral_clip", "stiefel_amortized", "stiefel_direction",
]
