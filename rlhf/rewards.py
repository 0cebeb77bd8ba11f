"""Reward functions for RL fine-tuning, and the registry that builds them from a spec.

Every reward follows the contract written down once in :mod:`reward.contract` (``RewardFn``);
``check_reward_output`` (from there) is what the trainer applies to whatever a user's reward
returns.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from reward.contract import RewardError, check_reward_output, reward_name

__all__ = [
    "Brightness",
    "SlowReward",
    "get_reward",
    "check_reward_output",
    "reward_name",
    "RewardError",
]


class Brightness:
    """Mean pixel value of each image, in [0, 1]. Differentiable (`score`).

    A test reward: easy to raise, so it shows whether learning happens at all.
    """

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) float32, differentiable."""
        return images.float().mean(dim=(1, 2, 3))

    def __call__(self, images, prompts, metadata):
        with torch.no_grad():
            r = self.score(images, prompts)
        return r, {"brightness": r.tolist()}

    def __repr__(self) -> str:
        return "Brightness()"


class SlowReward:
    """Wrap a reward and sleep `delay_s` seconds per call: stands in for a slow reward model
    (benchmarks of the reward/sampling overlap). Sleeping releases the GIL like a GPU wait."""

    def __init__(self, inner, delay_s: float):
        self.inner = inner
        self.delay_s = float(delay_s)

    def __call__(self, images, prompts, metadata):
        time.sleep(self.delay_s)
        return self.inner(images, prompts, metadata)

    def score(self, images, prompts=None):
        return self.inner.score(images, prompts)

    def __repr__(self) -> str:
        return f"SlowReward({self.inner!r}, delay_s={self.delay_s})"


_SPECS = {
    "brightness": "mean pixel value (test reward)",
    "hyperalign:<name_or_path>": "HyperAlign alignment score via reward.build_reward",
}


def get_reward(spec: str, device=None, dtype=None):
    """Build a reward function from a spec; unknown specs raise `ValueError` listing the
    valid ones. `device`/`dtype` are passed to reward models that hold weights."""
    name, _, arg = spec.partition(":")
    if name == "brightness" and not arg:
        return Brightness()
    if name == "hyperalign" and arg:
        try:
            from reward import build_reward  # lazy: heavy, and optional for custom rewards
        except ImportError as e:
            raise ImportError(
                f"reward spec {spec!r} needs `reward.build_reward` (the HyperAlign package of "
                f"this project), which failed to import: {e}"
            ) from e
        return build_reward(arg, device=device, dtype=dtype)
    valid = "\n  ".join(f"{k}: {v}" for k, v in _SPECS.items())
    raise ValueError(f"unknown reward spec {spec!r}; valid specs:\n  {valid}")
