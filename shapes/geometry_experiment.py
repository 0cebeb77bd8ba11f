"""The pre-registered geometry experiment (``docs/experiments/geometry.md``).

Per seed, every row of :data:`EXPERIMENT_ROWS` is trained on that seed's shapes dataset with
:func:`shapes.reward_training.fit` (cached CLIP features, early stopping on validation MOS
SRCC) and judged on its test prompts by :func:`analyse_predictions` (SRCC vs true alignment,
mean within-prompt SRCC, MOS SRCC, pairwise accuracy per perturbation group) and
:func:`geometry_diagnostics` (share of clamped apertures, aperture std across prompts,
corr(angle, theta)). :func:`contrasts` compares rows paired by seed: t-interval, Wilcoxon
signed-rank test, Holm correction.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from scipy import stats

from reward.metrics import iqa_metrics
from reward.model import HyperAlign
from reward.train import ABLATIONS, RAILS

EXPERIMENT_ROWS: dict[str, dict | None] = {
    "zero-shot cosine": None,
    "calibrated cosine": ABLATIONS["baseline"],
    "full, one-sided": ABLATIONS["full"],
    "full, two-sided": ABLATIONS["two-sided"],
    "full, membership": ABLATIONS["membership"],
    "Euclidean control, two-sided": ABLATIONS["euclidean-two-sided"],
    "Euclidean control, membership": ABLATIONS["euclidean-membership"],
    "no entailment loss": ABLATIONS["no-entailment"],
    "static cone, two-sided": ABLATIONS["static-cone-two-sided"],
    "static cone, membership": ABLATIONS["static-cone-membership"],
}
"""Row name -> HyperAlignConfig overrides (``None``: the raw CLIP cosine, no training)."""

EXPLORATORY_ROWS: dict[str, dict] = {
    "full, two-sided + rails": {"ent_loss": "two-sided", **RAILS},
    "Euclidean control, two-sided + rails": {
        "ent_loss": "two-sided",
        "regressor_input": "euclidean",
        **RAILS,
    },
}
"""Rows added after the protocol was fixed (``docs/experiments/geometry.md``, "Addenda"): they
are reported apart from the pre-registered rows and their contrasts are exploratory."""

ALL_ROWS: dict[str, dict | None] = {**EXPERIMENT_ROWS, **EXPLORATORY_ROWS}

GROUPS = {
    "subset": ("missing_object",),
    "superset": ("extra_object",),
    "count": ("wrong_count",),
    "substitution": ("color_swap", "shape_swap", "size_change", "relation_flip", "binding_swap"),
}
"""Perturbation kinds grouped as in the protocol (``wrong_count`` is not split by direction)."""

CLAMPED_APERTURE = math.asin(1 - 1e-6) - 1e-4
"""Half-apertures at or above this are at the clamp of ``reward.lorentz.half_aperture``."""


def within_prompt_srcc(pred: np.ndarray, truth: np.ndarray, prompts: Sequence[str]) -> float:
    """Mean over prompts of the Spearman correlation of ``pred`` and ``truth`` among that
    prompt's images (prompts whose truth is constant are skipped)."""
    groups = defaultdict(list)
    for k, p in enumerate(prompts):
        groups[p].append(k)
    values = []
    for idx in groups.values():
        if len(idx) >= 3 and np.ptp(truth[idx]) > 0:
            rho = stats.spearmanr(pred[idx], truth[idx]).statistic
            if np.isfinite(rho):
                values.append(rho)
    return float(np.mean(values)) if values else float("nan")


def pairwise_accuracy(pred: np.ndarray, rows: Sequence) -> dict[str, float]:
    """Share of (faithful, perturbed) pairs of one prompt where the faithful scene scores
    higher (ties count half), per kind and per group of :data:`GROUPS`."""
    by_prompt = defaultdict(lambda: {"faithful": [], "other": []})
    for k, r in enumerate(rows):
        slot = "faithful" if r.perturbation == "faithful" else "other"
        by_prompt[r.prompt][slot].append(k)
    wins = defaultdict(list)
    for entry in by_prompt.values():
        for j in entry["other"]:
            kind = rows[j].perturbation
            for i in entry["faithful"]:
                wins[kind].append(1.0 if pred[i] > pred[j] else 0.5 if pred[i] == pred[j] else 0.0)
    out = {f"acc_{kind}": float(np.mean(v)) for kind, v in wins.items() if "+" not in kind}
    for group, kinds in GROUPS.items():
        pooled = [w for kind in kinds for w in wins.get(kind, [])]
        out[f"acc_{group}"] = float(np.mean(pooled)) if pooled else float("nan")
    return out


