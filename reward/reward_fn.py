"""HyperAlign as a batched, device-native, differentiable reward function for RL loops.

``rewards, info = reward_fn(images, prompts, metadata)`` follows the project's reward contract,
:mod:`reward.contract` (the convention of trl <= 0.23 ``DDPOTrainer`` and ddpo-pytorch);
``reward_fn.score(images, prompts)`` is its differentiable variant (DRaFT / AlignProp / ReFL).

Images (converted by :func:`to_pixels`):

- a batch tensor or numpy array, float of any float dtype (fp16, bf16, fp32, fp64) in [0, 1]
  or uint8 in [0, 255]: channels first ``(B, C, H, W)`` (diffusers ``output_type="pt"``) or
  channels last ``(B, H, W, C)`` (diffusers ``output_type="np"``), ``C`` = 3 (RGB) or 4 (RGBA,
  alpha composited on white as :func:`hyperalign.common.to_rgb` does for files). The layout
  rule (:func:`channel_layout`): dimension 1 equal to 3 means channels first; otherwise a
  last dimension of 3 or 4 means channels last, a dimension 1 of 4 channels first; a shape
  that fits both readings (``(B, 4, H, 3)``, ``(B, 4, H, 4)``) or neither is refused with the
  accepted shapes;
- a list of PIL images, image file paths, numpy arrays or 3-D tensors (one image each; an
  array or tensor is channels last ``(H, W, C)`` when its last dimension is 3 or 4, else
  channels first ``(C, H, W)``), decoded with :func:`hyperalign.common.to_rgb` and
  :func:`hyperalign.common.load_image` and resized to the model's input size.

``rewards`` are float32 ``(B,)`` on the images' device (the model's for numpy arrays and
lists); ``info`` holds per-sample lists of floats. The reward computes in its own precision
(``dtype`` of :func:`build_reward`, fp32 by default) also inside a caller's autocast region,
and raises :class:`NonFiniteRewardError` rather than return a NaN or infinite reward. Text
features are computed once per distinct prompt of a call (RL batches repeat each prompt).
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

from hyperalign.common import BACKGROUND, load_image, to_rgb

from .config import HyperAlignConfig
from .contract import RewardError, check_reward_output, reward_name
from .model import HyperAlign, HyperAlignOutput, check_inputs

INFO_KEYS = ("s_base", "distance", "angle", "aperture", "alpha", "beta", "gamma")

ACCEPTED_IMAGES = (
    "a float (any float dtype, in [0, 1]) or uint8 tensor / numpy array of shape (B, 3, H, W) "
    "or (B, 4, H, W) (channels first) or (B, H, W, 3) or (B, H, W, 4) (channels last; 4 = RGBA), "
    "or a list of PIL images / file paths / numpy arrays / 3-D tensors"
)


class NonFiniteRewardError(RewardError):
    """The model produced a NaN or infinite reward for valid images (e.g. a corrupt checkpoint)."""


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


def _shapes_cosine(device, **overrides) -> HyperAlign:
    """The raw cosine of the shapes CLIP (no adapters, no geometry, no training): the
    CLIPScore analogue of the shapes world, beside which HyperAlign is judged as a reward."""
    from shapes.assets import CLIP_ARCH, CLIP_WEIGHTS, register_clip_config

    if not CLIP_WEIGHTS.is_file():
        raise FileNotFoundError(
            f"the shapes CLIP is not in this installation ({CLIP_WEIGHTS}); rebuild it with "
            "the command in README.md (section 'The shapes world')"
        )
    register_clip_config()
    cfg = HyperAlignConfig(
        backbone=CLIP_ARCH, pretrained=str(CLIP_WEIGHTS), tuning="frozen", regressor=False
    ).replace(**overrides)
    # The calibration starts at alpha = 1, beta = 0: the score is the cosine itself.
    return HyperAlign(cfg, device=device)


PRESETS: dict[str, Callable[..., HyperAlign]] = {
    "tiny-random": _tiny_random,
    "shapes": _shapes,
    "shapes-cosine": _shapes_cosine,
}


def build_reward(
    name_or_path: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    max_batch_size: int = 64,
    dedupe_prompts: bool = True,
    **overrides,
) -> HyperAlignReward:
    """Build a HyperAlign reward from a preset name, a checkpoint directory or a hub repo id.

    ``device``: where the model runs (default: CPU). ``dtype``: ``torch.bfloat16`` or
    ``torch.float16`` runs the backbone under autocast (the geometry stays fp32); ``None`` or
    ``torch.float32`` runs everything in fp32. ``dedupe_prompts``: encode each distinct prompt
    of a call once. ``overrides``: ``HyperAlignConfig`` fields.
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
    return HyperAlignReward(
        model, dtype=dtype, max_batch_size=max_batch_size, dedupe_prompts=dedupe_prompts, name=name
    )


