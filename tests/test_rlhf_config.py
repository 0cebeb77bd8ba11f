"""Config validation, presets, overrides and the command line of rlhf.train."""

import json

import pytest

from hyperalign.cli import main as cli
from rlhf.config import (
    PRESETS,
    RESUME_MAY_CHANGE,
    DDPOConfig,
    apply_overrides,
    get_preset,
    resume_differences,
    sd15_hyperalign,
    tiny_cpu,
)
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["num_checkpoint_limit=0"], "num_checkpoint_limit must be >= 1"),
        (["num_checkpoint_limit=-2"], "num_checkpoint_limit must be >= 1"),
        (["train_learning_rate=-1"], "train_learning_rate must be > 0"),
        (["train_learning_rate=0"], "train_learning_rate must be > 0"),
        (["train_learning_rate=inf"], "train_learning_rate must be a finite number"),
        (["train_learning_rate=nan"], "train_learning_rate must be a finite number"),
        (["train_adam_beta2=1"], "train_adam_beta2 must be in"),
        (["run_name=../../x"], "run_name must be a plain folder name"),
        (["run_name=/tmp/x"], "run_name must be a plain folder name"),
        (["run_name=a/b"], "run_name must be a plain folder name"),
        (["run_name=a\\b"], "run_name must be a plain folder name"),
        (["run_name=.."], "run_name must be a plain folder name"),
        (["run_name="], "run_name must be a plain folder name"),
    ],
)
def test_out_of_range_values_are_rejected(overrides, message):
    cfg = apply_overrides(tiny_cpu(), overrides)
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_run_name_cannot_escape_logdir_from_the_command_line(tmp_path, capsys):
    logdir = tmp_path / "a" / "b"
    rc = cli(["rl-train", "--set", f"logdir={logdir}", "--set", "run_name=../../x"])
    assert rc == 2 and "run_name" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not logdir.exists()


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("num_epochs", None, "num_epochs must be an integer, got None"),
        ("train_cfg", "false", "train_cfg must be a boolean"),
        ("resolution", "64", "resolution must be an integer or null, got '64'"),
        ("train_learning_rate", "3e-4", "train_learning_rate must be a number"),
        ("lora_target_modules", "to_q", "lora_target_modules must be a list of strings"),
        ("num_epochs", True, "num_epochs must be an integer, got True"),
    ],
)
def test_loaded_values_are_type_checked(tmp_path, field, value, expected):
    d = tiny_cpu().to_dict()
    d[field] = value
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"config file {path}") as err:
        DDPOConfig.load(path)
    assert expected in str(err.value)


def test_loading_accepts_equivalent_json_and_rejects_unknown_fields(tmp_path):
    d = tiny_cpu().to_dict()
    d["lora_alpha"], d["num_epochs"] = 4, 3.0  # an int for a float, an integral float for an int
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    cfg = DDPOConfig.load(path)
    assert cfg.lora_alpha == 4.0 and isinstance(cfg.lora_alpha, float) and cfg.num_epochs == 3
    d["num_epoch"] = 3
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="unknown config fields 'num_epoch' .did you mean"):
        DDPOConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot parse config file {path}"):
        DDPOConfig.load(path)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("num_epochs=abc", "bad value for num_epochs: expected an integer, got 'abc'"),
        ("num_epochs=null", "bad value for num_epochs: expected an integer, got 'null'"),
        ("train_learning_rate=fast", "bad value for train_learning_rate: expected a number"),
        ("extra=[1]", "bad value for extra: expected a JSON object"),
    ],
)
def test_overrides_name_the_field_and_type(item, expected):
    with pytest.raises(ValueError) as err:
        apply_overrides(DDPOConfig(), [item])
    assert expected in str(err.value)


def test_wrong_types_set_in_python_are_rejected_by_validate():
    cfg = tiny_cpu()
    cfg.num_epochs = "3"
    with pytest.raises(ValueError, match="num_epochs must be an integer, got '3'"):
        cfg.validate()


def test_resume_differences_ignore_fields_that_may_change():
    a, b = tiny_cpu(), tiny_cpu()
    b.num_epochs, b.run_name, b.resume_from = 10, "other", "latest"
    assert resume_differences(a, b) == []
    b.train_learning_rate, b.lora_rank = 1.0, 8
    assert resume_differences(a, b) == [("lora_rank", 4, 8), ("train_learning_rate", 3e-3, 1.0)]
    assert {"num_epochs", "resume_from", "run_name"} <= set(RESUME_MAY_CHANGE)
