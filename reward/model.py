"""The HyperAlign model (docs/hyperalign.md, "The model").

CLIP towers (+ gated adapters) -> Euclidean cosine ``s_base`` and, after a per-modality scale
and the exponential map, Lorentz points for the text and the image -> geometric primitives
``Z = (distance, exterior angle at the text, half-aperture of the text cone)`` -> adaptive
modulation regressor ``M(Z) = (alpha, beta, gamma)`` -> ``score = gamma * (alpha * s_base + beta)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from hyperalign.common import dumps_json, make_tmp_dir, recover_dir, replace_dir
from hyperalign.state import read_tensors

from . import lorentz
from .backbone import Backbone, load_backbone
from .config import HyperAlignConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "hyperalign/1"
_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(x) = 1 at this x
# arccos clamp of the Euclidean control (its slope is infinite at +-1; as reward.lorentz).
_EPS32 = 1e-6


@dataclass
class HyperAlignOutput:
    """Everything the model computes for a batch of ``B`` pairs."""

    score: Tensor  # (B,) predicted alignment on the normalised [0, 1] target scale
    s_base: Tensor  # (B,) cosine of the CLIP features
    distance: Tensor  # (B,) geodesic distance text <-> image
    angle: Tensor  # (B,) exterior angle at the text of triangle O-text-image
    aperture: Tensor  # (B,) half-aperture of the text's entailment cone
    alpha: Tensor  # (B,)
    beta: Tensor  # (B,)
    gamma: Tensor  # (B,)
    text_point: Tensor  # (B, D) Lorentz space components of the text
    image_point: Tensor  # (B, D) Lorentz space components of the image

    def per_sample(self) -> dict[str, Tensor]:
        """The ``(B,)`` fields by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.endswith("point")}


class GatedAdapter(nn.Module):
    """Residual gated adapter ``f + tanh(g) * MLP(f)``; ``g = 0`` at init (plain CLIP)."""

    def __init__(self, dim: int, width: int, norm_cap: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim))
        self.gate = nn.Parameter(torch.zeros(()))
        self.norm_cap = float(norm_cap)
        """``> 0``: the output's norm is at most ``norm_cap`` times the input's."""

    def forward(self, f: Tensor) -> Tensor:
        out = f + torch.tanh(self.gate) * self.mlp(f)
        if self.norm_cap > 0:
            limit = self.norm_cap * f.norm(dim=-1, keepdim=True)
            out = out * (limit / out.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
        return out


class ModulationRegressor(nn.Module):
    """``M: (d, phi, delta) -> (alpha, beta, gamma)``, alpha > 0, gamma in (0, 2).

    Initialised to ``alpha = 1, beta = 0, gamma = 1`` (the output layer starts at zero), so an
    untrained model scores like the plain cosine.
    """

    def __init__(self, width: int, init_std: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(3, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 3)
        )
        if init_std > 0:  # a non-zero start: the regression loss reaches the geometry at once
            nn.init.normal_(self.net[-1].weight, std=init_std)
        else:
            nn.init.zeros_(self.net[-1].weight)
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.tensor([_SOFTPLUS_INV_1, 0.0, 0.0]))

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.net(z)  # (B, 3)
        return F.softplus(out[:, 0]), out[:, 1], 2.0 * torch.sigmoid(out[:, 2])


