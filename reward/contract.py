"""The reward contract: one protocol for every reward of the project and of its users.

``rewards, info = reward_fn(images, prompts, metadata)``

- ``images``: float tensor ``(B, 3, H, W)`` in [0, 1] (diffusers ``output_type="pt"``) on the
  sampling device; ``prompts``: sequence of ``B`` str; ``metadata``: sequence of ``B`` dicts.
- ``rewards``: tensor or array of shape ``(B,)`` (``(B, 1)`` is accepted and squeezed);
  ``info``: dict of per-sample lists (to log), or ``None``. Values that are not per-sample
  lists (a scalar, a list of another length) are dropped with one warning per key.

This is the convention of trl <= 0.23 ``DDPOTrainer`` and of ddpo-pytorch, so their reward
functions work with this project's trainer and this project's rewards with theirs. Rewards are
picklable callable classes (state in ``__init__``, work in ``__call__``). A differentiable
reward also offers ``score(images, prompts) -> (B,)`` tensor with gradients (DRaFT / AlignProp).

:func:`check_reward_output` validates and normalises what any reward returns; the trainer and
:class:`reward.WeightedReward` both use it.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import MutableSet, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "RewardError",
    "RewardInfoWarning",
    "RewardFn",
    "DifferentiableRewardFn",
    "check_reward_output",
    "reward_name",
]


class RewardError(RuntimeError):
    """A reward function failed or broke the contract; the message names it and the batch."""


class RewardInfoWarning(UserWarning):
    """A reward's info value was not a per-sample list and is not logged."""


_WARN_LOCK = threading.Lock()  # rewards run in a thread pool: one warning per key, not two


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


def check_reward_output(
    out, batch_size: int, device, name: str, where: str, dropped: MutableSet[str] | None = None
):
    """Validate and normalise a reward function's return value.

    Returns `(rewards, info)` with rewards a float32 tensor (B,) on `device` (a `(B, 1)`
    column is squeezed) and info a dict of lists of length B. Raises `RewardError` naming the
    reward (`name`) and the batch (`where`) when the contract is broken or a reward is not
    finite. Info values that are not per-sample lists are dropped with a `RewardInfoWarning`;
    pass the same `dropped` set on every call of a run to warn only once per key.
    """
    if not (isinstance(out, tuple) and len(out) == 2):
        raise RewardError(
            f"reward function {name} must return (rewards, info), got {type(out).__name__} "
            f"({where})"
        )
    rewards, info = out
    rewards = _check_rewards(rewards, batch_size, device, name, where)
    return rewards, _per_sample_info(info, batch_size, name, where, dropped)


def _check_rewards(rewards, batch_size: int, device, name: str, where: str) -> torch.Tensor:
    """Rewards as a finite float32 tensor (B,) on `device`, or `RewardError`."""
    if isinstance(rewards, np.ndarray | list | tuple):
        rewards = torch.as_tensor(np.asarray(rewards, dtype=np.float32))
    if not isinstance(rewards, torch.Tensor):
        raise RewardError(
            f"reward function {name} returned rewards of type {type(rewards).__name__}; expected "
            f"a tensor or array of shape ({batch_size},) ({where})"
        )
    rewards = rewards.detach().to(device=device, dtype=torch.float32)
    if rewards.shape == (batch_size, 1):
        rewards = rewards[:, 0]  # (B, 1) -> (B,)
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
    return rewards


def _per_sample_info(info, batch_size: int, name: str, where: str, dropped) -> dict[str, list]:
    """The per-sample lists of `info`; other values are dropped with one warning per key."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise RewardError(
            f"reward function {name} returned info of type {type(info).__name__}, "
            f"expected a dict of per-sample lists ({where})"
        )
    clean = {}
    for k, v in info.items():
        if isinstance(v, torch.Tensor | np.ndarray):
            v = v.tolist()
        if isinstance(v, list | tuple) and len(v) == batch_size:
            clean[k] = list(v)
            continue
        with _WARN_LOCK:
            first = dropped is None or k not in dropped
            if dropped is not None:
                dropped.add(k)
        if first:
            what = f"{len(v)} values" if isinstance(v, list | tuple) else type(v).__name__
            warnings.warn(
                f"reward function {name}: info[{k!r}] is not a list of {batch_size} per-sample "
                f"values (got {what}); it is not logged ({where})",
                RewardInfoWarning,
                stacklevel=3,
            )
    return clean
