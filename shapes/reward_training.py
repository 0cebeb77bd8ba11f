"""HyperAlign on the shapes-world MOS with the tiny shapes CLIP: the results table and the shipped
``"shapes"`` reward.

Per seed ``s`` (:func:`run_seed`): the shapes dataset with master seed ``s``
(:mod:`shapes.dataset`: prompt-disjoint train/val/test, PNG + CSV ``image,prompt,score,...``)
is built under ``<out>/data_<s>`` (kept and reused), the frozen CLIP features of every image
and prompt are computed once (:func:`encode`), and each row of :data:`ROWS` is trained on the
training prompts with seed ``s`` (:func:`fit`), early-stopped on validation SRCC and scored on
the test prompts:

- ``zero-shot cosine``: cosine of the raw CLIP features (the CLIPScore analogue; no training);
- ``calibrated cosine``: gated adapters + ``alpha * cos + beta`` (no cone, no regressor;
  ``reward.train.ABLATIONS["baseline"]``);
- ``full HyperAlign``, and the ablations ``no entailment loss`` (``ent_weight = 0``),
  ``static cone`` (``a_shrink = 0``) and ``no regressor`` (``regressor = False``).
The losses without a degenerate solution and the Euclidean control are rows of
:mod:`shapes.geometry_experiment`.

The backbone is frozen (``tuning = "adapter"``), so a model's output on an image is
``head(adapter(f_clip(image)), adapter(f_clip(prompt)))`` with ``f_clip`` fixed: training on
cached ``f_clip`` features is the same computation as ``reward.train``'s loop on images (same
losses ``reward.losses.hyperalign_loss``, same parameter groups ``reward.train.param_groups``,
the same optimiser and early stopping), only without re-encoding every image every epoch.
Metrics are ``reward.metrics.iqa_metrics`` against the MOS (PLCC after the 4-parameter logistic
fit, and raw). :func:`run_experiment` writes ``<out>/results.json`` and ``<out>/results.md``
(test mean ± std over seeds) and can ship the full HyperAlign with the best validation SRCC
(``shapes/assets/reward`` is what ``build_reward("shapes")`` loads;
``scripts/train_shapes_hyperalign.py`` rebuilds it).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperalign.common import atomic_write_bytes, atomic_write_json, atomic_write_text, load_image
from reward.config import HyperAlignConfig
from reward.losses import hyperalign_loss
from reward.metrics import iqa_metrics, mean_std
from reward.model import HyperAlign
from reward.train import ABLATIONS, TrainConfig, param_groups
from shapes.assets import register_clip_config
from shapes.dataset import SPLITS, ShapesDatasetConfig, build_dataset, load_split

__all__ = [
    "CLIP_FILE",
    "METRICS",
    "ROWS",
    "ShapesHyperAlignConfig",
    "encode",
    "fit",
    "format_results",
    "predict",
    "run_experiment",
    "run_seed",
]

CLIP_FILE = "clip.safetensors"
"""Name of the CLIP weights inside a run folder's ``clip/`` and a shipped checkpoint."""
ROWS: dict[str, dict | None] = {
    "zero-shot cosine": None,
    "calibrated cosine": ABLATIONS["baseline"],
    "full HyperAlign": ABLATIONS["full"],
    "no entailment loss": ABLATIONS["no-entailment"],
    "static cone": ABLATIONS["static-cone"],
    "no regressor": ABLATIONS["no-regressor"],
    "full, two-sided": ABLATIONS["two-sided"],
    "full, two-sided + rails": ABLATIONS["two-sided-rails"],
}
"""Table rows: name -> HyperAlignConfig overrides (``None``: zero-shot cosine, no training)."""
SHIPPABLE = ("full HyperAlign", "full, two-sided", "full, two-sided + rails")
"""Rows shipped by default (the cone model with its regressor): the one shipped is the
(row, seed) with the best *validation* SRCC among these rows that were run. `run_experiment`
can ship any other trained row instead (e.g. "calibrated cosine", as an RL reward baseline)."""
METRICS = ("srcc", "plcc_logistic", "plcc")
"""Columns of the table."""


