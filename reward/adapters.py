"""Adapters that plug a reward of this project's contract into other trainers.

The project's contract is ``rewards, info = reward_fn(images, prompts, metadata)``
(:mod:`reward.contract`). Other trainers call a reward their own way:

- Flow-GRPO and DiffusionNFT (their ``multi_score``): ``scores, meta = fn(images, prompts,
  metadata, only_strict=True)``, ``scores`` a dict of per-reward score lists whose ``"avg"``
  entry, the weighted *sum* of the rewards, is what they optimise: :class:`FlowGRPOReward`,
  built by :func:`flow_grpo_reward`.
- Flow-Factory (its ``PointwiseRewardModel``): ``output = model(prompt=[...], image=[...])``,
  ``output.rewards`` of shape ``(B,)``: :class:`PointwiseReward`, built by
  :func:`pointwise_reward`; ``reward.adapters.FlowFactoryHyperAlign`` is the class to name in
  a Flow-Factory config (created on first access, it needs ``flow_factory`` installed).
- trl <= 0.23 ``DDPOTrainer``: ``rewards, reward_metadata = fn(images, prompts,
  prompt_metadata)``, this project's contract, except that with
  ``async_reward_computation=True`` it expects two futures back: :class:`DDPOReward`, built by
  :func:`ddpo_reward`.

The factories build the HyperAlign reward from a preset name, a checkpoint directory or a hub
id through :func:`rlhf.rewards.get_reward` (``"hyperalign:<name_or_path>"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from .contract import check_reward_output, reward_name
from .reward_fn import WeightedReward, single_layout, to_pixels

__all__ = [
    "DDPOReward",
    "FlowGRPOReward",
    "PointwiseOutput",
    "PointwiseReward",
    "contract_images",
    "ddpo_reward",
    "flow_grpo_reward",
    "per_sample_metadata",
    "pointwise_reward",
]

RESERVED_SCORE_KEYS = ("avg", "ori_avg")
"""Keys Flow-GRPO writes into the score dict itself ("avg" here, "ori_avg" in its trainer)."""


# ------------------------------------------------------------------ inputs of the contract


def per_sample_metadata(metadata, batch_size: int) -> list[dict]:
    """``metadata`` as a list of ``batch_size`` dicts.

    ``None``, ``{}`` or an empty sequence mean "no metadata" (Flow-GRPO's example passes
    ``{}``): ``batch_size`` empty dicts. A sequence must hold one dict per prompt.
    """
    if isinstance(metadata, str):
        raise TypeError("metadata must be a sequence of dicts (one per prompt), {} or None")
    if metadata is None or (isinstance(metadata, Mapping | Sequence) and len(metadata) == 0):
        return [{} for _ in range(batch_size)]
    if isinstance(metadata, Mapping):
        raise TypeError(
            f"metadata is one dict (keys {sorted(map(str, metadata))[:5]}); pass one dict per "
            f"prompt (a list of {batch_size}), {{}} or None"
        )
    if not isinstance(metadata, Sequence):
        raise TypeError(
            f"metadata must be a sequence of dicts (one per prompt), {{}} or None, got "
            f"{type(metadata).__name__}"
        )
    if len(metadata) != batch_size:
        raise ValueError(
            f"got {batch_size} prompts but {len(metadata)} metadata entries; pass one dict per "
            "prompt, {} or None"
        )
    return list(metadata)


def _prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a sequence of strings (list or tuple), got {type(prompts).__name__}"
        )
    return list(prompts)


def _item_size(item) -> tuple[int, int] | None:
    """``(H, W)`` of one list item (PIL image, path, array or tensor); None if unknown."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item.height, item.width
    if isinstance(item, str | os.PathLike):
        with Image.open(item) as im:
            return im.height, im.width
    if hasattr(item, "shape"):
        shape = tuple(int(s) for s in item.shape)
        side, _ = single_layout(shape)
        return shape[:2] if side == "last" else shape[1:]
    return None  # to_pixels names the unsupported type


