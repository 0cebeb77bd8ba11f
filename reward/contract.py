"""The reward contract: one protocol for every reward of the project and of its users.

``rewards, info = reward_fn(images, prompts, metadata)``

- ``images``: float tensor ``(B, 3, H, W)`` in [0, 1] (diffusers ``output_type="pt"``) on the
  sampling device; ``prompts``: sequence of ``B`` str; ``metadata``: sequence of ``B`` dicts.
- ``rewards``: tensor or array of shape ``(B,)``; ``info``: dict of per-sample lists (to log).

This is the convention of trl <= 0.23 ``DDPOTrainer`` and of ddpo-pytorch, so their reward
functions work with this project's trainer and this project's rewards with theirs. Rewards are
picklable callable classes (state in ``__init__``, work in ``__call__``). A differentiable
reward also offers ``score(images, prompts) -> (B,)`` tensor with gradients (DRaFT / AlignProp).

:func:`check_reward_output` validates and normalises what any reward returns; the trainer and
:class:`reward.WeightedReward` both use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "RewardError",
    "RewardFn",
    "DifferentiableRewardFn",
    "check_reward_output",
    "reward_name",
]


class RewardError(RuntimeError):
    """A reward function failed or broke the contract; the message names it and the batch."""


@runtime_checkable
class RewardFn(Protocol):
    """``(images (B,3,H,W) in [0,1], prompts, metadata) -> (rewards (B,), info dict)``."""

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]
    ) -> tuple[Any, dict]: ...


@runtime_checkable
class DifferentiableRewardFn(RewardFn, Protocol):
    """A :class:`RewardFn` that also returns differentiable scores."""

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor: ...


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
