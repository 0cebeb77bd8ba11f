"""Pinned outputs of the shapes world: perturbations, oracle readings and training data.

Each test hashes what a fixed set of seeds produces (every float by its exact bits, and the
random generator's state afterwards, so the number and order of random draws is pinned too)
and compares it with the digest recorded from the reference implementation. A failure means
the scenes, the readings or the generated training data changed: the shipped checkpoints in
``shapes/assets`` would no longer rebuild bit for bit. Rendering uses PIL, so a PIL release
that draws differently also changes the digests of rendered images.
"""

from __future__ import annotations

import collections
import hashlib
import json

import numpy as np
from scipy import ndimage

from shapes.oracle import OracleConfig, read_objects
from shapes.perturb import KINDS, faithful_scene, perturb, perturbed_scenes
from shapes.prompts import sample_prompt
from shapes.world import RenderConfig, WorldConfig, render

# A crowded world: large shapes and wide gaps, so that placements fail and the fallback
# branches of the perturbations (move, retry with a small size, give up) are taken.
CROWDED = WorldConfig(small_scale=(0.08, 0.095), large_scale=(0.17, 0.22), gap=0.1, max_tries=10)

N_SEEDS, N_CROWDED_SEEDS, N_ORACLE_PROMPTS = 300, 150, 10
"""Prompts (seeds) of the perturbation pins in the default and the crowded world, and of the
oracle pin."""

PERTURB_DIGEST = "0d8174208d179bcf200c4c704386beeb2d5839dda7e69d44e276720bcf089dcf"
ORACLE_DIGEST = "d6f92bd60004c13741c1b53e5cce6d18001f9676133e91a9a8ebc991cefa0617"
SD_DATA_DIGEST = "02c1519cce124df6b4653102a1bde583467ab05b80a311d09bd49e4a3417de6f"
CLIP_DATA_DIGEST = "69c7587adea060955706fba70fa1dbcb750cbb883f0af126b4fb0c1382a3ac0f"
DATASET_DIGEST = "f661ee7fbb26fa531b4dceb1765f9a52d784b882d03083ca4bf91bda36e4fba1"


def _f(x) -> str:
    return float(x).hex()


def scene_key(scene) -> str:
    """Exact text of a scene (float bits, not rounded)."""
    return ";".join(
        f"{o.shape},{o.color},{o.size},{_f(o.cx)},{_f(o.cy)},{_f(o.scale)},{_f(o.rotation)}"
        for o in scene.objects
    )


def perturbed_key(p) -> str:
    return "-" if p is None else f"{p.kind}|{p.expected_broken}|{scene_key(p.scene)}"


def rng_key(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state, sort_keys=True)


def perturb_digest(n_seeds: int, world: WorldConfig | None) -> str:
    """Every kind of :func:`perturb` and :func:`perturbed_scenes` on ``n_seeds`` prompts."""
    h = hashlib.sha256()
    for seed in range(n_seeds):
        rng = np.random.default_rng([seed, 31])
        spec = sample_prompt(rng)
        try:
            scene = faithful_scene(spec, rng, world)
        except RuntimeError:
            h.update(f"{spec.text}: no layout {rng_key(rng)}\n".encode())
            continue
        lines = [spec.text, scene_key(scene)]
        lines += [f"{k}:{perturbed_key(perturb(spec, scene, k, rng, world))}" for k in KINDS]
        lines += [perturbed_key(p) for p in perturbed_scenes(spec, scene, rng, world, n_double=2)]
        lines.append(rng_key(rng))
        h.update(("\n".join(lines) + "\n").encode())
    return h.hexdigest()


def detected_key(o) -> str:
    return ",".join(
        [o.shape, o.color, o.size, _f(o.cx), _f(o.cy), _f(o.area), *map(_f, o.harmonics)]
        + [_f(o.solidity)]
    )