class HyperAlign(nn.Module):
    """HyperAlign: predicts human text-image alignment from hyperbolic entailment geometry.

    ``forward(images, texts)``: images ``(B, 3, H, W)`` float in [0, 1] (any size; resized and
    normalised inside), texts a sequence of ``B`` strings or token ids ``(B, L)``.
    """

    def __init__(
        self,
        config: HyperAlignConfig | None = None,
        *,
        backbone: Backbone | None = None,
        device: torch.device | str = "cpu",
        base_dir: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or HyperAlignConfig()
        if backbone is None:
            backbone = load_backbone(
                config.backbone, config.pretrained, device=device, base_dir=base_dir
            )
        self.clip = backbone.model
        self.tokenizer = backbone.tokenizer
        self.image_size = backbone.image_size
        self.context_length = backbone.context_length
        self.embed_dim = dim = backbone.embed_dim
        self.register_buffer(
            "pixel_mean", torch.tensor(backbone.mean).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(backbone.std).view(1, 3, 1, 1), persistent=False
        )
        # Where a relative backbone weights file was found (copied along on save_pretrained).
        self._backbone_file = None
        if config.pretrained and base_dir is not None and not os.path.isabs(config.pretrained):
            candidate = Path(base_dir) / config.pretrained
            if candidate.is_file():
                self._backbone_file = candidate

        self._setup_tuning(dim)

        scale0 = (
            config.scale_init
            if config.scale_init is not None
            else min(1.0 / math.sqrt(dim), config.a_max / 2)
        )
        if not 0 < scale0 < config.a_max:
            raise ValueError(f"scale_init must be in (0, a_max={config.a_max}), got {scale0}")
        logit = math.log(scale0 / config.a_max) - math.log1p(-scale0 / config.a_max)
        self.image_scale_logit = nn.Parameter(torch.tensor(logit))
        self.text_scale_logit = nn.Parameter(torch.tensor(logit))
        log_c = torch.tensor(math.log(config.curv_init))
        if config.learn_curv:
            self.log_curv = nn.Parameter(log_c)
        else:
            self.register_buffer("log_curv", log_c)

        if config.regressor:
            self.regressor = ModulationRegressor(config.regressor_width, config.regressor_init_std)
        else:
            self.calib_alpha = nn.Parameter(torch.tensor(_SOFTPLUS_INV_1))
            self.calib_beta = nn.Parameter(torch.zeros(()))
        self._warned_truncation = False
        self.to(device)

    # ----------------------------------------------------------------------------- set-up
    def _setup_tuning(self, dim: int) -> None:
        cfg = self.config
        train_backbone = cfg.tuning == "full"
        for p in self.clip.parameters():
            p.requires_grad_(train_backbone)
        if cfg.tuning == "adapter":
            self.image_adapter = GatedAdapter(dim, cfg.adapter_width, cfg.adapter_norm_cap)
            self.text_adapter = GatedAdapter(dim, cfg.adapter_width, cfg.adapter_norm_cap)
        else:
            self.image_adapter = self.text_adapter = None
        if cfg.tuning == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            lora = LoraConfig(
                r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets)
            )
            inject_adapter_in_model(lora, self.clip)
            for name, p in self.clip.named_parameters():
                p.requires_grad_("lora_" in name)

    def train(self, mode: bool = True) -> HyperAlign:
        """Train mode for the head and adapters; the CLIP towers stay in eval mode unless they
        are trained in full, so a frozen tower with batch norm (a ResNet image tower) keeps
        its statistics and scores an image the same whatever else is in the batch."""
        super().train(mode)
        if self.config.tuning != "full":
            self.clip.eval()
        return self

    @property
    def curv(self) -> Tensor:
        """Curvature magnitude ``c`` (0-d, fp32), clamped to ``[curv_min, curv_max]``."""
        return self.log_curv.float().exp().clamp(self.config.curv_min, self.config.curv_max)

    # --------------------------------------------------------------------------- encoders
    def preprocess(self, images: Tensor) -> Tensor:
        """Resize to the backbone's input size and normalise, on the images' device."""
        if tuple(images.shape[-2:]) != tuple(self.image_size):
            images = F.interpolate(
                images, size=self.image_size, mode="bicubic", align_corners=False, antialias=True
            )
        return (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids ``(B, context_length)``; over-long prompts are truncated with one warning."""
        n = self.context_length
        tokens = self.tokenizer(list(texts), context_length=n + 1)  # (B, n + 1)
        truncated = tokens[:, n] != 0
        if bool(truncated.any()):
            if not self._warned_truncation:
                warnings.warn(
                    f"{int(truncated.sum())} prompt(s) exceed the text encoder's context of {n} "
                    "tokens and were truncated (this warning is shown once per model)",
                    stacklevel=3,
                )
                self._warned_truncation = True
            eot = tokens[truncated, n].clone()
            tokens = tokens[:, :n].clone()
            tokens[truncated, n - 1] = eot
        else:
            tokens = tokens[:, :n]
        return tokens

    def encode_images(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> adapted features ``(B, D)``."""
        f = self.clip.encode_image(self.preprocess(images))
        return self.image_adapter(f) if self.image_adapter is not None else f

    def encode_texts(self, texts: Sequence[str] | Tensor) -> Tensor:
        """Strings or token ids ``(B, L)`` -> adapted features ``(B, D)``."""
        device = self.pixel_mean.device
        tokens = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        f = self.clip.encode_text(tokens.to(device))
        return self.text_adapter(f) if self.text_adapter is not None else f

    # ---------------------------------------------------------------------------- forward
    def head(self, image_features: Tensor, text_features: Tensor) -> HyperAlignOutput:
        """The hyperbolic head and the regressor on ``(B, D)`` features, in fp32."""
        cfg = self.config
        with torch.autocast(device_type=image_features.device.type, enabled=False):
            f_i, f_t = image_features.float(), text_features.float()
            s_base = F.cosine_similarity(f_i, f_t, dim=-1)
            c = self.curv
            a_i = torch.sigmoid(self.image_scale_logit.float()) * cfg.a_max
            a_t = torch.sigmoid(self.text_scale_logit.float()) * cfg.a_max
            v_t = a_t * f_t  # (B, D) text tangent vector
            if cfg.text_min_radius > 0:  # rail: lift the norm smoothly above the clamp radius
                n = v_t.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                floor = cfg.text_min_radius * math.asinh(2 * cfg.k) / c.sqrt()
                v_t = v_t * (n.square() + floor.square()).sqrt() / n
            x_i = lorentz.exp_map0(a_i * f_i, c)  # (B, D)
            x_t = lorentz.exp_map0(v_t, c)  # (B, D)
            dist = lorentz.distance(x_t, x_i, c)
            angle = lorentz.exterior_angle(x_t, x_i, c)
            aperture = lorentz.half_aperture(x_t, c, cfg.k)
            if cfg.regressor:
                if cfg.regressor_input == "euclidean":  # the same information, Euclidean form
                    theta = torch.arccos(s_base.clamp(-1 + _EPS32, 1 - _EPS32))
                    u_t = v_t.norm(dim=-1)
                    u_i = (a_i * f_i).norm(dim=-1)
                    z = torch.stack([theta, u_t, u_i], dim=-1)  # (B, 3)
                else:
                    z = torch.stack([dist, angle, aperture], dim=-1)  # (B, 3)
                alpha, beta, gamma = self.regressor(z)
            else:
                alpha = F.softplus(self.calib_alpha.float()).expand_as(s_base)
                beta = self.calib_beta.float().expand_as(s_base)
                gamma = torch.ones_like(s_base)
            score = gamma * (alpha * s_base + beta)
        return HyperAlignOutput(score, s_base, dist, angle, aperture, alpha, beta, gamma, x_t, x_i)

    def forward(self, images: Tensor, texts: Sequence[str] | Tensor) -> HyperAlignOutput:
        check_inputs(images, texts)
        return self.head(self.encode_images(images), self.encode_texts(texts))

    def to_target_scale(self, score: Tensor) -> Tensor:
        """Map a normalised score back to the raw MOS scale of the training data."""
        if self.config.target_range is None:
            raise ValueError("this model has no target_range; it was not trained on a MOS scale")
        lo, hi = self.config.target_range
        return score * (hi - lo) + lo

    # ------------------------------------------------------------------------ checkpoints
    def trainable_state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint stores: the head, adapters and, when tuned, the backbone.

        With a frozen backbone (``adapter``/``frozen``) only the small trained parts are kept
        (the backbone is rebuilt from its id); ``lora`` adds the LoRA weights; ``full`` keeps all.
        """
        tuning = self.config.tuning
        out = {}
        for name, t in self.state_dict().items():
            if name.startswith("clip."):
                if tuning == "full" or (tuning == "lora" and "lora_" in name):
                    out[name] = t
            else:
                out[name] = t
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` into a temporary sibling folder, then
        swap it in with :func:`hyperalign.common.replace_dir` (a reader sees the old checkpoint
        or the new one, never a mix)."""
        target = Path(save_directory)
        cfg = self.config.to_dict()
        tmp = make_tmp_dir(target)
        try:
            if self._backbone_file is not None:
                shutil.copy2(self._backbone_file, tmp / self._backbone_file.name)
                cfg["pretrained"] = self._backbone_file.name
            if self.config.tuning == "full":
                cfg["pretrained"] = None  # the whole backbone is in model.safetensors
            state = {
                k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()
            }
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT_TAG})
            (tmp / CONFIG_NAME).write_text(dumps_json({"format": FORMAT_TAG, **cfg}))
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        device: torch.device | str = "cpu",
        **overrides,
    ) -> HyperAlign:
        """Load a checkpoint directory (or a Hugging Face hub repo id holding one).

        Errors name the file: a ``config.json`` that is not JSON or holds wrong field types, a
        truncated or corrupt ``model.safetensors``, weights holding NaN or infinities.
        """
        directory = resolve_checkpoint_dir(path_or_hub_id)
        config = read_checkpoint_config(directory / CONFIG_NAME)
        if overrides:
            config = config.replace(**overrides)
        model = cls(config, device=device, base_dir=directory)
        fix = "copy the checkpoint folder again (or save it again from its training run)"
        state = read_safetensors(directory / WEIGHTS_NAME, device=device, fix=fix)
        check_finite(state, directory / WEIGHTS_NAME)
        model.load_checkpoint_state(state, source=directory / WEIGHTS_NAME)
        return model

    def load_checkpoint_state(self, state: dict[str, Tensor], source: object = "state") -> None:
        """Load a ``trainable_state_dict``; any key or shape mismatch is an error naming keys."""
        expected = self.trainable_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        shape = sorted(
            f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
            for k in set(state) & set(expected)
            if state[k].shape != expected[k].shape
        )
        if missing or unexpected or shape:
            raise ValueError(
                f"checkpoint {source} does not match its config "
                f"(backbone={self.config.backbone!r}, tuning={self.config.tuning!r}, "
                f"regressor={self.config.regressor}): missing keys {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}; unexpected keys {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}; shape mismatches {shape[:10]}"
            )
        self.load_state_dict(state, strict=False)


