"""Scenes of flat coloured shapes: the objects, their deterministic sampling and rendering.

A scene is 1-3 (up to 4 after an "extra object" perturbation) non-overlapping shapes on a
plain white background. Coordinates are normalised: ``cx, cy`` in [0, 1] with ``y`` pointing
down (image rows), so "above" means a smaller ``cy``. ``scale`` is the radius of the circle
with the same area as the shape (also normalised by the image width), so the area of every
shape is ``pi * scale**2`` whatever its kind and the size class can be read back from area.

Rendering is anti-aliased by supersampling (draw at ``supersample`` times the resolution with
PIL, then box-filter down): a pixel's colour is ``background + coverage * (colour -
background)`` up to the supersampling grid, which the oracle inverts. That is the default
style; :class:`RenderConfig` also holds the style settings (background kind, shade jitter,
outline, blur, pixel noise, position jitter) that :mod:`shapes.styles` draws at random, and
:attr:`SceneObject.aspect` / :attr:`WorldConfig.max_aspect` stretch shapes in the layout.

Public API: :data:`SHAPES`, :data:`PALETTE`, :data:`COLORS`, :data:`SIZES`, :data:`BACKGROUND`,
:data:`BACKGROUND_KINDS`, :data:`OUTLINES`, :class:`SceneObject`, :class:`Scene`,
:class:`WorldConfig`, :class:`RenderConfig`, :func:`circumradius`, :func:`render`,
:func:`object_masks`, :func:`to_tensor`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
"""Shape kinds, in a fixed order (indices are stable)."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "yellow": (235, 205, 15),
    "green": (30, 160, 50),
    "blue": (35, 75, 220),
    "purple": (140, 40, 180),
    "cyan": (20, 190, 210),
}
"""Colour name -> sRGB (0-255). Chosen so that, seen from the white background, every pair of
colours is well separated: each colour lies >= 0.39 (RGB on a [0, 1] scale) from the line
from the background to any other colour (cyan from the blue line is the closest pair), which
the oracle's colour un-mixing relies on (tested in ``tests/test_shapes_oracle.py``)."""

COLORS: tuple[str, ...] = tuple(PALETTE)
"""Colour names, in a fixed order."""

SIZES: tuple[str, ...] = ("small", "large")
"""Size classes."""

BACKGROUND: tuple[int, int, int] = (255, 255, 255)
"""Plain background colour (sRGB 0-255)."""

