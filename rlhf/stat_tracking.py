"""Advantages from rewards: per-prompt tracking (DDPO), group-relative, or global.

All functions take the rewards and prompts of the *whole* epoch (gathered over processes)
and return float32 advantages (N,), already clipped by the caller's `clip`.
"""

from __future__ import annotations

from collections import deque

import numpy as np

__all__ = [
    "PerPromptStatTracker",
    "group_advantages",
    "group_centered_advantages",
    "global_advantages",
    "compute_advantages",
    "nanmean",
]

# Added to standard deviations before dividing: a prompt whose rewards are all equal gets
# advantage 0 instead of a division by zero (same constant as ddpo-pytorch's tracker).
STD_EPS = 1e-6


def global_advantages(rewards: np.ndarray) -> np.ndarray:
    """(r - mean) / (std + eps) over all N rewards; (N,) -> (N,)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    return ((rewards - rewards.mean()) / (rewards.std() + STD_EPS)).astype(np.float32)


def group_advantages(rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Normalise each reward inside the group of samples with the same prompt
    (GRPO-style, as in Flow-GRPO / DanceGRPO). A group of one gets advantage 0."""
    rewards = np.asarray(rewards, dtype=np.float64)
    prompts_arr = np.asarray(prompts, dtype=object)
    out = np.zeros_like(rewards)
    for p in dict.fromkeys(prompts):
        idx = prompts_arr == p
        r = rewards[idx]
        out[idx] = (r - r.mean()) / (r.std() + STD_EPS) if r.size > 1 else 0.0
    return out.astype(np.float32)


def group_centered_advantages(rewards: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Centre each reward on its prompt group's mean, then divide by the standard deviation
    of all centred rewards of the batch (one scale for everyone). Unlike `group_advantages`,
    a group whose rewards barely differ gets small advantages instead of unit-variance ones:
    the per-group std division blows ties and reward noise up to full-size signals (the
    bias Dr. GRPO removes; Liu et al. 2025, "Understanding R1-Zero-Like Training").
    A group of one gets advantage 0."""
    rewards = np.asarray(rewards, dtype=np.float64)
    prompts_arr = np.asarray(prompts, dtype=object)
    centred = np.zeros_like(rewards)
    for p in dict.fromkeys(prompts):
        idx = prompts_arr == p
        centred[idx] = rewards[idx] - rewards[idx].mean() if idx.sum() > 1 else 0.0
    return (centred / (np.sqrt((centred**2).mean()) + STD_EPS)).astype(np.float32)


class PerPromptStatTracker:
    """DDPO per-prompt statistics: each prompt keeps its last `buffer_size` rewards; once it
    has `min_count` of them, its rewards are normalised with that buffer's mean and std,
    before that with the mean and std of the whole current batch.

    `state_dict` / `load_state_dict` make it resumable; the state is JSON-ready (the trainer
    stores it in `trainer_state.json`).
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if buffer_size < 1 or min_count < 1:
            raise ValueError("buffer_size and min_count must be >= 1")
        self.buffer_size = buffer_size
        self.min_count = min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Add the rewards to their prompts' buffers and return advantages (N,)."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if len(prompts) != rewards.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {rewards.shape[0]} rewards")
        prompts_arr = np.asarray(prompts, dtype=object)
        out = np.empty_like(rewards)
        for p in dict.fromkeys(prompts):
            idx = prompts_arr == p
            buf = self.buffers.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(rewards[idx].tolist())
            if len(buf) < self.min_count:
                mean, std = rewards.mean(), rewards.std()
            else:
                mean, std = np.mean(buf), np.std(buf)
            out[idx] = (rewards[idx] - mean) / (std + STD_EPS)
        return out.astype(np.float32)

    def stats(self) -> dict[str, int]:
        """Number of tracked prompts and how many reached `min_count`."""
        full = sum(len(b) >= self.min_count for b in self.buffers.values())
        return {"tracked_prompts": len(self.buffers), "prompts_at_min_count": full}

    def state_dict(self) -> dict:
        """Sizes and every prompt's buffered rewards, as JSON-ready values."""
        return {
            "buffer_size": self.buffer_size,
            "min_count": self.min_count,
            "buffers": {p: list(b) for p, b in self.buffers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s output; malformed state raises `ValueError`."""
        try:
            buffer_size, min_count = int(state["buffer_size"]), int(state["min_count"])
            buffers = {
                str(p): deque((float(x) for x in v), maxlen=buffer_size)
                for p, v in state["buffers"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"not a PerPromptStatTracker state: {err!r}") from err
        self.buffer_size, self.min_count, self.buffers = buffer_size, min_count, buffers


def compute_advantages(
    mode: str,
    rewards: np.ndarray,
    prompts: list[str],
    tracker: PerPromptStatTracker | None = None,
    clip: float | None = None,
) -> np.ndarray:
    """Advantages (N,) for `mode` in {"per_prompt", "group", "group_centered", "global"}, clipped to +-clip."""
    if mode == "per_prompt":
        if tracker is None:
            raise ValueError("advantage mode 'per_prompt' needs a PerPromptStatTracker")
        adv = tracker.update(prompts, rewards)
    elif mode == "group":
        adv = group_advantages(rewards, prompts)
    elif mode == "group_centered":
        adv = group_centered_advantages(rewards, prompts)
    elif mode == "global":
        adv = global_advantages(rewards)
    else:
        raise ValueError(
            f"unknown advantage mode {mode!r}; valid: per_prompt, group, group_centered, global"
        )
    if clip is not None:
        adv = np.clip(adv, -clip, clip)
    return adv


def nanmean(values) -> float:
    """Mean of the non-NaN values; NaN when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if arr.size and not np.isnan(arr).all() else float("nan")
