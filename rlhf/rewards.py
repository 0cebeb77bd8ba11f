"""Reward functions for RL fine-tuning, and the registry that builds them from a spec.

Contract (see ../shared/design/rlhf.md): `rewards, info = reward_fn(images, prompts, metadata)`
with `images` a float tensor (B, 3, H, W) in [0, 1] on the sampling device, `prompts` a
sequence of str, `metadata` a sequence of dict; `rewards` a float32 tensor (B,) on the images'
device and `info` a dict of per-sample lists. Rewards are picklable callable classes. A reward
that is differentiable also offers `score(images, prompts) -> (B,) tensor` (used by the
DRaFT-K mode of the trainer).

`check_reward_output` is what the trainer applies to whatever a user's reward returns.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["Brightness", "SlowReward", "get_reward", "check_reward_output", "RewardError"]


class RewardError(RuntimeError):
    """A reward function failed or broke the contract; the message names it and the batch."""


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


def reward_name(reward_fn) -> str:
    """A readable name for error messages."""
    return getattr(reward_fn, "__name__", None) or type(reward_fn).__name__


def check_reward_output(out, batch_size: int, device, name: str, where: str):
    """Validate and normalise a reward function's return value.

    Returns `(rewards, info)` with rewards a float32 tensor (B,) on `device` and info a dict
    of lists of length B. Raises `RewardError` naming the reward (`name`) and the batch
    (`where`) when the contract is broken or a reward is not finite.
    """
    if not (isinstance(out, tuple) and len(out) == 2):
        raise RewardError(
            f"reward function {name} must return (rewards, info), got {type(out).__name__} "
            f"({where})"
        )
    rewards, info = out
    if isinstance(rewards, np.ndarray | list | tuple):
        rewards = torch.as_tensor(np.asarray(rewards, dtype=np.float32))
    if not isinstance(rewards, torch.Tensor):
        raise RewardError(
            f"reward function {name} returned rewards of type {type(rewards).__name__}; expected "
            f"a tensor or array of shape ({batch_size},) ({where})"
        )
    rewards = rewards.detach().to(device=device, dtype=torch.float32)
    if rewards.shape != (batch_size,):
        raise RewardError(
            f"reward function {name} returned rewards of shape {tuple(rewards.shape)}; expected "
            f"({batch_size},), one per image ({where})"
        )
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(
            f"reward function {name} returned non-finite rewards at indices {bad} "
            f"(values {rewards[bad].tolist()}) ({where})"
        )
    if info is None:
        info = {}
    if not isinstance(info, dict):
        raise RewardError(
            f"reward function {name} returned info of type {type(info).__name__}, "
            f"expected a dict of per-sample lists ({where})"
        )
    clean = {}
    for k, v in info.items():
        if isinstance(v, torch.Tensor | np.ndarray):
            v = v.tolist()
        if not isinstance(v, list | tuple) or len(v) != batch_size:
            raise RewardError(
                f"reward function {name}: info[{k!r}] must be a list of {batch_size} per-sample "
                f"values ({where})"
            )
        clean[k] = list(v)
    return rewards, clean