def contract_images(images, device: torch.device | str | None = None) -> Tensor:
    """Any image batch these trainers pass -> float ``(B, 3, H, W)`` in [0, 1] (the contract).

    A tensor batch (either layout, float or uint8) stays on its device and keeps its float
    dtype (trl's fp16 stays fp16; uint8 becomes float32); a numpy batch (Flow-GRPO's uint8
    NHWC) and a list of PIL images, arrays, tensors or paths become float32 on ``device``
    (default: the first tensor's device, else CPU). List items are resized to the first item's
    size only when sizes differ. The forms are those of :func:`reward.reward_fn.to_pixels`.
    """
    if isinstance(images, Tensor):
        dtype = images.dtype if images.is_floating_point() else torch.float32
        return to_pixels(images, images.device, None, dtype)  # size: batches are not resized
    if isinstance(images, Sequence) and not isinstance(images, str) and len(images) > 0:
        first = images[0]
        if device is None and isinstance(first, Tensor):
            device = first.device
        size = _item_size(first)
    else:
        size = None  # numpy batches are not resized; anything else: to_pixels says what's wrong
    device = torch.device(device) if device is not None else torch.device("cpu")
    return to_pixels(images, device, size, torch.float32)


def _done(value) -> Future:
    """A future that already holds ``value``."""
    future: Future = Future()
    future.set_result(value)
    return future


# ---------------------------------------------------------------- Flow-GRPO / DiffusionNFT


class FlowGRPOReward:
    """A Flow-GRPO / DiffusionNFT reward: ``scores, {} = fn(images, prompts, metadata, ...)``.

    ``critics``: ``{name: (reward_fn, weight)}``, each ``reward_fn`` of the project's contract
    (any ``RewardFn``, or a plain function such as Flow-GRPO's own scorers, which return
    ``(scores, {})``). Every critic gets the images in the contract's form
    (:func:`contract_images`; numpy and PIL batches go to ``device``) and one metadata dict per
    prompt (:func:`per_sample_metadata`: ``{}`` and ``None`` work). ``scores[name]`` is each
    critic's list of B floats and ``scores["avg"]`` their weighted sum ``sum_k w_k r_k`` (a
    sum, not a mean, as in their ``multi_score``): the reward those trainers optimise.
    ``only_strict`` (a GenEval option) and any other keyword are accepted and ignored.
    """

    def __init__(
        self,
        critics: Mapping[str, tuple[Callable, float]],
        device: torch.device | str | None = None,
    ) -> None:
        clash = [name for name in critics if name in RESERVED_SCORE_KEYS]
        if clash:
            raise ValueError(
                f"critic names {clash} are reserved: Flow-GRPO writes {RESERVED_SCORE_KEYS} into "
                "the score dict itself; rename them"
            )
        self.weighted = WeightedReward(critics)
        self.device = torch.device(device) if device is not None else None

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: ({reward_name(f)}, {w})" for k, (f, w) in self.critics.items())
        return f"FlowGRPOReward({{{parts}}}, device={self.device})"

    @property
    def critics(self) -> dict[str, tuple[Callable, float]]:
        return self.weighted.critics

    def __call__(self, images, prompts, metadata=None, only_strict: bool = True, **ignored):
        prompts = _prompt_list(prompts)
        metadata = per_sample_metadata(metadata, len(prompts))
        total, info = self.weighted(contract_images(images, self.device), prompts, metadata)
        scores = {name: info[name] for name in self.critics}  # each a list of B floats
        scores["avg"] = total.cpu().tolist()
        return scores, {}


# ----------------------------------------------------------------------------- Flow-Factory


@dataclass
class PointwiseOutput:
    """A pointwise reward's result, with the field names of Flow-Factory's
    ``RewardModelOutput``: ``rewards`` float32 ``(B,)``, ``extra_info`` per-sample lists."""

    rewards: Tensor
    extra_info: dict[str, list]