def oracle_digest(n_prompts: int) -> str:
    """:func:`read_objects` on clean, noisy and blurred renders at two sizes, two configs."""
    h = hashlib.sha256()
    configs = (OracleConfig(), OracleConfig(denoise=0))
    for seed in range(n_prompts):
        rng = np.random.default_rng([seed, 57])
        spec = sample_prompt(rng)
        scene = faithful_scene(spec, rng)
        scenes = [scene, *(p.scene for p in perturbed_scenes(spec, scene, rng))]
        for s in scenes:
            for size in (64, 48):
                img = render(s, RenderConfig(image_size=size)) / 255.0  # (H, W, 3)
                noisy = np.clip(img + rng.normal(0.0, 0.1, img.shape), 0.0, 1.0)
                blurred = ndimage.gaussian_filter(img, sigma=(1.0, 1.0, 0), mode="nearest")
                for x in (img, noisy, blurred):
                    for cfg in configs:
                        objs = read_objects(x, cfg)
                        h.update(("|".join(map(detected_key, objs)) + "\n").encode())
    return h.hexdigest()


def sd_data_digest(heldout_prompts, make_dataset, n: int = 96) -> str:
    """Held-out prompts and the (image, caption) pairs of the tiny SD's training data."""
    held = heldout_prompts(20, 12345)
    images, captions = make_dataset(n, 0, set(held), 64)
    h = hashlib.sha256()
    h.update(json.dumps([held, captions]).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return h.hexdigest()


def clip_data_digest(sample_specs, render_batch, scenes_and_negatives, hard_negatives) -> str:
    """The CLIP pretraining stream: prompts, scenes, image- and caption-side negatives."""
    rng = np.random.default_rng([0, 1])
    h = hashlib.sha256()
    specs = sample_specs(rng, 24, heldout=False)
    h.update(json.dumps([s.text for s in specs]).encode())
    h.update(render_batch(specs, rng, 64).numpy().tobytes())
    pos, neg, owner = scenes_and_negatives(specs, rng, 64, 1.5)
    h.update(pos.numpy().tobytes() + neg.numpy().tobytes() + json.dumps(owner).encode())
    h.update(json.dumps([hard_negatives(s, rng, 3) for s in specs]).encode())
    held = sample_specs(rng, 12, heldout=True)
    h.update(json.dumps([s.text for s in held]).encode())
    h.update(rng_key(rng).encode())
    return h.hexdigest()


def dataset_digest(build_dataset, config_cls, root) -> str:
    """The CSVs of a small shapes dataset (the MOS data the shipped reward is trained on)."""
    build_dataset(root, config_cls(n_prompts=16, seed=3))
    return hashlib.sha256(
        b"".join((root / f"{s}.csv").read_bytes() for s in ("train", "val", "test"))
    ).hexdigest()


def test_perturbations_are_pinned():
    got = perturb_digest(N_SEEDS, None) + perturb_digest(N_CROWDED_SEEDS, CROWDED)
    assert hashlib.sha256(got.encode()).hexdigest() == PERTURB_DIGEST


def test_oracle_readings_are_pinned():
    assert oracle_digest(N_ORACLE_PROMPTS) == ORACLE_DIGEST


def test_sd_training_data_is_pinned():
    from shapes.sd_training import heldout_prompts, make_dataset

    assert sd_data_digest(heldout_prompts, make_dataset) == SD_DATA_DIGEST


def test_clip_training_data_is_pinned():
    from shapes.clip_training import (
        hard_negatives,
        render_batch,
        sample_specs,
        scenes_and_negatives,
    )

    digest = clip_data_digest(sample_specs, render_batch, scenes_and_negatives, hard_negatives)
    assert digest == CLIP_DATA_DIGEST


def test_reward_dataset_is_pinned(tmp_path):
    from shapes.dataset import ShapesDatasetConfig, build_dataset

    assert dataset_digest(build_dataset, ShapesDatasetConfig, tmp_path / "d") == DATASET_DIGEST


def test_pinned_seeds_exercise_every_kind():
    """The pinned seeds cover each kind, both where it applies and (except for the two kinds
    that always apply) where it does not."""
    seen = collections.Counter()
    for world, n_seeds in ((None, N_SEEDS), (CROWDED, N_CROWDED_SEEDS)):
        for seed in range(n_seeds):
            rng = np.random.default_rng([seed, 31])
            spec = sample_prompt(rng)
            try:
                scene = faithful_scene(spec, rng, world)
            except RuntimeError:
                continue
            for k in KINDS:
                seen[k, perturb(spec, scene, k, rng, world) is not None] += 1
    for kind in KINDS:
        assert seen[kind, True] >= 20, (kind, seen)
        if kind not in ("color_swap", "missing_object"):
            assert seen[kind, False] >= 1, (kind, seen)
