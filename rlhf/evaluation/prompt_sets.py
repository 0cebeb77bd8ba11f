"""Prompt sets of ``hyperalign eval-checkpoints``: named sets and prompt files.

:func:`load_prompt_set` takes a name of :data:`PROMPT_SETS` or a file: ``.txt`` (one prompt a
line, ``#`` comments) or ``.csv`` / ``.tsv`` with a ``prompt`` (or ``prompts``) column and an
optional ``category`` column. Files are read as UTF-8 (a byte-order mark, as spreadsheet
programs write it, is accepted).
"""

from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hyperalign.common import shared_data_dir
from shapes.assets import HELDOUT_PROMPTS

__all__ = ["PROMPT_SETS", "PromptItem", "load_prompt_set", "read_csv_rows", "read_text_file"]


@dataclass(frozen=True)
class PromptItem:
    """One prompt and the category its scores are grouped under."""

    prompt: str
    category: str = "all"


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path`` (a leading byte-order mark dropped); a file in another
    encoding raises ``ValueError`` naming it."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err}); save it as UTF-8 (e.g. 'CSV UTF-8' in a "
            "spreadsheet program)"
        ) from err


def read_csv_rows(path: Path, delimiter: str = ",") -> tuple[list[str], list[dict]]:
    """``(column names, rows)`` of a UTF-8 CSV/TSV file (see :func:`read_text_file`)."""
    reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""), delimiter=delimiter)
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def _animals(limit: int | None, seed: int) -> list[PromptItem]:
    from rlhf.prompts import SIMPLE_ANIMALS

    return [PromptItem(f"a photo of a {a}", "animals") for a in SIMPLE_ANIMALS]


def _parti(limit: int | None, seed: int) -> list[PromptItem]:
    path = shared_data_dir() / "prompts" / "PartiPrompts.tsv"
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

    if HELDOUT_PROMPTS.is_file():
        texts = json.loads(HELDOUT_PROMPTS.read_text())
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
"""name -> (loader(limit, seed), description)."""


def _read_table(path: Path) -> list[PromptItem]:
    fields, rows = read_csv_rows(path, "\t" if path.suffix == ".tsv" else ",")
    if not rows:
        raise ValueError(f"prompt file {path} is empty")
    keys = {k.lower().strip(): k for k in fields}
    pkey = keys.get("prompt") or keys.get("prompts")
    if pkey is None:
        raise ValueError(f"prompt file {path} needs a 'prompt' column; it has {fields}")
    ckey = keys.get("category")
    return [
        PromptItem((r[pkey] or "").strip(), (r[ckey] or "all").strip() if ckey else "all")
        for r in rows
    ]


def _read_lines(path: Path) -> list[PromptItem]:
    lines = [ln.strip() for ln in read_text_file(path).splitlines()]
    return [PromptItem(ln) for ln in lines if ln and not ln.startswith("#")]


def load_prompt_set(spec: str, limit: int | None = None, seed: int = 0) -> list[PromptItem]:
    """A named prompt set, or a file: ``.txt`` (one per line) or ``.csv``/``.tsv`` with
    ``prompt`` and optional ``category`` columns. ``limit`` keeps a seeded random subset."""
    path = Path(spec)
    if spec in PROMPT_SETS:
        items = PROMPT_SETS[spec][0](limit, seed)
    elif path.is_file():
        items = _read_table(path) if path.suffix in (".csv", ".tsv") else _read_lines(path)
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
