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
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from shapes.perturb import RaterModel, faithful_scene, perturbed_scenes
from shapes.prompts import PromptSampler, PromptSpec, alignment, sample_prompt
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

    def __post_init__(self) -> None:
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


def build_dataset(out_dir: str | Path, config: ShapesDatasetConfig | None = None) -> dict:
    """Write the dataset to ``out_dir`` (created; must not hold a previous dataset's CSVs).

    Returns a summary dict: ``{"csv": {split: path}, "rows": {split: n}, "prompts": {split: n}}``.
    """
    cfg = config or ShapesDatasetConfig()
    out = Path(out_dir)
    if any((out / f"{s}.csv").exists() for s in SPLITS):
        raise FileExistsError(f"{out} already holds a dataset; choose a new --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    render_cfg = RenderConfig(image_size=cfg.image_size, supersample=cfg.supersample)
    specs = sample_prompts(cfg.n_prompts, cfg.seed, cfg.prompts)
    split_of = split_prompts(len(specs), cfg.split_fractions, cfg.seed)
    biases = cfg.raters.biases(cfg.seed)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for s in SPLITS:
        (out / "images" / s).mkdir(parents=True, exist_ok=True)

    for i, spec in enumerate(specs):
        rng = np.random.default_rng([cfg.seed, 3, i])
        faithful = [faithful_scene(spec, rng, cfg.world) for _ in range(cfg.faithful_per_prompt)]
        variants = [("faithful", sc) for sc in faithful]
        variants += [
            (p.kind, p.scene)
            for p in perturbed_scenes(spec, faithful[0], rng, cfg.world, cfg.n_double)
        ]
        split = split_of[i]
        n_facts = len(spec.facts())
        for j, (kind, scene) in enumerate(variants):
            rel = f"images/{split}/{i:05d}_{j:02d}.png"
            Image.fromarray(render(scene, render_cfg)).save(out / rel)
            true = alignment(spec, scene.objects)
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

    csv_paths = {}
    for s in SPLITS:
        csv_paths[s] = out / f"{s}.csv"
        _write_csv_atomic(csv_paths[s], rows[s])
    summary = {
        "csv": {s: str(p) for s, p in csv_paths.items()},
        "rows": {s: len(rows[s]) for s in SPLITS},
        "prompts": {s: split_of.count(s) for s in SPLITS},
    }
    meta = {
        "config": dataclasses.asdict(cfg),
        "palette": PALETTE,
        "columns": list(COLUMNS),
        **{k: v for k, v in summary.items() if k != "csv"},
    }
    _write_text_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return summary


def _write_csv_atomic(path: Path, rows: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".csv.tmp")
    with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


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
    parser.add_argument("--overwrite", action="store_true", help="delete --out first")


def run(args: argparse.Namespace) -> int:
    """Build the dataset described by parsed ``args``; prints a one-line summary."""
    cfg = ShapesDatasetConfig(
        n_prompts=args.n_prompts,
        seed=args.seed,
        image_size=args.image_size,
        split_fractions=tuple(args.splits),
        faithful_per_prompt=args.faithful_per_prompt,
        n_double=args.n_double,
    )
    if args.overwrite and Path(args.out).exists():
        shutil.rmtree(args.out)
    summary = build_dataset(args.out, cfg)
    print(f"wrote {args.out}: rows {summary['rows']}, prompts {summary['prompts']}")
    return 0


__all__ = [
    "COLUMNS",
    "SPLITS",
    "ShapesDatasetConfig",
    "ShapesRow",
    "build_dataset",
    "load_split",
    "sample_prompts",
    "split_prompts",
]
