"""IQA agreement metrics between predicted scores and MOS, and mean ± std over splits.

- SRCC: Spearman rank correlation (average ranks for ties).
- KRCC: Kendall's tau-b (tie-corrected).
- PLCC: Pearson correlation, raw, and after the 4-parameter logistic mapping of the VQEG
  convention used in IQA papers, ``f(x) = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``
  (VQEG FR-TV Phase II final report, 2003; the paper fits a "4- or 5-parameter" logistic).
- RMSE: raw, and after the logistic mapping.

Inputs are 1-D array-likes of equal length; outputs plain floats (``nan`` when undefined,
e.g. constant predictions).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

METRIC_NAMES = ("srcc", "plcc", "plcc_logistic", "krcc", "rmse", "rmse_logistic")


def _pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(pred, dtype=np.float64).ravel()
    y = np.asarray(target, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pred and target differ in length: {x.size} vs {y.size}")
    if x.size < 2:
        raise ValueError(f"metrics need at least 2 pairs, got {x.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("pred and target must be finite (found NaN or Inf)")
    return x, y


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], values.size]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def plcc(pred, target) -> float:
    """Pearson linear correlation (``nan`` if either side is constant)."""
    x, y = _pair(pred, target)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else float("nan")


def srcc(pred, target) -> float:
    """Spearman rank correlation: Pearson of the average ranks."""
    x, y = _pair(pred, target)
    return plcc(rankdata(x), rankdata(y))


def krcc(pred, target) -> float:
    """Kendall's tau-b: ``(C - D) / sqrt((n0 - n1)(n0 - n2))`` over all pairs.

    O(n^2) in blocks of rows (n = 3,000 pairs takes well under a second).
    """
    x, y = _pair(pred, target)
    n = x.size
    concord_minus_discord = 0.0
    ties_x = ties_y = 0.0
    block = 512
    for start in range(0, n, block):
        sx = np.sign(x[start : start + block, None] - x[None, :])  # (b, n)
        sy = np.sign(y[start : start + block, None] - y[None, :])  # (b, n)
        concord_minus_discord += float((sx * sy).sum())
        ties_x += float((sx == 0).sum())
        ties_y += float((sy == 0).sum())
    # Each unordered pair was counted twice and the diagonal (n self-pairs) counts as a tie.
    n0 = n * (n - 1) / 2.0
    n1 = (ties_x - n) / 2.0
    n2 = (ties_y - n) / 2.0
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return float(concord_minus_discord / 2.0 / denom) if denom > 0 else float("nan")


def rmse(pred, target) -> float:
    x, y = _pair(pred, target)
    return float(np.sqrt(np.mean((x - y) ** 2)))


def logistic4(x, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """``(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2``: from b2 (x -> -inf) to b1 (x -> inf)."""
    z = -(np.asarray(x, dtype=np.float64) - b3) / max(abs(b4), 1e-12)
    return (b1 - b2) / (1.0 + np.exp(np.clip(z, -500.0, 500.0))) + b2


def fit_logistic4(pred, target) -> np.ndarray | None:
    """Least-squares 4-parameter logistic from predictions to targets, or ``None`` on failure.

    The curve is constrained to be non-decreasing (``b1 >= b2``, ``b4 > 0``) so that the
    mapping keeps the predictions' order: a model that ranks images backwards cannot earn a
    high PLCC from a flipped curve. Initialised at ``b1 = max(y), b2 = min(y), b3 = mean(x),
    b4 = std(x)``, the usual start in IQA evaluation code.
    """
    from scipy.optimize import curve_fit

    x, y = _pair(pred, target)
    scale = float(x.std())
    if scale == 0:
        return None

    def rising(x_, span, b2, b3, b4):  # b1 = b2 + span, span >= 0
        return logistic4(x_, b2 + span, b2, b3, b4)

    span0 = max(float(y.max() - y.min()), 1e-6)
    p0 = [span0, float(y.min()), float(x.mean()), scale]
    lower = [0.0, -np.inf, -np.inf, 1e-12]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # OptimizeWarning on poor conditioning
            (span, b2, b3, b4), _ = curve_fit(
                rising, x, y, p0=p0, bounds=(lower, np.inf), maxfev=20000
            )
    except (RuntimeError, ValueError):
        return None
    params = np.array([b2 + span, b2, b3, b4])
    return params if np.isfinite(params).all() else None


def iqa_metrics(pred, target) -> dict[str, float]:
    """All of ``METRIC_NAMES`` plus ``n``; the logistic ones fall back to raw if the fit fails.

    ``plcc_logistic`` is ``nan`` when the best rising curve is flat (no positive trend).
    """
    x, y = _pair(pred, target)
    params = fit_logistic4(x, y)
    mapped = logistic4(x, *params) if params is not None else x
    return {
        "srcc": srcc(x, y),
        "plcc": plcc(x, y),
        "plcc_logistic": plcc(mapped, y),
        "krcc": krcc(x, y),
        "rmse": rmse(x, y),
        "rmse_logistic": rmse(mapped, y),
        "n": float(x.size),
    }


def mean_std(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """Per metric ``(mean, std)`` over runs; std is the sample std (ddof 1), 0 for one run."""
    if not runs:
        raise ValueError("mean_std needs at least one run")
    keys = [k for k in runs[0] if all(k in r for r in runs)]
    out = {}
    for k in keys:
        values = np.array([float(r[k]) for r in runs])
        std = float(values.std(ddof=1)) if values.size > 1 else 0.0
        out[k] = (float(values.mean()), std)
    return out


def format_mean_std(stats: tuple[float, float], digits: int = 4) -> str:
    mean, std = stats
    return f"{mean:.{digits}f} ± {std:.{digits}f}"
