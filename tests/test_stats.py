"""hyperalign.stats: bootstrap intervals, paired statistics, correlations."""

import json
import math

import numpy as np
import pytest

from hyperalign.common import dumps_json
from hyperalign.stats import (
    bootstrap_ci,
    ci_summary,
    correlations,
    paired_ci,
    paired_differences,
)


def test_bootstrap_interval_contains_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=200)
    mean, lo, hi = bootstrap_ci(x)
    assert lo < mean < hi and mean == pytest.approx(x.mean())
    # Width close to the normal-theory 95 % interval.
    assert (hi - lo) == pytest.approx(2 * 1.96 * x.std() / np.sqrt(x.size), rel=0.15)
    assert bootstrap_ci(x) == bootstrap_ci(list(x))  # seeded: the same interval every call
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_ci_summary_and_paired_ci():
    before = np.array([0.1, 0.4, 0.2, 0.8])
    after = before + np.array([0.1, 0.0, 0.2, 0.1])
    s = paired_ci(after, before)
    assert s["n"] == 4 and s["mean"] == pytest.approx(0.1)
    assert s == ci_summary(after - before)
    assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    with pytest.raises(ValueError, match="differ in shape"):
        paired_ci(after, before[:3])


def test_paired_differences_use_shared_keys_only():
    base = {("p0", 1): 0.5, ("p1", 2): 0.2}
    other = {("p1", 2): 0.7, ("p0", 1): 0.5, ("p2", 3): 9.0}
    assert paired_differences(base, other) == pytest.approx([0.5, 0.0])


def test_correlations_are_nan_when_undefined_and_json_stays_strict():
    a = [0.1, 0.5, 0.3, 0.9]
    p, s = correlations(a, [1.0, 2.0, 1.5, 4.0])
    assert p > 0.9 and s == pytest.approx(1.0)
    p, s = correlations(a, [1.0] * 4)  # constant: undefined
    assert math.isnan(p) and math.isnan(s)
    assert json.loads(dumps_json({"pearson": p})) == {"pearson": None}
