"""``hyperalign eval-reward``: score a labelled IQA dataset with trained HyperAlign checkpoints.

Writes, per checkpoint, ``metrics.json`` (SRCC, PLCC raw and after the 4-parameter logistic
fit, KRCC, RMSE), ``predictions.csv`` and ``scatter.png`` (prediction vs. MOS with the fitted
logistic curve); with several checkpoints (e.g. the ``split_*/best`` of a ``--splits N`` run)
also ``summary.json`` with mean ± std.

Within-dataset (the test subset of the split the checkpoint was trained on: the split is
rebuilt from the seed and fractions stored in the checkpoint, and refused unless its SHA-256
fingerprints match those stored at training time, so a label file that differs from the
training one, even only in row order, cannot pass training images off as test images)::

    hyperalign eval-reward --model runs/agiqa3k/split_*/best --dataset agiqa3k \\
        --labels $IQA/agiqa3k/data.csv --image-root AGIQA-3K/ --subset test --out eval/

Cross-dataset (trained on AIGCIQA2023, tested on all of AGIQA-3K)::

    hyperalign eval-reward --model runs/aigciqa2023/split_0/best --dataset agiqa3k \\
        --labels $IQA/agiqa3k/data.csv --image-root AGIQA-3K/ --subset all --out eval/x

(``$IQA`` stands for the folder holding the label files.)

Scores are on the normalised [0, 1] scale; targets are each dataset's MOS min-max
normalised with its own bounds, so RMSE is in those units and cross-dataset numbers compare.
"""

from __future__ import annotations

import argparse
import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from hyperalign.common import atomic_write_bytes, atomic_write_json, atomic_write_text

from .data import (
    DATASETS,
    FORMATS,
    IQADataset,
    PairDataset,
    Sample,
    Split,
    canonical_split,
    load_dataset,
    prompt_split,
)
from .metrics import METRIC_NAMES, fit_logistic4, format_mean_std, iqa_metrics, logistic4, mean_std

OUTPUT_KEYS = ("score", "s_base", "distance", "angle", "aperture", "alpha", "beta", "gamma")


@torch.no_grad()
def predict(model, loader, accelerator=None, progress: bool = False) -> dict[str, np.ndarray]:
    """Run ``model`` over ``loader``; per-sample arrays in dataset order (keys ``OUTPUT_KEYS``).

    With an ``accelerator`` the loader is sharded across processes and results are gathered
    (duplicates from padding dropped). ``model`` may be wrapped (DDP); it is unwrapped here.
    """
    from tqdm.auto import tqdm

    if accelerator is not None:
        net = accelerator.unwrap_model(model)
        device = accelerator.device
        show = progress and accelerator.is_local_main_process
    else:
        net = model
        device = next(model.parameters()).device
        show = progress
    was_training = net.training
    net.eval()
    chunks: dict[str, list] = {k: [] for k in (*OUTPUT_KEYS, "index")}
    for batch in tqdm(loader, desc="eval", disable=not show, leave=False):
        out = net(batch["pixels"].to(device), list(batch["prompt"]))
        values = {k: getattr(out, k).float() for k in OUTPUT_KEYS}
        values["index"] = batch["index"].to(device)
        if accelerator is not None:
            values = accelerator.gather_for_metrics(values)
        for k, v in values.items():
            chunks[k].append(v.cpu())
    net.train(was_training)
    index = torch.cat(chunks.pop("index")).numpy()
    order = np.argsort(index, kind="stable")
    return {k: torch.cat(v).numpy()[order] for k, v in chunks.items()}


def make_loader(
    samples: Sequence[Sample],
    image_root,
    image_size,
    target_range,
    batch_size: int,
    num_workers: int,
    sampler=None,
) -> DataLoader:
    dataset = PairDataset(samples, image_root, image_size, target_range)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
        drop_last=False,
    )


def write_predictions(
    path: Path, samples: Sequence[Sample], dataset: IQADataset, outputs: dict[str, np.ndarray]
) -> None:
    """CSV: image, prompt, mos, target (normalised), score, score_mos (on the MOS scale), ...
    (written atomically)."""
    with io.StringIO(newline="") as handle:
        writer = csv.writer(handle)
        extra = [k for k in OUTPUT_KEYS if k != "score"]
        writer.writerow(["image", "prompt", "mos", "target", "score", "score_mos", *extra])
        for i, s in enumerate(samples):
            score = float(outputs["score"][i])
            writer.writerow(
                [
                    s.image,
                    s.prompt,
                    f"{s.mos:.6g}",
                    f"{dataset.normalise(s.mos):.6f}",
                    f"{score:.6f}",
                    f"{dataset.denormalise(score):.6g}",
                    *(f"{float(outputs[k][i]):.6f}" for k in extra),
                ]
            )
        atomic_write_text(path, handle.getvalue())


