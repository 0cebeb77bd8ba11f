"""HyperAlign as a batched, device-native, differentiable reward function for RL loops.

The contract (``../shared/design/rlhf.md``; the convention of trl <= 0.23 ``DDPOTrainer`` and
ddpo-pytorch)::

    rewards, info = reward_fn(images, prompts, metadata)

- ``images``: float tensor ``(B, 3, H, W)`` in [0, 1] on any device (also: uint8 tensor
  ``(B, 3, H, W)``, a list of PIL images, of HWC uint8 numpy arrays, or of file paths);
- ``prompts``: sequence of ``B`` strings; ``metadata``: sequence of ``B`` dicts or ``None``;
- ``rewards``: float32 tensor ``(B,)`` on the images' device (the model's for non-tensors);
- ``info``: dict of per-sample lists of floats, ready to log.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .config import HyperAlignConfig
from .model import HyperAlign, check_inputs

INFO_KEYS = ("s_base", "distance", "angle", "aperture", "alpha", "beta", "gamma")


def _tiny_random(device, **overrides) -> HyperAlign:
    warnings.warn(
        "reward preset 'tiny-random' has RANDOM weights: its scores mean nothing. Use it to test "
        "plumbing only.",
        stacklevel=3,
    )
    cfg = HyperAlignConfig(backbone="hyperalign-tiny", pretrained=None).replace(**overrides)
    torch.manual_seed(0)
    return HyperAlign(cfg, device=device)


def _shapes(device, **overrides) -> HyperAlign:
    from shapes.assets import REWARD_DIR

    if not (REWARD_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the 'shapes' checkpoint is not in this installation ({REWARD_DIR}); rebuild it "
            "with the command in README.md (section 'The shapes world')"
        )
    return HyperAlign.from_pretrained(REWARD_DIR, device=device, **overrides)


PRESETS: dict[str, Callable[..., HyperAlign]] = {
    "tiny-random": _tiny_random,
    "shapes": _shapes,
}


def build_reward(
    name_or_path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    max_batch_size: int = 64,
    **overrides,
) -> HyperAlignReward:
    """Build a HyperAlign reward from a preset name, a checkpoint directory or a hub repo id.

    ``device``: where the model runs (default: CPU). ``dtype``: ``torch.bfloat16`` or
    ``torch.float16`` runs the backbone under autocast (the geometry stays fp32); ``None`` or
    ``torch.float32`` runs everything in fp32. ``overrides``: ``HyperAlignConfig`` fields.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    name = str(name_or_path)
    if name in PRESETS:
        model = PRESETS[name](device, **overrides)
    elif Path(name).is_dir() or (name.count("/") == 1 and not name.startswith((".", "/"))):
        model = HyperAlign.from_pretrained(name, device=device, **overrides)
    else:
        raise ValueError(
            f"unknown reward {name!r}: not a preset ({', '.join(sorted(PRESETS))}), nor a "
            "checkpoint directory, nor a Hugging Face hub repo id ('org/name')"
        )
    return HyperAlignReward(model, dtype=dtype, max_batch_size=max_batch_size)


class HyperAlignReward:
    """Picklable callable: ``rewards, info = reward_fn(images, prompts, metadata=None)``.

    ``score(images, prompts)`` is the differentiable variant (keeps the autograd graph to the
    pixels) for AlignProp / DRaFT / ReFL-style training.
    """

    def __init__(
        self,
        model: HyperAlign,
        *,
        dtype: torch.dtype | None = None,
        max_batch_size: int = 64,
    ) -> None:
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be None, float32, bfloat16 or float16, got {dtype}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.dtype = None if dtype == torch.float32 else dtype
        self.max_batch_size = max_batch_size

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    def __repr__(self) -> str:
        return (
            f"HyperAlignReward(backbone={self.model.config.backbone!r}, device={self.device}, "
            f"dtype={self.dtype}, max_batch_size={self.max_batch_size})"
        )

    def _autocast(self):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _forward(self, images: Tensor, prompts: Sequence[str]):
        outs = []
        for start in range(0, images.shape[0], self.max_batch_size):
            chunk = slice(start, start + self.max_batch_size)
            with self._autocast():
                # Inputs were validated once for the whole batch.
                f_i = self.model.encode_images(images[chunk])
                f_t = self.model.encode_texts(prompts[chunk])
            outs.append(self.model.head(f_i, f_t))
        return outs

    def __call__(
        self,
        images,
        prompts: Sequence[str],
        metadata: Sequence[Mapping] | None = None,
    ) -> tuple[Tensor, dict[str, list[float]]]:
        out_device = images.device if isinstance(images, Tensor) else self.device
        prompts = _check_prompts(prompts)
        if metadata is not None and len(metadata) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(metadata)} metadata entries; pass one "
                "dict per prompt or None"
            )
        with torch.inference_mode():
            pixels = to_pixels(images, self.device, self.model.image_size)
            check_inputs(pixels, prompts)
            outs = self._forward(pixels, prompts)
            rewards = torch.cat([o.score for o in outs]).float()
            info = {
                key: torch.cat([getattr(o, key) for o in outs]).float().cpu().tolist()
                for key in INFO_KEYS
            }
        return rewards.to(out_device), info

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Differentiable rewards ``(B,)`` (float32, on the images' device) for a float tensor."""
        if not isinstance(images, Tensor) or not images.is_floating_point():
            raise TypeError("score() needs a float tensor (B, 3, H, W) in [0, 1] to differentiate")
        prompts = _check_prompts(prompts)
        check_inputs(images, prompts)
        pixels = images.to(self.device)
        outs = self._forward(pixels, prompts)
        return torch.cat([o.score for o in outs]).float().to(images.device)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a sequence of strings (list or tuple), got {type(prompts).__name__}"
        )
    return list(prompts)


