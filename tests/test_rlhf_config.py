"""Config validation, presets, overrides and the command line of rlhf.train."""

import json

import pytest

from hyperalign.cli import main as cli
from rlhf.config import PRESETS, DDPOConfig, apply_overrides, get_preset, sd15_hyperalign, tiny_cpu
from rlhf.train import field_docs


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    get_preset(name).validate()


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="tiny-cpu"):
        get_preset("nope")


def test_derived_quantities():
    cfg = sd15_hyperalign()
    d = cfg.derived(num_processes=8)
    assert d["samples_per_epoch"] == 8 * 4 * 8
    assert d["total_train_batch_size"] == 4 * 8 * 2
    assert d["optimizer_steps_per_epoch"] == (32 // 4) // 2
    assert d["trained_timesteps_per_sample"] == 50


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["sample_batch_size=3", "train_batch_size=2", "sample_num_batches_per_epoch=1"],
            "divisible",
        ),
        (["train_batch_size=4", "train_gradient_accumulation_steps=3"], "span"),
        (["sample_eta=0"], "sample_eta"),
        (["train_timestep_fraction=0.01"], "0 timesteps"),
        (["advantage_mode=group"], "sample_num_images_per_prompt >= 2"),
        (["sample_num_images_per_prompt=3"], "must divide"),
        (["mixed_precision=fp8"], "mixed_precision"),
        (["train_mode=draft", "draft_k=11"], "draft_k"),
    ],
)
def test_impossible_combinations_are_rejected(overrides, message):
    cfg = apply_overrides(tiny_cpu(), overrides)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_overrides_parse_types_and_reject_unknown_fields():
    cfg = apply_overrides(
        DDPOConfig(),
        ["num_epochs=7", "train_cfg=false", "resolution=None", "lora_target_modules=to_q,to_v"],
    )
    assert cfg.num_epochs == 7 and cfg.train_cfg is False and cfg.resolution is None
    assert cfg.lora_target_modules == ("to_q", "to_v")
    with pytest.raises(ValueError, match="did you mean num_epochs"):
        apply_overrides(DDPOConfig(), ["num_epoch=3"])
    with pytest.raises(ValueError, match="boolean"):
        apply_overrides(DDPOConfig(), ["train_cfg=maybe"])


def test_save_load_round_trip(tmp_path):
    cfg = apply_overrides(tiny_cpu(), ["seed=5", "lora_target_modules=to_q"])
    cfg.save(tmp_path / "c.json")
    assert DDPOConfig.load(tmp_path / "c.json") == cfg


def test_every_field_is_documented():
    docs = field_docs()
    missing = [f for f in DDPOConfig.__dataclass_fields__ if not docs.get(f)]
    assert not missing


def test_cli_print_config_and_errors(capsys):
    assert cli(["rl-train", "--preset", "tiny-cpu", "--set", "num_epochs=2", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_epochs"] == 2 and printed["pretrained_model"] == "tiny"
    assert cli(["rl-train", "--set", "sample_eta=2"]) == 2
    assert "sample_eta" in capsys.readouterr().err
