"""Former home of :class:`ManifoldMuon` and :class:`SpectralBall`, kept as an import path; both
are bindings in :mod:`.geometric` now."""

from .geometric import ManifoldMuon, SpectralBall

__all__ = ["ManifoldMuon", "SpectralBall"]
