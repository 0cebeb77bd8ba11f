"""Small statistics used to judge generators: bootstrap intervals, paired differences,
correlations.

Pure functions of numbers (no I/O, no models), so the demo, ``hyperalign eval-checkpoints``
and the scripts report intervals computed the same way:

- :func:`bootstrap_ci`: mean and percentile-bootstrap interval of the mean;
- :func:`ci_summary`: the same as a JSON-ready ``{"mean", "ci95", "n"}`` dict;
- :func:`paired_ci`: :func:`ci_summary` of ``after - before`` on matched samples;
- :func:`paired_differences`: ``other - base`` over the keys two mappings share;
- :func:`correlations`: Pearson and Spearman correlation, NaN when undefined.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = ["bootstrap_ci", "ci_summary", "correlations", "paired_ci", "paired_differences"]


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean of ``values`` and the percentile-bootstrap ``level``
    interval of the mean (``n_boot`` resamples drawn with ``numpy.random.default_rng(seed)``).
    All three are NaN for no values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)  # (n_boot,)
    alpha = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def ci_summary(values: Sequence[float], seed: int = 0) -> dict:
    """``{"mean", "ci95": [lo, hi], "n"}`` of ``values`` (see :func:`bootstrap_ci`)."""
    mean, lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": mean, "ci95": [lo, hi], "n": len(values)}


def paired_ci(after: Sequence[float], before: Sequence[float], seed: int = 0) -> dict:
    """:func:`ci_summary` of the paired differences ``after[i] - before[i]``.

    ``after`` and ``before`` are scores of the same samples (same prompt and noise) under two
    models; raises ``ValueError`` when their lengths differ (they would not be paired)."""
    a = np.asarray(after, dtype=np.float64)
    b = np.asarray(before, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in shape: {a.shape} vs {b.shape}")
    return ci_summary(a - b, seed=seed)


def paired_differences(
    base: Mapping[Hashable, float], other: Mapping[Hashable, float]
) -> list[float]:
    """``other[k] - base[k]`` for every key ``k`` of ``other`` that ``base`` also has, in the
    order of ``other``. Keys identify a sample (e.g. ``(prompt, seed)``); a key that is not
    unique within one model has to be refused before building the mappings."""
    return [v - base[k] for k, v in other.items() if k in base]


def correlations(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(pearson, spearman)`` between ``a`` and ``b`` (scipy); both NaN when fewer than two
    samples or either side is constant (a correlation is undefined there)."""
    from scipy import stats

    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"correlated samples differ in shape: {x.shape} vs {y.shape}")
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return math.nan, math.nan
    return float(stats.pearsonr(x, y)[0]), float(stats.spearmanr(x, y)[0])
