"""HyperAlign configuration: one typed dataclass, every field documented where it is defined.

Values marked [ours] are this project's reading where the paper (arXiv 2601.04614) leaves
them open (docs/hyperalign.md, "Readings [ours]"). Every value is type-checked when a config
is built (also from a ``config.json``): a wrong type is a ``ValueError`` naming the field and
the type it needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any

TUNING_MODES = ("adapter", "lora", "full", "frozen")
ENT_LOSSES = ("one-sided", "two-sided", "membership")
REGRESSOR_INPUTS = ("cone", "euclidean")


_TYPE_NAMES = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _type_name(hint: Any) -> str:
    """``a number``, ``a string or None``, ``a list of 2 numbers``, ... for error messages."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is tuple:
        item = _type_name(args[0]).split(" ", 1)[1] + "s"  # "a number" -> "numbers"
        return f"a list of {item}" if args[-1] is Ellipsis else f"a list of {len(args)} {item}"
    if typing.get_origin(hint) is dict:
        return "a JSON object"
    return _TYPE_NAMES[hint]


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (ints are accepted as floats, lists as
    tuples); ``ValueError`` naming the field and the expected type otherwise."""

    def bad() -> ValueError:
        return ValueError(
            f"HyperAlignConfig.{name} must be {_type_name(hint)}, got {value!r} "
            f"({type(value).__name__})"
        )

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad()
        (inner,) = [a for a in args if a is not type(None)]
        if not _fits(value, inner):
            raise bad()
        return _coerce(name, value, inner)
    if not _fits(value, hint):
        raise bad()
    if hint is float:
        if not math.isfinite(value):
            raise ValueError(f"HyperAlignConfig.{name} must be a finite number, got {value!r}")
        return float(value)
    if hint is int:
        return int(value)
    if origin is tuple:
        inner = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        return tuple(_coerce(name, v, h) for v, h in zip(value, inner))
    return value


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the (non-optional) type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if args[-1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, h) for v, h in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    return True


@dataclass
class HyperAlignConfig:
    # --- backbone -------------------------------------------------------------------------
    backbone: str = "ViT-B-16"
    """open_clip architecture name (a built-in one, or one registered by this project such as
    ``hyperalign-tiny``), or an ``hf-hub:org/repo`` / ``local-dir:/path`` open_clip id."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag (``openai``), a local weights file (``.safetensors``/``.bin``;
    a relative path is resolved against the checkpoint directory), or ``None`` for random
    weights (tests, cost measurement). Ignored for ``hf-hub:``/``local-dir:`` backbones."""
    tuning: str = "adapter"
    """How the CLIP towers are trained: ``adapter`` (frozen towers + residual gated adapter per
    modality, [ours] default), ``lora`` (peft LoRA on the towers), ``full`` or ``frozen``."""
    adapter_width: int = 256
    """Hidden width of each gated adapter MLP ``D -> width -> D`` [ours]."""
    lora_rank: int = 8
    """LoRA rank when ``tuning == "lora"``."""
    lora_alpha: int = 16
    """LoRA scaling numerator when ``tuning == "lora"``."""
    lora_targets: tuple[str, ...] = ("c_fc", "c_proj")
    """Module names that get LoRA (open_clip transformer MLP linears) when ``tuning == "lora"``."""

    # --- hyperbolic mapping ---------------------------------------------------------------
    a_max: float = 1.0
    """Upper bound of the per-modality feature scale ``a = sigmoid(a_0) * a_max``."""
    scale_init: float | None = None
    """Initial value of ``a`` (per modality). ``None``: ``min(1/sqrt(embed_dim), a_max/2)``
    (MERU initialises its scale to ``1/sqrt(d)`` so that embeddings start at O(1) norm) [ours]."""
    curv_init: float = 1.0
    """Initial curvature magnitude ``c`` (the space has curvature ``-c``)."""
    learn_curv: bool = True
    """Learn ``log c`` (clamped to ``[curv_min, curv_max]``); ``False`` keeps ``curv_init``."""
    curv_min: float = 0.1
    """Lower clamp of the learned curvature [ours, as MERU]."""
    curv_max: float = 10.0
    """Upper clamp of the learned curvature [ours, as MERU]."""
    k: float = 0.1
    """Cone constant: half-aperture ``asin(2k / (sqrt(c)|x_s|))`` [ours, MERU's K]."""

    # --- regressor and loss ---------------------------------------------------------------
    regressor: bool = True
    """Adaptive modulation regressor ``M: (d, phi, delta) -> (alpha, beta, gamma)``. ``False``
    is the "no regressor" ablation: a calibrated cosine ``alpha * s_base + beta`` with two
    learned scalars."""
    regressor_width: int = 32
    """Hidden width of ``M`` (3 -> width -> width -> 3, GELU) [ours]."""
    regressor_input: str = "cone"
    """What ``M`` reads: ``cone`` = ``Z = (distance, exterior angle, half-aperture)``;
    ``euclidean`` = ``(theta, |u_t|, |u_i|)``, the Euclidean angle and the tangent norms that
    determine ``Z`` (side-angle-side): the control that holds the information fixed."""
    a_shrink: float = 0.8
    """Maximum cone shrinkage of the dynamic entailment loss: a pair with target ``s`` must lie
    in the cone shrunk to ``(1 - a_shrink * s)`` of its aperture. ``0`` = static cone."""
    ent_weight: float = 0.2
    """Weight ``lambda`` of the entailment loss (``0`` = no entailment loss) [ours, MERU]."""
    ent_loss: str = "one-sided"
    """Form of the entailment loss, with ``delta_s = delta * (1 - a_shrink * s)``:
    ``one-sided`` ``relu(phi - delta_s)`` (degenerate: minimised by moving texts to the origin,
    where ``delta`` is clamped at pi/2); ``two-sided`` ``s relu(phi - delta_s) + (1 - s)
    relu(delta_s + ent_margin - phi)``; ``membership`` ``BCE(sigmoid((delta_s - phi) /
    ent_tau), s)`` [ours]."""
    ent_margin: float = 0.1
    """Margin (radians) by which a poorly aligned pair must lie outside the cone (two-sided)."""
    ent_tau: float = 0.1
    """Temperature (radians) of the soft cone membership (``membership``)."""
    # --- rails against cone collapse (all off by default) [ours] ---------------------------
    text_min_radius: float = 0.0
    """Rail: keep every prompt's cone open. With ``r > 0`` the text point's tangent norm
    ``n = |a_t f_t|`` becomes ``sqrt(n^2 + (r * n_0)^2)``, where ``n_0 = asinh(2k) / sqrt(c)``
    is the norm at which the half-aperture reaches its clamp (pi/2); any ``r > 1`` keeps every
    aperture below pi/2. ``0`` = off."""
    adapter_norm_cap: float = 0.0
    """Rail: an adapted feature's norm may be at most this many times the raw CLIP feature's
    (``f' <- f' * min(1, cap * |f| / |f'|)``), so the adapters cannot inflate norms past the
    scale bound ``a_max``. ``0`` = off."""
    regressor_init_std: float = 0.0
    """Rail: std of the normal init of the regressor's output weights (``0``: zeros, so that
    at step 0 the regression loss sends no gradient into the geometry)."""
    ent_warmup_epochs: float = 0.0
    """Rail: the entailment weight rises linearly from 0 to ``ent_weight`` over this many
    epochs (``0``: full weight from the start)."""
    reg_loss: str = "mse"
    """Regression loss on the predicted score: ``mse``, ``l1`` or ``mse+plcc``."""

    # --- data -----------------------------------------------------------------------------
    target_range: tuple[float, float] | None = None
    """(min, max) of the raw MOS the model was trained on; targets were min-max normalised to
    [0, 1] with it. Used to map scores back to the dataset scale."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (dataset, seed, metrics); saved, never interpreted."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        if self.tuning not in TUNING_MODES:
            raise ValueError(
                f"HyperAlignConfig.tuning={self.tuning!r} is not one of {TUNING_MODES}"
            )
        if not 0 < self.curv_min <= self.curv_init <= self.curv_max:
            raise ValueError(
                "HyperAlignConfig needs 0 < curv_min <= curv_init <= curv_max, got "
                f"{self.curv_min}, {self.curv_init}, {self.curv_max}"
            )
        if self.a_max <= 0:
            raise ValueError(f"HyperAlignConfig.a_max must be > 0, got {self.a_max}")
        if not 0 <= self.a_shrink < 1:
            raise ValueError(f"HyperAlignConfig.a_shrink must be in [0, 1), got {self.a_shrink}")
        for name, valid in (("ent_loss", ENT_LOSSES), ("regressor_input", REGRESSOR_INPUTS)):
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"HyperAlignConfig.{name}={getattr(self, name)!r} is not one of {valid}"
                )
        if self.ent_margin < 0 or self.ent_tau <= 0:
            raise ValueError(
                "HyperAlignConfig needs ent_margin >= 0 and ent_tau > 0, got "
                f"{self.ent_margin}, {self.ent_tau}"
            )
        if self.reg_loss not in ("mse", "l1", "mse+plcc"):
            raise ValueError(
                f"HyperAlignConfig.reg_loss={self.reg_loss!r}: use 'mse', 'l1' or 'mse+plcc'"
            )
        for name in ("adapter_width", "lora_rank", "regressor_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"HyperAlignConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.k <= 0:
            raise ValueError(f"HyperAlignConfig.k (cone constant) must be > 0, got {self.k}")
        for name in ("text_min_radius", "adapter_norm_cap", "regressor_init_std"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"HyperAlignConfig.{name} must be >= 0 (0 = off), got {getattr(self, name)}"
                )
        if self.ent_warmup_epochs < 0:
            raise ValueError(
                f"HyperAlignConfig.ent_warmup_epochs must be >= 0, got {self.ent_warmup_epochs}"
            )
        if self.ent_weight < 0:
            raise ValueError(f"HyperAlignConfig.ent_weight must be >= 0, got {self.ent_weight}")
        if self.target_range is not None:
            lo, hi = self.target_range
            if not hi > lo:
                raise ValueError(f"HyperAlignConfig.target_range must have max > min, got {lo, hi}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (tuples as tuples; ``json`` writes them as lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HyperAlignConfig:
        """Build from a ``config.json``-style dict; unknown fields and wrong types are errors."""
        if not isinstance(data, dict):
            raise ValueError(
                f"a HyperAlignConfig needs a JSON object of fields, got {type(data).__name__}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown HyperAlignConfig fields {unknown}; valid fields: {sorted(known)}"
            )
        return cls(**data)

    def to_json(self) -> str:
        """The fields as indented JSON text (keys sorted)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self, **overrides: Any) -> HyperAlignConfig:
        """A copy with ``overrides`` applied (checked like a new config)."""
        bad = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if bad:
            raise ValueError(f"unknown HyperAlignConfig fields {bad}")
        return dataclasses.replace(self, **overrides)