def scatter_plot(
    path: Path, pred: np.ndarray, mos: np.ndarray, dataset: IQADataset, title: str, metrics: dict
) -> None:
    """PNG of prediction (x) vs. raw MOS (y) with the 4-parameter logistic fitted on them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # Agg canvas: no display, no global pyplot state
    ax = fig.add_subplot()
    ax.scatter(pred, mos, s=6, alpha=0.4, color="tab:blue", edgecolors="none", label="images")
    target = dataset.normalise(mos)
    params = fit_logistic4(pred, target)
    if params is not None:
        xs = np.linspace(float(pred.min()), float(pred.max()), 200)
        curve = dataset.denormalise(logistic4(xs, *params))
        ax.plot(xs, curve, color="tab:red", lw=2, label="4-parameter logistic fit")
    ax.set_xlabel("predicted alignment (normalised score)")
    ax.set_ylabel(f"MOS ({dataset.name})")
    ax.set_title(
        f"{title}\nSRCC {metrics['srcc']:.4f}  PLCC {metrics['plcc_logistic']:.4f} "
        f"(raw {metrics['plcc']:.4f})",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    atomic_write_bytes(path, png.getvalue())


def evaluate_samples(
    model,
    samples: Sequence[Sample],
    dataset: IQADataset,
    image_root,
    out_dir: Path | None,
    *,
    batch_size: int = 32,
    num_workers: int = 0,
    accelerator=None,
    title: str = "",
    progress: bool = False,
    loader=None,
) -> dict[str, float]:
    """Metrics of ``model`` on ``samples`` (targets normalised by ``dataset``'s bounds).

    With ``out_dir`` (and on the main process) also writes metrics.json, predictions.csv and
    scatter.png there. ``loader``: a ready (prepared) loader over exactly ``samples``.
    """
    if loader is None:
        net = accelerator.unwrap_model(model) if accelerator is not None else model
        loader = make_loader(
            samples, image_root, net.image_size, dataset.target_range, batch_size, num_workers
        )
        if accelerator is not None:
            loader = accelerator.prepare_data_loader(loader)
    outputs = predict(model, loader, accelerator, progress=progress)
    mos = np.array([s.mos for s in samples])
    metrics = iqa_metrics(outputs["score"], dataset.normalise(mos))
    main = accelerator is None or accelerator.is_main_process
    if out_dir is not None and main:
        out_dir = Path(out_dir)
        write_predictions(out_dir / "predictions.csv", samples, dataset, outputs)
        scatter_plot(out_dir / "scatter.png", outputs["score"], mos, dataset, title, metrics)
        atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def split_from_extra(dataset: IQADataset, extra: dict, source: object = "the checkpoint") -> Split:
    """Rebuild the split a checkpoint was trained on from its ``config.extra["split"]``.

    The rebuilt subsets and the labels must match the SHA-256 fingerprints stored at training
    time (``subsets_sha256``, ``labels_sha256``); otherwise a ``ValueError`` says why (other
    labels, the same labels in another row order) and what to do.
    """
    info = extra.get("split")
    if not info or extra.get("dataset") != dataset.name:
        raise ValueError(
            f"{source} was trained on {extra.get('dataset')!r}, not {dataset.name!r}, or "
            "stores no split; use --subset all (cross-dataset evaluation)"
        )
    if "subsets_sha256" not in info or "labels_sha256" not in info:
        raise ValueError(
            f"{source} stores no fingerprint of its split, so a split rebuilt from the given "
            "labels cannot be checked to be the one it was trained on; use --subset all, or "
            "retrain it with this version of hyperalign train-reward"
        )
    if info["mode"].startswith("canonical:"):
        split = canonical_split(dataset, info["dir"], info["val_fraction"], info["seed"])
    else:
        split = prompt_split(dataset, info["test_fraction"], info["val_fraction"], info["seed"])
    _check_fingerprints(dataset, split, info, extra.get("labels"), source)
    return split


def _check_fingerprints(
    dataset: IQADataset, split: Split, info: dict, labels: str | None, source: object
) -> None:
    """Refuse a rebuilt split whose labels or subsets differ from the stored fingerprints."""
    trained_on = f" ({labels})" if labels else ""
    if dataset.fingerprint() != info["labels_sha256"]:
        raise ValueError(
            f"these labels differ from the ones {source} was trained on{trained_on}: other "
            "images, prompts or scores. Its train/val/test split cannot be rebuilt from them; "
            "pass the training label file, or use --subset all"
        )
    changed = [k for k, v in split.fingerprint().items() if info["subsets_sha256"].get(k) != v]
    if changed:
        raise ValueError(
            f"the {'/'.join(changed)} subset(s) rebuilt from these labels differ from the ones "
            f"{source} was trained on: most likely the label file holds the same rows in "
            "another order (the seeded split depends on the row order). Pass the training "
            f"label file{trained_on} unchanged, or use --subset all"
        )


def format_table(rows: dict[str, dict], keys: Sequence[str] = METRIC_NAMES) -> str:
    """Markdown table, one row per name; values are floats or (mean, std) pairs."""
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, metrics in rows.items():
        cells = []
        for k in keys:
            v = metrics.get(k, float("nan"))
            cells.append(format_mean_std(v) if isinstance(v, tuple) else f"{v:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- CLI
def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The dataset options shared by ``train`` and ``eval``."""
    parser.add_argument(
        "--dataset",
        required=True,
        choices=list(DATASETS),
        help="which dataset the labels belong to (sets the label format and split ratio): "
        + "; ".join(f"{k}: {v.labels_hint}" for k, v in DATASETS.items()),
    )
    parser.add_argument(
        "--labels",
        required=True,
        help="label file or AMFF-Net split folder (e.g. $IQA/agiqa3k/data.csv)",
    )
    parser.add_argument(
        "--image-root",
        required=True,
        help="folder holding the images at the paths written in the label file (or all image "
        "files directly in it)",
    )
    parser.add_argument(
        "--format", choices=FORMATS, default=None, help="override the dataset's label format"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        nargs="+",
        required=True,
        help="checkpoint directories (e.g. runs/agiqa3k/split_*/best); several give mean ± std",
    )
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for metrics, CSVs and plots")
    parser.add_argument(
        "--subset",
        choices=["all", "test", "val", "train"],
        default="all",
        help="'all' scores every labelled image (cross-dataset); 'test'/'val'/'train' rebuild "
        "the split stored in each checkpoint and check it against the fingerprints stored "
        "there (default: %(default)s)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding workers")


def run(args: argparse.Namespace) -> int:
    from .model import HyperAlign

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = load_dataset(args.dataset, args.labels, args.format)
    out = Path(args.out)
    rows: dict[str, dict] = {}
    names = _run_names(args.model)
    for name, path in zip(names, args.model):
        model = HyperAlign.from_pretrained(path, device=device).eval()
        if args.subset == "all":
            samples = dataset.samples
        else:
            split = split_from_extra(dataset, model.config.extra, source=path)
            samples = split.subsets()[args.subset]
        title = f"{path} on {dataset.name} ({args.subset}, {len(samples)} images)"
        rows[name] = evaluate_samples(
            model,
            samples,
            dataset,
            args.image_root,
            out / name if len(names) > 1 else out,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            title=title,
            progress=True,
        )
        print(f"{name}: " + ", ".join(f"{k} {rows[name][k]:.4f}" for k in METRIC_NAMES))
    table = dict(rows)
    if len(rows) > 1:
        summary = mean_std(list(rows.values()))
        atomic_write_json(out / "summary.json", {k: list(v) for k, v in summary.items()})
        table["mean ± std"] = summary
    print(format_table(table))
    return 0


def _run_names(paths: Sequence[str]) -> list[str]:
    """Short distinct names for output folders (``split_0`` from ``runs/x/split_0/best``)."""
    names = []
    for p in paths:
        parts = Path(p).resolve().parts
        name = parts[-2] if parts[-1] in ("best", "last") and len(parts) > 1 else parts[-1]
        names.append(name)
    if len(set(names)) != len(names):
        names = [f"{i}_{n}" for i, n in enumerate(names)]
    return names