def read_checkpoint_config(path: Path) -> HyperAlignConfig:
    """The ``HyperAlignConfig`` of a checkpoint's ``config.json``; errors name the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path} is not valid UTF-8 JSON ({err}); the checkpoint is damaged: copy it again"
        ) from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    fmt = raw.pop("format", None)
    if fmt != FORMAT_TAG:
        raise ValueError(f"{path} is not a HyperAlign checkpoint (format={fmt!r})")
    try:
        return HyperAlignConfig.from_dict(raw)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def read_safetensors(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", fix: str
) -> dict[str, Tensor]:
    """Load a safetensors file onto ``device``; errors name the file and say ``fix``: a
    missing file is a ``FileNotFoundError``, a truncated or foreign one a ``ValueError`` (see
    :func:`hyperalign.state.read_tensors`)."""
    return read_tensors(path, device, fix=fix)


def check_finite(state: dict[str, Tensor], source: object) -> None:
    """``ValueError`` naming ``source`` and the first tensor holding NaN or an infinity."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(
                f"{source}: tensor {name!r} holds {n_bad} NaN/infinite value(s); the run that "
                "wrote it diverged. Use an earlier checkpoint or retrain (e.g. with a lower "
                "learning rate)."
            )


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint directory (first repaired with :func:`hyperalign.common.recover_dir`
    if a save was interrupted), or a hub repo id downloaded (config + safetensors only)."""
    path = recover_dir(path_or_hub_id)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{path} is not a HyperAlign checkpoint: it needs {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        return path
    text = str(path_or_hub_id)
    if text.count("/") != 1 or text.startswith((".", "/")) or os.path.exists(text):
        raise FileNotFoundError(f"no HyperAlign checkpoint directory at {text!r}")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(text, allow_patterns=[CONFIG_NAME, "*.safetensors", "*.json"])
        )
    except Exception as err:  # network, auth, missing repo
        raise FileNotFoundError(
            f"{text!r} is not a local directory and could not be fetched from the Hugging Face "
            f"hub ({type(err).__name__}: {err}). Download it where there is network access, or "
            "pass the path of a local checkpoint directory."
        ) from err


def check_inputs(images: object, texts: object) -> None:
    """Validate a batch: ``ValueError``/``TypeError`` naming the argument and the fix."""
    if not isinstance(images, Tensor):
        raise TypeError(
            "images must be a torch.Tensor of shape (B, 3, H, W) in [0, 1], got "
            f"{type(images).__name__}"
        )
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must have shape (B, 3, H, W) (RGB, channels first), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
    batch = images.shape[0]
    if batch == 0:
        raise ValueError("images is an empty batch (B = 0); pass at least one image")
    if isinstance(texts, Tensor):
        if texts.dim() != 2 or texts.dtype not in (torch.int64, torch.int32):
            raise TypeError(
                "token ids must be an integer tensor (B, L), got "
                f"{texts.dtype} {tuple(texts.shape)}"
            )
        n_texts = texts.shape[0]
    elif isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(
            "texts must be a sequence of B strings (or token ids (B, L)), got "
            f"{type(texts).__name__}"
        )
    else:
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(
                f"texts must all be str; item {bad[0]} is {type(texts[bad[0]]).__name__}"
            )
        n_texts = len(texts)
    if n_texts != batch:
        raise ValueError(f"got {batch} images but {n_texts} texts; pass one text per image")
    # One reduction, one device sync: non-finite or out-of-range pixels.
    lo, hi = torch.aminmax(images.detach())
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("images contain NaN or Inf pixels; check the generator's output")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; for [-1, 1] "
            "input use (x + 1) / 2, for uint8 divide by 255"
        )
