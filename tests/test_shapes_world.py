"""The shapes world: determinism, exact labels, perturbation effects, splits and CSV round trip."""

from __future__ import annotations

import collections
import csv
import itertools

import numpy as np
import pytest
from PIL import Image

from hyperalign.cli import main as cli
from shapes.dataset import COLUMNS, ShapesDatasetConfig, build_dataset, load_split
from shapes.perturb import KINDS, RaterModel, faithful_scene, perturb, perturbed_scenes
from shapes.prompts import (
    Entity,
    PromptSpec,
    Relation,
    alignment,
    evaluate_facts,
    parse_prompt,
    sample_prompt,
)
from shapes.world import (
    COLORS,
    PALETTE,
    RELATIONS,
    SHAPES,
    RenderConfig,
    Scene,
    SceneObject,
    relation_holds,
    render,
)


def _draw(seed: int, size: int = 64):
    rng = np.random.default_rng(seed)
    spec = sample_prompt(rng)
    scene = faithful_scene(spec, rng)
    return spec.text, scene, render(scene, RenderConfig(image_size=size))


def test_same_seed_same_pixels_and_prompts_different_seed_differs():
    a, b = _draw(123), _draw(123)
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])
    others = [_draw(s) for s in range(124, 129)]
    assert any(o[0] != a[0] for o in others)
    assert all(not np.array_equal(o[2], a[2]) for o in others)


def test_render_size_dtype_antialiasing_and_area():
    obj = SceneObject("circle", "red", "large", 0.5, 0.5, 0.125)
    for size in (32, 64, 96):
        img = render(Scene((obj,)), RenderConfig(image_size=size))
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
    img = render(Scene((obj,)), RenderConfig(image_size=64)).astype(np.float64)
    # Coverage of red, un-mixed along the green channel (background 255 -> red 30).
    cov = (255.0 - img[..., 1]) / (255.0 - PALETTE["red"][1])
    assert np.any((cov > 0.1) & (cov < 0.9)), "no anti-aliased edge pixels"
    area = cov.sum() / 64**2
    assert area == pytest.approx(np.pi * 0.125**2, rel=0.03)
    aliased = render(Scene((obj,)), RenderConfig(image_size=64, supersample=1))
    assert len(np.unique(aliased[..., 1])) == 2


def test_prompt_text_parses_back_and_bad_prompts_fail_clearly():
    rng = np.random.default_rng(0)
    for _ in range(300):
        spec = sample_prompt(rng)
        assert parse_prompt(spec.text) == spec
    assert parse_prompt("Two large blue squares.") == PromptSpec(
        (Entity("blue", "square", "large", 2),)
    )
    with pytest.raises(ValueError, match="unknown colour 'pink'"):
        parse_prompt("a pink circle")
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        parse_prompt("a red hexagon")
    with pytest.raises(ValueError, match="cannot parse"):
        parse_prompt("a photo of a cat")


def test_relations_are_mutually_exclusive():
    rng = np.random.default_rng(1)
    for _ in range(200):
        a = SceneObject("circle", "red", "small", *rng.uniform(0, 1, 2), 0.07)
        b = SceneObject("circle", "blue", "small", *rng.uniform(0, 1, 2), 0.07)
        assert sum(relation_holds(a, b, r) for r in RELATIONS) <= 1
    a = SceneObject("circle", "red", "small", 0.2, 0.5, 0.07)
    b = SceneObject("square", "blue", "small", 0.8, 0.55, 0.07)
    assert relation_holds(a, b, "left of") and relation_holds(b, a, "right of")


def test_faithful_scenes_have_alignment_one_and_clear_relations():
    rng = np.random.default_rng(2)
    n_rel = 0
    for _ in range(150):
        spec = sample_prompt(rng)
        scene = faithful_scene(spec, rng)
        assert len(scene.objects) == spec.n_objects <= 3
        assert alignment(spec, scene.objects) == 1.0
        if spec.relation is not None:
            n_rel += 1
            assert alignment(spec.text, scene.objects) == 1.0
    assert n_rel > 20


def test_each_perturbation_breaks_exactly_the_expected_facts():
    rng = np.random.default_rng(3)
    seen = collections.Counter()
    for _ in range(200):
        spec = sample_prompt(rng)
        scene = faithful_scene(spec, rng)
        n_facts = len(spec.facts())
        for kind in KINDS:
            p = perturb(spec, scene, kind, rng)
            if p is None:
                continue
            seen[kind] += 1
            got = alignment(spec, p.scene.objects)
            assert got == pytest.approx(1.0 - p.expected_broken / n_facts), (kind, spec.text)
            assert got < 1.0
    assert set(seen) == set(KINDS) and min(seen.values()) >= 10, seen


