"""shapes.geometry_experiment: the statistics and the per-prompt metrics on hand-made data."""

from types import SimpleNamespace

import numpy as np
import pytest

from shapes import geometry_experiment as ge


def test_holm_matches_the_step_down_rule():
    assert ge.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert ge.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_paired_contrast_interval_and_wilcoxon():
    a = [0.60, 0.62, 0.65, 0.61, 0.63, 0.64, 0.66, 0.60]
    b = [x - 0.02 for x in a]
    c = ge.paired_contrast(a, b)
    assert c["mean"] == pytest.approx(0.02)
    assert c["lo"] == pytest.approx(0.02) and c["hi"] == pytest.approx(0.02)  # no spread
    noisy = ge.paired_contrast(a, [x + d for x, d in zip(b, [0.01, -0.01] * 4)])
    assert noisy["lo"] < noisy["mean"] < noisy["hi"]
    assert 0 < noisy["p_wilcoxon"] < 0.05


def _row(prompt, kind):
    return SimpleNamespace(prompt=prompt, perturbation=kind)


def test_pairwise_accuracy_per_kind_and_group():
    rows = [
        _row("p", "faithful"),
        _row("p", "missing_object"),
        _row("p", "color_swap"),
        _row("q", "faithful"),
        _row("q", "extra_object"),
        _row("q", "color_swap+shape_swap"),
    ]
    pred = np.array([0.9, 0.5, 0.95, 0.4, 0.4, 0.1])
    acc = ge.pairwise_accuracy(pred, rows)
    assert acc["acc_missing_object"] == 1.0 and acc["acc_subset"] == 1.0
    assert acc["acc_color_swap"] == 0.0 and acc["acc_substitution"] == 0.0
    assert acc["acc_superset"] == 0.5  # a tie counts half
    assert "acc_color_swap+shape_swap" not in acc  # double perturbations are not a kind
    assert np.isnan(acc["acc_count"])


def test_within_prompt_srcc_ignores_the_order_across_prompts():
    prompts = ["a"] * 4 + ["b"] * 4
    truth = np.array([0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.3, 0.4])
    pred = np.array([1, 2, 3, 4, -4, -3, -2, -1], float)  # prompt b entirely lower
    assert ge.within_prompt_srcc(pred, truth, prompts) == pytest.approx(1.0)
    assert ge.within_prompt_srcc(-pred, truth, prompts) == pytest.approx(-1.0)


def test_loss_selection_uses_validation_only():
    seeds = [
        {"full, two-sided": {"val_srcc": 0.5}, "full, membership": {"val_srcc": 0.6}},
        {"full, two-sided": {"val_srcc": 0.55}, "full, membership": {"val_srcc": 0.58}},
    ]
    assert ge.select_loss(seeds) == "membership"
    first = ge.planned_contrasts("membership")[0]
    assert first == ("full, membership", "Euclidean control, membership")


def _fake_metrics(seed: int, name: str) -> dict:
    rng = np.random.default_rng(abs(hash((seed, name))) % 2**32)
    keys = ("srcc_alignment", "val_srcc", "within_prompt_srcc", "srcc_mos")
    return {k: float(rng.uniform(0.4, 0.7)) for k in keys}


def test_exploratory_rows_are_added_to_seeds_already_done(tmp_path, monkeypatch):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "geometry_experiment.py"
    spec = importlib.util.spec_from_file_location("geometry_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    calls = []

    def run_seed(seed, clip, out, cfg, rows):
        calls.append((seed, list(rows)))
        done = {name: _fake_metrics(seed, name) for name in rows}
        fixed = {
            ge.fixed_name(n): _fake_metrics(seed + 100, n)
            for n in rows
            if ge.ALL_ROWS[n] is not None
        }
        return {**done, **fixed}

    monkeypatch.setattr(script.ge, "run_seed", run_seed)
    monkeypatch.setattr(script, "stage_clip", lambda clip, out: clip)
    done = {name: _fake_metrics(0, name) for name in ge.EXPERIMENT_ROWS}
    trained = [n for n in ge.EXPERIMENT_ROWS if ge.ALL_ROWS[n] is not None]
    done.update({ge.fixed_name(n): _fake_metrics(100, n) for n in trained})
    (tmp_path / "seed_0.json").write_text(json.dumps(done))
    argv = ["--clip", "x.safetensors", "--out", str(tmp_path), "--seeds", "0", "1"]
    assert script.main([*argv, "--exploratory"]) == 0
    # Seed 0 only ran the new rows; seed 1 ran everything; nothing done twice.
    assert calls[0] == (0, list(ge.EXPLORATORY_ROWS))
    assert calls[1] == (1, list(ge.EXPERIMENT_ROWS) + list(ge.EXPLORATORY_ROWS))
    merged = json.loads((tmp_path / "seed_0.json").read_text())
    fixed = {ge.fixed_name(n) for n in ge.ALL_ROWS if ge.ALL_ROWS[n] is not None}
    assert set(merged) == set(ge.ALL_ROWS) | fixed
    assert merged["calibrated cosine"] == done["calibrated cosine"]  # kept, not recomputed
    text = (tmp_path / "results.md").read_text()
    assert "Exploratory rows" in text and "full, two-sided + rails" in text
    # Both seeds have the fixed-epoch models: their own table and contrasts.
    fixed_part = text.split("Fixed epochs")[1].split("Exploratory rows")[0]
    assert "@ fixed epochs − calibrated cosine @ fixed epochs" in fixed_part
    calls.clear()
    assert script.main(argv) == 0  # everything cached: no training at all
    assert calls == []


def test_rowwise_srcc_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    pred, truth = rng.normal(size=(3, 40)), rng.integers(0, 5, 40).astype(float)
    want = [stats.spearmanr(p, truth).statistic for p in pred]
    assert ge._rowwise_srcc(pred, truth) == pytest.approx(want)


def test_clustered_bootstrap_separates_a_better_model_and_not_a_copy():
    rng = np.random.default_rng(1)
    prompts = [f"p{k // 7}" for k in range(210)]  # 30 prompts x 7 images
    truth = rng.random(210)
    good = truth[None] + 0.1 * rng.normal(size=(4, 210))
    bad = truth[None] + 1.0 * rng.normal(size=(4, 210))
    out = ge.clustered_bootstrap(good, bad, truth, prompts, n_boot=300)
    assert out["shared_lo"] > 0 and out["shared_lo"] <= out["shared_mean"] <= out["shared_hi"]
    same = ge.clustered_bootstrap(good, good, truth, prompts, n_boot=50)
    assert same["shared_mean"] == same["shared_lo"] == same["shared_hi"] == 0.0
