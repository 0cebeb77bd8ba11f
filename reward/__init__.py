"""HyperAlign: hyperbolic entailment-cone text-to-image alignment reward."""

from .config import HyperAlignConfig
from .model import HyperAlign, HyperAlignOutput
from .reward_fn import PRESETS, HyperAlignReward, WeightedReward, build_reward

__all__ = [
    "PRESETS",
    "HyperAlign",
    "HyperAlignConfig",
    "HyperAlignOutput",
    "HyperAlignReward",
    "WeightedReward",
    "build_reward",
]
