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


def _strict_json(path: Path):
    """Parse ``path`` as strict JSON (NaN / Infinity, which strict parsers refuse, fail)."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which strict JSON parsers refuse")

    return json.loads(path.read_text(), parse_constant=refuse)


def _data_args(subsets, name):
    labels, root = subsets[name]
    return ["--dataset", name, "--labels", str(labels), "--image-root", str(root)]


@pytest.fixture(scope="module")
def agiqa_run(subsets, tmp_path_factory):
    """A finished 3-epoch run on the AGIQA-3K subset: its folder ``<out>``."""
    out = tmp_path_factory.mktemp("agiqa") / "run"
    args = _data_args(subsets, "agiqa3k") + ["--out", str(out), *TINY]
    fast = ["--lr-adapters", "3e-3", "--lr-head", "3e-3", "--val-fraction", "0.2"]
    assert train_main(args + ["--epochs", "3", *fast, "--checkpoint-every", "0"]) == 0
    return out


def test_short_training_then_evaluate_within_and_cross_dataset(
    subsets, agiqa_run, tmp_path, capsys
):
    out = agiqa_run
    run = out / "split_0"
    result = _strict_json(run / "result.json")
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
    saved = json.loads((state / "progress.json").read_text())["progress"]
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"]) == (1, 1, 4)
    monkeypatch.setattr(train_mod, "hyperalign_loss", real_loss)
    assert train_main(args + ["--out", str(tmp_path / "b")]) == 0  # resumes

    for part in ("state/last/model.safetensors", "best/model.safetensors"):
        wa = _weights(tmp_path / "a" / "split_0" / part)
        wb = _weights(tmp_path / "b" / "split_0" / part)
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wb[k], wa[k]), k  # bit-identical
    ra = json.loads((tmp_path / "a" / "split_0" / "result.json").read_text())
    rb = json.loads((tmp_path / "b" / "split_0" / "result.json").read_text())
    assert rb["test"] == ra["test"]
    assert rb["history"] == ra["history"]  # bit-identical, the resumed epoch included
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


class _Plant:
    """Unpickling this object creates ``marker`` (what a malicious checkpoint file could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# Every file name accelerate's save_state/load_state use for pickled state.
ACCELERATE_PICKLES = (
    "custom_checkpoint_0.pkl",
    "random_states_0.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "sampler.bin",
    "dl_state_dict.bin",
    "scaler.pt",
    "pytorch_model.bin",
)


def test_resume_never_unpickles(subsets, tmp_path):
    """A state folder with pickles planted under every name accelerate would read resumes from
    its safetensors/JSON files only: no planted code runs."""
    args = _data_args(subsets, "pku-i2iqa") + [*TINY, "--no-tensorboard", "--out", str(tmp_path)]
    assert train_main(args + ["--epochs", "1"]) == 0
    run = tmp_path / "split_0"
    (run / "result.json").unlink()  # unfinished again: the next call resumes from the state
    state = run / "state" / "last"
    saved = sorted(p.name for p in state.iterdir())
    marker = tmp_path / "pwned"
    for name in ACCELERATE_PICKLES:
        # Files a state folder holds stay (an accelerate-written folder stays loadable up to
        # its custom state, the one it unpickles without restriction); the rest are planted.
        if name == "custom_checkpoint_0.pkl" or not (state / name).exists():
            torch.save(_Plant(marker), state / name)
    assert train_main(args + ["--epochs", "2"]) == 0  # epochs may grow on resume
    assert not marker.exists(), "resuming ran code from a planted pickle"
    result = json.loads((run / "result.json").read_text())
    assert [h["epoch"] for h in result["history"]] == [0, 1]  # epoch 0 came from the state
    assert saved == [
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "progress.json",
        "rng_0.json",
        "rng_0.safetensors",
    ]


def test_resume_refuses_damaged_or_foreign_state(subsets, tmp_path):
    args = _data_args(subsets, "pku-i2iqa") + [*TINY, "--no-tensorboard", "--out", str(tmp_path)]
    assert train_main(args + ["--epochs", "1"]) == 0
    run = tmp_path / "split_0"
    (run / "result.json").unlink()
    state = run / "state" / "last"
    good = (state / "optimizer.safetensors").read_bytes()
    (state / "optimizer.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"optimizer.safetensors: it is truncated.*--restart"):
        train_main(args + ["--epochs", "2"])
    (state / "optimizer.safetensors").write_bytes(good)
    (state / "progress.json").unlink()  # e.g. a folder accelerate's save_state wrote
    with pytest.raises(ValueError, match=r"progress.json is missing.*--restart"):
        train_main(args + ["--epochs", "2"])
    assert train_main(args + ["--epochs", "2", "--restart"]) == 0


def _eval_args(model: Path, labels: Path, root: Path, out: Path, subset: str = "test") -> list:
    return [
        "--model",
        str(model),
        "--dataset",
        "agiqa3k",
        "--labels",
        str(labels),
        "--image-root",
        str(root),
        "--out",
        str(out),
        "--subset",
        subset,
        "--device",
        "cpu",
        "--num-workers",
        "0",
    ]


def test_eval_refuses_a_split_rebuilt_from_other_labels(subsets, agiqa_run, tmp_path):
    """``--subset test`` checks the rebuilt split against the fingerprints stored with the
    checkpoint: a row-shuffled copy of the training CSV (whose seeded split puts training
    images into "test") and a copy with one score changed are refused."""
    labels, root = subsets["agiqa3k"]
    best = agiqa_run / "split_0" / "best"
    header, *rows = labels.read_text().splitlines()
    shuffled = tmp_path / "shuffled.csv"
    order = np.random.default_rng(1).permutation(len(rows))
    shuffled.write_text("\n".join([header] + [rows[i] for i in order]) + "\n")
    ds, mixed = load_dataset("agiqa3k", labels), load_dataset("agiqa3k", shuffled)
    extra = HyperAlign.from_pretrained(best).config.extra
    trained = {s.image for s in make_split(ds, TrainConfig(val_fraction=0.2), 0)[0].train}
    rebuilt_test = make_split(mixed, TrainConfig(val_fraction=0.2), 0)[0].test
    assert trained & {s.image for s in rebuilt_test}  # what the check is there to stop
    with pytest.raises(ValueError, match=r"test.* differ .*another order.*--subset all"):
        eval_main(_eval_args(best, shuffled, root, tmp_path / "e1"))
    assert not (tmp_path / "e1" / "metrics.json").exists()
    changed = tmp_path / "changed.csv"
    fields = rows[0].split(",")
    fields[-2] = str(float(fields[-2]) + 0.5)  # mos_align of the first image
    changed.write_text("\n".join([header, ",".join(fields), *rows[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"labels differ from the ones .* was trained on"):
        eval_main(_eval_args(best, changed, root, tmp_path / "e2"))
    # Cross-dataset evaluation of every row needs no split; a checkpoint without stored
    # fingerprints cannot be checked and is refused for --subset test.
    assert eval_main(_eval_args(best, shuffled, root, tmp_path / "e3", "all")) == 0
    legacy = tmp_path / "legacy"
    model = HyperAlign.from_pretrained(best)
    split_info = {k: v for k, v in extra["split"].items() if not k.endswith("sha256")}
    model.config.extra = {**extra, "split": split_info}
    model.save_pretrained(legacy)
    with pytest.raises(ValueError, match="stores no fingerprint of its split"):
        eval_main(_eval_args(legacy, labels, root, tmp_path / "e4"))


@pytest.mark.parametrize(
    "flag, value", [("--lr-head", "-1"), ("--lr-adapters", "0"), ("--lr-backbone", "inf")]
)
def test_bad_learning_rates_are_refused_before_training(subsets, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    args = _data_args(subsets, "pku-i2iqa") + [*TINY, "--out", str(out), flag, value]
    assert cli(["train-reward", *args]) == 2
    err = capsys.readouterr().err
    assert f"lr_{flag[5:]} ({flag}) must be a finite number > 0, got {float(value)}" in err
    assert not out.exists()
    for bad in (-1e-3, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="lr_head"):
            TrainConfig(lr_head=bad)
    with pytest.raises(ValueError, match="wd_adapters"):
        TrainConfig(wd_adapters=-0.1)


def test_eval_outputs_are_strict_json_when_metrics_are_undefined(tmp_path):
    """A checkpoint that scores every image alike has undefined correlations: metrics.json and
    summary.json write them as null, not NaN."""
    from PIL import Image

    torch.manual_seed(0)
    model = HyperAlign(tiny_config())
    with torch.no_grad():
        model.regressor.net[-1].bias[2] = -200.0  # gamma = 2 sigmoid(-200) = 0: constant scores
    model.save_pretrained(tmp_path / "const")
    root = tmp_path / "images"
    root.mkdir()
    lines = ["image,prompt,score"]
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 20, 20)).save(root / f"{i}.png")
        lines.append(f"{i}.png,prompt {i % 3},{i}")
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "eval"
    args = ["--dataset", "csv", "--labels", str(tmp_path / "labels.csv"), "--image-root", str(root)]
    const = str(tmp_path / "const")
    common = ["--out", str(out), "--device", "cpu", "--num-workers", "0"]
    assert eval_main(["--model", const, const, *args, *common]) == 0
    for sub in ("0_const", "1_const"):
        metrics = _strict_json(out / sub / "metrics.json")
        assert metrics["srcc"] is None and metrics["rmse"] is not None
    summary = _strict_json(out / "summary.json")
    assert summary["srcc"] == [None, None] and all(v is not None for v in summary["rmse"])


def test_progress_round_trips_through_strict_json_and_bad_model_config_is_named(tmp_path):
    from hyperalign.common import dumps_json
    from reward.train import TrainState

    state = TrainState(running={"loss": 0.1 + 0.2}, history=[{"epoch": 0, "val_plcc": None}])
    loaded = TrainState()
    loaded.load_state_dict(json.loads(dumps_json(state.state_dict())))
    assert loaded == state and loaded.best_val_srcc == -float("inf")  # -inf is null in JSON
    with pytest.raises(ValueError, match=r"p.json: field 'epoch' has the wrong type"):
        loaded.load_state_dict({**state.state_dict(), "epoch": "3"}, source="p.json")
    bad = tmp_path / "model.json"
    bad.write_text('{"k": 0.1,}')
    parser = __import__("argparse").ArgumentParser()
    train_mod.add_arguments(parser)
    base = ["--dataset", "csv", "--labels", "x", "--image-root", "y", "--out", "z"]
    ns = parser.parse_args([*base, "--model-config", str(bad)])
    with pytest.raises(ValueError, match=r"--model-config .*model.json is not valid UTF-8 JSON"):
        train_mod.configs_from_args(ns)
    bad.write_text('{"k": null}')
    with pytest.raises(ValueError, match=r"HyperAlignConfig.k must be a number, got None"):
        train_mod.configs_from_args(ns)


def test_zero_shot_row_trains_nothing_and_ranks_as_the_cosine(subsets, tmp_path):
    """`zero-shot-cosine` (in `--ablation all`): no epoch is trained and its test predictions
    rank the pairs exactly as the raw CLIP cosine `s_base` does."""
    import csv

    from reward.metrics import srcc
    from reward.train import ZERO_SHOT_ROW

    labels, root = subsets["aigciqa2023"]
    ds = load_dataset("aigciqa2023", labels)
    config = TrainConfig(epochs=3, num_workers=0, tensorboard=False, checkpoint_every=0)
    rows = run_ablations([ZERO_SHOT_ROW], tiny_config(), config, ds, root, tmp_path, cpu=True)
    assert list(rows) == [ZERO_SHOT_ROW]
    run = tmp_path / ZERO_SHOT_ROW / "split_0"
    result = json.loads((run / "result.json").read_text())
    assert result["epochs_run"] == 0 and result["best_epoch"] == 0
    best = HyperAlign.from_pretrained(run / "best")
    gates = [p for n, p in best.named_parameters() if n.endswith("gate")]
    assert gates and all(float(g) == 0.0 for g in gates)  # CLIP's own features
    with open(run / "test" / "predictions.csv", newline="") as f:
        preds = list(csv.DictReader(f))
    score = np.array([float(r["score"]) for r in preds])
    s_base = np.array([float(r["s_base"]) for r in preds])
    assert len(preds) >= 4 and np.unique(s_base).size == len(preds)
    assert srcc(score, s_base) == pytest.approx(1.0)
    assert result["test"]["srcc"] == pytest.approx(srcc(s_base, [float(r["mos"]) for r in preds]))
    with pytest.raises(ValueError, match="zero-shot-cosine"):
        run_ablations(["no-such-row"], tiny_config(), config, ds, root, tmp_path, cpu=True)