@dataclass
class ShapesHyperAlignConfig:
    """What this benchmark trains; the model-side fields are HyperAlignConfig's."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One dataset (prompts, split, scenes, ratings) and one training seed per entry."""
    n_prompts: int = 1000
    """Distinct prompts per dataset (80 / 10 / 10 % train / val / test, prompt-disjoint)."""
    epochs: int = 40
    """Maximum epochs, early stopping on validation SRCC (the trained rows still improved
    at 20 epochs)."""
    patience: int = 8
    """Stop after this many epochs without validation SRCC gain."""
    batch_size: int = 32
    """Pairs per optimiser step."""
    lr_head: float = 1e-3
    """AdamW learning rate of the scales, curvature, regressor / calibration scalars."""
    lr_adapters: float = 1e-3
    """AdamW learning rate of the gated adapters."""
    adapter_width: int = 128
    """Hidden width of each gated adapter (HyperAlignConfig.adapter_width)."""
    reg_loss: str = "mse"
    """Regression loss (HyperAlignConfig.reg_loss): ``mse``, ``l1`` or ``mse+plcc``."""
    threads: int = 1
    """torch CPU threads (at most 2 on the shared machine)."""
    style: str = "default"
    """Style family of the datasets (``shapes.styles.STYLE_FAMILIES``; ``train`` randomises
    the rendering of every image)."""
    truth: str = "closed"
    """Truth model of the datasets' alignment and MOS (``shapes.perturb.TRUTH_MODELS``)."""
    unmentioned_weight: float = 1.0
    """Open world: the cost of an object the prompt does not describe."""
    clip_arch: str = ""
    """open_clip architecture JSON of the CLIP (empty: ``shapes.assets.CLIP_CONFIG``)."""

    def __post_init__(self) -> None:
        from shapes.perturb import check_truth
        from shapes.styles import style_family

        style_family(self.style)
        check_truth(self.truth, self.unmentioned_weight)
        self.seeds = tuple(self.seeds)
        if not self.seeds:
            raise ValueError("seeds needs at least one seed")


def clip_arch(cfg: ShapesHyperAlignConfig) -> str:
    """Register the CLIP architecture of ``cfg`` with open_clip; returns its name."""
    if not cfg.clip_arch:
        return register_clip_config()
    from reward.backbone import register_model_config

    return register_model_config(cfg.clip_arch)


def clip_config(cfg: ShapesHyperAlignConfig, **overrides) -> HyperAlignConfig:
    """HyperAlign on the tiny shapes CLIP, weights ``clip.safetensors`` in the base directory."""
    return HyperAlignConfig(
        backbone=clip_arch(cfg),
        pretrained=CLIP_FILE,
        tuning="adapter",
        adapter_width=cfg.adapter_width,
        reg_loss=cfg.reg_loss,
        **overrides,
    )


def load_rows(data_dir: Path) -> dict[str, list]:
    """The rows of each split of the dataset in ``data_dir``."""
    return {s: load_split(data_dir / f"{s}.csv") for s in SPLITS}


def _frozen(backbone) -> HyperAlign:
    """``backbone`` inside a frozen HyperAlign, for its preprocessing, tokenizer and towers."""
    cfg = HyperAlignConfig(backbone=register_clip_config(), pretrained=None, tuning="frozen")
    return HyperAlign(cfg, backbone=backbone).eval()


def _encode_batch(model: HyperAlign, pixels: torch.Tensor, prompts: list[str]):
    """Raw CLIP features ``(B, D)`` of images ``(B, 3, H, W)`` and of their prompts."""
    return model.clip.encode_image(model.preprocess(pixels)), model.clip.encode_text(
        model.tokenize(prompts)
    )


@torch.no_grad()
def encode(backbone, rows: dict[str, list], batch: int = 256) -> dict[str, dict[str, torch.Tensor]]:
    """Raw (pre-adapter) CLIP features ``(N, D)`` of every row's image and prompt, with the
    MOS and the true alignment ``(N,)``, per split."""
    model = _frozen(backbone)
    out = {}
    for split, items in rows.items():
        f_i, f_t = [], []
        for k in range(0, len(items), batch):
            chunk = items[k : k + batch]
            pixels = torch.stack([load_image(r.image) for r in chunk])  # (B, 3, H, W)
            fi, ft = _encode_batch(model, pixels, [r.prompt for r in chunk])
            f_i.append(fi)
            f_t.append(ft)
        out[split] = {
            "image": torch.cat(f_i),  # (N, D)
            "text": torch.cat(f_t),  # (N, D)
            "mos": torch.tensor([r.score for r in items], dtype=torch.float64),
            "alignment": torch.tensor([r.alignment for r in items], dtype=torch.float64),
        }
    return out


