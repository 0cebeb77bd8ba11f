"""Rendering styles: the default family is today's rendering, sampled styles are
deterministic, the train and heldout families differ where documented, and under every style
the facts stay readable (colours nameable, size classes separable, shapes apart)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from shapes.dataset import MANIFEST, ShapesDatasetConfig, build_dataset, load_split
from shapes.perturb import faithful_scene, perturbed_scenes
from shapes.prompts import sample_prompt
from shapes.styles import (
    STYLE_DRAWS,
    STYLE_FAMILIES,
    StyleFamily,
    sample_style,
    sample_world_style,
    style_family,
)
from shapes.world import (
    OUTLINE_DARK,
    PALETTE,
    SHADE_FACTOR,
    RenderConfig,
    Scene,
    SceneObject,
    WorldConfig,
    circumradius,
    object_masks,
    polygon,
    render,
)

PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float64)  # (K, 3)
PALETTE_NAMES = list(PALETTE)


def styled_cases(family: str, n: int, seed: int = 0):
    """``n`` (scene, style) pairs of ``family``: faithful and perturbed scenes laid out in a
    world of the family, each with its own style."""
    rng = np.random.default_rng([seed, 11])
    out = []
    while len(out) < n:
        spec = sample_prompt(rng)
        world = sample_world_style(rng, family)
        scene = faithful_scene(spec, rng, world)
        for s in [scene, *(p.scene for p in perturbed_scenes(spec, scene, rng, world))][:3]:
            out.append((s, sample_style(rng, family)))
    return out[:n]


def reference_render(scene: Scene, size: int = 64, ss: int = 4) -> np.ndarray:
    """The plain rendering as it was written before styles existed (PIL draw, PIL reduce)."""
    big = size * ss
    img = Image.new("RGB", (big, big), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        colour = PALETTE[obj.color]
        if obj.shape == "circle":
            cx, cy, r = obj.cx * big, obj.cy * big, obj.scale * big
            draw.ellipse((cx - r, cy - r, cx + r - 1, cy + r - 1), fill=colour)
        else:
            draw.polygon([(x - 0.5, y - 0.5) for x, y in polygon(obj, big)], fill=colour)
    if ss > 1:
        img = img.reduce(ss)
    return np.asarray(img, dtype=np.uint8)


# --- the default family -------------------------------------------------------------------


def test_default_family_is_todays_rendering_and_draws_nothing():
    rng = np.random.default_rng(0)
    before = json.dumps(rng.bit_generator.state)
    assert sample_style(rng, "default") == RenderConfig()
    assert sample_world_style(rng, "default") == WorldConfig()
    base = WorldConfig(gap=0.05)
    assert sample_world_style(rng, "default", base) is base
    assert json.dumps(rng.bit_generator.state) == before
    for seed in range(20):
        r = np.random.default_rng([seed, 3])
        spec = sample_prompt(r)
        scene = faithful_scene(spec, r)
        for s in [scene, *(p.scene for p in perturbed_scenes(spec, scene, r))]:
            for size, ss in ((64, 4), (48, 4), (64, 1)):
                cfg = dataclasses.replace(
                    sample_style(r, "default"), image_size=size, supersample=ss
                )
                assert np.array_equal(render(s, cfg), reference_render(s, size, ss))


def test_a_plain_config_takes_the_pil_path_and_any_style_setting_leaves_it():
    assert RenderConfig().is_plain
    assert RenderConfig(supersample=1, background=(240, 240, 240)).is_plain
    for change in (
        {"background_kind": "gradient"},
        {"shade_jitter": 1.0},
        {"outline": "dark", "outline_width": 0.01},
        {"blur": 0.01},
        {"noise_std": 1.0},
        {"position_jitter": 0.005},
    ):
        assert not RenderConfig(**change).is_plain, change


# --- determinism ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["train", "heldout"])
def test_sampled_styles_are_deterministic_from_the_generator(family):
    a = [sample_style(np.random.default_rng(5), family) for _ in range(2)]
    assert a[0] == a[1]
    assert sample_style(np.random.default_rng(6), family) != a[0]
    worlds = [sample_world_style(np.random.default_rng(5), family) for _ in range(2)]
    assert worlds[0] == worlds[1]
    assert sample_world_style(np.random.default_rng(6), family) != worlds[0]


def test_every_style_draws_the_same_number_of_values():
    """Whatever a style turns out to be, the generator moves by STYLE_DRAWS uniforms (one for
    a world style), so the streams drawn after it do not depend on it."""
    for family in ("train", "heldout"):
        for seed in range(30):
            rng, probe = np.random.default_rng(seed), np.random.default_rng(seed)
            sample_style(rng, family)
            probe.random(STYLE_DRAWS)
            sample_world_style(rng, family)
            probe.random()
            assert rng.bit_generator.state == probe.bit_generator.state


def test_render_is_a_pure_function_of_scene_and_config():
    for scene, style in styled_cases("train", 12) + styled_cases("heldout", 6):
        first = render(scene, style)
        assert first.dtype == np.uint8 and first.shape == (64, 64, 3)
        assert np.array_equal(first, render(scene, style))
        reseeded = render(scene, dataclasses.replace(style, seed=style.seed + 1))
        random_effects = (
            style.background_kind == "texture"
            or style.shade_jitter > 0
            or style.noise_std > 0
            or style.position_jitter > 0
        )
        if random_effects and scene.objects:
            assert not np.array_equal(first, reseeded)


# --- the families --------------------------------------------------------------------------


DOCUMENTED_DIFFERENCES = {"description", "backgrounds", "pattern_scale", "outline", "p_outline"}


def test_train_and_heldout_differ_exactly_in_the_documented_settings():
    train, held = (dataclasses.asdict(STYLE_FAMILIES[f]) for f in ("train", "heldout"))
    differ = {k for k in train if train[k] != held[k]}
    assert differ == DOCUMENTED_DIFFERENCES
    rng = np.random.default_rng(0)
    tr = [sample_style(rng, "train") for _ in range(300)]
    he = [sample_style(rng, "heldout") for _ in range(300)]
    assert {s.background_kind for s in tr} == {"plain", "gradient", "texture"}
    assert {s.outline for s in tr} == {"none", "dark"}
    assert {s.background_kind for s in he} == {"stripes"}
    assert {s.outline for s in he} == {"shade"}
    # Everything else varies in both: aliasing, blur, noise, jitter.
    for styles in (tr, he):
        assert {s.supersample for s in styles} == {1, 4}
        assert any(s.blur > 0 for s in styles) and any(s.blur == 0 for s in styles)
        assert any(s.noise_std > 0 for s in styles) and any(s.noise_std == 0 for s in styles)
        assert len({round(s.position_jitter, 6) for s in styles}) > 100
        assert len({s.seed for s in styles}) == len(styles)


def test_stripes_are_visible_and_every_background_is_light():
    rng = np.random.default_rng(1)
    for family in ("train", "heldout"):
        for _ in range(100):
            s = sample_style(rng, family)
            for c in (s.background, s.background_to):
                assert min(c) >= 205
            gap = np.abs(np.subtract(s.background, s.background_to))
            assert gap.max() <= 30
            if s.background_kind == "stripes":
                assert gap.min() >= 15  # every channel differs: the stripes show


def test_unknown_family_and_unfair_families_are_refused():
    with pytest.raises(ValueError, match="valid families: .*'train'"):
        sample_style(np.random.default_rng(0), "trian")
    with pytest.raises(ValueError, match="valid families"):
        style_family("")
    # A zoom that would push small shapes across the size threshold is not a family.
    with pytest.raises(ValueError, match="size_threshold"):
        StyleFamily(description="too big", small_scale=(0.07, 0.09), zoom=(1.0, 1.2))
    with pytest.raises(ValueError, match="background kinds|BACKGROUND|tuple of"):
        StyleFamily(description="x", backgrounds=("checker",))
    with pytest.raises(ValueError, match="outline_width"):
        RenderConfig(outline="dark")
    with pytest.raises(ValueError, match="valid kinds"):
        RenderConfig(background_kind="checker")


# --- the facts stay readable ---------------------------------------------------------------


def fill_colours(image: np.ndarray, scene: Scene, style: RenderConfig) -> list[np.ndarray]:
    """Mean colour of each object's interior: its fully covered pixels farthest from its
    edge (beyond the outline and the blur's reach where it has such pixels)."""
    masks = object_masks(scene, style)  # (N, H, W)
    size = style.image_size
    reach = style.outline_width * size + 2.0 * style.blur * size + 0.5  # px
    out = []
    for m in masks:
        dist = ndimage.distance_transform_edt(np.pad(m >= 1.0 - 1e-9, 1))[1:-1, 1:-1]
        inner = dist > reach
        if not inner.any():
            inner = dist >= dist.max()
        out.append(image[inner].astype(np.float64).mean(axis=0))
    return out


def nearest_palette(colour: np.ndarray) -> str:
    return PALETTE_NAMES[int(np.linalg.norm(PALETTE_RGB - colour, axis=1).argmin())]


@pytest.mark.parametrize("family", ["train", "heldout"])
def test_each_objects_fill_is_nearest_its_own_palette_colour(family):
    n_objects = 0
    for scene, style in styled_cases(family, 60, seed=2):
        image = render(scene, style)
        for obj, colour in zip(scene.objects, fill_colours(image, scene, style)):
            assert nearest_palette(colour) == obj.color, (obj, colour, style)
            n_objects += 1
    assert n_objects > 100


def test_the_colour_check_fails_when_the_shade_jitter_is_too_large():
    """Negative control: a jitter of 120 levels makes some objects nearest another colour."""
    wrong = 0
    for scene, style in styled_cases("train", 60, seed=2):
        wild = dataclasses.replace(style, shade_jitter=120.0)
        image = render(scene, wild)
        for obj, colour in zip(scene.objects, fill_colours(image, scene, wild)):
            wrong += nearest_palette(colour) != obj.color
    assert wrong > 5


@pytest.mark.parametrize("family", ["train", "heldout"])
def test_size_classes_are_separable_by_area_under_every_style(family):
    threshold = math.pi * WorldConfig().size_threshold ** 2  # area fraction between classes
    areas = {"small": [], "large": []}
    for scene, style in styled_cases(family, 80, seed=3):
        masks = object_masks(scene, style)  # (N, H, W)
        for obj, m in zip(scene.objects, masks):
            areas[obj.size].append(m.sum() / m.size)
    assert len(areas["small"]) > 20 and len(areas["large"]) > 20
    assert max(areas["small"]) < threshold < min(areas["large"])
    assert min(areas["large"]) / max(areas["small"]) > 1.4  # a clear gap, not a hair


@pytest.mark.parametrize("family", ["train", "heldout"])
def test_the_masks_are_what_render_paints(family):
    """Outside the (blur-widened) object masks a styled image is its background."""
    for scene, style in styled_cases(family, 20, seed=4):
        image = render(scene, style).astype(np.int64)
        empty = render(Scene(), style).astype(np.int64)
        masks = object_masks(scene, style)
        reach = 1 + math.ceil(4 * style.blur * style.image_size)  # px, 4 sigma
        near = ndimage.binary_dilation(masks.sum(axis=0) > 0, iterations=reach)
        diff = np.abs(image - empty).max(axis=2)
        assert diff[~near].max(initial=0) == 0
        assert (diff[masks.sum(axis=0) >= 0.5] > 0).all()  # and the objects do show


def test_drawn_shapes_never_touch_and_stay_inside_the_image():
    for family in ("train", "heldout"):
        for scene, style in styled_cases(family, 40, seed=5):
            big = dataclasses.replace(style, supersample=1, image_size=256)
            masks = object_masks(scene, big) > 0  # (N, 256, 256)
            for m in masks:
                assert m.any()
                assert not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())
            grown = [ndimage.binary_dilation(m, iterations=2) for m in masks]
            for a in range(len(masks)):
                for b in range(a + 1, len(masks)):
                    assert not (grown[a] & masks[b]).any()  # >= 2 px apart at 256 px