# Circumradius / area-equivalent radius for each shape (area pi * s**2 for all shapes):
# square side s*sqrt(pi) -> half-diagonal s*sqrt(pi/2); equilateral triangle side
# a = s*sqrt(4*pi/sqrt(3)) -> circumradius a/sqrt(3).
_CIRCUM_FACTOR = {
    "circle": 1.0,
    "square": math.sqrt(math.pi / 2.0),
    "triangle": math.sqrt(4.0 * math.pi / math.sqrt(3.0)) / math.sqrt(3.0),
}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene. All lengths are normalised by the image width."""

    shape: str
    """One of :data:`SHAPES`."""
    color: str
    """One of :data:`COLORS`."""
    size: str
    """Size class, one of :data:`SIZES`; consistent with ``scale`` (see :class:`WorldConfig`)."""
    cx: float
    """Centre x in [0, 1] (left to right)."""
    cy: float
    """Centre y in [0, 1] (top to bottom)."""
    scale: float
    """Radius of the circle of equal area (normalised); area = pi * scale**2."""
    rotation: float = 0.0
    """Rotation in degrees (counter-clockwise on screen); ignored for circles. Triangles point
    up at 0."""
    aspect: float = 1.0
    """Width / height of the shape in its own frame (before rotation): the shape is stretched
    by ``sqrt(aspect)`` along its x axis and squeezed by the same factor along its y axis, so
    its area stays ``pi * scale**2``. 1 = the regular shape (see
    :attr:`WorldConfig.max_aspect`)."""

    def __post_init__(self) -> None:
        if not self.aspect > 0:
            raise ValueError(f"aspect must be > 0, got {self.aspect}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; valid shapes: {SHAPES}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown colour {self.color!r}; valid colours: {COLORS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; valid sizes: {SIZES}")


@dataclass(frozen=True)
class Scene:
    """A scene: a tuple of :class:`SceneObject` (painted in order)."""

    objects: tuple[SceneObject, ...] = ()

    def to_json(self) -> str:
        """Compact JSON (a list of object dicts, floats rounded to 1e-5; ``aspect`` only where
        it is not 1, so scenes of regular shapes keep the text they always had)."""
        rows = []
        for o in self.objects:
            d = dataclasses.asdict(o)
            for k in ("cx", "cy", "scale", "rotation", "aspect"):
                d[k] = round(float(d[k]), 5)
            if o.aspect == 1.0:
                del d["aspect"]
            rows.append(d)
        return json.dumps(rows, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Scene:
        """Inverse of :meth:`to_json`."""
        return cls(tuple(SceneObject(**d) for d in json.loads(text)))


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are laid out. Lengths are fractions of the image width."""

    small_scale: tuple[float, float] = (0.065, 0.085)
    """Range of ``scale`` (equal-area radius) of small shapes (4.2-5.4 px at 64 px)."""
    large_scale: tuple[float, float] = (0.115, 0.14)
    """Range of ``scale`` of large shapes (7.4-9.0 px at 64 px): >= 1.8x the area of any
    small shape."""
    size_threshold: float = 0.1
    """``scale`` separating small from large (between the two ranges); the oracle reads the
    size class by comparing the equal-area radius of a detected shape with it."""
    max_rotation_deg: float = 15.0
    """Squares and triangles are rotated uniformly in +-this many degrees."""
    margin: float = 0.02
    """Minimum distance between a shape's circumcircle and the image border."""
    gap: float = 0.04
    """Minimum distance between the circumcircles of two shapes (2.5 px at 64 px), so that
    faithful scenes never touch."""
    relation_ratio: float = 2.0
    """In a faithful scene with a spatial relation, the separation along the relation's axis is
    at least this many times the separation across it (so left/right/above/below is
    unambiguous)."""
    max_tries: int = 500
    """Rejection-sampling attempts for one layout before giving up."""
    max_aspect: float = 1.0
    """Each placed shape gets an :attr:`SceneObject.aspect` drawn log-uniformly in
    [1 / max_aspect, max_aspect] (1 = regular shapes only, and no random draw at all)."""

    def __post_init__(self) -> None:
        if not (self.small_scale[1] < self.size_threshold < self.large_scale[0]):
            raise ValueError(
                "WorldConfig: need small_scale[1] < size_threshold < large_scale[0], got "
                f"{self.small_scale}, {self.size_threshold}, {self.large_scale}"
            )
        if self.max_aspect < 1.0:
            raise ValueError(
                f"WorldConfig: max_aspect is a ratio >= 1 (1 = regular shapes), got "
                f"{self.max_aspect}"
            )

    def sample_aspect(self, rng: np.random.Generator) -> float:
        """A random aspect (log-uniform in [1 / max_aspect, max_aspect]); exactly 1, drawing
        nothing from ``rng``, when ``max_aspect`` is 1."""
        if self.max_aspect == 1.0:
            return 1.0
        return float(np.exp(rng.uniform(-1.0, 1.0) * np.log(self.max_aspect)))

    def sample_scale(self, size: str, rng: np.random.Generator) -> float:
        """A random ``scale`` for the size class ``size``."""
        lo, hi = self.small_scale if size == "small" else self.large_scale
        return float(rng.uniform(lo, hi))

    def sample_rotation(self, shape: str, rng: np.random.Generator) -> float:
        """A random rotation (degrees); 0 for circles."""
        if shape == "circle":
            return 0.0
        return float(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg))


def _stretch(aspect: float) -> tuple[float, float]:
    """(x, y) stretch factors of a shape of width / height ``aspect`` (their product is 1)."""
    root = math.sqrt(aspect)
    return root, 1.0 / root


def _vertex_angles(shape: str) -> list[float]:
    """Angles (degrees, before rotation) of the vertices of a regular square or triangle."""
    if shape == "square":
        n, start = 4, 45.0
    elif shape == "triangle":
        n, start = 3, 90.0
    else:
        raise ValueError(f"polygon() is for squares and triangles, got {shape!r}")
    return [start + k * 360.0 / n for k in range(n)]