class PointwiseReward:
    """A Flow-Factory-style pointwise reward: ``output = fn(prompt=[...], image=[...])``.

    ``image``: a list of ``(C, H, W)`` tensors in [0, 1] (what Flow-Factory passes when
    ``use_tensor_inputs`` is True, as here), or of PIL images (when it is False), or a batch;
    ``prompt``: a list of B strings (or one string). Returns a :class:`PointwiseOutput`. The
    signature names only ``prompt`` and ``image``, because Flow-Factory passes a reward every
    sample field its ``__call__`` accepts.
    """

    required_fields = ("prompt", "image")
    use_tensor_inputs = True

    def __init__(self, reward_fn: Callable, device: torch.device | str | None = None) -> None:
        self.reward_fn = reward_fn
        self.device = torch.device(device) if device is not None else None
        self._dropped: set[str] = set()

    def __repr__(self) -> str:
        return f"PointwiseReward({reward_name(self.reward_fn)}, device={self.device})"

    def __call__(self, prompt, image=None) -> PointwiseOutput:
        if image is None:
            raise ValueError(
                f"{reward_name(self.reward_fn)} scores images but got image=None; keep 'image' in "
                "required_fields (a video model's samples have no images)"
            )
        prompts = [prompt] if isinstance(prompt, str) else _prompt_list(prompt)
        pixels = contract_images(image, self.device)
        out = self.reward_fn(pixels, prompts, per_sample_metadata(None, len(prompts)))
        where = f"pointwise batch of {len(prompts)}"
        rewards, info = check_reward_output(
            out, len(prompts), pixels.device, reward_name(self.reward_fn), where, self._dropped
        )
        return PointwiseOutput(rewards=rewards, extra_info=info)


def _flow_factory_class() -> type:
    """``FlowFactoryHyperAlign``: HyperAlign as a subclass of Flow-Factory's
    ``PointwiseRewardModel`` (its trainer only runs rewards that are instances of it)."""
    try:
        from flow_factory.rewards import PointwiseRewardModel, RewardModelOutput
    except ImportError as err:
        raise ImportError(
            "reward.adapters.FlowFactoryHyperAlign subclasses Flow-Factory's PointwiseRewardModel, "
            f"but flow_factory does not import here ({err}); install Flow-Factory in this "
            "environment, or use reward.adapters.PointwiseReward outside it"
        ) from err

    class FlowFactoryHyperAlign(PointwiseRewardModel):
        """HyperAlign as a Flow-Factory pointwise reward. Its config entry names the checkpoint
        as ``model_path`` (a preset such as ``shapes``, a checkpoint directory or a hub id);
        ``device`` and ``dtype`` of the entry are the reward's."""

        required_fields = PointwiseReward.required_fields
        use_tensor_inputs = PointwiseReward.use_tensor_inputs

        def __init__(self, config, accelerator):
            super().__init__(config, accelerator)  # sets self.config, self.device, self.dtype
            name = getattr(config, "model_path", None)
            if not name:
                raise ValueError(
                    "FlowFactoryHyperAlign needs the HyperAlign checkpoint: add `model_path: "
                    "<preset, checkpoint directory or hub id>` (e.g. `model_path: shapes`) to its "
                    "entry under `rewards:`"
                )
            reward_fn = _hyperalign(name, self.device, self.dtype)
            self.model = reward_fn.model  # the base class's .to(device) moves self.model
            self.pointwise = PointwiseReward(reward_fn)

        def __call__(self, prompt, image=None):
            out = self.pointwise(prompt, image)
            return RewardModelOutput(rewards=out.rewards, extra_info=out.extra_info)

    FlowFactoryHyperAlign.__module__ = __name__
    FlowFactoryHyperAlign.__qualname__ = "FlowFactoryHyperAlign"
    return FlowFactoryHyperAlign


def __getattr__(name: str):
    # Built on first access so that importing this module never needs flow_factory.
    if name == "FlowFactoryHyperAlign":
        cls = globals()[name] = _flow_factory_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------- trl <= 0.23 DDPO