# --- each setting does what it says ----------------------------------------------------------

ONE = Scene((SceneObject("square", "blue", "large", 0.5, 0.5, 0.13),))


def test_outlines_are_present_when_set_and_absent_otherwise():
    plain = RenderConfig(shade_jitter=0.0, position_jitter=0.0, background_kind="gradient")
    dark = dataclasses.replace(plain, outline="dark", outline_width=2 / 64)
    shade = dataclasses.replace(plain, outline="shade", outline_width=2 / 64)
    blue = np.array(PALETTE["blue"])
    for cfg, rim_colour in (
        (plain, blue),
        (dark, np.array(OUTLINE_DARK)),
        (shade, SHADE_FACTOR * blue),
    ):
        image = render(ONE, cfg).astype(np.float64)
        mask = object_masks(ONE, cfg)[0] >= 1.0  # (H, W) fully covered pixels
        dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        rim, core = image[mask & (dist <= 1)], image[mask & (dist >= 4)]
        assert np.abs(core - blue).max() <= 1
        assert np.abs(rim - rim_colour).max() <= 1, cfg.outline


def test_noise_blur_aliasing_and_backgrounds_are_present_when_set():
    base = RenderConfig(background=(230, 230, 230), background_kind="plain", seed=3)
    clean = render(ONE, dataclasses.replace(base, shade_jitter=0.0)).astype(np.float64)
    # noise: the residual has the asked std
    noisy = render(ONE, dataclasses.replace(base, noise_std=5.0)).astype(np.float64)
    assert 4.0 < (noisy - clean).std() < 6.0
    # blur: edges soften, mass stays
    blurred = render(ONE, dataclasses.replace(base, blur=0.01)).astype(np.float64)
    assert np.abs(np.diff(blurred, axis=1)).max() < 0.8 * np.abs(np.diff(clean, axis=1)).max()
    assert abs(blurred.mean() - clean.mean()) < 0.5
    # aliasing off: only the background and the fill colour appear
    aliased = render(ONE, dataclasses.replace(base, supersample=1, shade_jitter=1e-9))
    assert len(np.unique(aliased.reshape(-1, 3), axis=0)) == 2
    assert len(np.unique(clean.reshape(-1, 3), axis=0)) > 2
    # backgrounds (no objects): gradient monotone, stripes two-valued, texture smooth but varied
    lo, hi = (215, 215, 215), (245, 245, 245)
    grad = render(
        Scene(), RenderConfig(background=lo, background_to=hi, background_kind="gradient")
    )
    row = grad[32, :, 0].astype(int)
    assert row[0] < row[-1] and (np.diff(row) >= 0).all()
    stripes = render(
        Scene(),
        RenderConfig(background=lo, background_to=hi, background_kind="stripes", supersample=1),
    )
    assert {int(v) for v in np.unique(stripes)} == {215, 245}
    tex = render(Scene(), RenderConfig(background=lo, background_to=hi, background_kind="texture"))
    steps = np.abs(np.diff(tex[..., 0].astype(int), axis=1))
    assert tex[..., 0].std() > 3 and steps.max() <= 0.3 * (hi[0] - lo[0])  # blotches, not speckle