def circumradius(obj: SceneObject) -> float:
    """Radius of the circle around ``obj``'s centre that contains it (normalised)."""
    r = obj.scale * _CIRCUM_FACTOR[obj.shape]
    if obj.aspect == 1.0:
        return r
    sx, sy = _stretch(obj.aspect)
    if obj.shape == "circle":
        return r * max(sx, sy)  # an ellipse's semi-major axis
    return r * max(
        math.hypot(sx * math.cos(math.radians(a)), sy * math.sin(math.radians(a)))
        for a in _vertex_angles(obj.shape)
    )


def polygon(obj: SceneObject, size: float) -> list[tuple[float, float]]:
    """Vertices in pixel coordinates of a square or triangle drawn on a ``size``-px canvas."""
    angles = _vertex_angles(obj.shape)
    cx, cy = obj.cx * size, obj.cy * size
    r = obj.scale * _CIRCUM_FACTOR[obj.shape] * size
    out = []
    if obj.aspect == 1.0:
        for a in angles:
            ang = math.radians(a + obj.rotation)
            # Screen y points down: a positive angle turns counter-clockwise on screen.
            out.append((cx + r * math.cos(ang), cy - r * math.sin(ang)))
        return out
    sx, sy = _stretch(obj.aspect)
    rot = math.radians(obj.rotation)
    for a in angles:
        # Stretch in the shape's own frame, then rotate (y up), then flip y to screen rows.
        lx, ly = r * sx * math.cos(math.radians(a)), r * sy * math.sin(math.radians(a))
        x = lx * math.cos(rot) - ly * math.sin(rot)
        y = lx * math.sin(rot) + ly * math.cos(rot)
        out.append((cx + x, cy - y))
    return out


RELATION_AXES: dict[str, tuple[str, int]] = {
    "left of": ("x", 1),
    "right of": ("x", -1),
    "above": ("y", 1),
    "below": ("y", -1),
}
"""Each relation's axis and direction: "a <relation> b" means that b lies further than a
along the axis in that direction (y points down, so "above" means a smaller ``cy``)."""
RELATIONS: tuple[str, ...] = tuple(RELATION_AXES)
"""Spatial relations, read "subject <relation> object"."""


def relation_offsets(a, b, relation: str) -> tuple[float, float]:
    """``(along, across)``: how far ``b`` lies from ``a`` along ``relation``'s axis, in its
    direction (:data:`RELATION_AXES`), and across it. Objects have centres ``cx, cy``."""
    if relation not in RELATION_AXES:
        raise ValueError(f"unknown relation {relation!r}; valid relations: {RELATIONS}")
    axis, direction = RELATION_AXES[relation]
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, across = (dx, dy) if axis == "x" else (dy, dx)
    return direction * along, across


def relation_holds(a, b, relation: str, margin: float = 0.05) -> bool:
    """Whether ``a <relation> b`` holds for two objects with centres ``cx, cy`` (normalised).

    The relation's axis must dominate: "a left of b" means ``b.cx - a.cx > |b.cy - a.cy|`` and
    ``b.cx - a.cx > margin``; likewise for the others (y points down, so "above" means a
    smaller ``cy``). The four relations are mutually exclusive.
    """
    along, across = relation_offsets(a, b, relation)
    return along > abs(across) and along > margin


def fits(cand: SceneObject, others: Sequence[SceneObject], cfg: WorldConfig) -> bool:
    """Whether ``cand`` lies inside the image margins and clear of every object in ``others``."""
    r = circumradius(cand)
    if not (r + cfg.margin <= cand.cx <= 1 - r - cfg.margin):
        return False
    if not (r + cfg.margin <= cand.cy <= 1 - r - cfg.margin):
        return False
    for o in others:
        if math.hypot(cand.cx - o.cx, cand.cy - o.cy) < r + circumradius(o) + cfg.gap:
            return False
    return True


def _relation_clear(a: SceneObject, b: SceneObject, relation: str, cfg: WorldConfig) -> bool:
    """``a <relation> b`` holds with the along-axis separation >= ratio * across separation."""
    along, across = relation_offsets(a, b, relation)
    return along > 0 and along >= cfg.relation_ratio * abs(across)


