"""Constraint sets, one module each, behind one protocol (:class:`~.base.Geometry`): which shapes
a set holds, the nearest point, the tangent projection, a retraction, a distance. Geometry
imports only the linear algebra (:mod:`...linalg`, :mod:`...msign`), never an optimizer."""

from .base import Geometry, record_inner
from .birkhoff import Birkhoff, sinkhorn
from .lie import SpecialLinear, SymplecticGroup, symplectic_form
from .oblique import ORIENTATIONS, Oblique
from .sphere import RADIUS_MODES, SpectralSphere
from .stiefel import Grassmann, Stiefel, StiefelBlocks

__all__ = [
    "Birkhoff", "Geometry", "Grassmann", "ORIENTATIONS", "Oblique", "RADIUS_MODES", "SpecialLinear",
    "SpectralSphere", "Stiefel", "StiefelBlocks", "SymplecticGroup", "record_inner", "sinkhorn", "symplectic_form",
]