def test_shade_and_position_jitter_stay_within_their_bounds():
    for seed in range(30):
        cfg = RenderConfig(shade_jitter=18.0, position_jitter=0.008, seed=seed, supersample=1)
        big = dataclasses.replace(cfg, image_size=512)
        mask = object_masks(ONE, big)[0]
        ys, xs = np.nonzero(mask)
        cx, cy = (xs.mean() + 0.5) / 512, (ys.mean() + 0.5) / 512
        assert max(abs(cx - 0.5), abs(cy - 0.5)) <= 0.008 + 1e-3
        image = render(ONE, cfg).astype(np.float64)
        fill = image[mask_at(ONE, cfg)].mean(axis=0)
        assert np.abs(fill - PALETTE["blue"]).max() <= 18.5


def mask_at(scene: Scene, cfg: RenderConfig) -> np.ndarray:
    return object_masks(scene, cfg)[0] >= 1.0


def test_aspect_keeps_area_and_stays_inside_its_circumradius():
    for shape in ("circle", "square", "triangle"):
        for aspect in (1 / 1.2, 1.2, 1.44):
            obj = SceneObject(shape, "red", "large", 0.5, 0.5, 0.13, 10.0, aspect)
            cfg = RenderConfig(image_size=512, supersample=1)
            mask = object_masks(Scene((obj,)), cfg)[0] > 0
            area = mask.mean()
            assert abs(area / (math.pi * 0.13**2) - 1) < 0.02
            ys, xs = np.nonzero(mask)
            r = np.hypot((xs + 0.5) / 512 - 0.5, (ys + 0.5) / 512 - 0.5).max()
            assert r <= circumradius(obj) + 2 / 512
            assert r >= circumradius(obj) - 4 / 512  # tight: the bound is reached
            if shape == "circle":
                width = np.ptp(xs) + 1
                height = np.ptp(ys) + 1
                assert abs(width / height - aspect) < 0.03