@torch.no_grad()
def encode_tensors(
    backbone, images: torch.Tensor, prompts: list[str], batch: int = 256
) -> dict[str, torch.Tensor]:
    """Raw CLIP features ``(N, D)`` of in-memory images ``(N, 3, H, W)`` and their prompts."""
    model = _frozen(backbone)
    feats = [
        _encode_batch(model, images[k : k + batch], prompts[k : k + batch])
        for k in range(0, len(prompts), batch)
    ]
    return {"image": torch.cat([f[0] for f in feats]), "text": torch.cat([f[1] for f in feats])}


def predict(model: HyperAlign, feats: dict[str, torch.Tensor]) -> np.ndarray:
    """Scores ``(N,)`` of cached raw features through the adapters and the head."""
    return head_outputs(model, feats).score.double().numpy()


@torch.no_grad()
def head_outputs(model: HyperAlign, feats: dict[str, torch.Tensor]):
    """The model's ``HyperAlignOutput`` on cached raw features (adapters, then the head)."""
    model.eval()
    f_i, f_t = feats["image"], feats["text"]
    if model.image_adapter is not None:
        f_i, f_t = model.image_adapter(f_i), model.text_adapter(f_t)
    return model.head(f_i, f_t)


def _train_epoch(model, opt, params, train_feats, y, order, tcfg: TrainConfig, epoch: int = 0):
    """One pass over the training features in ``order``; returns the mean loss."""
    model.train()
    total = 0.0
    for k in range(0, len(y), tcfg.batch_size):
        idx = order[k : k + tcfg.batch_size]
        f_i, f_t = train_feats["image"][idx], train_feats["text"][idx]
        if model.image_adapter is not None:
            f_i, f_t = model.image_adapter(f_i), model.text_adapter(f_t)
        progress = epoch + k / len(y)
        loss, parts = hyperalign_loss(model.head(f_i, f_t), y[idx], model.config, progress)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        total += parts["loss"] * len(idx)
    return total / len(y)


def fit(
    model_cfg: HyperAlignConfig,
    backbone,
    clip_dir: Path,
    feats: dict[str, dict[str, torch.Tensor]],
    target_range: tuple[float, float],
    seed: int,
    cfg: ShapesHyperAlignConfig,
    fixed_epochs: bool = False,
) -> tuple[HyperAlign, dict]:
    """Train one model on cached features; returns it (best validation epoch) and its log.

    With ``fixed_epochs`` early stopping only picks the returned state: training runs all
    ``cfg.epochs`` epochs and ``info["last_state"]`` holds the state after the last one.
    """
    torch.manual_seed(seed)
    model = HyperAlign(model_cfg, backbone=backbone, base_dir=clip_dir)
    tcfg = TrainConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr_head=cfg.lr_head,
        lr_adapters=cfg.lr_adapters,
        patience=cfg.patience,
        seed=seed,
    )
    groups = param_groups(model, tcfg)
    opt = torch.optim.AdamW(groups, betas=tcfg.adam_betas)
    params = [p for g in groups for p in g["params"]]
    lo, hi = target_range
    y = ((feats["train"]["mos"] - lo) / (hi - lo)).float()
    gen = torch.Generator().manual_seed(seed)
    best = (-np.inf, -1, None)
    bad = 0
    history = []
    for epoch in range(tcfg.epochs):
        order = torch.randperm(len(y), generator=gen)
        train_loss = _train_epoch(model, opt, params, feats["train"], y, order, tcfg, epoch)
        val = iqa_metrics(predict(model, feats["val"]), feats["val"]["mos"].numpy())
        history.append({"epoch": epoch, "train_loss": train_loss, "val_srcc": val["srcc"]})
        if val["srcc"] > best[0] + tcfg.min_delta:
            best = (val["srcc"], epoch, copy.deepcopy(model.trainable_state_dict()))
            bad = 0
        else:
            bad += 1
            if bad >= tcfg.patience and not fixed_epochs:
                break
    info = {"best_epoch": best[1], "val_srcc": best[0], "history": history}
    if fixed_epochs:
        info["last_state"] = copy.deepcopy(model.trainable_state_dict())
    model.load_checkpoint_state(best[2])
    model.eval()
    return model, info


