"""HyperAlign: hyperbolic entailment-cone text-to-image alignment reward.

``build_reward(name_or_path)`` gives a reward function with the contract of
:mod:`reward.contract`; :class:`WeightedReward` mixes it with other critics.
"""

from .config import HyperAlignConfig
from .model import HyperAlign, HyperAlignOutput
from .reward_fn import (
    PRESETS,
    HyperAlignReward,
    NonFiniteRewardError,
    WeightedReward,
    build_reward,
)

__all__ = [
    "PRESETS",
    "HyperAlign",
    "HyperAlignConfig",
    "HyperAlignOutput",
    "HyperAlignReward",
    "NonFiniteRewardError",
    "WeightedReward",
    "build_reward",
]