def place_objects(
    items: Sequence[tuple[str, str, str]],
    rng: np.random.Generator,
    config: WorldConfig | None = None,
    relation: tuple[int, str, int] | None = None,
    existing: Sequence[SceneObject] = (),
) -> tuple[SceneObject, ...]:
    """Place new shapes ``items`` = [(shape, colour, size), ...] at random, without overlap.

    ``relation = (i, rel, j)`` asks that new item ``i`` be clearly ``rel`` new item ``j``
    (see :class:`WorldConfig.relation_ratio`). ``existing`` objects stay where they are and
    are avoided. Returns the new objects (in ``items`` order). Raises ``RuntimeError`` when no
    layout is found in ``config.max_tries`` attempts.
    """
    cfg = config or WorldConfig()
    for _ in range(cfg.max_tries):
        placed: list[SceneObject] = []
        ok = True
        for shape, color, size in items:
            scale = cfg.sample_scale(size, rng)
            rot = cfg.sample_rotation(shape, rng)
            aspect = cfg.sample_aspect(rng)
            probe = SceneObject(shape, color, size, 0.5, 0.5, scale, rot, aspect)
            lo = circumradius(probe) + cfg.margin
            for _ in range(50):
                cx, cy = rng.uniform(lo, 1 - lo, size=2)
                cand = SceneObject(shape, color, size, float(cx), float(cy), scale, rot, aspect)
                if fits(cand, [*existing, *placed], cfg):
                    placed.append(cand)
                    break
            else:
                ok = False
                break
        if ok and relation is not None:
            i, rel, j = relation
            ok = _relation_clear(placed[i], placed[j], rel, cfg)
        if ok:
            return tuple(placed)
    raise RuntimeError(
        f"could not place {list(items)} (relation {relation}) next to {len(existing)} existing "
        f"objects in {cfg.max_tries} tries; use fewer or smaller shapes"
    )


BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "texture", "stripes")
"""Background kinds of :class:`RenderConfig`: ``plain`` (one colour), ``gradient`` (linear from
``background`` to ``background_to`` along ``background_angle``), ``texture`` (smooth random
blotches mixing the two colours, feature size ``pattern_scale``) and ``stripes`` (hard stripes
of the two colours, period ``pattern_scale``, across ``background_angle``)."""

OUTLINES: tuple[str, ...] = ("none", "dark", "shade")
"""Outline kinds of :class:`RenderConfig`: ``none``, ``dark`` (:data:`OUTLINE_DARK`) or
``shade`` (the object's own colour darkened to :data:`SHADE_FACTOR` of it). Outlines are
drawn inside the silhouette, so they never change a shape's outer edge or area."""

OUTLINE_DARK: tuple[int, int, int] = (25, 25, 25)
"""Colour of a ``dark`` outline (sRGB 0-255)."""

SHADE_FACTOR: float = 0.5
"""A ``shade`` outline is the object's colour times this factor (same hue, darker)."""


