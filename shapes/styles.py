"""Rendering styles of the shapes world: named families of random styles, drawn per image.

A style is a :class:`~shapes.world.RenderConfig` (background, shade jitter, outline,
anti-aliasing, blur, pixel noise, position jitter, and the seed of its random effects) plus
the layout settings of a :class:`~shapes.world.WorldConfig` (size ranges, aspect), which must
be known when the scene is laid out. A :class:`StyleFamily` is the distribution both are
drawn from; :data:`STYLE_FAMILIES` names three:

- ``default``: today's rendering exactly (white, exact palette colours, no outline, 4x
  supersampling, regular shapes of the default sizes). Sampling it draws nothing from the
  generator, so code that samples a ``default`` style produces the streams it always did.
- ``train``: the randomised family every training set uses (CLIP pretraining, the MOS data):
  plain, gradient or textured light backgrounds, shade jitter, dark outlines on some images,
  aliased or anti-aliased edges, light blur and pixel noise on some images, small position
  jitter, a random zoom of the size ranges and stretched shapes.
- ``heldout``: never used in training. It keeps every setting of ``train`` except two, which
  ``train`` never draws: the background is always *stripes* (hard stripes of two light
  colours) and every shape has a *shade* outline (its own colour, darkened). It tests whether
  a model learned shapes and colours or the training backgrounds and outlines; it stays fair
  because the stripes are light and low-contrast like every training background, and a shade
  outline keeps the hue (the interior is the palette colour, as always).

Bounds that keep the facts readable (``tests/test_shapes_styles.py`` checks each on renders):

- Colours stay nameable: backgrounds are light (every channel >= 205, two colours of one
  background 15-30 levels apart per channel), and a shade jitter of at most 18 levels per
  channel (31 in RGB distance) is well under half the smallest distance between two palette colours (about
  116 levels, blue to cyan), so an object's fill is nearest its own palette colour.
- Size classes stay separable: with the zoom, small shapes have ``scale`` <= 0.088 and large
  ones >= 0.107 (an area ratio >= 1.5), on both sides of ``size_threshold = 0.1``. Outlines
  are drawn inside the silhouette, and blur keeps the total coverage, so areas are kept.
- Shapes stay recognisable and apart: aspect (width / height in the shape's own frame) within
  [1/1.2, 1.2], accounted for in the layout (:func:`~shapes.world.circumradius`); position
  jitter <= 0.008 per axis, so shapes 0.04 apart in the layout stay >= 0.017 apart when drawn
  and relations of faithful layouts (along-axis lead >= 0.08) still hold; blur sigma <= 0.64
  px at 64 px, below the ~1.5 px at which corners round off.

Public API: :class:`StyleFamily`, :data:`STYLE_FAMILIES`, :data:`STYLE_DRAWS`,
:func:`sample_style`,
:func:`sample_world_style`, :func:`style_family`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from shapes.world import BACKGROUND_KINDS, OUTLINES, RenderConfig, WorldConfig

Range = tuple[float, float]
"""(low, high) of a uniform draw."""


@dataclass(frozen=True)
class StyleFamily:
    """A distribution of styles. Each ``p_*`` is the probability that an image gets the
    effect; when it does, the effect's size is drawn uniformly from the matching range.
    Lengths are fractions of the image width (1/64 = 1 px at 64 px)."""

    description: str
    """One line on what the family is for."""
    backgrounds: tuple[str, ...] = ("plain",)
    """Background kinds (:data:`~shapes.world.BACKGROUND_KINDS`), drawn uniformly."""
    background_levels: tuple[int, int] = (255, 255)
    """Range of each channel of the first background colour (sRGB levels, integers)."""
    pattern_contrast: int = 0
    """Per-channel difference of the second background colour from the first: between half
    of it and all of it (sRGB levels; both colours stay in ``background_levels``)."""
    pattern_scale: Range = (0.125, 0.125)
    """Stripe period or texture feature size."""
    outline: str = "none"
    """Outline kind (:data:`~shapes.world.OUTLINES`) of an outlined image."""
    p_outline: float = 0.0
    """Probability that an image's shapes are outlined."""
    outline_width: Range = (0.0, 0.0)
    """Outline width."""
    shade_jitter: Range = (0.0, 0.0)
    """Range of the image's largest per-channel colour deviation (sRGB levels)."""
    p_aliased: float = 0.0
    """Probability that an image is drawn without anti-aliasing (``supersample = 1``)."""
    p_blur: float = 0.0
    """Probability of a Gaussian blur."""
    blur: Range = (0.0, 0.0)
    """Blur sigma."""
    p_noise: float = 0.0
    """Probability of pixel noise."""
    noise_std: Range = (0.0, 0.0)
    """Noise std (sRGB levels)."""
    position_jitter: Range = (0.0, 0.0)
    """Range of the image's largest drawn-position offset per axis."""
    small_scale: Range = WorldConfig().small_scale
    """``scale`` range of small shapes before the zoom."""
    large_scale: Range = WorldConfig().large_scale
    """``scale`` range of large shapes before the zoom."""
    zoom: Range = (1.0, 1.0)
    """Per-image factor on both size ranges (``sample_world_style``)."""
    max_aspect: float = 1.0
    """:attr:`~shapes.world.WorldConfig.max_aspect` of the layout."""

    def __post_init__(self) -> None:
        bad = [b for b in self.backgrounds if b not in BACKGROUND_KINDS]
        if not self.backgrounds or bad:
            raise ValueError(
                f"StyleFamily: backgrounds {self.backgrounds} must be a non-empty tuple of "
                f"{BACKGROUND_KINDS}"
            )
        if self.outline not in OUTLINES:
            raise ValueError(f"StyleFamily: unknown outline {self.outline!r}; valid: {OUTLINES}")
        lo, hi = self.background_levels
        if not 0 <= lo <= hi <= 255:
            raise ValueError(
                f"StyleFamily: background_levels must be 0 <= lo <= hi <= 255, got {self.background_levels}"
            )
        z_lo, z_hi = self.zoom
        # The size classes must stay on both sides of the threshold at every zoom.
        WorldConfig(
            small_scale=(self.small_scale[0] * z_lo, self.small_scale[1] * z_hi),
            large_scale=(self.large_scale[0] * z_lo, self.large_scale[1] * z_hi),
            max_aspect=self.max_aspect,
        )