def analyse_predictions(pred: np.ndarray, feats: dict, rows: Sequence) -> dict[str, float]:
    """The protocol's metrics of one model's test predictions ``pred`` ``(N,)``."""
    truth = feats["alignment"].numpy()
    prompts = [r.prompt for r in rows]
    out = {
        "srcc_alignment": float(stats.spearmanr(pred, truth).statistic),
        "within_prompt_srcc": within_prompt_srcc(pred, truth, prompts),
        "srcc_mos": iqa_metrics(pred, feats["mos"].numpy())["srcc"],
    }
    out.update(pairwise_accuracy(pred, rows))
    return out


@torch.no_grad()
def geometry_diagnostics(model: HyperAlign, feats: dict, prompts: Sequence[str]) -> dict:
    """Clamped-aperture share and aperture std over distinct prompts; corr(angle, theta)."""
    from shapes.reward_training import head_outputs

    out = head_outputs(model, feats)
    first = {}
    for k, p in enumerate(prompts):
        first.setdefault(p, k)
    aperture = out.aperture[list(first.values())].double().numpy()  # one per distinct prompt
    theta = torch.arccos(out.s_base.clamp(-1, 1)).double().numpy()
    angle = out.angle.double().numpy()
    corr = float(np.corrcoef(angle, theta)[0, 1]) if np.std(angle) > 0 else float("nan")
    return {
        "clamped_share": float(np.mean(aperture >= CLAMPED_APERTURE)),
        "aperture_std": float(np.std(aperture)),
        "corr_angle_theta": corr,
    }


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (family-wise error), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (len(p) - rank) * p[i])
        adjusted[i] = min(1.0, running)
    return adjusted.tolist()


