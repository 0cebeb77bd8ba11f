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
    for v in m["facts"].values():
        assert v["change"] == pytest.approx(v["after"] - v["before"])
    assert 0.0 <= m["drift"]["share_changed"] <= 1.0 and m["drift"]["mean_abs_pixel"] >= 0.0
    assert "oracle after − before (paired)" in capsys.readouterr().out


FLOW = demo.MODELS["flow"]


@pytest.mark.skipif(
    not (FLOW / "model_index.json").is_file() or not (SHAPES_REWARD / "config.json").is_file(),
    reason="shipped shapes assets not built",
)
def test_one_epoch_flow_demo_trains_the_sd3_lora(tmp_path):
    """`--model flow`: Flow-GRPO on the shipped shapes SD3, judged by its Euler sampler; the
    final LoRA loads into the pipeline and changes its images."""
    import torch

    from rlhf.flow.pipeline import load_flow_pipeline

    args = [
        "--model", "flow", "--out", str(tmp_path / "demo"), "--eval-prompts", "2",
        "--eval-images", "2", "--train-prompts", "2",
        "--set", "num_epochs=1", "--set", "sample_batch_size=8",
        "--set", "sample_num_batches_per_epoch=1", "--set", "train_batch_size=8",
        "--set", "sample_num_steps=4", "--set", "save_freq=1",
    ]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli(["demo", *args]) == 0
    out = tmp_path / "demo"
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["trainer"] == "flow_grpo" and m["before"]["oracle"]["n"] == 4
    assert "Flow-GRPO" in (out / "report.md").read_text()
    pipe = load_flow_pipeline(FLOW)

    def image():
        g = torch.Generator().manual_seed(0)
        kw = dict(num_inference_steps=4, guidance_scale=3.0, max_sequence_length=1)
        return pipe(["a red circle"], generator=g, output_type="pt", **kw).images

    base = image()
    pipe.load_lora_weights(str(out / "lora"))
    assert not torch.equal(image(), base)


def test_flow_demo_refuses_the_sd_only_modes():
    import argparse

    args = argparse.Namespace(model="flow", train_mode="raft", pipeline=None, out="x", seed=0)
    with pytest.raises(ValueError, match="--model sd only"):
        demo.demo_config(args)


def test_training_prompts_exclude_held_out():
    held = {"a red circle", "a blue square"}
    prompts = demo.training_prompts(20, held, seed=0)
    assert len(set(prompts)) == 20 and not held & set(prompts)


def test_demo_metrics_json_is_strict_when_a_correlation_is_undefined(tmp_path):
    """Constant scores make the reward-oracle correlation undefined: metrics.json holds null
    there (it held NaN, which strict JSON parsers refuse)."""
    import argparse
    import math

    import numpy as np
    import torch

    from rlhf.config import shapes_demo

    prompts = demo.DemoPrompts(["a red circle"], ["a blue square"], ["a red circle"] * 2, [1, 2])
    same = demo.Judgement(torch.zeros(2, 3, 8, 8), np.array([0.5, 0.5]), np.array([1.0, 1.0]))
    metrics = demo.demo_metrics(argparse.Namespace(seed=0, eval_images=2), prompts, same, same)
    assert math.isnan(metrics["reward_oracle_correlation"]["pearson"])
    assert metrics["improvement"]["reward"] == {"mean": 0.0, "ci95": [0.0, 0.0], "n": 2}
    history = [{"epoch": 0, "reward_mean": 0.5, "reward_info/oracle_mean": 1.0}]
    metrics.update(history=history, time_s={"total": 1.0}, config=shapes_demo().to_dict())
    demo.write_demo_outputs(tmp_path, metrics, history, same, same, prompts)

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    m = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert m["reward_oracle_correlation"] == {"pearson": None, "spearman": None}
    assert (tmp_path / "report.md").is_file() and (tmp_path / "grid_before_after.png").is_file()
