"""The oracle: read the shapes-world facts back from any image and score a prompt against them.

Pipeline for one RGB image (float, [0, 1]):

1. **Denoise**: a ``denoise`` px box filter (3 by default; 0 turns it off).
2. **Background** = per-channel median of the image border (2 px frame), so a generated image
   whose background drifts from pure white still segments.
3. **Colour segmentation as un-mixing.** An anti-aliased or blurred pixel is
   ``p = b + alpha * (c - b)`` for background ``b`` and palette colour ``c``. For each palette
   colour the oracle projects ``p - b`` on ``c - b`` (giving ``alpha``) and measures the
   distance to that line (the residual). A pixel belongs to the colour of least residual among
   those with ``alpha >= 0.5``, if that residual is ``<= max_residual`` and small relative to
   the pixel's distance from the background (``max_relative_residual``: a dull grey is not a
   dark purple); otherwise it is background / unexplained. This is what keeps the anti-aliased rim of a red shape from
   reading as another colour (a nearest-colour rule would call a 50 % red/white pixel orange
   or pink).
4. **Objects** = 4-connected components of each colour's mask (holes filled) that pass four
   filters against artefacts: area ``>= min_area`` (fraction of the image; 35 % of the
   smallest small shape), *solidity* (pixel count / lattice points of its convex hull)
   ``>= min_solidity``, at least ``min_own_fraction`` of its pixels of its colour before
   hole filling, and the alpha at its centroid ``>= 0.5``. Scattered pixels of the
   right colour, noise speckle and thin strokes therefore do not become objects.
5. **Shape** from the radial profile: from the alpha-weighted centroid, cast ``n_rays`` rays
   and find, with sub-pixel interpolation of the soft alpha map, where alpha drops below 0.5:
   ``r(theta)``. A circle has a flat profile; a square a strong 4th Fourier harmonic
   (0.070 of the mean for a perfect square) and a triangle a strong 3rd (0.138). Below
   ``circle_max_harmonic`` for both -> circle; otherwise the larger harmonic decides. This
   is rotation invariant.
6. **Size** from the soft area: the equal-area radius compared with
   :attr:`~shapes.world.WorldConfig.size_threshold`. **Position** = alpha-weighted
   centroid. Relations and scoring are then exactly those of the scene's truth:
   :func:`shapes.perturb.alignment_under` under the config's truth model (``truth``,
   ``unmentioned_weight``; closed world by default, i.e. :func:`shapes.prompts.alignment`).

Which images it reads: the ``default`` style of :mod:`shapes.styles` (a plain white or
near-white background, exact palette colours, anti-aliased or aliased edges, the light blur
and noise measured below), and the tiny Stable Diffusion's outputs, which are one more test
style (judged as they come). It is not built for the ``train`` and ``heldout`` styles and
misreads a share of them (patterned backgrounds upset step 2, outlines and shade jitter step
3): the truth of styled data comes from the scene itself
(:func:`shapes.perturb.true_alignment`).

Known failure modes (measured figures: ``scripts/bench_oracle.py``):

- Touching or overlapping shapes of the *same* colour merge into one component: it is read as
  one object (usually shape ``other`` because of low solidity or an odd profile), so counts
  drop. Different colours touching are fine.
- Occlusion: a shape partly hidden behind another one of a different colour loses area and
  its profile is cut, so shape and size may be misread.
- Colours off the palette (brown, pink, grey, black) or very dark/washed-out versions of
  palette colours are unexplained (background); a colour halfway between two palette colours
  goes to the nearer one.
- Heavy blur rounds corners: squares and then triangles drift towards "circle" (a Gaussian
  blur of sigma >= ~1.5 px at 64 px for small shapes); very heavy noise (sigma >= ~0.2 with the
  default ``denoise=3``; >= ~0.15 without it) breaks masks into holes and specks.
- Holes are filled, so a thick outline (a ring whose hole is < 30 % of it) reads as the filled
  shape; thinner outlines are rejected.
- Shapes outside the world: an ellipse reads as a circle, a rectangle as a square, a
  pentagon/hexagon as a circle; shapes cut by the image border have odd profiles.
- A background that is itself a palette colour, or a textured background, breaks step 2.
- Small shapes at image sizes below ~48 px have too few pixels for a reliable profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from shapes.perturb import alignment_under, check_truth, facts_under
from shapes.prompts import Fact, PromptSpec
from shapes.world import PALETTE, WorldConfig

_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[c] for c in _PALETTE_NAMES], dtype=np.float64) / 255.0  # (K, 3)
_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class OracleConfig:
    """Thresholds of the oracle (see the module docstring for each step)."""

    denoise: int = 3
    """Box-filter width in pixels applied before segmentation (0 or 1 = none). The 3 px
    default removes most additive noise (and single stray pixels) at no cost in accuracy on
    clean 64 px renders; use 0 for images below ~48 px."""
    max_residual: float = 0.25
    """Largest distance (RGB in [0, 1]) of a pixel from its colour's background-to-colour line
    for it to count as that colour. Pure palette colours are >= 0.39 from every other line."""
    max_relative_residual: float = 0.3
    """Largest residual relative to the pixel's distance from the background along the colour's
    line (tangent of the angle between the pixel's and the colour's direction, ~17 degrees)."""
    min_own_fraction: float = 0.7
    """Least fraction of a component's pixels that are of its colour before hole filling."""
    min_alpha: float = 0.5
    """Least coverage ``alpha`` for a pixel to belong to a shape."""
    min_area: float = 0.35 * np.pi * 0.065**2
    """Least component area as a fraction of the image (35 % of the smallest small shape)."""
    min_solidity: float = 0.8
    """Least pixel count / convex-hull lattice points of a component."""
    circle_max_harmonic: float = 0.03
    """Largest 3rd and 4th Fourier harmonic of the radial profile (relative to its mean) for a
    circle."""
    n_rays: int = 64
    """Rays of the radial profile."""
    size_threshold: float = WorldConfig().size_threshold
    """Equal-area radius (fraction of the image width) separating small from large."""
    max_objects: int = 8
    """Keep at most this many objects (largest first) for scoring."""
    truth: str = "closed"
    """Truth model the readings are scored under, one of
    :data:`~shapes.perturb.TRUTH_MODELS`: ``closed`` (the prompt describes the whole scene)
    or ``open`` (facts are what the prompt states)."""
    unmentioned_weight: float = 1.0
    """Open world: facts each object beyond those the prompt describes costs (0 = ignored)."""

    def __post_init__(self) -> None:
        check_truth(self.truth, self.unmentioned_weight)


