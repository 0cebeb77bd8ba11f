"""Images generated elsewhere, as records for ``hyperalign eval-checkpoints --images``.

Two sources:

- a CSV with columns ``image,prompt`` and optional ``category``, ``checkpoint`` and ``seed``
  (image paths relative to the CSV; UTF-8, with or without a byte-order mark);
- a folder of images, each with a same-named ``.txt`` holding its prompt (one checkpoint,
  ``"images"``).

Pairing. Paired differences compare two checkpoints on images that share a prompt and a seed
(the same initial noise). With a ``seed`` column every row needs an integer seed, and two
rows of one checkpoint with the same prompt and seed are refused (they could not be told
apart). Without a ``seed`` column an image's seed is unknown (``None``): checkpoints are then
paired by prompt only when each has at most one image per prompt; otherwise the report gives
means and intervals but no paired difference, and says to add a ``seed`` column (pairing
several unseeded images of a prompt would match arbitrary images).

A row that repeats an image of the same checkpoint is refused rather than counted twice.
"""

from __future__ import annotations

from pathlib import Path

from hyperalign.common import IMAGE_SUFFIXES

from .prompt_sets import read_csv_rows, read_text_file

__all__ = ["records_from_images"]


def _seed(value: str | None, source: Path, line: int) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(
            f"{source} line {line}: seed {value!r} is not an integer (every row needs the "
            "integer noise seed of its image when the CSV has a 'seed' column)"
        ) from None


def _records_from_csv(source: Path) -> tuple[list[dict], list[str]]:
    """Records of a CSV and, for each, where it came from (``"line N"``)."""
    fields, rows = read_csv_rows(source)
    col = {k.strip().lower(): k for k in fields if k is not None}
    missing = {"image", "prompt"} - set(col)
    if missing:
        raise ValueError(
            f"{source} needs columns image,prompt; missing {sorted(missing)} (it has {fields})"
        )

    def get(row: dict, name: str) -> str | None:
        return row.get(col[name]) if name in col else None

    recs, where = [], []
    for line, row in enumerate(rows, start=2):
        image, prompt = get(row, "image"), get(row, "prompt")
        if not image or prompt is None:
            raise ValueError(f"{source} line {line}: empty image or prompt")
        path = Path(image.strip())
        recs.append(
            {
                "checkpoint": get(row, "checkpoint") or "images",
                "prompt": prompt,
                "category": get(row, "category") or "all",
                "seed": _seed(get(row, "seed"), source, line) if "seed" in col else None,
                "image": str(path if path.is_absolute() else source.parent / path),
            }
        )
        where.append(f"line {line}")
    return recs, where


def _records_from_folder(source: Path) -> tuple[list[dict], list[str]]:
    recs = []
    for img in sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            raise FileNotFoundError(f"{img} has no prompt file {txt.name} beside it")
        prompt = read_text_file(txt).strip()
        recs.append(
            {
                "checkpoint": "images",
                "prompt": prompt,
                "category": "all",
                "seed": None,
                "image": str(img),
            }
        )
    return recs, [Path(r["image"]).name for r in recs]


def _check_duplicates(recs: list[dict], where: list[str], source: Path) -> None:
    """Refuse an image listed twice for one checkpoint, and two images of one checkpoint with
    the same prompt and seed."""
    seen_image: dict[tuple, str] = {}
    seen_key: dict[tuple, str] = {}
    for rec, at in zip(recs, where):
        ck = rec["checkpoint"]
        image = (ck, str(Path(rec["image"]).resolve()))
        if image in seen_image:
            raise ValueError(
                f"{source} {at} repeats the image of {seen_image[image]} ({rec['image']}, "
                f"checkpoint {ck!r}); it would be counted twice: remove the duplicate row"
            )
        seen_image[image] = at
        if rec["seed"] is None:
            continue
        key = (ck, rec["prompt"], rec["seed"])
        if key in seen_key:
            raise ValueError(
                f"{source} {at} and {seen_key[key]} give checkpoint {ck!r} two images for the "
                f"prompt {rec['prompt']!r} and seed {rec['seed']}; images of one checkpoint "
                "need distinct (prompt, seed) pairs to be paired with other checkpoints"
            )
        seen_key[key] = at


def records_from_images(source: str | Path) -> list[dict]:
    """Records (checkpoint, prompt, category, seed, image, prompt_index) from a CSV or a
    folder (see the module docstring); ``prompt_index`` numbers the distinct prompts."""
    source = Path(source)
    if source.is_file():
        recs, where = _records_from_csv(source)
    elif source.is_dir():
        recs, where = _records_from_folder(source)
    else:
        raise FileNotFoundError(f"--images {source}: no such CSV file or folder")
    if not recs:
        raise ValueError(f"--images {source}: no images found")
    _check_duplicates(recs, where, source)
    index: dict[str, int] = {}
    for r in recs:  # pair images of different checkpoints by prompt (and seed)
        r["prompt_index"] = index.setdefault(r["prompt"], len(index))
    return recs
