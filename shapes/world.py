"""Scenes of flat coloured shapes: the objects, their deterministic sampling and rendering.

A scene is 1-3 (up to 4 after an "extra object" perturbation) non-overlapping shapes on a
plain white background. Coordinates are normalised: ``cx, cy`` in [0, 1] with ``y`` pointing
down (image rows), so "above" means a smaller ``cy``. ``scale`` is the radius of the circle
with the same area as the shape (also normalised by the image width), so the area of every
shape is ``pi * scale**2`` whatever its kind and the size class can be read back from area.

Rendering is anti-aliased by supersampling (draw at ``supersample`` times the resolution with
PIL, then box-filter down): a pixel's colour is ``background + coverage * (colour -
background)`` up to the supersampling grid, which the oracle inverts.

Public API: :data:`SHAPES`, :data:`PALETTE`, :data:`COLORS`, :data:`SIZES`, :data:`BACKGROUND`,
:class:`SceneObject`, :class:`Scene`, :class:`WorldConfig`, :func:`circumradius`,
:func:`render`, :func:`to_tensor`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

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

    def __post_init__(self) -> None:
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
        """Compact JSON (a list of object dicts, floats rounded to 1e-5)."""
        rows = []
        for o in self.objects:
            d = dataclasses.asdict(o)
            for k in ("cx", "cy", "scale", "rotation"):
                d[k] = round(float(d[k]), 5)
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

    def __post_init__(self) -> None:
        if not (self.small_scale[1] < self.size_threshold < self.large_scale[0]):
            raise ValueError(
                "WorldConfig: need small_scale[1] < size_threshold < large_scale[0], got "
                f"{self.small_scale}, {self.size_threshold}, {self.large_scale}"
            )

    def sample_scale(self, size: str, rng: np.random.Generator) -> float:
        """A random ``scale`` for the size class ``size``."""
        lo, hi = self.small_scale if size == "small" else self.large_scale
        return float(rng.uniform(lo, hi))

    def sample_rotation(self, shape: str, rng: np.random.Generator) -> float:
        """A random rotation (degrees); 0 for circles."""
        if shape == "circle":
            return 0.0
        return float(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg))


def circumradius(obj: SceneObject) -> float:
    """Radius of the circle around ``obj``'s centre that contains it (normalised)."""
    return obj.scale * _CIRCUM_FACTOR[obj.shape]


def polygon(obj: SceneObject, size: float) -> list[tuple[float, float]]:
    """Vertices in pixel coordinates of a square or triangle drawn on a ``size``-px canvas."""
    cx, cy, r = obj.cx * size, obj.cy * size, circumradius(obj) * size
    if obj.shape == "square":
        n, start = 4, 45.0
    elif obj.shape == "triangle":
        n, start = 3, 90.0
    else:
        raise ValueError(f"polygon() is for squares and triangles, got {obj.shape!r}")
    out = []
    for k in range(n):
        ang = math.radians(start + obj.rotation + k * 360.0 / n)
        # Screen y points down: a positive angle turns counter-clockwise on screen.
        out.append((cx + r * math.cos(ang), cy - r * math.sin(ang)))
    return out


RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
"""Spatial relations, read "subject <relation> object"."""


def relation_holds(a, b, relation: str, margin: float = 0.05) -> bool:
    """Whether ``a <relation> b`` holds for two objects with centres ``cx, cy`` (normalised).

    The relation's axis must dominate: "a left of b" means ``b.cx - a.cx > |b.cy - a.cy|`` and
    ``b.cx - a.cx > margin``; likewise for the others (y points down, so "above" means a
    smaller ``cy``). The four relations are mutually exclusive.
    """
    dx, dy = b.cx - a.cx, b.cy - a.cy
    if relation == "left of":
        along, across = dx, dy
    elif relation == "right of":
        along, across = -dx, dy
    elif relation == "above":
        along, across = dy, dx
    elif relation == "below":
        along, across = -dy, dx
    else:
        raise ValueError(f"unknown relation {relation!r}; valid relations: {RELATIONS}")
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
    dx, dy = b.cx - a.cx, b.cy - a.cy
    along, across = {
        "left of": (dx, dy),
        "right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
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
            lo = circumradius(SceneObject(shape, color, size, 0.5, 0.5, scale)) + cfg.margin
            for _ in range(50):
                cx, cy = rng.uniform(lo, 1 - lo, size=2)
                cand = SceneObject(shape, color, size, float(cx), float(cy), scale, rot)
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


@dataclass(frozen=True)
class RenderConfig:
    """How scenes become pixels."""

    image_size: int = 64
    """Output width = height in pixels."""
    supersample: int = 4
    """Anti-aliasing: draw at ``image_size * supersample`` and box-filter down (1 = aliased)."""
    background: tuple[int, int, int] = field(default=BACKGROUND)
    """Background colour (sRGB 0-255)."""


def render(scene: Scene, config: RenderConfig | None = None) -> np.ndarray:
    """Render ``scene`` to a uint8 array of shape (H, W, 3), H = W = ``config.image_size``."""
    cfg = config or RenderConfig()
    if cfg.image_size < 8 or cfg.supersample < 1:
        raise ValueError(f"RenderConfig: need image_size >= 8 and supersample >= 1, got {cfg}")
    big = cfg.image_size * cfg.supersample
    img = Image.new("RGB", (big, big), tuple(cfg.background))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        colour = PALETTE[obj.color]
        if obj.shape == "circle":
            cx, cy, r = obj.cx * big, obj.cy * big, obj.scale * big
            # PIL's ellipse box is inclusive of its end pixel: shrink by half a pixel.
            draw.ellipse((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=colour)
        else:
            # PIL pixel i covers [i, i+1): continuous x is index x - 0.5.
            draw.polygon([(x - 0.5, y - 0.5) for x, y in polygon(obj, big)], fill=colour)
    if cfg.supersample > 1:
        # Box filter: each output pixel is the mean of its supersample x supersample block.
        img = img.reduce(cfg.supersample)
    return np.asarray(img, dtype=np.uint8).copy()  # (H, W, 3)


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