@dataclass(frozen=True)
class RenderConfig:
    """How scenes become pixels. The defaults are the plain rendering (white background, exact
    palette colours, no outline, 4x supersampling); the other fields are the style settings
    that :mod:`shapes.styles` draws at random. Lengths are fractions of the image width, so a
    style means the same at any ``image_size``. Every random effect (texture, shade jitter,
    position jitter, pixel noise) derives from ``seed``: :func:`render` is a pure function of
    the scene and the config."""

    image_size: int = 64
    """Output width = height in pixels."""
    supersample: int = 4
    """Anti-aliasing: draw at ``image_size * supersample`` and box-filter down (1 = aliased)."""
    background: tuple[int, int, int] = field(default=BACKGROUND)
    """Background colour (sRGB 0-255); the first colour of a patterned background."""
    background_kind: str = "plain"
    """One of :data:`BACKGROUND_KINDS`."""
    background_to: tuple[int, int, int] = field(default=BACKGROUND)
    """Second background colour of ``gradient``, ``texture`` and ``stripes`` (sRGB 0-255)."""
    background_angle: float = 0.0
    """Direction of a ``gradient`` or of the stripes' normal, degrees counter-clockwise from
    the +x axis."""
    pattern_scale: float = 0.125
    """Stripe period or texture feature size (fraction of the image width)."""
    shade_jitter: float = 0.0
    """Each object's colour moves from its palette colour by up to this much per channel
    (uniform, sRGB levels 0-255), the same over the whole object."""
    outline: str = "none"
    """One of :data:`OUTLINES`."""
    outline_width: float = 0.0
    """Outline width (fraction of the image width; 1/64 = 1 px at 64 px); > 0 with an
    outline."""
    blur: float = 0.0
    """Gaussian blur sigma after downsampling (fraction of the image width; 0 = none)."""
    noise_std: float = 0.0
    """Std of Gaussian pixel noise added last, per pixel and channel (sRGB levels 0-255)."""
    position_jitter: float = 0.0
    """Each object is drawn up to this far (per axis, uniform; fraction of the image width)
    from its scene position. The scene, not the image, is the truth: keep it well under
    :attr:`WorldConfig.gap` / 2 so that drawn shapes still never touch."""
    seed: int = 0
    """Seed of the random effects above."""

    def __post_init__(self) -> None:
        if self.background_kind not in BACKGROUND_KINDS:
            raise ValueError(
                f"RenderConfig: unknown background_kind {self.background_kind!r}; valid kinds: "
                f"{BACKGROUND_KINDS}"
            )
        if self.outline not in OUTLINES:
            raise ValueError(
                f"RenderConfig: unknown outline {self.outline!r}; valid outlines: {OUTLINES}"
            )
        if (self.outline != "none") != (self.outline_width > 0):
            raise ValueError(
                f"RenderConfig: outline={self.outline!r} with outline_width="
                f"{self.outline_width}; give a width > 0 with an outline and 0 without one"
            )
        for name in ("shade_jitter", "blur", "noise_std", "position_jitter"):
            if getattr(self, name) < 0:
                raise ValueError(f"RenderConfig: {name} must be >= 0, got {getattr(self, name)}")
        if self.pattern_scale <= 0:
            raise ValueError(f"RenderConfig: pattern_scale must be > 0, got {self.pattern_scale}")

    @property
    def is_plain(self) -> bool:
        """Whether every style setting is off (plain background, exact colours, no outline,
        blur, noise or jitter): such configs render exactly as they always have."""
        return (
            self.background_kind == "plain"
            and self.shade_jitter == 0
            and self.outline == "none"
            and self.blur == 0
            and self.noise_std == 0
            and self.position_jitter == 0
        )


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, big: int, fill) -> None:
    """Paint ``obj`` with ``fill`` on a ``big``-px PIL canvas."""
    if obj.shape == "circle":
        cx, cy, r = obj.cx * big, obj.cy * big, obj.scale * big
        rx, ry = r, r
        if obj.aspect != 1.0:
            sx, sy = _stretch(obj.aspect)
            rx, ry = r * sx, r * sy
        # PIL's ellipse box is inclusive of its end pixel: shrink by half a pixel.
        draw.ellipse((cx - rx, cy - ry, cx + rx - 1, cy + ry - 1), fill=fill)
    else:
        # PIL pixel i covers [i, i+1): continuous x is index x - 0.5.
        draw.polygon([(x - 0.5, y - 0.5) for x, y in polygon(obj, big)], fill=fill)


def _check_size(cfg: RenderConfig) -> None:
    """``ValueError`` unless ``cfg`` has a drawable size."""
    if cfg.image_size < 8 or cfg.supersample < 1:
        raise ValueError(f"RenderConfig: need image_size >= 8 and supersample >= 1, got {cfg}")


def render(scene: Scene, config: RenderConfig | None = None) -> np.ndarray:
    """Render ``scene`` to a uint8 array of shape (H, W, 3), H = W = ``config.image_size``.

    A plain config (:attr:`RenderConfig.is_plain`) paints with PIL and box-filters with PIL
    (the rendering the pinned digests record); any style setting goes through
    :func:`_render_styled`, which draws the same shape geometry.
    """
    cfg = config or RenderConfig()
    _check_size(cfg)
    if not cfg.is_plain:
        return _render_styled(scene, cfg)
    big = cfg.image_size * cfg.supersample
    img = Image.new("RGB", (big, big), tuple(cfg.background))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        _draw_object(draw, obj, big, PALETTE[obj.color])
    if cfg.supersample > 1:
        # Box filter: each output pixel is the mean of its supersample x supersample block.
        img = img.reduce(cfg.supersample)
    return np.asarray(img, dtype=np.uint8).copy()  # (H, W, 3)


