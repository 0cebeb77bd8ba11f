"""Reports of ``hyperalign eval-checkpoints``: summary statistics, Markdown, grids, files.

:func:`summarize` computes per checkpoint and scorer the mean with a bootstrap 95 % interval
(overall and per category), paired differences against the first checkpoint on images that
share a (prompt, seed) key, and the reward-oracle correlation; :func:`write_outputs` writes
``scores.csv``, ``scores.json`` (strict JSON), the grids and ``report.md``.

Paired differences need exactly one image per (prompt, seed) key and checkpoint; when some
checkpoint has several (images without seeds), no paired difference is reported and
:attr:`Summary.pairing_note` says why (see :mod:`rlhf.evaluation.ingest`).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from hyperalign.common import atomic_write_bytes, atomic_write_json, atomic_write_text, dumps_json
from hyperalign.stats import bootstrap_ci, correlations, paired_differences

__all__ = [
    "Summary",
    "best_worst_names",
    "file_stem",
    "pairing_problem",
    "render_report",
    "render_summary_table",
    "summarize",
    "unique_file_stems",
    "write_grids",
    "write_outputs",
]


@dataclass
class Summary:
    """Statistics of one evaluation; every statistic is ``(mean, lo, hi, n)``."""

    checkpoints: list[str]
    scorers: list[str]
    overall: dict = field(default_factory=dict)  # ckpt -> scorer -> (mean, lo, hi, n)
    by_category: dict = field(default_factory=dict)  # ckpt -> category -> scorer -> (...)
    paired: dict = field(default_factory=dict)  # ckpt -> scorer -> (mean, lo, hi, n)
    correlation: dict = field(default_factory=dict)  # ckpt -> (pearson, spearman) reward/oracle
    pairing_note: str | None = None  # why paired differences are not reported


def pair_key(record: dict) -> tuple:
    """The key that matches images of two checkpoints: (prompt index, seed)."""
    return record["prompt_index"], record["seed"]


def pairing_problem(records: list[dict], checkpoints: list[str]) -> str | None:
    """Why the records of several checkpoints cannot be paired by (prompt, seed), or ``None``
    when they can (or when there is only one checkpoint)."""
    if len(checkpoints) < 2:
        return None
    for ck in checkpoints:
        counts = Counter(pair_key(r) for r in records if r["checkpoint"] == ck)
        shared = [k for k, n in counts.items() if n > 1]
        if shared:
            prompt = next(r["prompt"] for r in records if pair_key(r) == shared[0])
            return (
                f"no paired differences: checkpoint {ck!r} has several images for the same "
                f"prompt and seed ({len(shared)} keys, e.g. prompt {prompt!r}), so images of "
                "two checkpoints cannot be matched; give each image its noise seed (a 'seed' "
                "column in the --images CSV)"
            )
    return None


def _paired(records, base: str, other: str, key: str) -> tuple[float, float, float, int]:
    """``other - base`` on images matched by (prompt, seed), with its interval."""

    def scores(ck: str) -> dict:
        return {pair_key(r): r[key] for r in records if r["checkpoint"] == ck and key in r}

    diffs = paired_differences(scores(base), scores(other))
    return (*bootstrap_ci(diffs), len(diffs))


def _by_category(recs: list[dict], scorers: list[str]) -> dict:
    cats = defaultdict(list)
    for r in recs:
        cats[r["category"]].append(r)
    return {
        cat: {name: (*bootstrap_ci([r[f"score_{name}"] for r in rs]), len(rs)) for name in scorers}
        for cat, rs in sorted(cats.items())
    }


def _correlation(recs: list[dict]) -> tuple[float, float] | None:
    if len(recs) <= 2:
        return None
    a = [r["score_hyperalign"] for r in recs]
    b = [r["score_oracle"] for r in recs]
    pearson, spearman = correlations(a, b)
    return None if math.isnan(pearson) else (pearson, spearman)


def summarize(records: list[dict], checkpoints: list[str], scorers: list[str]) -> Summary:
    """The :class:`Summary` of scored records."""
    s = Summary(checkpoints, scorers, pairing_note=pairing_problem(records, checkpoints))
    for ck in checkpoints:
        recs = [r for r in records if r["checkpoint"] == ck]
        s.overall[ck] = {}
        for name in scorers:
            vals = [r[f"score_{name}"] for r in recs if f"score_{name}" in r]
            s.overall[ck][name] = (*bootstrap_ci(vals), len(vals))
        s.by_category[ck] = _by_category(recs, scorers)
        if ck != checkpoints[0] and s.pairing_note is None:
            s.paired[ck] = {
                name: _paired(records, checkpoints[0], ck, f"score_{name}") for name in scorers
            }
        if "oracle" in scorers and "hyperalign" in scorers:
            corr = _correlation(recs)
            if corr is not None:
                s.correlation[ck] = corr
    return s


# ------------------------------------------------------------------------------ Markdown
def _fmt(t) -> str:
    mean, lo, hi, n = t
    return f"{mean:.4f} [{lo:.4f}, {hi:.4f}] (n={n})"


def _table(head: str, rows: dict, scorers: list[str]) -> list[str]:
    lines = [head, "|---" * (len(scorers) + 1) + "|"]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row[n]) for n in scorers) + " |")
    return lines


def render_report(summary: Summary, settings: dict) -> str:
    """``report.md``: settings, means, paired differences, correlations, categories, grids."""
    sc = summary.scorers
    head = "| checkpoint | " + " | ".join(sc) + " |"
    lines = ["# Checkpoint evaluation", "", "Settings:", "", "```json", dumps_json(settings)]
    lines += ["```", "", "## Mean score with bootstrap 95 % interval", ""]
    lines += _table(head, {ck: summary.overall[ck] for ck in summary.checkpoints}, sc)
    if summary.paired:
        base = summary.checkpoints[0]
        lines += ["", f"## Paired difference vs `{base}` (same prompt and seed)", ""]
        lines += _table(head, summary.paired, sc)
    if summary.pairing_note:
        lines += ["", "## Paired difference", "", summary.pairing_note + "."]
    if summary.correlation:
        lines += ["", "## Reward vs oracle (reward-hacking check)", ""]
        lines += ["| checkpoint | Pearson | Spearman |", "|---|---|---|"]
        lines += [f"| {ck} | {p:.3f} | {s:.3f} |" for ck, (p, s) in summary.correlation.items()]
    lines += ["", "## Per category", ""]
    for ck in summary.checkpoints:
        lines += [f"### {ck}", ""]
        lines += _table("| category | " + " | ".join(sc) + " |", summary.by_category[ck], sc)
        lines.append("")
    lines += ["## Grids", ""]
    for ck, name in best_worst_names(summary.checkpoints).items():
        lines.append(f"- `{name}`: best (top) and worst (bottom) prompts of `{ck}`")
    lines.append("- `grid_across_checkpoints.png`: the same prompts and seeds across checkpoints")
    return "\n".join(lines) + "\n"


def render_summary_table(summary: Summary) -> str:
    """The console table: mean [interval] per checkpoint and scorer, and paired differences."""
    rows = [f"{'checkpoint':<16}" + "".join(f"{n:>34}" for n in summary.scorers)]
    for ck in summary.checkpoints:
        cells = ""
        for n in summary.scorers:
            m, lo, hi, _ = summary.overall[ck][n]
            cells += f"{m:>10.4f} [{lo:.4f},{hi:.4f}]".rjust(34)
        rows.append(f"{ck:<16}{cells}")
        if ck in summary.paired:
            cells = ""
            for n in summary.scorers:
                m, lo, hi, _ = summary.paired[ck][n]
                cells += f"diff {m:+.4f} [{lo:+.4f},{hi:+.4f}]".rjust(34)
            rows.append(f"{'':<16}{cells}")
    if summary.pairing_note:
        rows.append(summary.pairing_note)
    return "\n".join(rows)


# --------------------------------------------------------------------------------- grids
def file_stem(name: str) -> str:
    """``name`` as a safe file-name part: characters other than letters, digits, ``.``,
    ``_`` and ``-`` (a ``/`` in a checkpoint name, say) become ``_``."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip(".")
    return stem or "_"


