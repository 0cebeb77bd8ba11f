"""The shapes-world oracle: accuracy on renders, robustness to artefacts, batched/reward APIs."""

from __future__ import annotations

import itertools
import pickle

import numpy as np
import pytest
import torch

from shapes.oracle import (
    OracleConfig,
    ShapesOracleReward,
    oracle_alignment,
    oracle_alignment_batch,
    oracle_facts,
    read_objects,
)
from shapes.perturb import faithful_scene, perturbed_scenes
from shapes.prompts import evaluate_facts, parse_prompt, sample_prompt
from shapes.world import BACKGROUND, PALETTE, Scene, SceneObject, render, to_tensor


def test_palette_is_well_separated_from_the_background():
    bg = np.array(BACKGROUND, float) / 255
    dirs = {c: np.array(v, float) / 255 - bg for c, v in PALETTE.items()}
    for a, b in itertools.permutations(dirs, 2):
        u, v = dirs[a], dirs[b]
        t = np.clip(u @ v / (v @ v), 0, 1)
        assert np.linalg.norm(u - t * v) > 0.38, (a, b)


def test_reads_a_known_scene_exactly():
    scene = Scene(
        (
            SceneObject("circle", "red", "large", 0.25, 0.3, 0.13),
            SceneObject("square", "cyan", "small", 0.75, 0.3, 0.075, 10.0),
            SceneObject("triangle", "purple", "large", 0.5, 0.72, 0.12, -12.0),
        )
    )
    objs = read_objects(render(scene))
    got = {(o.shape, o.color, o.size) for o in objs}
    assert got == {
        ("circle", "red", "large"),
        ("square", "cyan", "small"),
        ("triangle", "purple", "large"),
    }
    for o in objs:
        ref = next(s for s in scene.objects if s.color == o.color)
        assert abs(o.cx - ref.cx) < 0.01 and abs(o.cy - ref.cy) < 0.01
        assert o.area == pytest.approx(np.pi * ref.scale**2, rel=0.06)
    assert oracle_alignment(render(scene), "a large red circle left of a small cyan square") < 1
    two = Scene(scene.objects[:2])
    assert oracle_alignment(render(two), "a large red circle left of a small cyan square") == 1.0
    assert oracle_alignment(render(two), "a large red circle right of a small cyan square") == 7 / 8


@pytest.mark.parametrize("denoise", [0, 3])
def test_fact_accuracy_on_clean_renders_is_at_least_99_percent(denoise):
    cfg = OracleConfig(denoise=denoise)
    rng = np.random.default_rng(11)
    n = right = 0
    for _ in range(20):
        spec = sample_prompt(rng)
        scene = faithful_scene(spec, rng)
        for s in [scene, *(p.scene for p in perturbed_scenes(spec, scene, rng))]:
            truth = evaluate_facts(spec, s.objects)
            read = oracle_facts(render(s), spec, cfg)
            n += len(truth)
            right += sum(a == b for a, b in zip(truth, read))
    assert n > 700
    assert right / n >= 0.99


@pytest.mark.parametrize("denoise", [0, 3])
def test_not_fooled_by_scattered_pixels_of_the_right_colour(denoise):
    cfg = OracleConfig(denoise=denoise)
    rng = np.random.default_rng(0)
    red = np.array(PALETTE["red"], np.uint8)
    for density in (0.02, 0.05, 0.1):
        img = np.full((64, 64, 3), 255, np.uint8)
        img[rng.random((64, 64)) < density] = red
        assert read_objects(img, cfg) == []
        assert oracle_alignment(img, "a red circle") == 0.0
        assert oracle_alignment(img, "two small red squares") == 0.0
    # A faithful scene sprinkled with pixels of a prompt colour stays fully aligned.
    spec = parse_prompt("a large blue circle above a small red triangle")
    img = render(faithful_scene(spec, rng)).copy()
    img[(rng.random((64, 64)) < 0.05) & (img.min(axis=2) == 255)] = red
    assert oracle_alignment(img, spec, cfg) == 1.0