class HyperAlignReward:
    """Picklable callable: ``rewards, info = reward_fn(images, prompts, metadata=None)``.

    ``score(images, prompts)`` is the differentiable variant (keeps the autograd graph to the
    pixels, in their dtype) for AlignProp / DRaFT / ReFL-style training. ``name`` (the preset
    or checkpoint) is quoted in errors.
    """

    def __init__(
        self,
        model: HyperAlign,
        *,
        dtype: torch.dtype | None = None,
        max_batch_size: int = 64,
        dedupe_prompts: bool = True,
        name: str | None = None,
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
        self.dedupe_prompts = bool(dedupe_prompts)
        self.name = name or f"HyperAlign({model.config.backbone})"

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @property
    def input_dtype(self) -> torch.dtype:
        """The float dtype images are converted to before the backbone (the model's)."""
        return self.model.pixel_mean.dtype

    def __repr__(self) -> str:
        return (
            f"HyperAlignReward({self.name!r}, backbone={self.model.config.backbone!r}, "
            f"device={self.device}, dtype={self.dtype}, max_batch_size={self.max_batch_size}, "
            f"dedupe_prompts={self.dedupe_prompts})"
        )

    def _autocast(self):
        """The reward's own precision: its ``dtype``, or fp32 even inside a caller's autocast."""
        if self.dtype is None and not torch.amp.is_autocast_available(self.device.type):
            return nullcontext()
        return torch.autocast(
            device_type=self.device.type, dtype=self.dtype, enabled=self.dtype is not None
        )

    def _text_features(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Features ``(U, D)`` of the prompts to encode and each prompt's row ``(B,)`` in them.

        With ``dedupe_prompts`` the U rows are the distinct prompts (first-seen order);
        without, U = B and the rows are the prompts themselves.
        """
        if self.dedupe_prompts:
            rows: dict[str, int] = {}
            index = torch.tensor([rows.setdefault(p, len(rows)) for p in prompts])  # (B,)
            texts = list(rows)
        else:
            index, texts = torch.arange(len(prompts)), prompts
        n = self.max_batch_size
        feats = [self.model.encode_texts(texts[s : s + n]) for s in range(0, len(texts), n)]
        feats = torch.cat(feats)  # (U, D)
        return feats, index.to(feats.device)

    def _forward(self, images: Tensor, prompts: list[str]) -> list[HyperAlignOutput]:
        """Model outputs for chunks of ``max_batch_size`` (inputs were validated once)."""
        with self._autocast():
            texts, index = self._text_features(prompts)  # (U, D), (B,)
        outs = []
        for start in range(0, images.shape[0], self.max_batch_size):
            chunk = slice(start, start + self.max_batch_size)
            with self._autocast():
                f_i = self.model.encode_images(images[chunk])
            outs.append(self.model.head(f_i, texts[index[chunk]]))
        return outs

    def _check_finite(self, fields: dict[str, Tensor]) -> None:
        """Raise :class:`NonFiniteRewardError` naming the checkpoint if an output is not finite."""
        stacked = torch.stack([v.detach().float() for v in fields.values()])  # (K, B)
        if bool(torch.isfinite(stacked).all()):
            return
        bad = {k: (~torch.isfinite(v)).nonzero().flatten().tolist() for k, v in fields.items()}
        where = ", ".join(f"{k} at indices {v[:8]}" for k, v in bad.items() if v)
        raise NonFiniteRewardError(
            f"HyperAlign reward {self.name!r} produced non-finite values for valid images in "
            f"[0, 1] ({where}): {self._diagnose()}"
        )

    def _diagnose(self) -> str:
        """Why the model may have produced a non-finite output, and what to do."""
        broken = [
            n for n, t in self.model.state_dict().items() if not bool(torch.isfinite(t).all())
        ]
        if broken:
            return (
                f"{len(broken)} weight tensor(s) hold NaN or Inf (e.g. {broken[:3]}); the "
                "checkpoint is corrupt or its training diverged: load or retrain another one"
            )
        if self.dtype is not None:
            return (
                f"the weights are finite; the {self.dtype} backbone may overflow: build the "
                "reward with dtype=None (fp32)"
            )
        return "the weights are finite; please report the images and prompts that cause it"

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
            pixels = to_pixels(images, self.device, self.model.image_size, self.input_dtype)
            check_inputs(pixels, prompts)
            outs = self._forward(pixels, prompts)
            fields = {
                key: torch.cat([getattr(o, key) for o in outs]).float()
                for key in ("score", *INFO_KEYS)
            }
            self._check_finite(fields)
            rewards = fields.pop("score")
            info = {key: v.cpu().tolist() for key, v in fields.items()}
        return rewards.to(out_device), info

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Differentiable rewards ``(B,)`` (float32, on the images' device) for a float tensor.

        Any float dtype and either layout of :func:`to_pixels`; the gradient reaches
        ``images`` in their own dtype.
        """
        if not isinstance(images, Tensor) or not images.is_floating_point():
            got = type(images).__name__
            if isinstance(images, Tensor):
                got += f" of dtype {images.dtype}"
            raise TypeError(
                "score() needs a float tensor (B, 3, H, W) (or (B, H, W, 3)) in [0, 1] to "
                f"differentiate, got {got}"
            )
        prompts = _check_prompts(prompts)
        pixels = to_pixels(images, self.device, self.model.image_size, self.input_dtype)
        check_inputs(pixels, prompts)
        outs = self._forward(pixels, prompts)
        scores = torch.cat([o.score for o in outs]).float()
        self._check_finite({"score": scores})
        return scores.to(images.device)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"prompts must be a sequence of strings (list or tuple), got {type(prompts).__name__}"
        )
    return list(prompts)


# ------------------------------------------------------------------------------ images


def channel_layout(shape: Sequence[int]) -> tuple[str, int]:
    """``(side, channels)`` of a 4-D image batch shape, side ``"first"`` or ``"last"``.

    ``(B, 3, H, W)`` is channels first; else a last dimension of 3 or 4 is channels last and a
    dimension 1 of 4 channels first (RGBA). ``ValueError`` when both or neither reading fits.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 4:
        hint = "; add a batch dimension (x[None]) for one image" if len(shape) == 3 else ""
        raise ValueError(
            f"images must be a 4-D batch, got shape {shape}{hint}; accepted: {ACCEPTED_IMAGES}"
        )
    if shape[1] == 3:
        return "first", 3
    first, last = shape[1] == 4, shape[3] in (3, 4)
    if first and last:
        raise ValueError(
            f"images of shape {shape} are ambiguous: (B, 4, H, W) RGBA channels first or "
            f"(B, H, W, {shape[3]}) channels last; permute them to (B, 3, H, W) (RGB), or to "
            "(B, 4, H, W) / (B, H, W, 4) with H and W not 3 or 4"
        )
    if last:
        return "last", shape[3]
    if first:
        return "first", 4
    raise ValueError(f"images of shape {shape} are not an image batch; accepted: {ACCEPTED_IMAGES}")


def single_layout(shape: Sequence[int]) -> tuple[str, int]:
    """``(side, channels)`` of one 3-D image: channels last ``(H, W, C)`` when the last
    dimension is 3 or 4 (the numpy / PIL convention), else channels first ``(C, H, W)``."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 3 and shape[2] in (3, 4):
        return "last", shape[2]
    if len(shape) == 3 and shape[0] in (3, 4):
        return "first", shape[0]
    raise ValueError(
        f"a single image must be (H, W, C) or (C, H, W) with C = 3 (RGB) or 4 (RGBA), got "
        f"shape {shape}"
    )


def composite_alpha(rgba: Tensor) -> Tensor:
    """``(B, 4, H, W)`` RGBA in [0, 1] -> ``(B, 3, H, W)`` RGB over the white background of
    :func:`hyperalign.common.to_rgb` (:data:`hyperalign.common.BACKGROUND`)."""
    alpha = rgba[:, 3:]  # (B, 1, H, W)
    lo, hi = (float(v) for v in torch.aminmax(alpha.detach()))
    if not (0.0 <= lo and hi <= 1.0):  # also False for NaN
        raise ValueError(
            "the alpha channel of RGBA images must be in [0, 1] (uint8: 0-255), got values in "
            f"[{lo:.3g}, {hi:.3g}]"
        )
    background = torch.tensor(BACKGROUND, dtype=rgba.dtype, device=rgba.device) / 255.0
    return rgba[:, :3] * alpha + background.view(1, 3, 1, 1) * (1.0 - alpha)


def _tensor_pixels(
    images: Tensor, device, dtype: torch.dtype, layout: tuple[str, int] | None = None
) -> Tensor:
    """A 4-D batch in any accepted layout and dtype -> ``(B, 3, H, W)`` ``dtype`` on ``device``.

    ``layout``: ``(side, channels)`` when known, else read by :func:`channel_layout`. Float
    input stays on the autograd graph (the conversion is differentiable).
    """
    side, channels = layout or channel_layout(images.shape)
    if images.dtype == torch.uint8:
        x = images.to(device).to(dtype).div_(255.0)
    elif images.is_floating_point():
        x = images.to(device=device, dtype=dtype)
    else:
        raise TypeError(
            f"images must be float in [0, 1] or uint8 in [0, 255], got dtype {images.dtype}"
        )
    if side == "last":
        x = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
    return composite_alpha(x) if channels == 4 else x


def to_pixels(
    images, device: torch.device, size: tuple[int, int], dtype: torch.dtype = torch.float32
) -> Tensor:
    """Any supported image batch -> float tensor ``(B, 3, H, W)`` in [0, 1] on ``device``.

    Tensors and numpy batches are converted as a whole (moved, never round-tripped through
    PIL; not resized: the model resizes on its device); lists are converted one by one and
    resized to ``size`` so they can be stacked. See the module docstring for the forms.
    """
    if isinstance(images, Tensor):
        return _tensor_pixels(images, device, dtype)
    if isinstance(images, np.ndarray):
        return _tensor_pixels(_from_numpy(images, "images"), device, dtype)
    if isinstance(images, (str, os.PathLike)) or not isinstance(images, Sequence):
        raise TypeError(f"images must be {ACCEPTED_IMAGES}; got {type(images).__name__}")
    if len(images) == 0:
        raise ValueError("images is an empty batch (B = 0); pass at least one image")
    return torch.stack([_one_image(im, i, device, size, dtype) for i, im in enumerate(images)])


def _from_numpy(array: np.ndarray, what: str) -> Tensor:
    """A numpy array as a tensor of its own (a copy: read-only and negative-stride arrays work)."""
    if not (array.dtype == np.uint8 or np.issubdtype(array.dtype, np.floating)):
        raise TypeError(f"{what} must be a float or uint8 numpy array, got dtype {array.dtype}")
    return torch.from_numpy(np.array(array))


def _decode(image, index: int) -> tuple[Tensor, tuple[str, int]]:
    """One list item -> a ``(1, ...)`` uint8 or float tensor and its ``(side, channels)``."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            return load_image(image)[None], ("first", 3)  # (1, 3, H, W) float
        except ValueError as err:
            raise ValueError(f"image {index}: {err}") from err
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image))  # (H, W, 3) uint8
        return torch.from_numpy(array.copy())[None], ("last", 3)
    if isinstance(image, np.ndarray):
        image = _from_numpy(image, f"image {index}")
    if isinstance(image, Tensor):
        try:
            return image[None], single_layout(image.shape)
        except ValueError as err:
            raise ValueError(f"image {index}: {err}") from err
    raise TypeError(
        f"image {index} is a {type(image).__name__}; use a PIL image, a file path, a numpy "
        "array or a tensor"
    )


def _one_image(image, index: int, device, size, dtype) -> Tensor:
    """One list item -> ``(3, *size)`` in [0, 1] on ``device`` (resized when needed)."""
    raw, layout = _decode(image, index)  # (1, C, H, W) or (1, H, W, C)
    try:
        t = _tensor_pixels(raw, device, dtype, layout)  # (1, 3, H, W)
    except (ValueError, TypeError) as err:
        raise type(err)(f"image {index}: {err}") from err
    if raw.is_floating_point():
        lo, hi = (float(v) for v in torch.aminmax(t.detach()))
        if not (0.0 <= lo and hi <= 1.0):  # also False for NaN
            raise ValueError(
                f"image {index}: float images must be finite and in [0, 1], got values in "
                f"[{lo:.3g}, {hi:.3g}]; for uint8 data pass a uint8 array"
            )
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bicubic", align_corners=False, antialias=True)
        t = t.clamp_(0.0, 1.0)  # bicubic overshoots slightly at edges
    return t[0]


# ----------------------------------------------------------------------- weighted sums


def standardize(rewards: Tensor) -> Tensor:
    """Z-scores within the batch ``(r - mean) / std`` (std clamped at 1e-6).

    A batch of one has no spread: its reward sits at the batch mean, so the result is 0
    (``r - r``, still on the autograd graph) rather than NaN.
    """
    if rewards.numel() < 2:
        return rewards - rewards.mean()
    return (rewards - rewards.mean()) / rewards.std().clamp(min=1e-6)


class WeightedReward:
    """A weighted sum of reward functions with the same contract, run in the given order.

    ``WeightedReward({"hyperalign": (fn, 1.0), "llava": (critic, 0.5)}, standardize=False)``.
    ``info[name]`` holds each critic's raw rewards, ``info[f"{name}/{key}"]`` its own info.
    Each critic's output is validated by :func:`reward.contract.check_reward_output`. With
    ``standardize=True`` each critic's rewards are z-scored within the batch before weighting
    (scale-free mixing, see :func:`standardize`); a batch of one (B = 1) then scores 0, with
    one warning.
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
        self._warned_single = False

    def _warn_single(self, batch: int) -> None:
        if self.standardize and batch == 1 and not self._warned_single:
            warnings.warn(
                "WeightedReward(standardize=True) on a batch of one: each critic's z-score is "
                "0, so the reward is 0; use standardize=False to score single images (this "
                "warning is shown once)",
                stacklevel=3,
            )
            self._warned_single = True

    def _critic(self, name: str, fn, images, prompts, metadata, device):
        """Run one critic and validate its output: ``(rewards (B,) float32, info)``."""
        try:
            out = fn(images, prompts, metadata)
        except Exception as err:
            raise RewardError(f"reward critic {name!r} failed: {err}") from err
        if device is None:  # non-tensor images: the first critic's device
            first = out[0] if isinstance(out, tuple) and out else None
            device = first.device if isinstance(first, Tensor) else torch.device("cpu")
        where = f"WeightedReward critic {name!r}, batch of {len(prompts)}"
        label = f"{name!r} ({reward_name(fn)})"
        return check_reward_output(out, len(prompts), device, label, where)

    def __call__(self, images, prompts, metadata=None):
        self._warn_single(len(prompts))
        device = images.device if isinstance(images, Tensor) else None
        total = None
        info: dict[str, list] = {}
        for name, (fn, weight) in self.critics.items():
            rewards, sub = self._critic(name, fn, images, prompts, metadata, device)
            device = rewards.device
            info[name] = rewards.cpu().tolist()
            for key, values in sub.items():
                info[f"{name}/{key}"] = values
            if self.standardize:
                rewards = standardize(rewards)
            total = weight * rewards if total is None else total + weight * rewards
        return total, info

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Differentiable weighted sum of the critics' ``score(images, prompts)``.

        Critics with weight 0 (logged, not optimised) are skipped; every other critic must
        have a differentiable ``score`` method.
        """
        self._warn_single(len(prompts))
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
                s = standardize(s)
            total = weight * s if total is None else total + weight * s
        if total is None:
            raise ValueError("WeightedReward.score: every critic has weight 0")
        return total
