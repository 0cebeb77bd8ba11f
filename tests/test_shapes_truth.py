"""Truth models pinned on hand-made scenes: the closed world (the prompt describes the whole
scene) and the open world (facts are what the prompt states; unmentioned objects cost
``unmentioned_weight``), for the scene's truth and for the oracle reading its render."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from hyperalign.cli import main as cli
from shapes.dataset import MANIFEST, ShapesDatasetConfig, build_dataset, load_split
from shapes.oracle import OracleConfig, ShapesOracleReward, oracle_alignment, oracle_facts
from shapes.perturb import (
    alignment_under,
    true_alignment,
    truth_facts,
    unmentioned_objects,
)
from shapes.prompts import alignment, parse_prompt
from shapes.world import RenderConfig, Scene, SceneObject, render, to_tensor

PROMPT = "two red circles and a blue square"
"""Facts: shape and colour of 3 slots, count (2 red circles), total (3): 8 closed, 7 open."""


def obj(shape: str, color: str, cx: float, cy: float) -> SceneObject:
    return SceneObject(shape, color, "small", cx, cy, 0.075)


RC1, RC2 = obj("circle", "red", 0.25, 0.25), obj("circle", "red", 0.75, 0.25)
BS = obj("square", "blue", 0.25, 0.75)
CORNER = (0.75, 0.75)  # the free quarter, for an extra object

SCENES = {
    "faithful": (RC1, RC2, BS),
    "extra unmentioned": (RC1, RC2, BS, obj("triangle", "green", *CORNER)),
    "stated count exceeded": (RC1, RC2, BS, obj("circle", "red", *CORNER)),
    "missing object": (RC1, RC2),
}

W = 0.5
"""The non-zero unmentioned weight pinned below."""

# (closed, open with weight 0, open with weight W): exact fractions of facts.
EXPECTED = {
    "faithful": (1.0, 1.0, 1.0),
    # closed: total broken, 7/8; open: nothing stated is broken; the extra object costs W.
    "extra unmentioned": (7 / 8, 1.0, 7 / (7 + W)),
    # closed: count and total broken, 6/8; open: count broken, 6/7, and the surplus costs W.
    "stated count exceeded": (6 / 8, 6 / 7, 6 / (7 + W)),
    # closed: the square's shape and colour and total broken, 5/8; open: 5/7 (nothing extra).
    "missing object": (5 / 8, 5 / 7, 5 / 7),
}

RULES = (("closed", 1.0), ("open", 0.0), ("open", W))


@pytest.mark.parametrize("case", list(SCENES))
def test_true_alignment_under_both_rules(case):
    spec = parse_prompt(PROMPT)
    scene = Scene(SCENES[case])
    got = tuple(true_alignment(spec, scene, truth, w) for truth, w in RULES)
    assert got == pytest.approx(EXPECTED[case], abs=1e-12)


@pytest.mark.parametrize("case", list(SCENES))
def test_the_oracle_reads_the_same_values_from_default_style_renders(case):
    image = render(Scene(SCENES[case]), RenderConfig())
    for (truth, w), want in zip(RULES, EXPECTED[case]):
        cfg = OracleConfig(truth=truth, unmentioned_weight=w)
        assert oracle_alignment(image, PROMPT, cfg) == pytest.approx(want, abs=1e-12)
    # The reward class scores under its config's truth model too.
    reward = ShapesOracleReward(OracleConfig(truth="open", unmentioned_weight=W))
    rewards, info = reward(to_tensor([image]), [PROMPT])
    assert float(rewards[0]) == pytest.approx(EXPECTED[case][2], abs=1e-6)


def test_the_closed_world_is_the_default_everywhere():
    spec = parse_prompt(PROMPT)
    for objects in SCENES.values():
        scene = Scene(objects)
        assert true_alignment(spec, scene) == alignment(spec, objects)
        image = render(scene)
        assert oracle_alignment(image, PROMPT) == oracle_alignment(
            image, PROMPT, OracleConfig(truth="closed")
        )
    assert OracleConfig().truth == ShapesDatasetConfig().truth == "closed"


def test_open_world_facts_are_the_stated_ones():
    closed, opened = truth_facts(PROMPT, "closed"), truth_facts(PROMPT, "open")
    assert [f.kind for f in closed].count("total") == 1
    assert [f for f in closed if f.kind != "total"] == opened
    image = render(Scene(SCENES["extra unmentioned"]))
    assert oracle_facts(image, PROMPT) == [True] * 7 + [False]  # total, the last fact, breaks
    assert oracle_facts(image, PROMPT, OracleConfig(truth="open")) == [True] * 7


def test_unmentioned_objects_count_the_surplus_only():
    assert [unmentioned_objects(PROMPT, SCENES[c]) for c in SCENES] == [0, 1, 1, 0]
    # "a red circle" with two red circles: the second one is unmentioned, not a count error.
    two = (RC1, RC2)
    assert alignment_under("a red circle", two, "open", 0.0) == 1.0
    assert alignment_under("a red circle", two, "open", 1.0) == pytest.approx(2 / 3)
    assert alignment_under("a red circle", two, "closed") == pytest.approx(2 / 3)


def test_with_weight_zero_clutter_can_only_help():
    """The trade-off of best-assignment scoring: with weight 0, adding objects gives the
    assignment more chances to match a slot, so a cluttered scene scores higher."""
    prompt = "a red circle left of a blue square"
    swapped = (obj("circle", "blue", 0.25, 0.5), obj("square", "red", 0.75, 0.5))
    clutter = swapped + (obj("circle", "red", 0.25, 0.2), obj("square", "blue", 0.75, 0.2))
    # Swapped colours: shape facts hold, colour facts fail, the relation holds: 3/5.
    assert alignment_under(prompt, swapped, "open", 0.0) == pytest.approx(3 / 5)
    assert alignment_under(prompt, clutter, "open", 0.0) == 1.0
    # A positive weight charges the clutter; the closed world charges it through total.
    assert alignment_under(prompt, clutter, "open", 1.0) == pytest.approx(5 / 7)
    assert alignment_under(prompt, clutter, "closed") == pytest.approx(5 / 6)
    for objects in (swapped, clutter):
        image = render(Scene(objects))
        cfg = OracleConfig(truth="open", unmentioned_weight=0.0)
        assert oracle_alignment(image, prompt, cfg) == alignment_under(prompt, objects, "open", 0)


def test_bad_truth_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="valid truth models: \\('closed', 'open'\\)"):
        OracleConfig(truth="opened")
    with pytest.raises(ValueError, match="unmentioned_weight must be >= 0"):
        OracleConfig(truth="open", unmentioned_weight=-1.0)
    with pytest.raises(ValueError, match="valid truth models"):
        ShapesDatasetConfig(truth="partial")
    with pytest.raises(ValueError, match="valid truth models"):
        true_alignment(parse_prompt(PROMPT), Scene(SCENES["faithful"]), "world")


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_the_dataset_labels_under_its_truth_model(tmp_path):
    out = {}
    for name, truth, w in (("closed", "closed", 1.0), ("open0", "open", 0.0)):
        out[name] = tmp_path / name
        cfg = ShapesDatasetConfig(n_prompts=6, seed=2, truth=truth, unmentioned_weight=w)
        build_dataset(out[name], cfg)
        meta = json.loads((out[name] / MANIFEST).read_text())
        assert (meta["config"]["truth"], meta["config"]["unmentioned_weight"]) == (truth, w)
        for r in load_split(out[name] / "train.csv"):
            spec = parse_prompt(r.prompt)
            assert r.alignment == pytest.approx(true_alignment(spec, r.scene, truth, w), abs=1e-6)
    closed, open0 = (read_csv(out[n] / "train.csv") for n in ("closed", "open0"))
    assert [r["scene"] for r in closed] == [r["scene"] for r in open0]  # same scenes
    extra = [i for i, r in enumerate(closed) if r["perturbation"] == "extra_object"]
    assert extra
    for i in extra:  # the extra object breaks total in the closed world, nothing in the open
        assert float(closed[i]["alignment"]) < 1.0 == float(open0[i]["alignment"])
    # The MOS follows the labels: rated from the open-world alignment, it moves with it.
    assert [r["score"] for r in closed] != [r["score"] for r in open0]


def test_the_cli_threads_truth_and_style_into_the_manifest(tmp_path):
    out = tmp_path / "ds"
    argv = ["shapes-data", "--out", str(out), "--n-prompts", "4", "--image-size", "32"]
    assert cli(argv + ["--truth", "open", "--unmentioned-weight", "0.25", "--style", "train"]) == 0
    config = json.loads((out / MANIFEST).read_text())["config"]
    assert (config["truth"], config["unmentioned_weight"], config["style"]) == (
        "open",
        0.25,
        "train",
    )
    assert np.isfinite([r.alignment for r in load_split(out / "train.csv")]).all()