def dataset_name(seed: int, cfg: ShapesHyperAlignConfig) -> str:
    """``data_<seed>``, with the style and truth model when they are not the defaults."""
    name = f"data_{seed}"
    if cfg.style != "default":
        name += f"_{cfg.style}"
    if cfg.truth != "closed":
        name += f"_{cfg.truth}{cfg.unmentioned_weight:g}"
    return name


def _dataset(seed: int, out: Path, cfg: ShapesHyperAlignConfig) -> Path:
    """``<out>/<dataset_name>``, built with master seed ``seed`` unless it is already there."""
    data_dir = out / dataset_name(seed, cfg)
    if not (data_dir / "test.csv").is_file():
        t = time.time()
        dcfg = ShapesDatasetConfig(
            n_prompts=cfg.n_prompts,
            seed=seed,
            style=cfg.style,
            truth=cfg.truth,
            unmentioned_weight=cfg.unmentioned_weight,
        )
        summary = build_dataset(data_dir, dcfg)
        print(f"seed {seed}: built {data_dir} {summary['rows']} in {time.time() - t:.0f} s")
    return data_dir


def _zero_shot(feats) -> dict:
    """Test metrics of the raw CLIP cosine."""
    f = feats["test"]
    cos = torch.nn.functional.cosine_similarity(f["image"], f["text"], dim=-1)
    return iqa_metrics(cos.double().numpy(), f["mos"].numpy())


def _print_row(seed: int, name: str, result: dict, info: dict, seconds: float) -> None:
    print(
        f"seed {seed} {name:>20}: test SRCC {result['srcc']:.4f} PLCC "
        f"{result['plcc_logistic']:.4f} (raw {result['plcc']:.4f})"
        + (
            f", best epoch {info['best_epoch'] + 1}, val SRCC {info['val_srcc']:.4f}"
            if info
            else ""
        )
        + f" [{seconds:.0f} s]",
        flush=True,
    )


@dataclass
class PreparedSeed:
    """One seed's dataset rows, its cached CLIP features, MOS range and the backbone."""

    rows: dict[str, list]
    feats: dict[str, dict[str, torch.Tensor]]
    target_range: tuple[float, float]
    backbone: object


def prepare_seed(seed: int, clip_path: Path, out: Path, cfg: ShapesHyperAlignConfig):
    """Build (or reuse) seed ``seed``'s dataset and encode it with the CLIP at ``clip_path``."""
    from reward.backbone import load_backbone

    rows = load_rows(_dataset(seed, out, cfg))
    mos_all = [r.score for items in rows.values() for r in items]
    # Min-max normalisation over the whole label set (reward.data.IQADataset's convention).
    target_range = (float(min(mos_all)), float(max(mos_all)))
    backbone = load_backbone(clip_arch(cfg), clip_path.name, base_dir=clip_path.parent)
    t = time.time()
    feats = encode(backbone, rows)
    n_pairs = sum(len(v) for v in rows.values())
    print(f"seed {seed}: encoded {n_pairs} pairs in {time.time() - t:.0f} s")
    return PreparedSeed(rows, feats, target_range, backbone)


def run_seed(
    seed: int,
    clip_path: Path,
    out: Path,
    cfg: ShapesHyperAlignConfig,
    rows_wanted: tuple[str, ...] = (),
) -> tuple[dict, dict]:
    """All rows for one seed: ``({row: test metrics}, {row: (val_srcc, model)})``."""
    prepared = prepare_seed(seed, clip_path, out, cfg)
    backbone, feats, target_range = prepared.backbone, prepared.feats, prepared.target_range
    clip_dir = clip_path.parent
    test = feats["test"]
    results, models = {}, {}
    for name, overrides in ROWS.items():
        if rows_wanted and name not in rows_wanted:
            continue
        t = time.time()
        info = {}
        if overrides is None:
            results[name] = _zero_shot(feats)
        else:
            extra = {"dataset": "shapes", "seed": seed, "n_prompts": cfg.n_prompts, "row": name}
            model_cfg = clip_config(cfg, target_range=target_range, extra=extra, **overrides)
            model, info = fit(model_cfg, backbone, clip_dir, feats, target_range, seed, cfg)
            results[name] = iqa_metrics(predict(model, test), test["mos"].numpy())
            results[name]["srcc_vs_alignment"] = iqa_metrics(
                predict(model, test), test["alignment"].numpy()
            )["srcc"]
            models[name] = (info["val_srcc"], model)
        _print_row(seed, name, results[name], info, time.time() - t)
    return results, models


