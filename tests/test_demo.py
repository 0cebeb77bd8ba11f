"""A one-epoch version of the main job (`make demo`) on the shipped assets."""

import json
import warnings

import pytest

from hyperalign.cli import main as cli
from rlhf import demo
from shapes.assets import REWARD_DIR

PIPE = demo.DEFAULT_PIPELINE
SHAPES_REWARD = REWARD_DIR


@pytest.mark.skipif(
    not (PIPE / "model_index.json").is_file() or not (SHAPES_REWARD / "config.json").is_file(),
    reason="shipped shapes assets not built",
)
def test_one_epoch_demo_writes_the_report(tmp_path, capsys):
    args = [
        "--out", str(tmp_path / "demo"), "--eval-prompts", "3", "--eval-images", "2",
        "--train-prompts", "4",
        "--set", "num_epochs=1", "--set", "sample_batch_size=8",
        "--set", "sample_num_batches_per_epoch=1", "--set", "train_batch_size=8",
        "--set", "sample_num_steps=4", "--set", "save_freq=1",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["demo", *args]) == 0
    out = tmp_path / "demo"
    for name in ("report.md", "metrics.json", "curves.png", "grid_before_after.png"):
        assert (out / name).is_file(), name
    assert any((out / "lora").glob("*.safetensors"))
    m = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        for what in ("reward", "oracle"):
            stat = m[when][what]
            assert stat["n"] == 6 and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
            assert 0.0 <= m[when]["oracle"]["mean"] <= 1.0
    assert len(m["per_image"]["oracle_after"]) == 6
    assert len(m["history"]) == 1 and "reward_info/oracle_mean" in m["history"][0]
    assert "oracle after − before (paired)" in capsys.readouterr().out


def test_training_prompts_exclude_held_out():
    held = {"a red circle", "a blue square"}
    prompts = demo.training_prompts(20, held, seed=0)
    assert len(set(prompts)) == 20 and not held & set(prompts)
