"""HyperAlign: hyperbolic entailment-cone text-to-image alignment reward."""

from .config import HyperAlignConfig
from .model import HyperAlign, HyperAlignOutput

__all__ = ["HyperAlign", "HyperAlignConfig", "HyperAlignOutput"]
