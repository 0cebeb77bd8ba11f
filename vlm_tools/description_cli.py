"""Evaluate description selection on an image-folder dataset (``hyperalign disclip``).

Usage::

    hyperalign disclip ROOT --pool descriptions_eurosat_dclip.json [--reference-root TRAIN]
        [--backbone ViT-B-32 --pretrained openai] [--k 3 --m 5 --n-reference 1000]
        [--w-cls 0:40:0.25] [--out runs/disclip] [--device cuda]

``ROOT`` holds ``ROOT/<class name>/*.jpg`` (any suffix of ``hyperalign.common.IMAGE_SUFFIXES``:
png, jpeg, webp, ...); every class folder must
be in the pool (names are matched ignoring case, ``_``/``-`` vs spaces and a leading ``001.``).
Reference images for the lookup matrix come from ``--reference-root`` (same layout, e.g. the
train split). Without it, the first ``n`` images of each class of ``ROOT`` (file-name order),
``n = min(--n-reference, half the smallest class)``, are the references and only the rest is
evaluated.

Prints a Markdown accuracy table (top-1 %) over the ``w_cls`` sweep for: the classname-only
prompt (CLIP), the LLM-assigned descriptions (all classes), the selected descriptions
(classname-free, in the local neighbourhood) and the selected descriptions in the
classname-containing mode. Writes to ``--out``: ``accuracy.md``/``.json``,
``selected_descriptions.md``/``.json`` (per class: how often each description was selected
for it, over the images where it was a candidate; per image: the selections),
``lookup.safetensors`` (reusable by :class:`~vlm_tools.description_critic.DescriptionCritic`)
and ``config.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hyperalign.common import IMAGE_SUFFIXES, atomic_write_json, atomic_write_text, to_rgb
from vlm_tools.description_selection import DescriptionSelector, SelectionConfig
from vlm_tools.descriptions import DescriptionPool, load_pool

# ---------------------------------------------------------------------------------------------
# Image folders


@dataclass
class ImageFolder:
    """Files of an image-folder dataset, classes in sorted folder order."""

    classnames: list[str]
    """Class folder names, sorted."""
    paths: list[Path]
    """Image files, grouped by class, sorted by name inside a class."""
    labels: list[int]
    """Class index (into ``classnames``) of every path."""


def scan_image_folder(root: str | os.PathLike) -> ImageFolder:
    """List ``root/<class>/<image>``; clear errors for a missing root or an empty class."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {str(root)!r} does not exist; expected root/<class name>/*.jpg"
        )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{str(root)!r} has no class sub-folders; expected root/<class>/*.jpg")
    paths, labels, empty = [], [], []
    for c, name in enumerate(classes):
        files = sorted(
            f for f in (root / name).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            empty.append(name)
        paths += files
        labels += [c] * len(files)
    if empty:
        raise ValueError(
            f"class folders without images ({', '.join(IMAGE_SUFFIXES)}) in {str(root)!r}: {empty}"
        )
    return ImageFolder(classes, paths, labels)


def load_image(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Image file -> ``(3, h, w)`` in [0, 1]: decoded as :func:`hyperalign.common.to_rgb` does
    (EXIF orientation, alpha on white), shorter side resized to fit (bicubic), then
    centre-cropped (CLIP's evaluation preprocessing). Undecodable files raise ``ValueError``
    naming the file."""
    from PIL import Image, UnidentifiedImageError

    h, w = size
    try:
        with Image.open(path) as im:
            im = to_rgb(im)  # a decoded copy: valid after the file is closed
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    scale = max(h / im.height, w / im.width)
    new = (max(w, round(im.width * scale)), max(h, round(im.height * scale)))
    im = im.resize(new, Image.BICUBIC)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    im = im.crop((left, top, left + w, top + h))
    arr = np.asarray(im, dtype=np.float32) / 255.0  # (h, w, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, h, w)


def encode_folder(
    selector: DescriptionSelector, paths: list[Path], labels: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``(N, D)`` (on the selector's device) and labels ``(N,)`` of image files,
    loaded and encoded ``batch_size`` at a time."""
    bs = selector.config.batch_size
    out = []
    for start in range(0, len(paths), bs):
        batch = torch.stack(
            [load_image(p, selector.backbone.image_size) for p in paths[start : start + bs]]
        )  # (b, 3, h, w)
        out.append(selector.encode_images(batch))
    emb = torch.cat(out) if out else torch.empty(0, selector.backbone.embed_dim)
    return emb, torch.tensor(labels, dtype=torch.long)


def parse_sweep(spec: str) -> list[float]:
    """``"start:stop:step"`` (stop excluded, like the official ``np.arange(0, 40, 0.25)``) or
    a comma list ``"0,1,5"``."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop <= start:
                raise ValueError
            return [round(float(v), 6) for v in np.arange(start, stop, step)]
        return [float(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"--w-cls {spec!r}: use start:stop:step (e.g. 0:40:0.25) or a comma list (e.g. 0,1,5)"
        ) from None


# ---------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class EvalResult:
    """Accuracies (top-1 %, per w_cls where it applies) and the selection made."""

    w_cls: list[float]
    classname_only: float
    llm_assigned: list[float]
    selected: list[float]
    selected_classname_containing: float
    neighbourhood_recall: float
    """Percentage of images whose true class is in their neighbourhood (the ceiling of the
    local methods)."""
    fallback_rate: float
    """Percentage of (image, candidate) pairs where no description survived."""


def evaluate(
    selector: DescriptionSelector, emb: torch.Tensor, labels: torch.Tensor, sweep: list[float]
):
    """Run every method on the evaluation embeddings; returns ``(EvalResult, Selection)``."""
    labels = labels.to(selector.device)
    acc = lambda pred: 100.0 * float((pred == labels).float().mean())
    selection = selector.select(emb)
    parts = selector.score_parts(emb, selection)
    hood = selection.neighbourhood
    local = lambda scores: hood.gather(1, scores.argmax(1, keepdim=True)).squeeze(1)
    result = EvalResult(
        w_cls=list(sweep),
        classname_only=acc(selector.classname_scores(emb).argmax(1)),
        llm_assigned=[acc(selector.llm_assigned_scores(emb, w).argmax(1)) for w in sweep],
        selected=[acc(local(parts.scores(w))) for w in sweep],
        selected_classname_containing=acc(
            local(selector.classname_containing_scores(emb, selection))
        ),
        neighbourhood_recall=100.0 * float((hood == labels.unsqueeze(1)).any(1).float().mean()),
        fallback_rate=100.0 * float(selection.fallback.float().mean()),
    )
    return result, selection


def accuracy_markdown(res: EvalResult, rows: list[int] | None = None) -> str:
    """The accuracy table (all sweep rows, or the given row indices)."""
    lines = [
        "| w_cls | classname only | LLM-assigned | selected (classname-free) "
        "| selected, classname-containing |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i in rows if rows is not None else range(len(res.w_cls)):
        lines.append(
            f"| {res.w_cls[i]:g} | {res.classname_only:.2f} | {res.llm_assigned[i]:.2f} "
            f"| {res.selected[i]:.2f} | {res.selected_classname_containing:.2f} |"
        )
    return "\n".join(lines)


def summary_rows(res: EvalResult, max_rows: int = 25) -> list[int]:
    """All rows of a short sweep; else w_cls = 0 (or the first), the last, and the best row of
    each sweep-dependent method."""
    n = len(res.w_cls)
    if n <= max_rows:
        return list(range(n))
    zero = [i for i, w in enumerate(res.w_cls) if w == 0.0] or [0]
    best = [int(np.argmax(res.llm_assigned)), int(np.argmax(res.selected))]
    return sorted(set(zero + best + [n - 1]))


def per_class_selection(selector: DescriptionSelector, selection, top: int = 10) -> dict[str, dict]:
    """Per class: over the images where it was a candidate, how often each description was
    selected for it, the fallback rate, and the LLM's own descriptions."""
    pool = selector.pool
    counts: list[Counter] = [Counter() for _ in range(pool.num_classes)]
    seen = [0] * pool.num_classes
    fallbacks = [0] * pool.num_classes
    hood = selection.neighbourhood.tolist()
    idx = selection.indices.tolist()
    fb = selection.fallback.tolist()
    for i in range(len(hood)):
        for j, c in enumerate(hood[i]):
            seen[c] += 1
            fallbacks[c] += int(fb[i][j])
            counts[c].update(d for d in idx[i][j] if d >= 0)
    out = {}
    for c, name in enumerate(pool.classnames):
        out[name] = {
            "candidate_in_images": seen[c],
            "fallback_rate": fallbacks[c] / seen[c] if seen[c] else None,
            "selected": [
                {"description": pool.descriptions[d], "fraction": n / seen[c]}
                for d, n in counts[c].most_common(top)
            ],
            "llm_descriptions": pool.class_descriptions(c),
        }
    return out


def selection_markdown(per_class: dict[str, dict], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        "Per class: the descriptions selected for it (fraction of the images where it was "
        "one of the k candidates), then the LLM's own descriptions.",
        "",
    ]
    for name, row in per_class.items():
        lines.append(f"## {name}")
        if not row["candidate_in_images"]:
            lines += ["", "_never a candidate in the evaluated images_", ""]
        else:
            lines.append("")
            lines.append(
                f"candidate in {row['candidate_in_images']} images, fallback "
                f"{100 * row['fallback_rate']:.0f}%"
            )
            lines.append("")
            lines += [f"- {s['description']} ({100 * s['fraction']:.0f}%)" for s in row["selected"]]
        lines.append("")
        lines.append("LLM: " + "; ".join(row["llm_descriptions"]))
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", help="image folder root/<class name>/*.jpg to evaluate")
    parser.add_argument("--pool", required=True, help="description pool JSON (DCLIP or DisCLIP)")
    parser.add_argument(
        "--fallback-pool",
        default=None,
        help="pool filling classes with no description (DisCLIP: the DCLIP pool)",
    )
    parser.add_argument(
        "--reference-root",
        default=None,
        help="image folder of reference images for S (default: split ROOT)",
    )
    parser.add_argument("--backbone", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument(
        "--pretrained",
        default="openai",
        help="open_clip tag or weights file; 'none' for random weights",
    )
    parser.add_argument("--k", type=int, default=3, help="neighbourhood size")
    parser.add_argument("--m", type=int, default=5, help="descriptions per candidate")
    parser.add_argument(
        "--n-reference",
        type=int,
        default=1000,
        help="reference images per class (lowered to the smallest class)",
    )
    parser.add_argument(
        "--w-cls",
        default="0:40:0.25",
        help="classname weight sweep: start:stop:step or a comma list",
    )
    parser.add_argument("--out", default="runs/disclip", help="output folder")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per CLIP forward")


@dataclass
class ReferenceSplit:
    """Reference images (for the lookup matrix) and evaluation images, with class indices
    into the evaluated folder's ``classnames``."""

    ref_paths: list[Path]
    ref_labels: list[int]
    eval_paths: list[Path]
    eval_labels: list[int]
    n_reference: int
    """References per class asked of the selector."""


def split_references(
    folder: ImageFolder, reference_root: str | None, n_reference: int
) -> ReferenceSplit:
    """References from ``reference_root`` (same layout; classes outside ``folder`` ignored),
    else the first ``min(n_reference, half the smallest class)`` images of every class of
    ``folder`` (the rest is evaluated)."""
    if reference_root is not None:
        ref = scan_image_folder(reference_root)
        missing = sorted(set(folder.classnames) - set(ref.classnames))
        if missing:
            raise ValueError(f"classes with no folder in --reference-root: {missing}")
        keep = [i for i, c in enumerate(ref.labels) if ref.classnames[c] in folder.classnames]
        return ReferenceSplit(
            ref_paths=[ref.paths[i] for i in keep],
            ref_labels=[folder.classnames.index(ref.classnames[ref.labels[i]]) for i in keep],
            eval_paths=folder.paths,
            eval_labels=folder.labels,
            n_reference=n_reference,
        )
    labels = torch.tensor(folder.labels)
    smallest = int(torch.bincount(labels).min())
    if smallest < 2:
        raise ValueError(
            "without --reference-root every class needs >= 2 images (half are "
            "references); add images or pass --reference-root"
        )
    n_ref = min(n_reference, smallest // 2)
    is_ref = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(len(folder.classnames)):
        is_ref[torch.nonzero(labels == c).flatten()[:n_ref]] = True
    flags = is_ref.tolist()
    return ReferenceSplit(
        ref_paths=[p for p, r in zip(folder.paths, flags) if r],
        ref_labels=labels[is_ref].tolist(),
        eval_paths=[p for p, r in zip(folder.paths, flags) if not r],
        eval_labels=labels[~is_ref].tolist(),
        n_reference=n_ref,
    )


def write_outputs(
    args: argparse.Namespace,
    folder: ImageFolder,
    split: ReferenceSplit,
    selector: DescriptionSelector,
    result: EvalResult,
    selection,
) -> Path:
    """Write accuracy, selected descriptions, config and lookup matrix to ``args.out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"Selected descriptions: {Path(args.root).name}, pool {Path(args.pool).name}"
    per_class = per_class_selection(selector, selection)
    per_image = {
        str(p): {
            "label": folder.classnames[lbl],
            "candidates": selector.selected_texts(selection, i),
        }
        for i, (p, lbl) in enumerate(zip(split.eval_paths, split.eval_labels))
    }
    atomic_write_text(out / "accuracy.md", accuracy_markdown(result) + "\n")
    atomic_write_json(out / "accuracy.json", asdict(result))
    atomic_write_json(
        out / "selected_descriptions.json", {"per_class": per_class, "per_image": per_image}
    )
    atomic_write_text(out / "selected_descriptions.md", selection_markdown(per_class, title))
    plain = lambda v: v if isinstance(v, str | int | float | bool | type(None)) else str(v)
    resolved = {
        **{k: plain(v) for k, v in vars(args).items()},
        "n_reference_used": selector.n_reference_used,
        "selection": asdict(selector.config),
    }
    atomic_write_json(out / "config.json", resolved)
    selector.save_lookup(out / "lookup.safetensors")
    return out


def run(args: argparse.Namespace) -> int:
    """Evaluate every method on ``args.root``, write the outputs, print the summary."""
    from reward.backbone import load_backbone

    sweep = parse_sweep(args.w_cls)
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    folder = scan_image_folder(args.root)
    pool: DescriptionPool = load_pool(args.pool, fallback=args.fallback_pool)
    pool = pool.for_classes(folder.classnames)  # raises, listing classes missing from the pool
    split = split_references(folder, args.reference_root, args.n_reference)

    config = SelectionConfig(
        k=args.k, m=args.m, n_reference=split.n_reference, batch_size=args.batch_size
    )
    backbone = load_backbone(args.backbone, pretrained, device=args.device)
    selector = DescriptionSelector(backbone, pool, config, device=args.device)
    print(
        f"{len(pool.classnames)} classes, {len(pool.descriptions)} distinct descriptions, "
        f"{len(split.ref_paths)} reference and {len(split.eval_paths)} evaluation images",
        file=sys.stderr,
    )
    ref_emb, ref_lab = encode_folder(selector, split.ref_paths, split.ref_labels)
    selector.fit(ref_emb, ref_lab)
    emb, lab = encode_folder(selector, split.eval_paths, split.eval_labels)
    result, selection = evaluate(selector, emb, lab, sweep)
    out = write_outputs(args, folder, split, selector, result, selection)

    print(accuracy_markdown(result, summary_rows(result)))
    print(
        f"\nneighbourhood recall (true class among k={args.k}): "
        f"{result.neighbourhood_recall:.2f}%; fallback rate {result.fallback_rate:.2f}%; "
        f"full table and selected descriptions in {out}/"
    )
    return 0