_TRAIN = StyleFamily(
    description="randomised styles of every training set",
    backgrounds=("plain", "gradient", "texture"),
    background_levels=(205, 255),
    pattern_contrast=30,
    pattern_scale=(0.15, 0.4),
    outline="dark",
    p_outline=0.4,
    outline_width=(0.012, 0.025),
    shade_jitter=(0.0, 18.0),
    p_aliased=0.3,
    p_blur=0.3,
    blur=(0.004, 0.01),
    p_noise=0.3,
    noise_std=(1.0, 6.0),
    position_jitter=(0.0, 0.008),
    small_scale=(0.062, 0.085),
    large_scale=(0.113, 0.135),
    zoom=(0.955, 1.035),
    max_aspect=1.2,
)

STYLE_FAMILIES: dict[str, StyleFamily] = {
    "default": StyleFamily(description="today's plain rendering exactly; draws nothing"),
    "train": _TRAIN,
    "heldout": dataclasses.replace(
        _TRAIN,
        description="never trained on: train's settings, but striped backgrounds and shade "
        "outlines on every image",
        backgrounds=("stripes",),
        pattern_scale=(0.08, 0.16),
        outline="shade",
        p_outline=1.0,
    ),
}
"""Family name -> :class:`StyleFamily` (see the module docstring)."""


def style_family(family: str) -> StyleFamily:
    """The family named ``family``; ``ValueError`` listing the valid names otherwise."""
    if family not in STYLE_FAMILIES:
        raise ValueError(
            f"unknown style family {family!r}; valid families: {tuple(STYLE_FAMILIES)}"
        )
    return STYLE_FAMILIES[family]


STYLE_DRAWS = 22
"""Uniform values one :func:`sample_style` call of a random family draws (one
``rng.random(STYLE_DRAWS)``), whatever comes out."""