def test_specific_perturbation_fractions():
    # "a large red circle left of a blue square": 2 + 3 slot facts... 5 unary + total + relation.
    spec = parse_prompt("a large red circle left of a blue square")
    assert len(spec.facts()) == 7
    scene = faithful_scene(spec, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    expect = {
        "color_swap": 6 / 7,
        "relation_flip": 6 / 7,
        "size_change": 6 / 7,
        "binding_swap": 5 / 7,
        "extra_object": 6 / 7,
    }
    for kind, value in expect.items():
        assert alignment(spec, perturb(spec, scene, kind, rng).scene.objects) == pytest.approx(
            value
        )
    missing = perturb(spec, scene, "missing_object", rng)
    assert alignment(spec, missing.scene.objects) in (pytest.approx(2 / 7), pytest.approx(3 / 7))
    # Counts: "two blue squares" = 4 slot facts + count + total.
    spec = parse_prompt("two blue squares")
    objs = faithful_scene(spec, np.random.default_rng(1)).objects
    assert alignment(spec, objs[:1]) == pytest.approx(2 / 6)
    assert alignment(spec, (*objs, *faithful_scene(parse_prompt("a blue square"), rng).objects)) < 1


def test_scoring_does_not_depend_on_object_order():
    rng = np.random.default_rng(4)
    for _ in range(50):
        spec = sample_prompt(rng)
        scene = faithful_scene(spec, rng)
        for p in perturbed_scenes(spec, scene, rng):
            objs = p.scene.objects
            ref = evaluate_facts(spec, objs)
            for perm in itertools.islice(itertools.permutations(objs), 6):
                assert evaluate_facts(spec, perm) == ref


def test_simulated_mos_range_monotone_and_seeded():
    raters = RaterModel()
    biases = raters.biases(0)
    np.testing.assert_array_equal(biases, raters.biases(0))
    rng = np.random.default_rng(0)
    means = []
    for a in (0.0, 0.5, 1.0):
        mos = [raters.mos(a, biases, rng) for _ in range(200)]
        assert 1.0 <= min(mos) and max(mos) <= 5.0
        means.append(np.mean(mos))
    assert means[0] < means[1] < means[2]
    assert means[2] - means[0] > 3.0


def test_dataset_is_prompt_disjoint_deterministic_and_round_trips(tmp_path):
    cfg = ShapesDatasetConfig(n_prompts=12, seed=5)
    summary = build_dataset(tmp_path / "a", cfg)
    build_dataset(tmp_path / "b", cfg)
    build_dataset(tmp_path / "c", ShapesDatasetConfig(n_prompts=12, seed=6))
    prompts = {}
    for split, path in summary["csv"].items():
        with open(path, newline="") as f:
            assert tuple(next(csv.reader(f))) == COLUMNS
        assert (tmp_path / "a" / f"{split}.csv").read_bytes() == (
            tmp_path / "b" / f"{split}.csv"
        ).read_bytes()
        rows = load_split(path)
        assert rows, split
        prompts[split] = {r.prompt for r in rows}
        for r in rows:
            assert r.image.is_file()
            spec = parse_prompt(r.prompt)
            assert r.alignment == pytest.approx(alignment(spec, r.scene.objects), abs=1e-6)
            assert 1.0 <= r.score <= 5.0
            pixels = np.asarray(Image.open(r.image).convert("RGB"))
            np.testing.assert_array_equal(pixels, render(r.scene))
        kinds = {r.perturbation for r in rows}
        assert "faithful" in kinds and len(kinds) > 2
    assert not (prompts["train"] & prompts["val"] or prompts["train"] & prompts["test"])
    assert not prompts["val"] & prompts["test"]
    assert sum(len(p) for p in prompts.values()) == 12
    assert (tmp_path / "a" / "train.csv").read_bytes() != (
        tmp_path / "c" / "train.csv"
    ).read_bytes()
    with pytest.raises(FileExistsError):
        build_dataset(tmp_path / "a", cfg)


def test_cli_main_builds_a_dataset(tmp_path):
    out = tmp_path / "ds"
    assert (
        cli(
            [
                "shapes-data",
                "--out",
                str(out),
                "--n-prompts",
                "4",
                "--seed",
                "1",
                "--image-size",
                "48",
            ]
        )
        == 0
    )
    rows = load_split(out / "train.csv")
    assert np.asarray(Image.open(rows[0].image)).shape == (48, 48, 3)
    assert (out / "meta.json").is_file()


def test_world_constants():
    assert len(SHAPES) >= 3 and len(COLORS) >= 6
    with pytest.raises(ValueError, match="valid colours"):
        SceneObject("circle", "pink", "small", 0.5, 0.5, 0.07)
    with pytest.raises(ValueError, match="related entities must be singular"):
        PromptSpec(
            (Entity("red", "circle", count=2), Entity("blue", "square")), Relation(0, "above", 1)
        )
