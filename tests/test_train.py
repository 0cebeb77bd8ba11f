"""Training and evaluation (reward.train, reward.evaluate) on real label files with placeholder
images and the tiny random backbone."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import reward.train as train_mod
from hyperalign.cli import main as cli
from reward import HyperAlign
from reward.data import MissingImagesError, load_dataset
from reward.train import ABLATIONS, TrainConfig, make_split, param_groups, run_ablations

from .conftest import tiny_config
from .test_data import make_subset

TINY = ["--backbone", "hyperalign-tiny", "--pretrained", "none", "--cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def subsets(shared_data, tmp_path_factory):
    """Small subsets of the real label files (same formats) with placeholder images."""
    tmp = tmp_path_factory.mktemp("iqa")
    return {
        "agiqa3k": make_subset(shared_data, tmp, "agiqa3k", 15, per_prompt=6),
        "aigciqa2023": make_subset(shared_data, tmp, "aigciqa2023", 10, per_prompt=4),
        "pku-i2iqa": make_subset(shared_data, tmp, "pku-i2iqa", 8, per_prompt=4),
    }


def train_main(argv):
    return cli(["train-reward", "--debug", *argv])


def eval_main(argv):
    return cli(["eval-reward", "--debug", *argv])


def _data_args(subsets, name):
    labels, root = subsets[name]
    return ["--dataset", name, "--labels", str(labels), "--image-root", str(root)]


def test_short_training_then_evaluate_within_and_cross_dataset(subsets, tmp_path, capsys):
    out = tmp_path / "run"
    args = _data_args(subsets, "agiqa3k") + ["--out", str(out), *TINY]
    fast = ["--lr-adapters", "3e-3", "--lr-head", "3e-3", "--val-fraction", "0.2"]
    rc = train_main(args + ["--epochs", "3", *fast, "--checkpoint-every", "0"])
    assert rc == 0
    run = out / "split_0"
    result = json.loads((run / "result.json").read_text())
    hist = result["history"]
    assert len(hist) == 3
    # Learning: the images' grey level encodes the MOS (the untrained model ranks the
    # validation images backwards); the training loss falls every epoch and the best model
    # ranks held-out validation prompts' images by it.
    assert hist[2]["train_loss"] < hist[1]["train_loss"] < hist[0]["train_loss"]
    assert result["best_val_srcc"] > 0.3
    # Test outputs: metrics, one prediction per test image, a PNG scatter plot.
    test = result["test"]
    assert set(test) >= {"srcc", "plcc", "plcc_logistic", "krcc", "rmse", "rmse_logistic"}
    assert all(np.isfinite(v) for v in test.values())
    rows = (run / "test" / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("image,prompt,mos,target,score,score_mos")
    ds = load_dataset("agiqa3k", subsets["agiqa3k"][0])
    split, _ = make_split(ds, TrainConfig(val_fraction=0.2), 0)
    assert len(rows) - 1 == test["n"] == len(split.test)
    assert (run / "test" / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "logs").rglob("events.out.tfevents.*")), "no TensorBoard log written"
    # The best checkpoint carries the MOS range and the split that rebuilds its test subset.
    best = HyperAlign.from_pretrained(run / "best")
    assert best.config.target_range == ds.target_range
    assert best.config.extra["split"]["seed"] == 0 and best.config.extra["dataset"] == "agiqa3k"
    assert json.loads((out / "summary.json").read_text())["mean_std"]["srcc"][1] == 0.0
    capsys.readouterr()

    # Full evaluation of the same test subset reproduces the training run's test metrics.
    ev = tmp_path / "eval"
    assert (
        eval_main(
            [
                "--model",
                str(run / "best"),
                *_data_args(subsets, "agiqa3k"),
                "--out",
                str(ev),
                "--subset",
                "test",
                "--device",
                "cpu",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["srcc"] == pytest.approx(test["srcc"], abs=1e-6)
    assert metrics["plcc_logistic"] == pytest.approx(test["plcc_logistic"], abs=1e-4)
    # Cross-dataset: trained on AGIQA-3K, tested on all of the AIGCIQA2023 subset; two
    # checkpoints give a mean ± std summary.
    cross = tmp_path / "cross"
    rc = eval_main(
        [
            "--model",
            str(run / "best"),
            str(run / "best"),
            *_data_args(subsets, "aigciqa2023"),
            "--out",
            str(cross),
            "--subset",
            "all",
            "--device",
            "cpu",
            "--num-workers",
            "0",
        ]
    )
    assert rc == 0
    n_aigc = len(load_dataset("aigciqa2023", subsets["aigciqa2023"][0]).samples)
    for sub in ("0_split_0", "1_split_0"):
        assert len((cross / sub / "predictions.csv").read_text().splitlines()) == n_aigc + 1
        assert (cross / sub / "scatter.png").is_file()
    summary = json.loads((cross / "summary.json").read_text())
    assert summary["srcc"][1] == pytest.approx(0.0, abs=1e-9)  # same checkpoint twice
    assert "mean ± std" in capsys.readouterr().out
    with pytest.raises(ValueError, match="trained on 'agiqa3k', not 'aigciqa2023'"):
        eval_main(
            [
                "--model",
                str(run / "best"),
                *_data_args(subsets, "aigciqa2023"),
                "--out",
                str(cross),
                "--subset",
                "test",
                "--device",
                "cpu",
            ]
        )


def _weights(path: Path) -> dict:
    return load_file(str(path))


def test_interrupted_then_resumed_run_matches_uninterrupted(subsets, tmp_path, monkeypatch):
    args = _data_args(subsets, "pku-i2iqa") + [
        *TINY,
        "--epochs",
        "2",
        "--checkpoint-every",
        "2",
        "--no-tensorboard",
        "--lr-adapters",
        "1e-3",
    ]
    assert train_main(args + ["--out", str(tmp_path / "a")]) == 0

    real_loss = train_mod.hyperalign_loss
    calls = {"n": 0}

    def interrupting_loss(*a, **k):
        calls["n"] += 1
        # 3 steps per epoch, state saved every 2 steps and at epoch ends: call 6 is the 3rd
        # step of epoch 2, after the mid-epoch save at global step 4.
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(train_mod, "hyperalign_loss", interrupting_loss)
    with pytest.raises(KeyboardInterrupt):
        train_main(args + ["--out", str(tmp_path / "b")])
    state = tmp_path / "b" / "split_0" / "state" / "last"
    assert state.is_dir() and not (tmp_path / "b" / "split_0" / "result.json").exists()
    saved = torch.load(state / "custom_checkpoint_0.pkl", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 1, 4)
    monkeypatch.setattr(train_mod, "hyperalign_loss", real_loss)
    assert train_main(args + ["--out", str(tmp_path / "b")]) == 0  # resumes

    for part in ("state/last/model.safetensors", "best/model.safetensors"):
        wa = _weights(tmp_path / "a" / "split_0" / part)
        wb = _weights(tmp_path / "b" / "split_0" / part)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)
    ra = json.loads((tmp_path / "a" / "split_0" / "result.json").read_text())
    rb = json.loads((tmp_path / "b" / "split_0" / "result.json").read_text())
    assert rb["test"]["srcc"] == pytest.approx(ra["test"]["srcc"], abs=1e-6)
    for ha, hb in zip(ra["history"], rb["history"], strict=True):  # incl. the resumed epoch
        assert hb == pytest.approx(ha, rel=1e-4, abs=1e-6, nan_ok=True)
    # A saved run is only resumed with the same settings.
    with pytest.raises(ValueError, match=r"different settings \(train.lr_adapters\).*--restart"):
        train_main([*args[:-1], "2e-3", "--out", str(tmp_path / "b")])


def test_ablation_table_and_switches(subsets, tmp_path):
    labels, root = subsets["aigciqa2023"]
    ds = load_dataset("aigciqa2023", labels)
    config = TrainConfig(epochs=1, num_workers=0, tensorboard=False, checkpoint_every=0)
    rows = run_ablations(list(ABLATIONS), tiny_config(), config, ds, root, tmp_path, cpu=True)
    assert list(rows) == list(ABLATIONS)
    table = (tmp_path / "ablation.md").read_text()
    for name in ABLATIONS:
        assert f"| {name} |" in table
        cfg = json.loads((tmp_path / name / "split_0" / "best" / "config.json").read_text())
        for key, value in ABLATIONS[name].items():
            assert cfg[key] == value
    # The CLI switches map to the same fields.
    args = train_mod.add_arguments
    parser = __import__("argparse").ArgumentParser()
    args(parser)
    ns = parser.parse_args(
        [
            "--dataset",
            "csv",
            "--labels",
            "x",
            "--image-root",
            "y",
            "--out",
            "z",
            "--no-entailment",
            "--static-cone",
            "--no-regressor",
        ]
    )
    model_config, _ = train_mod.configs_from_args(ns)
    assert (model_config.ent_weight, model_config.a_shrink, model_config.regressor) == (0, 0, False)


def test_param_groups_and_missing_images_fail_before_training(subsets, tmp_path):
    torch.manual_seed(0)
    model = HyperAlign(tiny_config())
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr_head=1e-2, wd_adapters=0.3))}
    assert set(groups) == {"head", "adapters"}  # frozen towers: no backbone group
    assert groups["head"]["lr"] == 1e-2 and groups["adapters"]["weight_decay"] == 0.3
    full = param_groups(HyperAlign(tiny_config(tuning="full")), TrainConfig())
    assert {g["name"] for g in full} == {"head", "backbone"}

    labels, root = subsets["pku-i2iqa"]
    ds = load_dataset("pku-i2iqa", labels)
    images = tmp_path / "imgs"
    for s in ds.samples[3:]:  # the first three images are missing
        dst = images / s.image
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes((root / s.image).read_bytes())
    out = tmp_path / "run"
    with pytest.raises(MissingImagesError, match=f"3 of {len(ds.samples)} images") as err:
        train_main(
            [
                "--dataset",
                "pku-i2iqa",
                "--labels",
                str(labels),
                "--image-root",
                str(images),
                "--out",
                str(out),
                *TINY,
            ]
        )
    assert ds.samples[0].image in str(err.value)
    assert not (out / "split_0" / "state").exists()
