"""Lightning training for spectral-norm constrained optimization (Muon family)."""

from importlib.metadata import PackageNotFoundError, version

from lightning_spectral.config_policy import register_config_function

__all__ = ["register_config_function"]

try:
    __version__ = version("lightning_spectral")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
