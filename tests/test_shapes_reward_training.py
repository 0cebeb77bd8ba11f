"""HyperAlign on the shapes world (``shapes.reward_training``): a tiny run end to end."""

from __future__ import annotations

import json

import pytest

from reward.model import HyperAlign
from shapes.assets import CLIP_WEIGHTS
from shapes.reward_training import ShapesHyperAlignConfig, run_experiment

pytestmark = pytest.mark.skipif(not CLIP_WEIGHTS.is_file(), reason="shipped shapes CLIP missing")


def test_tiny_run_writes_results_and_ships_a_loadable_reward(tmp_path):
    cfg = ShapesHyperAlignConfig(seeds=(0,), n_prompts=30, epochs=2)
    rows = ("zero-shot cosine", "full HyperAlign")
    ship = tmp_path / "shipped"
    payload = run_experiment(cfg, CLIP_WEIGHTS, tmp_path / "run", rows, ship_to=ship)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results == json.loads(json.dumps(payload)) and results["shipped"] == {
        "row": "full HyperAlign",
        "seed": 0,
    }
    assert set(results["per_seed"][0]) == set(rows)
    table = (tmp_path / "run" / "results.md").read_text()
    assert "| full HyperAlign |" in table and "| zero-shot cosine |" in table
    from shapes.assets import CLIP_CONFIG

    assert sorted(p.name for p in ship.iterdir()) == sorted(
        ["clip.safetensors", "config.json", "model.safetensors", CLIP_CONFIG.name]
    )
    model = HyperAlign.from_pretrained(ship)
    assert model.config.extra["row"] == "full HyperAlign" and "val_srcc" in model.config.extra
    # The dataset of the seed is kept and reused by the next run.
    assert (tmp_path / "run" / "data_0" / "test.csv").is_file()


def test_bad_requests_fail_before_any_work(tmp_path):
    cfg = ShapesHyperAlignConfig(seeds=(0,), n_prompts=30, epochs=1)
    with pytest.raises(ValueError, match="unknown rows"):
        run_experiment(cfg, CLIP_WEIGHTS, tmp_path, ("best row",))
    with pytest.raises(ValueError, match="shipping needs one of the rows"):
        run_experiment(cfg, CLIP_WEIGHTS, tmp_path, ("zero-shot cosine",), ship_to=tmp_path / "s")
    with pytest.raises(ValueError, match="train nothing and cannot be shipped"):
        run_experiment(
            cfg,
            CLIP_WEIGHTS,
            tmp_path,
            ("zero-shot cosine",),
            tmp_path / "s",
            ship_rows=("zero-shot cosine",),
        )
    with pytest.raises(ValueError, match="unknown rows"):
        run_experiment(cfg, CLIP_WEIGHTS, tmp_path, ("full HyperAlign",), ship_rows=("cosine",))
    with pytest.raises(FileNotFoundError, match="train them with scripts/train_shapes_clip.py"):
        run_experiment(cfg, tmp_path / "missing.safetensors", tmp_path)
    with pytest.raises(ValueError, match="at least one seed"):
        ShapesHyperAlignConfig(seeds=())
    assert not any(tmp_path.iterdir())  # nothing was written


def test_ship_rows_ships_the_calibrated_cosine(tmp_path):
    """`ship_rows` picks among other rows: the calibrated cosine, an RL reward baseline."""
    cfg = ShapesHyperAlignConfig(seeds=(0,), n_prompts=30, epochs=1)
    rows = ("calibrated cosine", "full HyperAlign")
    ship = tmp_path / "shipped"
    payload = run_experiment(
        cfg, CLIP_WEIGHTS, tmp_path / "run", rows, ship_to=ship, ship_rows=("calibrated cosine",)
    )
    assert payload["shipped"] == {"row": "calibrated cosine", "seed": 0}
    model = HyperAlign.from_pretrained(ship)
    assert model.config.extra["row"] == "calibrated cosine"