@dataclass(frozen=True)
class DetectedObject:
    """An object read from an image. Same attributes as a
    :class:`~shapes.world.SceneObject` where scoring needs them."""

    shape: str
    """``circle``, ``square``, ``triangle`` or ``other`` (an object-like blob of no known
    shape)."""
    color: str
    """Palette colour name."""
    size: str
    """``small`` or ``large``."""
    cx: float
    """Centroid x in [0, 1]."""
    cy: float
    """Centroid y in [0, 1] (down)."""
    area: float
    """Soft area as a fraction of the image."""
    harmonics: tuple[float, float]
    """(3rd, 4th) Fourier harmonic of the radial profile relative to its mean."""
    solidity: float
    """Pixel count / convex-hull lattice points."""


def _as_hwc(image) -> np.ndarray:
    """Any supported image -> float64 (H, W, 3) in [0, 1]."""
    try:
        import torch

        if isinstance(image, torch.Tensor):
            t = image.detach().to("cpu", torch.float64)
            if t.ndim != 3 or t.shape[0] != 3:
                raise ValueError(
                    f"expected a (3, H, W) tensor in [0, 1], got shape {tuple(t.shape)}"
                )
            return t.permute(1, 2, 0).numpy()  # (3, H, W) -> (H, W, 3)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if hasattr(image, "convert"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
        raise ValueError("float images must be in [0, 1]; divide uint8-range floats by 255")
    return arr