def paired_contrast(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """``a - b`` paired by seed: mean, 95 % t-interval, Wilcoxon signed-rank p-value."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    mean = float(d.mean())
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    wilcoxon = stats.wilcoxon(d).pvalue if n > 1 and np.any(d != 0) else 1.0
    t_p = stats.ttest_1samp(d, 0.0).pvalue if n > 1 and d.std() > 0 else 1.0
    return {
        "n": n,
        "mean": mean,
        "lo": mean - half,
        "hi": mean + half,
        "p_wilcoxon": float(wilcoxon),
        "p_t": float(t_p),
    }


SHARED_SEED = 10_000
"""Seed of the shared fresh test set (``shapes.fresh.fresh_set``) every seed's models score."""
SHARED_PROMPTS = 200
"""Held-out prompts of the shared test set (about 1,400 images)."""
ROLE_SWAP_PROMPTS = 200
"""Held-out prompts drawn for the role-swap pairs (those with two or more entities are used)."""


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (average ties) along the last axis."""
    return stats.rankdata(x, axis=-1)


def _rowwise_srcc(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``pred`` ``(S, N)`` with ``truth`` ``(N,)``."""
    rp, rt = _ranks(pred), _ranks(truth)
    rp = rp - rp.mean(-1, keepdims=True)
    rt = rt - rt.mean()
    return (rp @ rt) / np.sqrt((rp * rp).sum(-1) * (rt @ rt))


def clustered_bootstrap(
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    truth: np.ndarray,
    prompts: Sequence[str],
    n_boot: int = 10_000,
    seed: int = 0,
) -> dict[str, float]:
    """Mean over seeds of SRCC(a) - SRCC(b) vs ``truth`` on the shared test set, with a 95 %
    prompt-clustered bootstrap interval: prompts (all of a prompt's images together) are
    resampled with replacement. ``pred_*``: ``(S, N)`` predictions of the S seeds' models."""
    groups = defaultdict(list)
    for k, p in enumerate(prompts):
        groups[p].append(k)
    clusters = [np.array(v) for v in groups.values()]
    rng = np.random.default_rng(seed)

    both = np.concatenate([pred_a, pred_b])  # (2S, N): one ranking per resample for both
    n_seeds = pred_a.shape[0]

    def delta(idx: np.ndarray) -> float:
        r = _rowwise_srcc(both[:, idx], truth[idx])
        return float(np.mean(r[:n_seeds] - r[n_seeds:]))

    boots = [
        delta(
            np.concatenate([clusters[j] for j in rng.integers(len(clusters), size=len(clusters))])
        )
        for _ in range(n_boot)
    ]
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {
        "shared_mean": delta(np.arange(len(truth))),
        "shared_lo": float(lo),
        "shared_hi": float(hi),
    }


def contrasts(
    per_seed: list[dict],
    pairs: Sequence[tuple[str, str]],
    metric: str = "srcc_alignment",
    shared: tuple[np.ndarray, Sequence[str]] | None = None,
) -> list[dict]:
    """Paired contrasts ``a - b`` of ``metric`` over seeds, with Holm-adjusted p-values (over
    the t-test p-values of all the pairs, and over the Wilcoxon ones). With ``shared`` =
    (true alignment, prompts) of the shared test set and ``shared_pred`` in every seed's rows,
    also the prompt-clustered bootstrap of :func:`clustered_bootstrap` on it."""
    rows = []
    for a, b in pairs:
        c = paired_contrast([s[a][metric] for s in per_seed], [s[b][metric] for s in per_seed])
        if shared is not None and all("shared_pred" in s[r] for s in per_seed for r in (a, b)):
            pa = np.array([s[a]["shared_pred"] for s in per_seed])
            pb = np.array([s[b]["shared_pred"] for s in per_seed])
            c.update(clustered_bootstrap(pa, pb, shared[0], shared[1]))
        rows.append({"a": a, "b": b, **c})
    for key in ("p_t", "p_wilcoxon"):
        for r, adj in zip(rows, holm([r[key] for r in rows])):
            r[f"{key}_holm"] = adj
    return rows


# ---------------------------------------------------------------------------- the runs


_SHARED_CACHE: dict = {}
"""The shared fresh set and role-swap pairs with their features, per (CLIP, world)."""


def run_seed(seed: int, clip_path, out, cfg, rows: Sequence[str]) -> dict:
    """Every requested row on seed ``seed``'s dataset: ``{row: metrics and diagnostics}``."""
    import time

    from shapes import reward_training as rt
    from shapes.fresh import fresh_set, role_swap_set

    prepared = rt.prepare_seed(seed, clip_path, out, cfg)
    feats, target_range, backbone = prepared.feats, prepared.target_range, prepared.backbone
    test, test_rows = feats["test"], prepared.rows["test"]
    prompts = [r.prompt for r in test_rows]
    world = (cfg.style, cfg.truth, cfg.unmentioned_weight)
    key = (str(clip_path), cfg.clip_arch, world)
    if key not in _SHARED_CACHE:  # the same for every seed of a run: render and encode once
        shared = fresh_set(SHARED_SEED, SHARED_PROMPTS, *world)
        shared_feats = rt.encode_tensors(backbone, shared.images, shared.prompts)
        swap_images, swap_prompts, _ = role_swap_set(SHARED_SEED, ROLE_SWAP_PROMPTS, *world)
        swap_feats = rt.encode_tensors(backbone, swap_images, swap_prompts)
        _SHARED_CACHE.clear()
        _SHARED_CACHE[key] = (shared, shared_feats, swap_feats)
    shared, shared_feats, swap_feats = _SHARED_CACHE[key]

    def extra_metrics(score) -> dict:
        on_shared, on_swap = score(shared_feats), score(swap_feats)
        return {
            "shared_pred": [round(float(v), 6) for v in on_shared],
            "shared_srcc": float(stats.spearmanr(on_shared, shared.truth).statistic),
            "role_swap_acc": float(np.mean(on_swap[0::2] > on_swap[1::2])),
        }

    def cosine(f) -> np.ndarray:
        return torch.nn.functional.cosine_similarity(f["image"], f["text"], dim=-1).double().numpy()

    def judge(model) -> dict:
        r = analyse_predictions(rt.predict(model, test), test, test_rows)
        r.update(geometry_diagnostics(model, test, prompts))
        r.update(extra_metrics(lambda f: rt.predict(model, f)))
        return r

    results = {}
    for name in rows:
        t = time.time()
        overrides = ALL_ROWS[name]
        if overrides is None:
            cos = torch.nn.functional.cosine_similarity(test["image"], test["text"], dim=-1)
            results[name] = analyse_predictions(cos.double().numpy(), test, test_rows)
            results[name].update(extra_metrics(cosine))
        else:
            extra = {"dataset": "shapes", "seed": seed, "row": name}
            model_cfg = rt.clip_config(cfg, target_range=target_range, extra=extra, **overrides)
            model, info = rt.fit(
                model_cfg,
                backbone,
                clip_path.parent,
                feats,
                target_range,
                seed,
                cfg,
                fixed_epochs=True,
            )
            results[name] = judge(model)
            results[name].update(val_srcc=info["val_srcc"], best_epoch=info["best_epoch"])
            model.load_checkpoint_state(info["last_state"])
            model.eval()
            results[fixed_name(name)] = judge(model)
        r = results[name]
        print(
            f"seed {seed} {name:>30}: SRCC(align) {r['srcc_alignment']:.4f} within "
            f"{r['within_prompt_srcc']:.4f} MOS {r['srcc_mos']:.4f} "
            f"clamped {r.get('clamped_share', float('nan')):.2f} [{time.time() - t:.0f} s]",
            flush=True,
        )
    return results


def fixed_name(row: str) -> str:
    """Key of a row's fixed-epoch model (all epochs run, no early stopping) in a seed's results."""
    return f"{row} @ fixed epochs"


def select_loss(per_seed: list[dict]) -> str:
    """``two-sided`` or ``membership``: the higher mean validation MOS SRCC of the full rows."""
    means = {
        loss: float(np.mean([s[f"full, {loss}"]["val_srcc"] for s in per_seed]))
        for loss in ("two-sided", "membership")
    }
    return max(means, key=means.get)


def planned_contrasts(loss: str) -> list[tuple[str, str]]:
    """The protocol's contrasts for the selected loss: two primary, then three secondary."""
    full = f"full, {loss}"
    return [
        (full, f"Euclidean control, {loss}"),
        (full, "calibrated cosine"),
        (full, "full, one-sided"),
        (full, "no entailment loss"),
        (f"static cone, {loss}", full),
    ]


def exploratory_contrasts() -> list[tuple[str, str]]:
    """Contrasts of the exploratory rows (Holm-corrected among themselves only)."""
    rails = "full, two-sided + rails"
    return [
        (rails, "Euclidean control, two-sided + rails"),
        (rails, "calibrated cosine"),
        (rails, "full, two-sided"),
    ]


METRICS = (
    "srcc_alignment",
    "shared_srcc",
    "role_swap_acc",
    "within_prompt_srcc",
    "srcc_mos",
    "acc_subset",
    "acc_superset",
    "acc_count",
    "acc_substitution",
    "clamped_share",
    "aperture_std",
    "corr_angle_theta",
)


def results_table(per_seed: list[dict], rows: Sequence[str]) -> str:
    """Markdown table: mean ± std over seeds of :data:`METRICS` per row."""
    head = "| row | " + " | ".join(METRICS) + " |"
    lines = [head, "|---" * (len(METRICS) + 1) + "|"]
    for name in rows:
        cells = []
        for m in METRICS:
            v = np.array([s[name].get(m, np.nan) for s in per_seed], float)
            cells.append(
                "—" if np.all(np.isnan(v)) else f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contrast_table(rows: list[dict]) -> str:
    """Markdown table of :func:`contrasts` output."""
    lines = [
        "| contrast (a − b) | n | mean | 95 % t-interval | p (t, Holm) | p (Wilcoxon, Holm) "
        "| shared set: mean [95 % prompt bootstrap] |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shared = (
            f"{r['shared_mean']:+.4f} [{r['shared_lo']:+.4f}, {r['shared_hi']:+.4f}]"
            if "shared_mean" in r
            else "—"
        )
        lines.append(
            f"| {r['a']} − {r['b']} | {r['n']} | {r['mean']:+.4f} | [{r['lo']:+.4f}, "
            f"{r['hi']:+.4f}] | {r['p_t_holm']:.3g} | {r['p_wilcoxon_holm']:.3g} | {shared} |"
        )
    return "\n".join(lines)