def to_pixels(images, device: torch.device, size: tuple[int, int]) -> Tensor:
    """Any supported image batch -> float tensor ``(B, 3, H, W)`` in [0, 1] on ``device``.

    Tensors stay tensors (moved, never round-tripped through PIL); lists of PIL images, numpy
    arrays or paths are converted one by one and resized to ``size`` so they can be stacked.
    """
    if isinstance(images, Tensor):
        if images.dtype == torch.uint8:
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(
                    f"uint8 images must have shape (B, 3, H, W), got {tuple(images.shape)}"
                )
            return images.to(device).float().div_(255.0)
        return images.to(device)
    if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
        raise TypeError(
            "images must be a tensor (B, 3, H, W) or a list of PIL images / HWC uint8 arrays / "
            f"file paths, got {type(images).__name__}"
        )
    if len(images) == 0:
        raise ValueError("images is an empty batch (B = 0); pass at least one image")
    return torch.stack([_one_image(im, i, device, size) for i, im in enumerate(images)])


def _one_image(image, index: int, device, size) -> Tensor:
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except (OSError, ValueError) as err:
            raise ValueError(f"image {index} ({image}) could not be read: {err}") from err
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(
                f"image {index}: numpy images must be HWC with 3 channels, got {array.shape}"
            )
        if array.dtype != np.uint8:
            raise ValueError(f"image {index}: numpy images must be uint8, got {array.dtype}")
    else:
        raise TypeError(
            f"image {index} is a {type(image).__name__}; use a PIL image, an HWC uint8 array or a path"
        )
    t = torch.from_numpy(np.array(array)).to(device).permute(2, 0, 1)  # (3, H, W), own copy
    t = t.float().div_(255.0)[None]  # (1, 3, H, W)
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=True)
        t = t.clamp_(0.0, 1.0)  # bicubic overshoots slightly at edges
    return t[0]


class WeightedReward:
    """A weighted sum of reward functions with the same contract, run in the given order.

    ``WeightedReward({"hyperalign": (fn, 1.0), "llava": (critic, 0.5)}, standardize=False)``.
    ``info[name]`` holds each critic's raw rewards, ``info[f"{name}/{key}"]`` its own info.
    With ``standardize=True`` each critic's rewards are z-scored within the batch before
    weighting (scale-free mixing; needs ``B >= 2``).
    """

    def __init__(self, critics: Mapping[str, tuple[Callable, float]], standardize: bool = False):
        if not critics:
            raise ValueError("WeightedReward needs at least one (reward_fn, weight) entry")
        for name, entry in critics.items():
            if not (isinstance(entry, tuple) and len(entry) == 2 and callable(entry[0])):
                raise TypeError(f"critic {name!r} must be a (reward_fn, weight) tuple")
            if not math.isfinite(float(entry[1])):
                raise ValueError(f"critic {name!r} has a non-finite weight {entry[1]}")
        self.critics = dict(critics)
        self.standardize = standardize

    def __call__(self, images, prompts, metadata=None):
        batch = len(prompts)
        total = None
        info: dict[str, list] = {}
        for name, (fn, weight) in self.critics.items():
            try:
                rewards, sub = fn(images, prompts, metadata)
            except Exception as err:
                raise RuntimeError(f"reward critic {name!r} failed: {err}") from err
            rewards = torch.as_tensor(rewards, dtype=torch.float32)
            if rewards.shape != (batch,) or not bool(torch.isfinite(rewards).all()):
                raise ValueError(
                    f"reward critic {name!r} returned {tuple(rewards.shape)} "
                    f"{'with non-finite values ' if rewards.shape == (batch,) else ''}"
                    f"rewards; expected {batch} finite values"
                )
            info[name] = rewards.detach().cpu().tolist()
            for key, values in (sub or {}).items():
                info[f"{name}/{key}"] = values
            if self.standardize:
                rewards = (rewards - rewards.mean()) / rewards.std().clamp(min=1e-6)
            if total is None:
                total = weight * rewards
            else:
                total = total + weight * rewards.to(total.device)
        device = images.device if isinstance(images, Tensor) else total.device
        return total.to(device), info

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Differentiable weighted sum of the critics' ``score(images, prompts)``.

        Critics with weight 0 (logged, not optimised) are skipped; every other critic must
        have a differentiable ``score`` method.
        """
        total = None
        for name, (fn, weight) in self.critics.items():
            if weight == 0:
                continue
            if not callable(getattr(fn, "score", None)):
                raise TypeError(
                    f"reward critic {name!r} has no differentiable score(images, prompts); "
                    "give it weight 0 or use the plain call"
                )
            s = fn.score(images, prompts).float()
            if self.standardize:
                s = (s - s.mean()) / s.std().clamp(min=1e-6)
            total = weight * s if total is None else total + weight * s
        if total is None:
            raise ValueError("WeightedReward.score: every critic has weight 0")
        return total