def test_aspect_round_trips_through_json_and_is_omitted_when_one():
    regular = SceneObject("square", "red", "large", 0.5, 0.5, 0.13)
    stretched = dataclasses.replace(regular, aspect=1.15)
    assert "aspect" not in Scene((regular,)).to_json()
    assert '"aspect":1.15' in Scene((stretched,)).to_json()
    back = Scene.from_json(Scene((regular, stretched)).to_json())
    assert back.objects == (regular, stretched)
    with pytest.raises(ValueError, match="aspect"):
        SceneObject("square", "red", "large", 0.5, 0.5, 0.13, aspect=0.0)
    with pytest.raises(ValueError, match="max_aspect"):
        WorldConfig(max_aspect=0.9)


def test_the_train_world_stretches_shapes_and_zooms_sizes():
    rng = np.random.default_rng(0)
    worlds = [sample_world_style(rng, "train") for _ in range(50)]
    assert {w.max_aspect for w in worlds} == {1.2}
    assert len({w.small_scale for w in worlds}) == 50
    spec = sample_prompt(np.random.default_rng(4))
    aspects = [o.aspect for w in worlds for o in faithful_scene(spec, rng, w).objects]
    assert min(aspects) < 0.9 and max(aspects) > 1.1
    assert all(1 / 1.2 - 1e-9 <= a <= 1.2 + 1e-9 for a in aspects)