def test_not_fooled_by_thin_strokes_or_noise_speckle():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[10, 5:60] = PALETTE["green"]  # a 1 px line
    img[20:60, 40] = PALETTE["green"]
    assert read_objects(img, OracleConfig(denoise=0)) == []
    assert read_objects(img) == []
    rng = np.random.default_rng(1)
    noise_only = np.clip(1.0 + rng.normal(0, 0.15, (64, 64, 3)), 0, 1)
    assert read_objects(noise_only) == []
    assert read_objects(noise_only, OracleConfig(denoise=0)) == []
    # Faithful scenes under moderate noise keep alignment 1.
    scores = []
    for _ in range(10):
        spec = sample_prompt(rng)
        img = render(faithful_scene(spec, rng)) / 255.0
        scores.append(oracle_alignment(np.clip(img + rng.normal(0, 0.1, img.shape), 0, 1), spec))
    assert np.mean(scores) >= 0.98


def test_off_palette_colours_are_not_objects():
    scene_img = np.full((64, 64, 3), 255, np.uint8)
    scene_img[20:40, 20:40] = (128, 128, 128)  # grey square
    scene_img[45:60, 5:20] = (120, 70, 20)  # brown square
    assert read_objects(scene_img) == []
    assert read_objects(scene_img, OracleConfig(denoise=0)) == []
    ring = np.full((64, 64, 3), 255, np.uint8)
    ring[10:50, 10:50] = PALETTE["blue"]
    ring[13:47, 13:47] = 255  # a hollow blue square, 3 px thick
    assert read_objects(ring) == []


def test_batch_and_reward_match_single_image_and_are_picklable():
    rng = np.random.default_rng(3)
    prompts, imgs, singles = [], [], []
    for _ in range(4):
        spec = sample_prompt(rng)
        scene = faithful_scene(spec, rng)
        p = perturbed_scenes(spec, scene, rng)[0]
        img = render(p.scene)
        prompts.append(spec.text)
        imgs.append(img)
        singles.append(oracle_alignment(img, spec.text))
    batch = to_tensor(np.stack(imgs))  # (B, 3, H, W)
    assert batch.shape == (4, 3, 64, 64)
    out = oracle_alignment_batch(batch, prompts)
    assert out.dtype == torch.float32 and out.shape == (4,)
    np.testing.assert_allclose(out.numpy(), singles, atol=1e-6)
    reward = pickle.loads(pickle.dumps(ShapesOracleReward()))
    rewards, info = reward(batch, prompts, [{}] * 4)
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    np.testing.assert_allclose(rewards.numpy(), singles, atol=1e-6)
    assert len(info["oracle_alignment"]) == 4 and len(info["n_objects"]) == 4


def test_bad_inputs_fail_clearly():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        oracle_alignment_batch(torch.zeros(3, 64, 64), ["a red circle"])
    with pytest.raises(ValueError, match="2 prompts"):
        oracle_alignment_batch(torch.zeros(1, 3, 64, 64), ["a red circle"] * 2)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        oracle_alignment(np.full((64, 64, 3), 200.0), "a red circle")
    with pytest.raises(ValueError, match="unknown colour"):
        oracle_alignment(np.ones((64, 64, 3)), "a pink circle")


def test_fact_breakdown_per_kind_and_objects_excess():
    """Faithful renders: every kind holds and the oracle reads as many objects as stated;
    one extra object breaks only the closed world's `total` fact and reads as +1."""
    from shapes.oracle import fact_breakdown

    prompt = "a red circle left of a blue square"
    pair = (
        SceneObject("circle", "red", "large", 0.3, 0.6, 0.12),
        SceneObject("square", "blue", "large", 0.72, 0.6, 0.12),
    )
    extra = SceneObject("triangle", "green", "small", 0.5, 0.18, 0.075)
    images = to_tensor(np.stack([render(Scene(pair)), render(Scene((*pair, extra)))]))
    both = fact_breakdown(images, [prompt, prompt])
    assert both["color"] == both["shape"] == both["relation"] == 1.0
    assert both["total"] == 0.5 and both["objects_excess"] == 0.5
    alone = fact_breakdown(images[:1], [prompt])
    assert alone["total"] == 1.0 and alone["objects_excess"] == 0.0