class DDPOReward:
    """A reward for trl <= 0.23 ``DDPOTrainer``: ``rewards, info = fn(images, prompts,
    prompt_metadata)``.

    trl passes ``images`` as a float tensor ``(B, 3, H, W)`` in [0, 1] in its mixed precision
    (fp16 by default), ``prompts`` and ``prompt_metadata`` as tuples, and turns ``rewards`` into
    a tensor with ``torch.as_tensor(rewards, device=...)``. Here ``rewards`` is float32 ``(B,)``
    on the images' device, validated by :func:`reward.contract.check_reward_output`.

    ``async_reward_computation``: set it to the trainer's setting. With it trl runs the reward in
    its thread pool after the whole epoch is sampled and calls ``.result()`` on both returned
    values, so the reward then returns two finished futures.
    """

    def __init__(self, reward_fn: Callable, async_reward_computation: bool = False) -> None:
        self.reward_fn = reward_fn
        self.async_reward_computation = bool(async_reward_computation)
        self._dropped: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"DDPOReward({reward_name(self.reward_fn)}, "
            f"async_reward_computation={self.async_reward_computation})"
        )

    def __call__(self, images, prompts, prompt_metadata=None):
        prompts = _prompt_list(prompts)
        metadata = per_sample_metadata(prompt_metadata, len(prompts))
        out = self.reward_fn(images, prompts, metadata)
        device = images.device if isinstance(images, Tensor) else torch.device("cpu")
        rewards, info = check_reward_output(
            out,
            len(prompts),
            device,
            reward_name(self.reward_fn),
            f"trl DDPOTrainer batch of {len(prompts)}",
            self._dropped,
        )
        if self.async_reward_computation:
            return _done(rewards), _done(info)
        return rewards, info


# ------------------------------------------------------------------------------ factories


def _hyperalign(model: str | os.PathLike, device, dtype):
    """The HyperAlign reward of a preset, checkpoint directory or hub id, via the registry."""
    from rlhf.rewards import get_reward  # lazy: the registry lives with the RL trainer

    return get_reward(f"hyperalign:{os.fspath(model)}", device=device, dtype=dtype)


def flow_grpo_reward(
    model: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    weights: Mapping[str, float] | None = None,
    rewards: Mapping[str, Callable] | None = None,
) -> FlowGRPOReward:
    """A Flow-GRPO / DiffusionNFT reward around the HyperAlign reward of ``model``.

    ``model``: a HyperAlign preset (``"shapes"``), checkpoint directory or hub id, run on
    ``device`` in ``dtype`` (fp32 by default). ``weights``: ``{name: weight}``, default
    ``{"hyperalign": 1.0}``; ``"hyperalign"`` is the HyperAlign reward, any other name is taken
    from ``rewards`` (``{name: reward_fn}``, e.g. Flow-GRPO's ``pickscore_score(device)``) or
    else built by :func:`rlhf.rewards.get_reward` (``"brightness"``, ``"import:pkg.mod:fn"``).
    A weight of 0 logs a reward without optimising it.
    """
    weights = dict(weights) if weights is not None else {"hyperalign": 1.0}
    rewards = dict(rewards or {})
    if "hyperalign" not in weights:
        raise ValueError(
            f"weights {weights} has no 'hyperalign' entry; add 'hyperalign': <weight> (0 logs "
            "HyperAlign without optimising it)"
        )
    unweighted = sorted(set(rewards) - set(weights))
    if unweighted:
        raise ValueError(f"rewards {unweighted} have no weight; add them to weights")
    from rlhf.rewards import get_reward

    critics = {}
    for name, weight in weights.items():
        if name == "hyperalign":
            fn = _hyperalign(model, device, dtype)
        elif name in rewards:
            fn = rewards[name]
        else:
            fn = get_reward(name, device=device, dtype=dtype)
        critics[name] = (fn, float(weight))
    return FlowGRPOReward(critics, device=device)


def pointwise_reward(
    model: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PointwiseReward:
    """A Flow-Factory-style pointwise reward around the HyperAlign reward of ``model``."""
    return PointwiseReward(_hyperalign(model, device, dtype), device=device)


def ddpo_reward(
    model: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    async_reward_computation: bool = False,
) -> DDPOReward:
    """A trl <= 0.23 ``DDPOTrainer`` reward around the HyperAlign reward of ``model``; pass the
    trainer's ``DDPOConfig.async_reward_computation``."""
    return DDPOReward(_hyperalign(model, device, dtype), async_reward_computation)