def format_results(per_seed: list[dict], rows=tuple(ROWS)) -> str:
    """The Markdown table of test mean ± std over seeds."""
    lines = [
        f"| model ({len(per_seed)} seeds, test prompts) | SRCC | PLCC (logistic) | PLCC (raw) |",
        "|---|---|---|---|",
    ]
    for name in rows:
        ms = mean_std([r[name] for r in per_seed])
        cells = [f"{ms[k][0]:.4f} ± {ms[k][1]:.4f}" for k in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_clip(clip: Path, out: Path) -> Path:
    """Copy the CLIP weights to ``<out>/clip/clip.safetensors`` (unless already identical):
    checkpoints refer to their CLIP by that relative name."""
    staged = out / "clip" / CLIP_FILE
    data = clip.read_bytes()
    if not staged.is_file() or staged.read_bytes() != data:
        atomic_write_bytes(staged, data)
        staged.chmod(0o644)  # save_pretrained copies the mode; weights are shared data
    return staged


def ship(model: HyperAlign, target: Path, arch_json: Path | None = None) -> None:
    """Save ``model`` (+ its CLIP file) to ``target`` atomically via ``save_pretrained``, and
    the CLIP's architecture ``arch_json`` beside it (``<arch>.json``: the folder loads on any
    machine without registering anything first)."""
    model.save_pretrained(target)
    if arch_json is not None:
        data = Path(arch_json).read_bytes()
        side = Path(target) / Path(arch_json).name
        if not side.is_file() or side.read_bytes() != data:
            atomic_write_bytes(side, data)
            side.chmod(0o644)
    size = sum(p.stat().st_size for p in target.iterdir()) / 1e6
    print(f"shipped {target}: {sorted(p.name for p in target.iterdir())}, {size:.1f} MB")


def run_experiment(
    cfg: ShapesHyperAlignConfig,
    clip: Path,
    out: Path,
    rows: tuple[str, ...] = tuple(ROWS),
    ship_to: Path | None = None,
    ship_rows: tuple[str, ...] = SHIPPABLE,
) -> dict:
    """Every seed and row; writes ``results.json`` / ``results.md`` into ``out``, ships the
    model of `ship_rows` with the best validation SRCC to ``ship_to`` if given, and returns
    the results payload."""
    unknown = [r for r in (*rows, *ship_rows) if r not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {unknown}; valid rows: {list(ROWS)}")
    untrained = [r for r in ship_rows if ROWS[r] is None]
    if untrained:
        raise ValueError(f"rows {untrained} train nothing and cannot be shipped")
    if ship_to is not None and not set(ship_rows) & set(rows):
        raise ValueError(f"shipping needs one of the rows {list(ship_rows)} in --rows")
    if not Path(clip).is_file():
        raise FileNotFoundError(
            f"CLIP weights {clip} do not exist; train them with scripts/train_shapes_clip.py"
        )
    torch.set_num_threads(cfg.threads)
    staged = stage_clip(Path(clip), out)
    per_seed, best = [], (-np.inf, None, None)
    for seed in cfg.seeds:
        results, models = run_seed(seed, staged, out, cfg, tuple(rows))
        per_seed.append(results)
        for row in ship_rows:
            val_srcc, model = models.get(row, (-np.inf, None))
            if val_srcc > best[0]:
                best = (val_srcc, (row, seed), model)
    table = format_results(per_seed, rows)
    print("\n" + table)
    payload = {
        "config": dataclasses.asdict(cfg),
        "clip": str(clip),
        "per_seed": per_seed,
        "mean_std": {
            name: {k: list(v) for k, v in mean_std([r[name] for r in per_seed]).items()}
            for name in rows
        },
        "shipped": None if best[1] is None else {"row": best[1][0], "seed": best[1][1]},
    }
    atomic_write_json(out / "results.json", payload)
    atomic_write_text(out / "results.md", table + "\n")
    if ship_to is not None:
        model = best[2]
        model.config.extra = {**model.config.extra, "val_srcc": best[0]}
        print(f"shipping {best[1][0]!r} of seed {best[1][1]} (validation SRCC {best[0]:.4f})")
        from shapes.assets import CLIP_CONFIG

        ship(model, ship_to, Path(cfg.clip_arch) if cfg.clip_arch else CLIP_CONFIG)
    return payload