# Sub-streams of RenderConfig.seed, one per random effect, so that turning one effect on or
# off leaves the draws of the others unchanged.
_BACKGROUND_STREAM, _OBJECT_STREAM, _NOISE_STREAM = 1, 2, 3


def _background_canvas(cfg: RenderConfig, big: int) -> np.ndarray:
    """The background at ``big`` px: float64 (big, big, 3) in sRGB levels."""
    c0 = np.asarray(cfg.background, dtype=np.float64)  # (3,)
    c1 = np.asarray(cfg.background_to, dtype=np.float64)  # (3,)
    if cfg.background_kind == "plain":
        return np.broadcast_to(c0, (big, big, 3)).copy()
    # Pixel-centre coordinates as fractions of the width, y down: (big,) each.
    u = (np.arange(big) + 0.5) / big
    x, y = u[None, :], u[:, None]
    ang = math.radians(cfg.background_angle)
    # Distance along the direction (y up on screen, hence -y); (big, big).
    along = (x - 0.5) * math.cos(ang) - (y - 0.5) * math.sin(ang)
    if cfg.background_kind == "gradient":
        half = 0.5 * (abs(math.cos(ang)) + abs(math.sin(ang)))  # largest |along| at a corner
        t = 0.5 + along / (2.0 * half)
    elif cfg.background_kind == "stripes":
        t = np.floor(along / (0.5 * cfg.pattern_scale)) % 2.0
    else:  # texture: cubic interpolation of a coarse uniform grid, one value per feature
        rng = np.random.default_rng([cfg.seed, _BACKGROUND_STREAM])
        n = max(2, math.ceil(1.0 / cfg.pattern_scale)) + 1
        coarse = rng.random((n, n))  # (n, n)
        grid = u * (n - 1)  # (big,) coarse-grid coordinates
        t = ndimage.map_coordinates(
            coarse, np.meshgrid(grid, grid, indexing="ij"), order=3, mode="nearest"
        )
        t = np.clip(t, 0.0, 1.0)  # cubic interpolation overshoots a little
    return c0 + t[..., None] * (c1 - c0)  # (big, big, 3)


def _drawn_objects(scene: Scene, cfg: RenderConfig):
    """Per object: (drawn object, fill colour (3,) float sRGB), from ``cfg.seed``."""
    out = []
    for k, obj in enumerate(scene.objects):
        rng = np.random.default_rng([cfg.seed, _OBJECT_STREAM, k])
        colour = np.asarray(PALETTE[obj.color], dtype=np.float64)
        colour = np.clip(colour + rng.uniform(-1, 1, 3) * cfg.shade_jitter, 0.0, 255.0)
        dx, dy = rng.uniform(-1, 1, 2) * cfg.position_jitter
        drawn = (
            obj
            if cfg.position_jitter == 0
            else dataclasses.replace(obj, cx=obj.cx + float(dx), cy=obj.cy + float(dy))
        )
        out.append((drawn, colour))
    return out


def _silhouette(obj: SceneObject, big: int) -> np.ndarray:
    """Boolean (big, big) mask of ``obj`` drawn on a ``big``-px canvas (no anti-aliasing)."""
    canvas = Image.new("L", (big, big), 0)
    _draw_object(ImageDraw.Draw(canvas), obj, big, 255)
    return np.asarray(canvas) > 0