def unique_file_stems(names: list[str]) -> dict[str, str]:
    """``{name: file_stem(name)}``, distinct for distinct names (stems that would collide, as
    ``"a/b"`` and ``"a_b"`` do, get a numeric suffix)."""
    stems: dict[str, str] = {}
    for name in names:
        stem, k = file_stem(name), 1
        while stem in stems.values():
            k += 1
            stem = f"{file_stem(name)}-{k}"
        stems[name] = stem
    return stems


def best_worst_names(checkpoints: list[str]) -> dict[str, str]:
    """``{checkpoint: file name of its best/worst grid}``, distinct for distinct checkpoints."""
    return {ck: f"grid_best_worst_{s}.png" for ck, s in unique_file_stems(checkpoints).items()}


def _grid(cells: list[list[tuple[str | None, str]]], path: Path) -> None:
    """A PNG of image rows: ``cells[row][col] = (image file or None, title)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows, cols = len(cells), max(len(r) for r in cells)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for i, row in enumerate(cells):
        for j in range(cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(row) and row[j][0] is not None:
                with Image.open(row[j][0]) as im:
                    ax.imshow(np.asarray(im.convert("RGB")))
                ax.set_title(row[j][1], fontsize=7, wrap=True)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _short(s: str) -> str:
    return s if len(s) <= 40 else s[:37] + "..."


def _best_worst_grid(records, ck: str, path: Path, key: str, n: int) -> None:
    by_prompt = defaultdict(list)
    for r in records:
        if r["checkpoint"] == ck and key in r:
            by_prompt[r["prompt_index"]].append(r)
    ranked = sorted(by_prompt.values(), key=lambda rs: np.mean([r[key] for r in rs]))
    if not ranked:
        return
    best, worst = ranked[::-1][:n], ranked[:n]
    cells = [
        [(rs[0]["image"], f"{_short(rs[0]['prompt'])}\n{rs[0][key]:.3f}") for rs in group]
        for group in (best, worst)
    ]
    _grid(cells, path)


def _across_grid(records, checkpoints: list[str], out: Path, key: str, n: int) -> None:
    first: dict[tuple, dict] = {}
    for r in records:
        first.setdefault(pair_key(r), {})[r["checkpoint"]] = r
    keys = sorted(first, key=lambda k: (k[0], k[1] is None, k[1] or 0))[:n]
    if not keys:
        return
    cells = []
    for k in keys:
        row = []
        for ck in checkpoints:
            r = first[k].get(ck)
            label = f"{ck}: {_short(r['prompt'])}\n{r.get(key, math.nan):.3f}" if r else ck
            row.append((r["image"] if r else None, label))
        cells.append(row)
    _grid(cells, out / "grid_across_checkpoints.png")


def write_grids(records: list[dict], checkpoints: list[str], out: Path, key: str, n: int = 4):
    """Best/worst prompts of each checkpoint, and the same prompts across checkpoints."""
    for ck, name in best_worst_names(checkpoints).items():
        _best_worst_grid(records, ck, out / name, key, n)
    _across_grid(records, checkpoints, out, key, n)


# --------------------------------------------------------------------------------- files
def _scores_csv(records: list[dict], scorers: list[str]) -> str:
    fields = ["checkpoint", "prompt_index", "prompt", "category", "seed", "image"]
    fields += [f"score_{n}" for n in scorers]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    return buf.getvalue()


def write_outputs(records, summary: Summary, settings: dict, out: Path) -> None:
    """``scores.csv``, ``scores.json`` (strict JSON: NaN as null), grids and ``report.md``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "scores.csv", _scores_csv(records, summary.scorers))
    payload = {"settings": settings, "summary": asdict(summary), "records": records}
    atomic_write_json(out / "scores.json", payload, indent=1)
    write_grids(records, summary.checkpoints, out, f"score_{summary.scorers[0]}")
    atomic_write_text(out / "report.md", render_report(summary, settings))
