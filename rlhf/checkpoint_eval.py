"""Offline evaluation of generator checkpoints: ``hyperalign eval-checkpoints``.

Generate images for a prompt set with a diffusers pipeline and zero or more LoRA checkpoints
(fixed seeds, so every checkpoint sees the same noise), or take images generated elsewhere
(a folder or a CSV of ``image,prompt``), score them with HyperAlign and any critics, and write
a report: per-checkpoint means with bootstrap 95 % intervals (overall and per category), paired
differences against the first checkpoint on matching (prompt, seed) pairs, image grids,
``report.md`` and per-image ``scores.csv`` / ``scores.json``.

Generated images are cached under ``OUT/images/<checkpoint>/`` with a manifest of the settings
that made them; re-scoring with another reward reuses them. Under ``accelerate launch`` the
jobs are split across processes and gathered into one report.

Examples::

    hyperalign eval-checkpoints --pipeline runwayml/stable-diffusion-v1-5 \\
        --lora runs/sd15/lora --prompts animals --images-per-prompt 4 --out runs/eval
    hyperalign eval-checkpoints --images generated.csv --reward shapes --out runs/eval-ext
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import random
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from shapes.assets import HELDOUT_PROMPTS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# ------------------------------------------------------------------------------ prompts
@dataclass(frozen=True)
class PromptItem:
    prompt: str
    category: str = "all"


def _shared_data() -> Path:
    default = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    return Path(os.environ.get("HYPERALIGN_SHARED_DATA", default))


def _animals(limit: int | None, seed: int) -> list[PromptItem]:
    from .prompts import SIMPLE_ANIMALS

    return [PromptItem(f"a photo of a {a}", "animals") for a in SIMPLE_ANIMALS]


def _parti(limit: int | None, seed: int) -> list[PromptItem]:
    path = _shared_data() / "prompts" / "PartiPrompts.tsv"
    if not path.is_file():
        raise FileNotFoundError(
            f"PartiPrompts.tsv not found at {path}; download it from google-research/parti "
            "(PartiPrompts.tsv) and pass its path with --prompts /path/PartiPrompts.tsv"
        )
    return _read_table(path)


def _drawbench(limit: int | None, seed: int) -> list[PromptItem]:
    raise FileNotFoundError(
        "DrawBench prompts are not bundled; save them as a CSV with columns 'prompt' and "
        "'category' (Imagen's DrawBench sheet has 'Prompts' and 'Category') and pass "
        "--prompts /path/drawbench.csv"
    )


def _shapes(limit: int | None, seed: int) -> list[PromptItem]:
    """The shipped shapes pipeline's held-out prompts (never used to train it), else a
    seeded sample of the grammar."""
    from shapes.prompts import parse_prompt, sample_prompt

    held = HELDOUT_PROMPTS
    if held.is_file():
        texts = json.loads(held.read_text())
        return [PromptItem(t, _shapes_category(parse_prompt(t))) for t in texts]
    rng = np.random.default_rng(10_000 + seed)
    items, seen = [], set()
    while len(items) < (limit or 32):
        spec = sample_prompt(rng)
        if spec.text not in seen:
            seen.add(spec.text)
            items.append(PromptItem(spec.text, _shapes_category(spec)))
    return items


def _shapes_category(spec) -> str:
    if spec.relation is not None:
        return "relation"
    if any(e.count > 1 for e in spec.entities):
        return "count"
    return "single" if len(spec.entities) == 1 else "multi"


PROMPT_SETS = {
    "animals": (_animals, "DDPO's 45 animals as 'a photo of a {animal}'"),
    "parti": (_parti, "PartiPrompts (1,632 prompts, with categories)"),
    "drawbench": (_drawbench, "DrawBench (bring the CSV: --prompts file.csv)"),
    "shapes": (_shapes, "shapes-world prompts held out from the shipped pipeline"),
}


def _read_table(path: Path) -> list[PromptItem]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    if not rows:
        raise ValueError(f"prompt file {path} is empty")
    keys = {k.lower(): k for k in rows[0]}
    pkey = keys.get("prompt") or keys.get("prompts")
    if pkey is None:
        raise ValueError(f"prompt file {path} needs a 'prompt' column; it has {list(rows[0])}")
    ckey = keys.get("category")
    return [
        PromptItem(r[pkey].strip(), (r[ckey] or "all").strip() if ckey else "all") for r in rows
    ]


def load_prompt_set(spec: str, limit: int | None = None, seed: int = 0) -> list[PromptItem]:
    """A named prompt set, or a file: ``.txt`` (one per line) or ``.csv``/``.tsv`` with
    ``prompt`` and optional ``category`` columns. ``limit`` keeps a seeded random subset."""
    path = Path(spec)
    if spec in PROMPT_SETS:
        items = PROMPT_SETS[spec][0](limit, seed)
    elif path.is_file():
        if path.suffix in (".csv", ".tsv"):
            items = _read_table(path)
        else:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            items = [PromptItem(ln) for ln in lines if ln and not ln.startswith("#")]
    else:
        valid = ", ".join(f"{k} ({v[1]})" for k, v in PROMPT_SETS.items())
        raise ValueError(f"unknown prompt set {spec!r}: not a file; valid names: {valid}")
    items = [it for it in items if it.prompt]
    if not items:
        raise ValueError(f"prompt set {spec!r} holds no prompts")
    if limit is not None and len(items) > limit:
        rng = random.Random(seed)
        items = [items[i] for i in sorted(rng.sample(range(len(items)), limit))]
    return items


# -------------------------------------------------------------------------------- LoRA
# "unet.<module path>.<lora_A|lora_B|lora.down|lora.up>[.default].weight" (PEFT or diffusers).
_LORA_KEY = re.compile(r"^unet\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)(?:\.[\w-]+)?\.weight$")


def check_lora_fits(pipe, lora_path: str | Path) -> Path:
    """The LoRA weights file of ``lora_path``, after checking every key against the UNet.

    Raises ``ValueError`` naming the file and the keys whose module is missing or whose shape
    does not match (diffusers would otherwise skip them with a warning)."""
    from safetensors import safe_open

    path = Path(lora_path)
    file = path if path.is_file() else next(iter(sorted(path.glob("*.safetensors"))), None)
    if file is None:
        raise FileNotFoundError(f"no LoRA .safetensors file at {path}")
    modules = dict(pipe.unet.named_modules())
    bad = []
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            m = _LORA_KEY.match(key)
            if not key.startswith("unet.") or m is None:
                continue  # text-encoder LoRA and alphas are left to diffusers
            stem, kind = m.group(1), m.group(2)
            module = modules.get(stem)
            base = getattr(module, "base_layer", module)
            if not isinstance(base, torch.nn.Linear):
                bad.append(f"{key} (no Linear {stem!r} in the UNet)")
                continue
            shape = tuple(f.get_slice(key).get_shape())
            if kind in ("lora_A", "lora.down") and shape[1] != base.in_features:
                bad.append(f"{key} {shape} vs in_features {base.in_features}")
            if kind in ("lora_B", "lora.up") and shape[0] != base.out_features:
                bad.append(f"{key} {shape} vs out_features {base.out_features}")
    if bad:
        raise ValueError(
            f"LoRA {file} does not fit this pipeline's UNet; mismatched keys: {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''}"
        )
    return file


def _fingerprint(path: Path | None) -> str:
    if path is None:
        return "none"
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()


def _checkpoint_names(loras: Sequence[str], with_base: bool) -> list[tuple[str, str | None]]:
    names = [("base", None)] if with_base else []
    used = {"base"}
    for lora in loras:
        p = Path(lora).resolve()
        name = p.name if p.is_dir() else p.stem
        if name in ("lora", "pytorch_lora_weights"):  # a run's lora/ or checkpoint_N/lora/
            name = (p if p.is_dir() else p.parent).parent.name
        if name in used:
            name = f"{p.parent.name}-{name}"
        used.add(name)
        names.append((name, lora))
    return names


# --------------------------------------------------------------------------- generation
@dataclass
class GenSettings:
    steps: int = 50
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None


def image_seed(base_seed: int, prompt_index: int, k: int) -> int:
    """The noise seed of image ``k`` of prompt ``prompt_index``: the same for every checkpoint."""
    return (base_seed * 1_000_003 + prompt_index * 1_009 + k) % (2**63 - 1)


def generate_checkpoint(
    pipe,
    jobs: list[dict],
    settings: GenSettings,
    batch_size: int,
    show_progress: bool = True,
) -> int:
    """Generate the missing images of ``jobs`` (dicts with prompt, seed, image); returns how
    many were generated (cached PNGs are reused)."""
    from tqdm.auto import tqdm

    todo = [j for j in jobs if not Path(j["image"]).is_file()]
    for start in tqdm(
        range(0, len(todo), batch_size), disable=not show_progress or not todo, desc="generate"
    ):
        chunk = todo[start : start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(j["seed"]) for j in chunk]
        out = pipe(
            prompt=[j["prompt"] for j in chunk],
            negative_prompt=[settings.negative_prompt] * len(chunk)
            if settings.negative_prompt
            else None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            generator=generators,
            output_type="np",
        ).images  # (b, H, W, 3) float in [0, 1]
        for j, img in zip(chunk, out):
            Path(j["image"]).parent.mkdir(parents=True, exist_ok=True)
            _save_png_atomic((np.clip(img, 0, 1) * 255).round().astype(np.uint8), j["image"])
    return len(todo)


def _save_png_atomic(array: np.ndarray, path: str | Path) -> None:
    from PIL import Image

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ scoring
def _load_image(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W)


def score_records(
    records: list[dict],
    scorers: dict[str, object],
    batch_size: int,
    device: torch.device,
    skip_bad: bool = False,
    show_progress: bool = True,
) -> list[dict]:
    """Add ``score_<name>`` to every record; images are read from their PNG/JPEG files.

    An unreadable image raises ``ValueError`` naming the file, unless ``skip_bad`` (then the
    record is dropped with a message on stderr)."""
    from tqdm.auto import tqdm

    from .rewards import check_reward_output

    kept = []
    for start in tqdm(range(0, len(records), batch_size), disable=not show_progress, desc="score"):
        chunk, tensors = [], []
        for rec in records[start : start + batch_size]:
            try:
                tensors.append(_load_image(rec["image"]))
                chunk.append(rec)
            except Exception as err:
                if not skip_bad:
                    raise ValueError(
                        f"cannot read image {rec['image']}: {err} (pass --skip-bad to skip it)"
                    ) from err
                print(f"skipping unreadable image {rec['image']}: {err}", file=sys.stderr)
        if not chunk:
            continue
        by_size = defaultdict(list)  # images of different sizes are scored in separate batches
        for i, t in enumerate(tensors):
            by_size[tuple(t.shape)].append(i)
        for idx in by_size.values():
            images = torch.stack([tensors[i] for i in idx]).to(device)  # (b, 3, H, W)
            prompts = [chunk[i]["prompt"] for i in idx]
            metadata = [{"category": chunk[i]["category"]} for i in idx]
            for name, fn in scorers.items():
                where = f"images {chunk[idx[0]]['image']} ..."
                rewards, _ = check_reward_output(
                    fn(images, prompts, metadata), len(idx), "cpu", name, where
                )
                for i, r in zip(idx, rewards.tolist()):
                    chunk[i][f"score_{name}"] = r
        kept.extend(chunk)
    return kept


def build_scorers(reward: str, critics: Sequence[str], device, dtype) -> dict[str, object]:
    """``{name: reward_fn}``: HyperAlign (``reward``: preset, directory or hub id) and critics
    (specs of ``rlhf.rewards.get_reward``, plus ``oracle`` for the shapes world)."""
    from reward import build_reward

    from .rewards import get_reward

    scorers = {"hyperalign": build_reward(reward, device=device, dtype=dtype)}
    for spec in critics:
        if spec == "oracle":
            from shapes.oracle import ShapesOracleReward

            scorers["oracle"] = ShapesOracleReward()
        else:
            scorers[spec.split(":")[0]] = get_reward(spec, device=device, dtype=dtype)
    return scorers


# ------------------------------------------------------------------------------ statistics
def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap ``level`` interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_differences(
    records: list[dict], base: str, other: str, key: str
) -> tuple[list[float], int]:
    """``other - base`` on records matched by (prompt index, seed); also the match count."""
    base_by = {(r["prompt_index"], r["seed"]): r for r in records if r["checkpoint"] == base}
    diffs = []
    for r in records:
        if r["checkpoint"] != other:
            continue
        b = base_by.get((r["prompt_index"], r["seed"]))
        if b is not None and key in r and key in b:
            diffs.append(r[key] - b[key])
    return diffs, len(diffs)


# ------------------------------------------------------------------------------- report
@dataclass
class Summary:
    checkpoints: list[str]
    scorers: list[str]
    overall: dict = field(default_factory=dict)  # ckpt -> scorer -> (mean, lo, hi, n)
    by_category: dict = field(default_factory=dict)  # ckpt -> category -> scorer -> (...)
    paired: dict = field(default_factory=dict)  # ckpt -> scorer -> (mean, lo, hi, n)
    correlation: dict = field(default_factory=dict)  # ckpt -> (pearson, spearman) reward/oracle


def summarize(records: list[dict], checkpoints: list[str], scorers: list[str]) -> Summary:
    from scipy import stats

    s = Summary(checkpoints, scorers)
    for ck in checkpoints:
        recs = [r for r in records if r["checkpoint"] == ck]
        s.overall[ck] = {}
        for name in scorers:
            vals = [r[f"score_{name}"] for r in recs if f"score_{name}" in r]
            s.overall[ck][name] = (*bootstrap_ci(vals), len(vals))
        cats = defaultdict(list)
        for r in recs:
            cats[r["category"]].append(r)
        s.by_category[ck] = {
            cat: {
                name: (*bootstrap_ci([r[f"score_{name}"] for r in rs]), len(rs)) for name in scorers
            }
            for cat, rs in sorted(cats.items())
        }
        if ck != checkpoints[0]:
            s.paired[ck] = {}
            for name in scorers:
                diffs, n = paired_differences(records, checkpoints[0], ck, f"score_{name}")
                s.paired[ck][name] = (*bootstrap_ci(diffs), n)
        if "oracle" in scorers and "hyperalign" in scorers and len(recs) > 2:
            a = np.array([r["score_hyperalign"] for r in recs])
            b = np.array([r["score_oracle"] for r in recs])
            if a.std() > 0 and b.std() > 0:
                s.correlation[ck] = (
                    float(stats.pearsonr(a, b)[0]),
                    float(stats.spearmanr(a, b)[0]),
                )
    return s


def _fmt(t) -> str:
    mean, lo, hi, n = t
    return f"{mean:.4f} [{lo:.4f}, {hi:.4f}] (n={n})"


def render_report(summary: Summary, settings: dict) -> str:
    lines = ["# Checkpoint evaluation", "", "Settings:", "", "```json"]
    lines += [json.dumps(settings, indent=2, default=str), "```", ""]
    head = "| checkpoint | " + " | ".join(summary.scorers) + " |"
    lines += ["## Mean score with bootstrap 95 % interval", "", head]
    lines.append("|---" * (len(summary.scorers) + 1) + "|")
    for ck in summary.checkpoints:
        lines.append(
            f"| {ck} | " + " | ".join(_fmt(summary.overall[ck][n]) for n in summary.scorers) + " |"
        )
    if summary.paired:
        base = summary.checkpoints[0]
        lines += ["", f"## Paired difference vs `{base}` (same prompt and seed)", "", head]
        lines.append("|---" * (len(summary.scorers) + 1) + "|")
        for ck, row in summary.paired.items():
            lines.append(f"| {ck} | " + " | ".join(_fmt(row[n]) for n in summary.scorers) + " |")
    if summary.correlation:
        lines += ["", "## Reward vs oracle (reward-hacking check)", ""]
        lines += ["| checkpoint | Pearson | Spearman |", "|---|---|---|"]
        for ck, (p, s) in summary.correlation.items():
            lines.append(f"| {ck} | {p:.3f} | {s:.3f} |")
    lines += ["", "## Per category", ""]
    for ck in summary.checkpoints:
        lines += [f"### {ck}", "", "| category | " + " | ".join(summary.scorers) + " |"]
        lines.append("|---" * (len(summary.scorers) + 1) + "|")
        for cat, row in summary.by_category[ck].items():
            lines.append(f"| {cat} | " + " | ".join(_fmt(row[n]) for n in summary.scorers) + " |")
        lines.append("")
    lines += ["## Grids", ""]
    for ck in summary.checkpoints:
        lines.append(f"- `grid_best_worst_{ck}.png`: best (top) and worst (bottom) prompts")
    lines.append("- `grid_across_checkpoints.png`: the same prompts and seeds across checkpoints")
    return "\n".join(lines) + "\n"


def _grid(cells: list[list[tuple[str | None, str]]], path: Path) -> None:
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
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def write_grids(records: list[dict], checkpoints: list[str], out: Path, key: str, n: int = 4):
    short = lambda s: s if len(s) <= 40 else s[:37] + "..."  # noqa: E731
    for ck in checkpoints:
        by_prompt = defaultdict(list)
        for r in records:
            if r["checkpoint"] == ck and key in r:
                by_prompt[r["prompt_index"]].append(r)
        ranked = sorted(by_prompt.values(), key=lambda rs: np.mean([r[key] for r in rs]))
        if not ranked:
            continue
        best, worst = ranked[::-1][:n], ranked[:n]
        cells = [
            [(rs[0]["image"], f"{short(rs[0]['prompt'])}\n{rs[0][key]:.3f}") for rs in group]
            for group in (best, worst)
        ]
        _grid(cells, out / f"grid_best_worst_{ck}.png")
    first = {}
    for r in records:
        first.setdefault((r["prompt_index"], r["seed"]), {})[r["checkpoint"]] = r
    keys = sorted(first)[:n]
    if keys:
        cells = []
        for k in keys:
            row = []
            for ck in checkpoints:
                r = first[k].get(ck)
                label = f"{ck}: {short(r['prompt'])}\n{r.get(key, math.nan):.3f}" if r else ck
                row.append((r["image"] if r else None, label))
            cells.append(row)
        _grid(cells, out / "grid_across_checkpoints.png")


def write_outputs(records, summary: Summary, settings: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = ["checkpoint", "prompt_index", "prompt", "category", "seed", "image"]
    fields += [f"score_{n}" for n in summary.scorers]
    tmp = out / ".scores.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, out / "scores.csv")
    payload = {"settings": settings, "summary": asdict(summary), "records": records}
    (out / ".scores.json.tmp").write_text(json.dumps(payload, indent=1, default=str))
    os.replace(out / ".scores.json.tmp", out / "scores.json")
    write_grids(records, summary.checkpoints, out, f"score_{summary.scorers[0]}")
    (out / ".report.md.tmp").write_text(render_report(summary, settings))
    os.replace(out / ".report.md.tmp", out / "report.md")


# -------------------------------------------------------------------- external images
def records_from_images(source: str | Path) -> list[dict]:
    """Records from a CSV (``image,prompt[,category][,checkpoint][,seed]``; paths relative to
    the CSV) or a folder of images, each with a same-named ``.txt`` holding its prompt."""
    source = Path(source)
    recs = []
    if source.is_file():
        with source.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"image", "prompt"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{source} needs columns image,prompt; missing {sorted(missing)}")
            for line, row in enumerate(reader, start=2):
                if not row["image"] or row["prompt"] is None:
                    raise ValueError(f"{source} line {line}: empty image or prompt")
                image = Path(row["image"])
                image = image if image.is_absolute() else source.parent / image
                recs.append(
                    {
                        "checkpoint": row.get("checkpoint") or "images",
                        "prompt": row["prompt"],
                        "category": row.get("category") or "all",
                        "seed": int(row.get("seed") or 0),
                        "image": str(image),
                    }
                )
    elif source.is_dir():
        for img in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            txt = img.with_suffix(".txt")
            if not txt.is_file():
                raise FileNotFoundError(f"{img} has no prompt file {txt.name} beside it")
            recs.append(
                {
                    "checkpoint": "images",
                    "prompt": txt.read_text(encoding="utf-8").strip(),
                    "category": "all",
                    "seed": 0,
                    "image": str(img),
                }
            )
    else:
        raise FileNotFoundError(f"--images {source}: no such CSV file or folder")
    if not recs:
        raise ValueError(f"--images {source}: no images found")
    index = {}
    for r in recs:  # pair images of different checkpoints by prompt (and seed)
        r["prompt_index"] = index.setdefault(r["prompt"], len(index))
    return recs


# ---------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("what to evaluate (--pipeline or --images)")
    src.add_argument("--pipeline", help="diffusers pipeline: hub id or local directory")
    src.add_argument(
        "--lora",
        action="append",
        default=[],
        help="LoRA checkpoint (directory or .safetensors) to compare; repeat for several",
    )
    src.add_argument(
        "--no-base", action="store_true", help="do not evaluate the pipeline without LoRA"
    )
    src.add_argument("--images", help="score existing images: a CSV image,prompt or a folder")
    gen = parser.add_argument_group("generation")
    gen.add_argument(
        "--prompts",
        default="animals",
        help=f"prompt set ({', '.join(PROMPT_SETS)}) or a .txt/.csv/.tsv file (default: %(default)s)",
    )
    gen.add_argument("--limit", type=int, help="keep a seeded random subset of this many prompts")
    gen.add_argument("--images-per-prompt", type=int, default=2)
    gen.add_argument("--seed", type=int, default=0, help="base seed of the image noise")
    gen.add_argument("--steps", type=int, default=50, help="sampling steps")
    gen.add_argument("--guidance-scale", type=float, default=5.0)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--negative-prompt")
    gen.add_argument(
        "--batch-size", type=int, default=8, help="images per generation/scoring batch"
    )
    sc = parser.add_argument_group("scoring")
    sc.add_argument("--reward", default="shapes", help="HyperAlign preset, checkpoint or hub id")
    sc.add_argument(
        "--critic",
        action="append",
        default=[],
        help="extra scorer: 'oracle' (shapes world), 'brightness', or another rlhf reward spec",
    )
    sc.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images instead of failing"
    )
    parser.add_argument("--out", default="runs/eval", help="output directory")
    parser.add_argument("--device", help="torch device (default: accelerate's)")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    device = torch.device(args.device) if args.device else state.device
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    out = Path(args.out)
    show = state.is_local_main_process
    if (args.pipeline is None) == (args.images is None):
        print(
            "hyperalign eval-checkpoints: give exactly one of --pipeline or --images",
            file=sys.stderr,
        )
        return 2
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}

    if args.images:
        records = records_from_images(args.images)
        checkpoints = list(dict.fromkeys(r["checkpoint"] for r in records))
    else:
        items = load_prompt_set(args.prompts, args.limit, args.seed)
        checkpoints_spec = _checkpoint_names(args.lora, with_base=not args.no_base)
        if not checkpoints_spec:
            print(
                "hyperalign eval-checkpoints: --no-base needs at least one --lora", file=sys.stderr
            )
            return 2
        checkpoints = [name for name, _ in checkpoints_spec]
        pipe = load_pipeline(args.pipeline, device, dtype)
        gen = GenSettings(
            args.steps, args.guidance_scale, args.height, args.width, args.negative_prompt
        )
        records = []
        for name, lora in checkpoints_spec:
            lora_file = check_lora_fits(pipe, lora) if lora else None
            folder = out / "images" / name
            manifest = {
                "pipeline": str(args.pipeline),
                "lora": _fingerprint(lora_file),
                **asdict(gen),
            }
            jobs = [
                {
                    "checkpoint": name,
                    "prompt_index": pi,
                    "prompt": it.prompt,
                    "category": it.category,
                    "seed": image_seed(args.seed, pi, k),
                    "image": str(folder / f"p{pi:05d}_s{image_seed(args.seed, pi, k)}.png"),
                }
                for pi, it in enumerate(items)
                for k in range(args.images_per_prompt)
            ]
            mpath = folder / "manifest.json"
            if state.is_main_process:
                if mpath.is_file() and json.loads(mpath.read_text()) != manifest:
                    for j in jobs:  # settings changed: the cached images are stale
                        Path(j["image"]).unlink(missing_ok=True)
                folder.mkdir(parents=True, exist_ok=True)
                mpath.write_text(json.dumps(manifest, indent=1))
            state.wait_for_everyone()
            if lora_file is not None:
                pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name)
            with state.split_between_processes(jobs) as mine:
                made = generate_checkpoint(pipe, mine, gen, args.batch_size, show)
            if show:
                print(
                    f"{name}: generated {made} images, reused {len(jobs) - made} cached",
                    file=sys.stderr,
                )
            if lora_file is not None:
                pipe.unload_lora_weights()
            records.extend(jobs)
        del pipe
    state.wait_for_everyone()
    scorers = build_scorers(args.reward, args.critic, device, dtype)
    with state.split_between_processes(records) as mine:
        scored = score_records(mine, scorers, args.batch_size, device, args.skip_bad, show)
    scored = gather_object(scored) if state.num_processes > 1 else scored
    if not state.is_main_process:
        return 0
    scored.sort(key=lambda r: (checkpoints.index(r["checkpoint"]), r["prompt_index"], r["seed"]))
    summary = summarize(scored, checkpoints, list(scorers))
    write_outputs(scored, summary, settings, out)
    print(render_summary_table(summary))
    print(f"report: {out / 'report.md'}")
    return 0


def render_summary_table(summary: Summary) -> str:
    rows = [f"{'checkpoint':<16}" + "".join(f"{n:>34}" for n in summary.scorers)]
    for ck in summary.checkpoints:
        cells = "".join(
            f"{summary.overall[ck][n][0]:>10.4f} [{summary.overall[ck][n][1]:.4f},{summary.overall[ck][n][2]:.4f}]".rjust(
                34
            )
            for n in summary.scorers
        )
        rows.append(f"{ck:<16}{cells}")
        if ck in summary.paired:
            cells = "".join(
                f"diff {summary.paired[ck][n][0]:+.4f} [{summary.paired[ck][n][1]:+.4f},{summary.paired[ck][n][2]:+.4f}]".rjust(
                    34
                )
                for n in summary.scorers
            )
            rows.append(f"{'':<16}{cells}")
    return "\n".join(rows)


def load_pipeline(name_or_path: str, device, dtype):
    """A ``StableDiffusionPipeline`` from a hub id or local directory, offline-aware."""
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            name_or_path, torch_dtype=dtype or torch.float32, safety_checker=None
        )
    except Exception as err:
        raise FileNotFoundError(
            f"could not load the diffusers pipeline {name_or_path!r} ({type(err).__name__}: "
            f"{err}); pass a local pipeline directory, or run where the hub is reachable"
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