def _outline_ring(mask: np.ndarray, width_px: float) -> np.ndarray:
    """The pixels of ``mask`` (big, big) within ``width_px`` of its edge (at least 1 px)."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return mask
    # Work in the bounding box padded by one pixel, so the edge counts as outside.
    y0, y1 = max(ys.min() - 1, 0), ys.max() + 2
    x0, x1 = max(xs.min() - 1, 0), xs.max() + 2
    crop = np.pad(mask[y0:y1, x0:x1], 1)
    dist = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]  # px to the nearest outside pixel
    ring = np.zeros_like(mask)
    ring[y0:y1, x0:x1] = mask[y0:y1, x0:x1] & (dist <= max(width_px, 1.0))
    return ring


def object_masks(scene: Scene, config: RenderConfig | None = None) -> np.ndarray:
    """Coverage of each object as :func:`render` draws it (position jitter and aspect
    included, before blur): float64 (N, H, W) in [0, 1], N = ``len(scene.objects)``. Later
    objects paint over earlier ones, as in the image."""
    cfg = config or RenderConfig()
    _check_size(cfg)
    big, ss, size = cfg.image_size * cfg.supersample, cfg.supersample, cfg.image_size
    owner = np.full((big, big), -1, dtype=np.int64)  # index of the object painted last
    for k, (drawn, _) in enumerate(_drawn_objects(scene, cfg)):
        owner[_silhouette(drawn, big)] = k
    out = np.zeros((len(scene.objects), size, size))
    for k in range(len(scene.objects)):
        # (big, big) -> (size, ss, size, ss) -> mean over each ss x ss block
        out[k] = (owner == k).reshape(size, ss, size, ss).mean(axis=(1, 3))
    return out


def _render_styled(scene: Scene, cfg: RenderConfig) -> np.ndarray:
    """:func:`render` with style settings: objects and outlines drawn as labels at
    ``supersample`` times the size, box-filtered to per-pixel coverages and composited over
    the background in float, then blur, noise, rounding to uint8.

    Plain and striped backgrounds are box-filtered from the supersampled canvas like the
    objects (stripes have hard edges). Gradients and textures are smooth, so they are
    evaluated at pixel centres and weighted by each pixel's background coverage: the same up
    to the curvature of the background within one pixel, at a fraction of the cost.
    """
    big, ss, size = cfg.image_size * cfg.supersample, cfg.supersample, cfg.image_size
    label = np.zeros((big, big), dtype=np.int64)  # 0 = background, then one per paint
    paints = [np.zeros(3)]  # colour of each label (sRGB levels, float)
    for drawn, colour in _drawn_objects(scene, cfg):
        mask = _silhouette(drawn, big)
        paints.append(colour)
        label[mask] = len(paints) - 1
        if cfg.outline != "none":
            ring = _outline_ring(mask, cfg.outline_width * big)
            dark = np.asarray(OUTLINE_DARK, dtype=np.float64)
            paints.append(dark if cfg.outline == "dark" else SHADE_FACTOR * colour)
            label[ring] = len(paints) - 1
    # Coverage of each label in each output pixel: (size * size, L) fractions.
    n_labels = len(paints)
    block = (np.arange(big)[:, None] // ss) * size + (np.arange(big)[None, :] // ss)
    counts = np.bincount((block * n_labels + label).ravel(), minlength=size * size * n_labels)
    cover = counts.reshape(size, size, n_labels) / float(ss * ss)  # (H, W, L)
    img = cover[..., 1:] @ np.stack(paints[1:]) if n_labels > 1 else np.zeros((size, size, 3))
    if cfg.background_kind in ("plain", "stripes"):
        bg = _background_canvas(cfg, big) * (label == 0)[..., None]  # (big, big, 3)
        img = img + bg.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    else:
        img = img + _background_canvas(cfg, size) * cover[..., :1]
    if cfg.blur > 0:
        sigma = cfg.blur * size
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")
    if cfg.noise_std > 0:
        img = img + np.random.default_rng([cfg.seed, _NOISE_STREAM]).normal(
            0.0, cfg.noise_std, img.shape
        )
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)  # (H, W, 3)


def to_tensor(images: np.ndarray | Sequence[np.ndarray]):
    """uint8 (H, W, 3) or a sequence of them -> float32 torch tensor (3, H, W) / (B, 3, H, W)
    in [0, 1]."""
    import torch

    arr = np.asarray(images)
    if arr.ndim == 3:
        return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous()
    if arr.ndim == 4:
        # (B, H, W, 3) -> (B, 3, H, W)
        return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"to_tensor expects (H, W, 3) or (B, H, W, 3) arrays, got shape {arr.shape}")