def _solidity(ys: np.ndarray, xs: np.ndarray) -> float:
    """Pixel count / estimated lattice points of the convex hull of the pixel centres."""
    pts = np.stack([xs, ys], axis=1).astype(np.float64)  # (n, 2)
    try:
        hull = ConvexHull(pts)
    except (QhullError, ValueError):
        return 0.0  # collinear or too few points: a line, not a shape
    # Pick's theorem: lattice points in a closed lattice polygon = area + boundary/2 + 1;
    # the hull perimeter stands in for the boundary count (exact for axis-aligned edges).
    return float(
        len(pts) / (hull.volume + hull.area / 2.0 + 1.0)
    )  # 2-D: volume=area, area=perimeter


def _bilinear(img: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Sample ``img`` (H, W) at pixel-centre coordinates (x, y); zero outside."""
    h, w = img.shape
    padded = np.pad(img, 1)  # (H+2, W+2): zero border
    x = np.clip(x + 1.0, 0.0, w + 1.0 - 1e-6)
    y = np.clip(y + 1.0, 0.0, h + 1.0 - 1e-6)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, w + 1), np.minimum(y0 + 1, h + 1)
    fx, fy = x - x0, y - y0
    top = padded[y0, x0] * (1 - fx) + padded[y0, x1] * fx
    bot = padded[y1, x0] * (1 - fx) + padded[y1, x1] * fx
    return top * (1 - fy) + bot * fy


def _radial_profile(alpha: np.ndarray, cx: float, cy: float, r_max: float, n_rays: int):
    """Distance from (cx, cy) (pixel-centre coords) to where ``alpha`` first drops below 0.5,
    per ray: shape (n_rays,). Angles: shape (n_rays,)."""
    theta = np.linspace(0.0, 2.0 * np.pi, n_rays, endpoint=False)  # (R,)
    step = 0.2
    t = np.arange(0.0, r_max + step, step)  # (T,)
    xs = cx + np.cos(theta)[:, None] * t[None, :]  # (R, T)
    ys = cy - np.sin(theta)[:, None] * t[None, :]  # (R, T)
    vals = _bilinear(alpha, xs, ys)  # (R, T)
    below = vals < 0.5
    below[:, -1] = True
    first = below.argmax(axis=1)  # (R,) first sample below 0.5
    first = np.maximum(first, 1)
    rows = np.arange(n_rays)
    v0, v1 = vals[rows, first - 1], vals[rows, first]
    frac = np.clip((v0 - 0.5) / np.maximum(v0 - v1, 1e-9), 0.0, 1.0)
    return t[first - 1] + frac * step, theta


def _denoise(img: np.ndarray, cfg: OracleConfig) -> np.ndarray:
    """Step 1: a ``cfg.denoise`` px box filter over each channel of ``img`` (H, W, 3)."""
    if cfg.denoise > 1:
        return ndimage.uniform_filter(img, size=(cfg.denoise, cfg.denoise, 1), mode="nearest")
    return img


def _background(img: np.ndarray) -> np.ndarray:
    """Step 2: per-channel median (3,) of the 2 px image border."""
    border = np.concatenate(
        [
            img[:2].reshape(-1, 3),
            img[-2:].reshape(-1, 3),
            img[:, :2].reshape(-1, 3),
            img[:, -2:].reshape(-1, 3),
        ]
    )  # (N, 3)
    return np.median(border, axis=0)  # (3,)


def _unmix(img: np.ndarray, bg: np.ndarray, cfg: OracleConfig) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: colour label per pixel (H, W) (palette index, -1 = background / unexplained)
    and the coverage ``alpha`` of every palette colour (H, W, K)."""
    d = _PALETTE_RGB - bg  # (K, 3) background -> colour directions
    d2 = (d * d).sum(axis=1)  # (K,)
    usable = d2 > 0.05  # a palette colour too close to the background cannot be segmented
    v = img - bg  # (H, W, 3)
    a = np.einsum("hwc,kc->hwk", v, d) / np.maximum(d2, 1e-9)  # (H, W, K) coverage
    # Squared distance to each colour's line: |v|^2 - a^2 |d|^2 (Pythagoras), floored at 0.
    res2 = np.maximum((v * v).sum(axis=2)[..., None] - a * a * d2, 0.0)  # (H, W, K)
    res2 = np.where((a >= cfg.min_alpha) & usable, res2, np.inf)
    label = res2.argmin(axis=2)  # (H, W)
    best = np.take_along_axis(res2, label[..., None], axis=2)[..., 0]  # (H, W)
    # Accept if close to the line in absolute terms and in angle (relative to the distance from
    # the background): a dull grey or its anti-aliased rim must not read as a dark palette colour.
    a_best = np.take_along_axis(a, label[..., None], axis=2)[..., 0]  # (H, W)
    along2 = a_best**2 * d2[label]  # squared distance from the background along the line
    ok = (best <= cfg.max_residual**2) & (best <= cfg.max_relative_residual**2 * along2)
    return np.where(ok, label, -1), a


def _shape_from_profile(soft: np.ndarray, cx: float, cy: float, area: float, cfg: OracleConfig):
    """Step 5: (shape, (h3, h4)) from the radial profile of the soft map ``soft`` around its
    centroid (``cx``, ``cy``) (crop pixel-centre coordinates)."""
    r_eq = np.sqrt(area / np.pi)
    prof, theta = _radial_profile(soft, cx, cy, 3.0 * r_eq + 2.0, cfg.n_rays)
    mean = prof.mean()
    h3 = float(np.abs((prof * np.exp(-3j * theta)).mean()) / mean)
    h4 = float(np.abs((prof * np.exp(-4j * theta)).mean()) / mean)
    if max(h3, h4) < cfg.circle_max_harmonic:
        return "circle", (h3, h4)
    return ("triangle" if h3 > h4 else "square"), (h3, h4)


def _read_component(comps, c, raw, label, alpha_k, k, cfg: OracleConfig) -> DetectedObject | None:
    """Steps 4-6 for component ``c`` of colour ``k``: the artefact filters, then shape, size
    and position; ``None`` if the component is not an object.

    ``comps``: (H, W) component ids of colour ``k``'s hole-filled mask; ``raw``: (H, W) that
    mask before hole filling; ``label``: (H, W) colour labels; ``alpha_k``: (H, W) coverage
    of colour ``k`` in [0, 1].
    """
    h, w = label.shape
    # Work in the component's bounding box padded by 2 px (the rim and the profile rays that
    # leave the shape stay inside it; _bilinear is zero beyond).
    sl = ndimage.find_objects((comps == c).astype(np.int32))[0]
    y0, y1 = max(sl[0].start - 2, 0), min(sl[0].stop + 2, h)
    x0, x1 = max(sl[1].start - 2, 0), min(sl[1].stop + 2, w)
    comp = comps[y0:y1, x0:x1] == c  # (h', w')
    ys, xs = np.nonzero(comp)
    solidity = _solidity(ys, xs)
    if solidity < cfg.min_solidity:
        return None
    if raw[y0:y1, x0:x1][comp].mean() < cfg.min_own_fraction:
        return None  # mostly filled-in hole: an outline of this colour, not a shape
    # Soft map: the component plus its 1-px rim (anti-aliased edge pixels below 0.5),
    # excluding pixels that belong to anything else.
    free = label[y0:y1, x0:x1] < 0
    rim = ndimage.binary_dilation(comp, structure=np.ones((3, 3), bool)) & free
    soft = np.where(comp | rim, alpha_k[y0:y1, x0:x1], 0.0)  # (h', w')
    area = soft.sum()
    gy, gx = np.mgrid[0 : y1 - y0, 0 : x1 - x0]
    cx, cy = (soft * gx).sum() / area, (soft * gy).sum() / area  # crop pixel-centre coords
    if _bilinear(soft, np.array([cx]), np.array([cy]))[0] < 0.5:
        return None  # centroid outside the blob: not a convex shape
    shape, harmonics = _shape_from_profile(soft, cx, cy, area, cfg)
    return DetectedObject(
        shape=shape,
        color=_PALETTE_NAMES[int(k)],
        size="large" if np.sqrt(area / np.pi) / w >= cfg.size_threshold else "small",
        cx=float((cx + x0 + 0.5) / w),
        cy=float((cy + y0 + 0.5) / h),
        area=float(area / (h * w)),
        harmonics=harmonics,
        solidity=solidity,
    )


def _objects_of_colour(label, a, k, cfg: OracleConfig) -> list[DetectedObject]:
    """Step 4: the objects among the 4-connected components of colour ``k``'s mask."""
    h, w = label.shape
    raw = label == k
    comps, n = ndimage.label(ndimage.binary_fill_holes(raw), structure=_FOUR_CONNECTED)
    if n == 0:
        return []
    sizes = np.bincount(comps.ravel())
    alpha_k = np.clip(a[..., k], 0.0, 1.0)  # (H, W)
    found = []
    for c in range(1, n + 1):
        if sizes[c] < cfg.min_area * h * w:
            continue
        obj = _read_component(comps, c, raw, label, alpha_k, k, cfg)
        if obj is not None:
            found.append(obj)
    return found


def read_objects(image, config: OracleConfig | None = None) -> list[DetectedObject]:
    """Detect the shapes in ``image``: a uint8 (H, W, 3) array, a float (H, W, 3) array or a
    (3, H, W) torch tensor in [0, 1], or a PIL image. Largest first, at most
    ``config.max_objects``. The steps are those of the module docstring."""
    cfg = config or OracleConfig()
    img = _denoise(_as_hwc(image), cfg)  # (H, W, 3)
    label, a = _unmix(img, _background(img), cfg)  # (H, W), (H, W, K)
    found: list[DetectedObject] = []
    for k in np.unique(label):
        if k >= 0:
            found += _objects_of_colour(label, a, k, cfg)
    found.sort(key=lambda o: -o.area)
    return found[: cfg.max_objects]


def oracle_facts(
    image, prompt: str | PromptSpec | Sequence[Fact], config: OracleConfig | None = None
) -> list[bool]:
    """Truth value of each fact of ``prompt`` as read from ``image`` (order of
    :meth:`PromptSpec.facts`; in the open world without the ``total`` fact, see
    :func:`shapes.perturb.truth_facts`)."""
    cfg = config or OracleConfig()
    return facts_under(prompt, read_objects(image, cfg), cfg.truth)


def oracle_alignment(
    image, prompt: str | PromptSpec | Sequence[Fact], config: OracleConfig | None = None
) -> float:
    """Fraction of the prompt's facts that hold in ``image`` as read by the oracle, in [0, 1].

    ``image``: uint8/float (H, W, 3) array, (3, H, W) tensor in [0, 1], or PIL image.
    ``prompt``: a prompt string of the grammar, a :class:`PromptSpec` or a list of facts.
    Scored under ``config.truth`` (:func:`shapes.perturb.alignment_under`).
    """
    cfg = config or OracleConfig()
    return alignment_under(prompt, read_objects(image, cfg), cfg.truth, cfg.unmentioned_weight)


def oracle_alignment_batch(images, prompts: Sequence, config: OracleConfig | None = None):
    """Batched :func:`oracle_alignment`.

    ``images``: float tensor (B, 3, H, W) in [0, 1] on any device; ``prompts``: B prompt
    strings / specs / fact lists. Returns a float32 tensor (B,) on ``images.device``.
    (Computed on the CPU, one image at a time; ~1-3 ms per 64 px image.)
    """
    import torch

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
    cpu = images.detach().to("cpu", torch.float64).clamp(0.0, 1.0)
    scores = [oracle_alignment(cpu[i], prompts[i], config) for i in range(cpu.shape[0])]
    return torch.tensor(scores, dtype=torch.float32, device=images.device)


FACT_KINDS = ("color", "shape", "size", "count", "relation", "total")
"""The kinds of :class:`shapes.prompts.Fact`, in the order reports list them."""


def fact_breakdown(images, prompts: Sequence, config: OracleConfig | None = None) -> dict:
    """What the oracle reads in a batch, per fact kind.

    ``images`` (B, 3, H, W) in [0, 1], ``prompts`` B grammar prompts. Returns
    ``{"<kind>": share of that kind's facts that hold, ..., "objects_excess": mean of objects
    read - objects the prompt states}`` (kinds of :data:`FACT_KINDS` that occur; scored under
    ``config.truth``; the number stated is the closed world's ``total`` fact).
    """
    import torch

    cfg = config or OracleConfig()
    cpu = images.detach().to("cpu", torch.float64).clamp(0.0, 1.0)
    scenes = [read_objects(cpu[i], cfg) for i in range(len(prompts))]
    return fact_breakdown_of_scenes(scenes, prompts, cfg)


def fact_breakdown_of_scenes(
    scenes: Sequence, prompts: Sequence, config: OracleConfig | None = None
) -> dict:
    """:func:`fact_breakdown` of scenes already read: ``scenes[i]`` the objects of the image
    of ``prompts[i]`` (as :func:`read_objects` returns them)."""
    from shapes.prompts import as_facts

    cfg = config or OracleConfig()
    held: dict[str, list[bool]] = {k: [] for k in FACT_KINDS}
    excess = []
    for objects, prompt in zip(scenes, prompts, strict=True):
        facts = as_facts(prompt)
        scored = [f for f in facts if cfg.truth == "closed" or f.kind != "total"]
        for fact, ok in zip(scored, facts_under(prompt, objects, cfg.truth)):
            held[fact.kind].append(bool(ok))
        stated = [int(f.value) for f in facts if f.kind == "total"]
        excess.append(len(objects) - stated[0] if stated else np.nan)
    out = {k: float(np.mean(v)) for k, v in held.items() if v}
    out["objects_excess"] = float(np.nanmean(excess)) if not np.all(np.isnan(excess)) else np.nan
    return out


class ShapesOracleReward:
    """Reward function (project contract): ``rewards, info = reward(images, prompts, metadata)``.

    ``images`` (B, 3, H, W) float in [0, 1]; ``prompts`` B shapes-grammar strings; ``metadata``
    ignored. ``rewards``: float32 (B,) on the images' device = oracle alignment in [0, 1]
    under the config's truth model;
    ``info``: ``{"oracle_alignment": [...], "n_objects": [...]}``. Not differentiable.
    """

    def __init__(self, config: OracleConfig | None = None) -> None:
        self.config = config or OracleConfig()

    def __call__(self, images, prompts: Sequence[str], metadata: Sequence[dict] | None = None):
        import torch

        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != images.shape[0]:
            raise ValueError(
                f"expected images (B, 3, H, W) and B prompts, got {tuple(images.shape)} and "
                f"{len(prompts)} prompts"
            )
        cpu = images.detach().to("cpu", torch.float64).clamp(0.0, 1.0)
        scores, counts = [], []
        for i in range(cpu.shape[0]):
            objs = read_objects(cpu[i], self.config)
            cfg = self.config
            scores.append(alignment_under(prompts[i], objs, cfg.truth, cfg.unmentioned_weight))
            counts.append(len(objs))
        rewards = torch.tensor(scores, dtype=torch.float32, device=images.device)
        return rewards, {"oracle_alignment": scores, "n_objects": counts}
