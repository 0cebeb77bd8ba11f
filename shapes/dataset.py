"""Build a shapes-world alignment dataset: prompt-disjoint train/val/test splits of PNG images
with a generic CSV per split.

Usage::

    hyperalign shapes-data --out runs/shapes_data --n-prompts 1000 --seed 0

Layout of ``--out``::

    train.csv  val.csv  test.csv  meta.json  images/{train,val,test}/<prompt>_<variant>.png

CSV columns (header first): ``image`` (path relative to the CSV's folder), ``prompt``,
``score`` (simulated MOS on 1-5, see :class:`~shapes.perturb.RaterModel`), then the
ground truth: ``alignment`` (fraction of the prompt's facts satisfied), ``perturbation``
(``faithful``, a kind of :data:`~shapes.perturb.KINDS` or ``double:<k1>+<k2>``),
``n_facts`` and ``scene`` (JSON of the objects, :meth:`~shapes.world.Scene.to_json`).
Readers that only know ``image,prompt,score`` can ignore the rest.

Per prompt: ``faithful_per_prompt`` faithful scenes, every applicable single perturbation of
the first one, and ``n_double`` double perturbations. Everything derives from ``seed``: the
same arguments give byte-identical files.

``--style`` (:data:`~shapes.styles.STYLE_FAMILIES`: ``default``, ``train`` or ``heldout``)
draws a layout world per prompt (:func:`~shapes.styles.sample_world_style`) and a rendering
style per image (:func:`~shapes.styles.sample_style`); ``default`` is the plain rendering and
draws nothing, so its files are those of a build without the setting. ``--truth`` (``closed``
or ``open``) and ``--unmentioned-weight`` choose the truth model (see :mod:`shapes.perturb`)
of the ``alignment`` column and of the alignment the simulated raters judge. All three are
recorded in ``meta.json`` (``config``, and the style family's settings under ``style``).

The dataset is built in a temporary folder and moved to ``--out`` when complete. ``meta.json``
is its manifest (``"format": "shapes-dataset/1"``, the config, row counts): ``--overwrite``
replaces only a folder that holds such a manifest and nothing but the files listed above
(or an empty folder); any other folder is refused with exit status 2 and left as it is.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hyperalign.common import (
    atomic_write_json,
    atomic_write_text,
    make_tmp_dir,
    replace_dir,
    save_png,
)
from shapes.perturb import (
    TRUTH_MODELS,
    RaterModel,
    check_truth,
    faithful_scene,
    perturbed_scenes,
    true_alignment,
)
from shapes.prompts import PromptSampler, PromptSpec, sample_prompt
from shapes.styles import STYLE_FAMILIES, sample_style, sample_world_style, style_family
from shapes.world import PALETTE, RenderConfig, Scene, WorldConfig, render

SPLITS: tuple[str, ...] = ("train", "val", "test")
COLUMNS: tuple[str, ...] = (
    "image",
    "prompt",
    "score",
    "alignment",
    "perturbation",
    "n_facts",
    "scene",
)
"""CSV header, in order."""
MANIFEST = "meta.json"
"""The manifest :func:`build_dataset` writes last: config, style family settings, palette,
columns, row counts."""
FORMAT = "shapes-dataset/1"
"""``meta.json["format"]``: marks a folder written by :func:`build_dataset` (only such a
folder may be replaced with ``--overwrite``)."""


@dataclass(frozen=True)
class ShapesDatasetConfig:
    """What :func:`build_dataset` generates."""

    n_prompts: int = 1000
    """Distinct prompts in all splits together."""
    seed: int = 0
    """Master seed: prompts, splits, scenes and ratings all derive from it."""
    image_size: int = 64
    """Image width = height in pixels."""
    supersample: int = 4
    """Anti-aliasing factor of the renderer."""
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    """Fractions of the *prompts* in train/val/test (prompt-disjoint)."""
    faithful_per_prompt: int = 2
    """Faithful scenes (different layouts) per prompt."""
    n_double: int = 1
    """Scenes with two different perturbations per prompt."""
    raters: RaterModel = field(default_factory=RaterModel)
    """Simulated raters of the MOS."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """Layout of the scenes."""
    prompts: PromptSampler = field(default_factory=PromptSampler)
    """Prompt template probabilities."""
    style: str = "default"
    """Style family of :data:`~shapes.styles.STYLE_FAMILIES` (``default`` = plain rendering;
    ``train`` for training data; ``heldout`` only to evaluate)."""
    truth: str = "closed"
    """Truth model of the ``alignment`` column and the MOS, one of
    :data:`~shapes.perturb.TRUTH_MODELS`."""
    unmentioned_weight: float = 1.0
    """Open world: facts each object beyond those the prompt describes costs (0 = ignored)."""

    def __post_init__(self) -> None:
        style_family(self.style)
        check_truth(self.truth, self.unmentioned_weight)
        if self.n_prompts < len(SPLITS):
            raise ValueError(f"n_prompts must be >= {len(SPLITS)}, got {self.n_prompts}")
        fr = self.split_fractions
        if len(fr) != 3 or min(fr) <= 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be 3 positive numbers summing to 1, got {fr}")
        if self.faithful_per_prompt < 1:
            raise ValueError("faithful_per_prompt must be >= 1")


@dataclass(frozen=True)
class ShapesRow:
    """One row of a split CSV, as read back by :func:`load_split`."""

    image: Path
    """Absolute image path."""
    prompt: str
    score: float
    """Simulated MOS, 1-5."""
    alignment: float
    """True alignment, [0, 1]."""
    perturbation: str
    n_facts: int
    scene: Scene


def sample_prompts(n: int, seed: int, sampler: PromptSampler | None = None) -> list[PromptSpec]:
    """``n`` distinct prompts (distinct text), deterministic from ``seed``."""
    rng = np.random.default_rng([seed, 1])
    seen: dict[str, PromptSpec] = {}
    for _ in range(n * 50):
        spec = sample_prompt(rng, sampler)
        seen.setdefault(spec.text, spec)
        if len(seen) == n:
            return list(seen.values())
    raise ValueError(f"could only draw {len(seen)} distinct prompts; ask for fewer")


def split_prompts(n: int, fractions: tuple[float, float, float], seed: int) -> list[str]:
    """Split name of each of ``n`` prompts (shuffled, sizes from ``fractions``, none empty)."""
    order = np.random.default_rng([seed, 2]).permutation(n)
    n_train = max(1, int(round(fractions[0] * n)))
    n_val = max(1, int(round(fractions[1] * n)))
    n_train = min(n_train, n - n_val - 1)
    out = [""] * n
    for rank, idx in enumerate(order):
        out[idx] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def _variants(
    spec: PromptSpec, i: int, cfg: ShapesDatasetConfig
) -> tuple[list, np.random.Generator]:
    """The (kind, scene) pairs of prompt ``i``: faithful scenes, then every applicable single
    perturbation of the first and ``n_double`` double ones; and the prompt's generator (its
    ratings are drawn from it next)."""
    rng = np.random.default_rng([cfg.seed, 3, i])
    # The style's layout world has a stream of its own (``default`` draws nothing from it).
    world = sample_world_style(np.random.default_rng([cfg.seed, 4, i]), cfg.style, cfg.world)
    faithful = [faithful_scene(spec, rng, world) for _ in range(cfg.faithful_per_prompt)]
    variants = [("faithful", sc) for sc in faithful]
    variants += [
        (p.kind, p.scene) for p in perturbed_scenes(spec, faithful[0], rng, world, cfg.n_double)
    ]
    return variants, rng


def _render_config(cfg: ShapesDatasetConfig, i: int, j: int) -> RenderConfig:
    """The rendering of image ``j`` of prompt ``i``: a style of ``cfg.style`` drawn from its
    own stream, at ``cfg.image_size`` (and ``cfg.supersample`` unless the style is aliased)."""
    if cfg.style == "default":
        return RenderConfig(image_size=cfg.image_size, supersample=cfg.supersample)
    style = sample_style(np.random.default_rng([cfg.seed, 5, i, j]), cfg.style)
    supersample = 1 if style.supersample == 1 else cfg.supersample
    return dataclasses.replace(style, image_size=cfg.image_size, supersample=supersample)


def _write_images(out: Path, cfg: ShapesDatasetConfig) -> tuple[dict[str, list[dict]], list[str]]:
    """Render every prompt's scenes into ``out/images/<split>/``; returns the CSV rows per split
    and the split of each prompt."""
    specs = sample_prompts(cfg.n_prompts, cfg.seed, cfg.prompts)
    split_of = split_prompts(len(specs), cfg.split_fractions, cfg.seed)
    biases = cfg.raters.biases(cfg.seed)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for s in SPLITS:
        (out / "images" / s).mkdir(parents=True, exist_ok=True)
    for i, spec in enumerate(specs):
        variants, rng = _variants(spec, i, cfg)
        split = split_of[i]
        n_facts = len(spec.facts())
        for j, (kind, scene) in enumerate(variants):
            rel = f"images/{split}/{i:05d}_{j:02d}.png"
            save_png(render(scene, _render_config(cfg, i, j)), out / rel)
            true = true_alignment(spec, scene, cfg.truth, cfg.unmentioned_weight)
            rows[split].append(
                {
                    "image": rel,
                    "prompt": spec.text,
                    "score": f"{cfg.raters.mos(true, biases, rng):.4f}",
                    "alignment": f"{true:.6f}",
                    "perturbation": kind,
                    "n_facts": n_facts,
                    "scene": scene.to_json(),
                }
            )
    return rows, split_of


def _csv_text(rows: list[dict]) -> str:
    """The CSV text of ``rows``: header :data:`COLUMNS`, CRLF line ends (the csv module's)."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _write_tables(out: Path, cfg: ShapesDatasetConfig, rows, split_of) -> dict:
    """Write the split CSVs and ``meta.json`` (the manifest) into ``out``; returns the summary."""
    for s in SPLITS:
        atomic_write_text(out / f"{s}.csv", _csv_text(rows[s]))
    summary = {
        "rows": {s: len(rows[s]) for s in SPLITS},
        "prompts": {s: split_of.count(s) for s in SPLITS},
    }
    meta = {
        "format": FORMAT,
        "config": dataclasses.asdict(cfg),
        "style": dataclasses.asdict(STYLE_FAMILIES[cfg.style]),
        "palette": PALETTE,
        "columns": list(COLUMNS),
        **summary,
    }
    atomic_write_json(out / MANIFEST, meta)
    return summary


def _unexpected_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that :func:`build_dataset` does not write (relative paths)."""
    known = {f"{s}.csv" for s in SPLITS} | {MANIFEST, "images"}
    odd = [p.name for p in folder.iterdir() if p.name not in known]
    images = folder / "images"
    if images.is_symlink() or (images.exists() and not images.is_dir()):
        return odd + ["images"]
    if images.is_dir():
        for sub in images.iterdir():
            if sub.name not in SPLITS or sub.is_symlink() or not sub.is_dir():
                odd.append(f"images/{sub.name}")
                continue
            odd += [
                f"images/{sub.name}/{f.name}"
                for f in sub.iterdir()
                if f.suffix != ".png" or f.is_symlink() or not f.is_file()
            ]
    return sorted(odd)


def is_shapes_dataset(folder: str | Path) -> bool:
    """Whether ``folder`` holds a manifest (``meta.json``) written by :func:`build_dataset`."""
    try:
        meta = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_replaceable(out: Path) -> None:
    """Raise unless ``out`` may be deleted to make room for a new dataset: it must be an empty
    folder, or a folder that :func:`build_dataset` wrote and that holds nothing else."""
    if not out.is_dir() or out.is_symlink():
        raise ValueError(f"--overwrite refuses to replace {out}: it is not a folder")
    if not any(out.iterdir()):
        return
    if not is_shapes_dataset(out):
        raise ValueError(
            f"--overwrite refuses to delete {out}: it was not written by shapes-data (no "
            f"{MANIFEST} with format {FORMAT!r}). Choose a new --out, or delete the folder "
            "yourself if you are sure"
        )
    odd = _unexpected_entries(out)
    if odd:
        shown = ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
        raise ValueError(
            f"--overwrite refuses to delete {out}: besides a shapes dataset it holds {shown}. "
            "Move those files out, or choose a new --out"
        )


def build_dataset(
    out_dir: str | Path, config: ShapesDatasetConfig | None = None, overwrite: bool = False
) -> dict:
    """Write the dataset to ``out_dir``, which must not exist or be an empty folder; with
    ``overwrite``, it may also be a dataset this function wrote (see :func:`check_replaceable`).

    The dataset is built in a temporary sibling folder and swapped in when complete
    (:func:`hyperalign.common.replace_dir`), so ``out_dir`` never holds half a dataset.
    Returns a summary dict: ``{"csv": {split: path}, "rows": {split: n}, "prompts": {split:
    n}}``.
    """
    cfg = config or ShapesDatasetConfig()
    out = Path(out_dir).absolute()
    if out.exists() or out.is_symlink():
        if overwrite:
            check_replaceable(out)
        elif not out.is_dir() or any(out.iterdir()):
            raise FileExistsError(
                f"{out} already exists and is not empty; choose a new --out (or --overwrite "
                "to replace a dataset that shapes-data wrote)"
            )
    tmp = make_tmp_dir(out)
    try:
        tmp.chmod(0o755)  # a temporary folder is private; the dataset is a normal folder
        rows, split_of = _write_images(tmp, cfg)
        summary = _write_tables(tmp, cfg, rows, split_of)
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return {"csv": {s: str(out / f"{s}.csv") for s in SPLITS}, **summary}


def load_split(csv_path: str | Path) -> list[ShapesRow]:
    """Read a split CSV written by :func:`build_dataset` (image paths made absolute)."""
    path = Path(csv_path)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing columns {missing}; expected {list(COLUMNS)}")
        return [
            ShapesRow(
                image=(path.parent / r["image"]).resolve(),
                prompt=r["prompt"],
                score=float(r["score"]),
                alignment=float(r["alignment"]),
                perturbation=r["perturbation"],
                n_facts=int(r["n_facts"]),
                scene=Scene.from_json(r["scene"]),
            )
            for r in reader
        ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CLI options of the dataset builder."""
    d = ShapesDatasetConfig()
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n-prompts", type=int, default=d.n_prompts, help="distinct prompts")
    parser.add_argument("--seed", type=int, default=d.seed, help="master seed")
    parser.add_argument("--image-size", type=int, default=d.image_size, help="pixels per side")
    parser.add_argument(
        "--splits",
        type=float,
        nargs=3,
        default=d.split_fractions,
        metavar=("TRAIN", "VAL", "TEST"),
        help="fractions of prompts per split",
    )
    parser.add_argument(
        "--faithful-per-prompt",
        type=int,
        default=d.faithful_per_prompt,
        help="faithful scenes per prompt",
    )
    parser.add_argument(
        "--n-double", type=int, default=d.n_double, help="double-perturbation scenes per prompt"
    )
    parser.add_argument(
        "--style",
        choices=tuple(STYLE_FAMILIES),
        default=d.style,
        help="rendering style family (default: the plain rendering; train: randomised styles "
        "for training data; heldout: styles never used in training)",
    )
    parser.add_argument(
        "--truth",
        choices=TRUTH_MODELS,
        default=d.truth,
        help="truth model of the alignment and the MOS (closed: the prompt describes the whole "
        "scene; open: facts are what the prompt states)",
    )
    parser.add_argument(
        "--unmentioned-weight",
        type=float,
        default=d.unmentioned_weight,
        help="open world: facts each object beyond those the prompt describes costs (0 = ignored)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out if it holds a dataset that shapes-data wrote (and nothing else)",
    )


def run(args: argparse.Namespace) -> int:
    """Build the dataset described by parsed ``args``; prints a one-line summary."""
    cfg = ShapesDatasetConfig(
        n_prompts=args.n_prompts,
        seed=args.seed,
        image_size=args.image_size,
        split_fractions=tuple(args.splits),
        faithful_per_prompt=args.faithful_per_prompt,
        n_double=args.n_double,
        style=args.style,
        truth=args.truth,
        unmentioned_weight=args.unmentioned_weight,
    )
    summary = build_dataset(args.out, cfg, overwrite=args.overwrite)
    print(f"wrote {args.out}: rows {summary['rows']}, prompts {summary['prompts']}")
    return 0


__all__ = [
    "COLUMNS",
    "FORMAT",
    "MANIFEST",
    "SPLITS",
    "ShapesDatasetConfig",
    "ShapesRow",
    "build_dataset",
    "check_replaceable",
    "is_shapes_dataset",
    "load_split",
    "sample_prompts",
    "split_prompts",
]