def _level(u: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Integers uniform in ``lo..hi`` from uniforms ``u`` in [0, 1)."""
    return np.minimum(lo + np.floor(u * (hi - lo + 1)), hi).astype(np.int64)


def _background_colours(u: np.ndarray, fam: StyleFamily) -> tuple[np.ndarray, np.ndarray]:
    """Two light colours (3,) each from 9 uniforms: the first uniform in ``background_levels``
    per channel; the second differs from it by half to all of ``pattern_contrast`` per channel
    (so a pattern always shows), inside ``background_levels``."""
    lo, hi = fam.background_levels
    first = _level(u[0:3], lo, hi)
    sign = np.where(u[3:6] < 0.5, -1, 1)
    step = sign * _level(u[6:9], fam.pattern_contrast // 2, fam.pattern_contrast)
    # Where the step leaves the range, go the other way; clip for ranges narrower than it.
    second = np.where((first + step < lo) | (first + step > hi), first - step, first + step)
    return first, np.clip(second, lo, hi)


def sample_style(rng: np.random.Generator, family: str = "train") -> RenderConfig:
    """A random :class:`~shapes.world.RenderConfig` of ``family``, at the default image size
    (use ``dataclasses.replace(style, image_size=...)``; lengths are fractions of the width).

    ``default`` returns ``RenderConfig()`` and draws nothing from ``rng``. The other families
    draw exactly :data:`STYLE_DRAWS` uniforms, so ``rng``'s state afterwards depends only on
    how many styles were drawn, never on what they were.
    """
    fam = style_family(family)
    if family == "default":
        return RenderConfig()
    u = rng.random(STYLE_DRAWS)  # (22,)
    # u[0:5] choices: background kind, outline, aliasing, blur, noise; u[5:14] background
    # colours; u[14] angle; u[15:21] sizes of pattern, shade jitter, outline, blur, noise,
    # position jitter; u[21] the seed.
    first, second = _background_colours(u[5:14], fam)

    def pick(r: Range, t: float) -> float:
        return float(r[0] + t * (r[1] - r[0]))

    outlined = bool(u[1] < fam.p_outline) and fam.outline != "none"
    return RenderConfig(
        supersample=1 if u[2] < fam.p_aliased else RenderConfig().supersample,
        background=tuple(int(c) for c in first),
        background_kind=fam.backgrounds[int(u[0] * len(fam.backgrounds))],
        background_to=tuple(int(c) for c in second),
        background_angle=float(360.0 * u[14]),
        pattern_scale=pick(fam.pattern_scale, u[15]),
        shade_jitter=pick(fam.shade_jitter, u[16]),
        outline=fam.outline if outlined else "none",
        outline_width=pick(fam.outline_width, u[17]) if outlined else 0.0,
        blur=pick(fam.blur, u[18]) if u[3] < fam.p_blur else 0.0,
        noise_std=pick(fam.noise_std, u[19]) if u[4] < fam.p_noise else 0.0,
        position_jitter=pick(fam.position_jitter, u[20]),
        seed=int(u[21] * (2**31 - 1)),
    )


def sample_world_style(
    rng: np.random.Generator, family: str = "train", base: WorldConfig | None = None
) -> WorldConfig:
    """``base`` (default :class:`~shapes.world.WorldConfig`) with the layout settings of a
    random style of ``family``: size ranges times a random zoom, and ``max_aspect``.

    Draw it once per prompt (a prompt's faithful and perturbed scenes share one layout
    world) and :func:`sample_style` once per image. Random families draw one uniform;
    ``default`` returns ``base`` unchanged and draws nothing from ``rng``.
    """
    fam = style_family(family)
    world = base or WorldConfig()
    if family == "default":
        return world
    z = float(rng.uniform(*fam.zoom))
    return dataclasses.replace(
        world,
        small_scale=(fam.small_scale[0] * z, fam.small_scale[1] * z),
        large_scale=(fam.large_scale[0] * z, fam.large_scale[1] * z),
        max_aspect=fam.max_aspect,
    )


__all__ = [
    "STYLE_DRAWS",
    "STYLE_FAMILIES",
    "StyleFamily",
    "sample_style",
    "sample_world_style",
    "style_family",
]