# --- the dataset builder ---------------------------------------------------------------------


def test_dataset_style_is_recorded_and_changes_only_the_images(tmp_path):
    rows = {}
    for style in ("default", "train", "heldout"):
        out = tmp_path / style
        build_dataset(out, ShapesDatasetConfig(n_prompts=4, seed=1, style=style))
        meta = json.loads((out / MANIFEST).read_text())
        assert meta["config"]["style"] == style
        assert meta["style"] == json.loads(json.dumps(dataclasses.asdict(STYLE_FAMILIES[style])))
        rows[style] = load_split(out / "train.csv")
    pixels = {s: np.stack([np.asarray(Image.open(r.image)) for r in rows[s][:4]]) for s in rows}
    assert not np.array_equal(pixels["default"], pixels["train"])
    assert not np.array_equal(pixels["train"], pixels["heldout"])
    # The styled builds lay out their own worlds (zoom, aspect), labelled from their scenes.
    assert any(o.aspect != 1.0 for r in rows["train"] for o in r.scene.objects)
    assert all(o.aspect == 1.0 for r in rows["default"] for o in r.scene.objects)
    with pytest.raises(ValueError, match="valid families"):
        ShapesDatasetConfig(style="fancy")


def test_relations_of_faithful_layouts_hold_where_the_shapes_are_drawn():
    """Position jitter moves the drawn shapes, never far enough to flip a relation."""
    from shapes.world import relation_holds

    rng = np.random.default_rng(7)
    checked = 0
    while checked < 40:
        spec = sample_prompt(rng)
        if spec.relation is None:
            continue
        world = sample_world_style(rng, "train")
        scene = faithful_scene(spec, rng, world)
        style = dataclasses.replace(sample_style(rng, "train"), position_jitter=0.008)
        masks = object_masks(scene, dataclasses.replace(style, image_size=256, supersample=1))
        gy, gx = np.mgrid[0:256, 0:256]
        drawn = [
            SceneObject(
                o.shape,
                o.color,
                o.size,
                (m * (gx + 0.5)).sum() / m.sum() / 256,
                (m * (gy + 0.5)).sum() / m.sum() / 256,
                o.scale,
            )
            for o, m in zip(scene.objects, masks)
        ]
        r = spec.relation
        assert relation_holds(drawn[r.subject], drawn[r.object], r.relation)
        checked += 1
