"""IQA metrics (reward.metrics) checked against scipy and known values."""

import math

import numpy as np
import pytest
from scipy import stats

from reward.metrics import (
    fit_logistic4,
    format_mean_std,
    iqa_metrics,
    krcc,
    logistic4,
    mean_std,
    plcc,
    rankdata,
    rmse,
    srcc,
)


def _data(seed, n=200, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=n)
    x = 0.6 * y + rng.normal(size=n)
    if ties:  # rounding creates many ties on both sides
        x, y = np.round(x, 1), np.round(y, 1)
    return x, y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(seed, ties):
    x, y = _data(seed, ties=ties)
    assert srcc(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert krcc(x, y) == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)
    assert plcc(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert rmse(x, y) == pytest.approx(math.sqrt(np.mean((x - y) ** 2)), abs=1e-12)
    np.testing.assert_allclose(rankdata(x), stats.rankdata(x))


def test_known_values():
    x = [1, 2, 3, 4, 5]
    assert srcc(x, [5, 6, 7, 8, 7]) == pytest.approx(stats.spearmanr(x, [5, 6, 7, 8, 7])[0])
    assert srcc(x, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert krcc(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # One discordant pair out of 10: tau = (9 - 1) / 10.
    assert krcc(x, [1, 2, 3, 5, 4]) == pytest.approx(0.8)
    assert rmse([0, 0], [3, 4]) == pytest.approx(math.sqrt(12.5))


def test_logistic_fit_recovers_known_curve():
    x = np.linspace(-3, 3, 300)
    true = (4.0, 1.0, 0.5, 0.7)
    y = logistic4(x, *true)
    params = fit_logistic4(x, y)
    assert params is not None
    np.testing.assert_allclose(logistic4(x, *params), y, atol=1e-6)
    m = iqa_metrics(x, y)
    # The relation is monotone but not linear: ranks are perfect, raw Pearson is not,
    # the logistic-mapped Pearson is.
    assert m["srcc"] == pytest.approx(1.0)
    assert m["plcc"] < 0.99
    assert m["plcc_logistic"] == pytest.approx(1.0, abs=1e-8)
    assert m["rmse_logistic"] < 1e-5 < m["rmse"]


def test_logistic_fit_improves_plcc_on_noisy_sigmoid():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, 500)
    y = 1 / (1 + np.exp(-6 * x)) + rng.normal(0, 0.05, x.size)
    m = iqa_metrics(x, y)
    assert m["plcc_logistic"] > m["plcc"]
    assert m["n"] == 500


def test_degenerate_and_bad_inputs():
    assert math.isnan(srcc([1, 1, 1], [1, 2, 3]))
    assert math.isnan(plcc([1, 1, 1], [1, 2, 3]))
    assert fit_logistic4([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="differ in length"):
        srcc([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        plcc([1], [1])
    with pytest.raises(ValueError, match="finite"):
        srcc([1, float("nan"), 3], [1, 2, 3])


def test_mean_std():
    runs = [{"srcc": 0.7, "plcc": 0.5}, {"srcc": 0.8, "plcc": 0.5}, {"srcc": 0.9, "plcc": 0.5}]
    out = mean_std(runs)
    assert out["srcc"] == pytest.approx((0.8, 0.1))  # sample std (ddof 1)
    assert out["plcc"] == pytest.approx((0.5, 0.0))
    assert mean_std([{"srcc": 0.3}])["srcc"] == (0.3, 0.0)
    assert format_mean_std((0.81234, 0.01)) == "0.8123 ± 0.0100"
    with pytest.raises(ValueError):
        mean_std([])


def test_logistic_fit_keeps_order():
    # Predictions that rank images backwards get no credit from a flipped curve.
    x = np.linspace(-3, 3, 100)
    y = -x + np.random.default_rng(0).normal(0, 0.1, x.size)
    m = iqa_metrics(x, y)
    assert m["srcc"] < -0.9 and m["plcc"] < -0.9
    assert not m["plcc_logistic"] > 0.1  # nan (flat curve) or near zero
