"""IQA alignment datasets for HyperAlign: label-file adapters, targets, prompt-grouped splits.

Label formats (``FORMATS``):

- ``agiqa3k-csv``: AGIQA-3K ``data.csv`` (``name,prompt,adj1,adj2,style,mos_quality,
  std_quality,mos_align,std_align``); target ``mos_align``; the ``prompt`` column is the full
  prompt (adjectives and style included).
- ``amff-tsv``: the tab-separated split files of the AMFF-Net release, no header. AIGCIQA2023
  and PKU-I2IQA have 5 fields ``path, quality, authenticity, correspondence, prompt``
  (target ``correspondence``); AGIQA-3K's have 4 ``path, quality, align, prompt`` (target
  ``align``). A directory means its ``train.txt`` and ``test.txt`` together (the files are used
  as label sources; our own splits are made by prompt), or, when it holds numbered split
  folders (``1/``, ``2/``, ...), the first of them.
- ``csv``: a generic CSV with a header holding ``image,prompt,score`` (other columns ignored)
  for a user's own data.

Label files are read as UTF-8 (a byte-order mark, as spreadsheet programs write it, is
skipped); a file in another encoding is an error naming it. Image paths in a label file are
relative to ``--image-root``; a path not found there is also looked up by its file name
directly under the root (a flat image folder).

Targets are min-max normalised per dataset to [0, 1] [ours]; the bounds travel with the
checkpoint (``HyperAlignConfig.target_range``).

Splits are prompt-grouped ("the same prompt appears only in one subset", the paper's
protocol): seeded, test fraction 1/5 for AGIQA-3K and AIGCIQA2023, 1/4 for PKU-I2IQA, and a
validation subset carved from the training prompts. ``canonical`` splits read AMFF-Net's 10
AGIQA-3K split folders (prompt-disjoint); the single AIGCIQA2023 / PKU-I2IQA split files are
split by image and are refused as splits (they stay label sources). A split carries SHA-256
fingerprints of its subsets and of the labels (:meth:`Split.fingerprint`), so that a split
rebuilt later from a label file can be checked to be the one a checkpoint was trained on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

# How many missing image paths an error message lists.
_SHOW_MISSING = 5


class LabelFileError(ValueError):
    """A label file is malformed; the message names the file and line."""


class MissingImagesError(FileNotFoundError):
    """Images named by the labels are not under the image root (count + first few paths)."""


class UnreadableImageError(ValueError):
    """An image file exists but cannot be decoded; the message names the file."""


class EmptySplitError(ValueError):
    """A train / val / test subset came out empty; the message says which and why."""


@dataclass(frozen=True)
class Sample:
    """One labelled prompt-image pair."""

    image: str  # path as written in the label file, relative to the image root
    prompt: str
    mos: float  # raw target on the dataset's own scale
    source: str = ""  # label file it came from (for error messages)
    line: int = 0  # 1-based line in ``source``


@dataclass
class IQADataset:
    """All labelled pairs of one dataset and the range used to normalise its target."""

    name: str
    samples: list[Sample]
    target_range: tuple[float, float] = field(default=(0.0, 1.0))
    """(min, max) of the raw MOS over the whole label set: ``s = (mos - min) / (max - min)``."""

    @classmethod
    def from_samples(cls, name: str, samples: Sequence[Sample]) -> IQADataset:
        samples = list(samples)
        if not samples:
            raise LabelFileError(f"dataset {name!r} has no labelled samples")
        mos = [s.mos for s in samples]
        lo, hi = min(mos), max(mos)
        if not hi > lo:
            raise LabelFileError(
                f"dataset {name!r}: every target equals {lo}; min-max normalisation needs at "
                "least two distinct scores"
            )
        return cls(name, samples, (float(lo), float(hi)))

    @property
    def prompts(self) -> list[str]:
        """Distinct prompts in first-seen order."""
        return list(dict.fromkeys(s.prompt for s in self.samples))

    def normalise(self, mos: float | np.ndarray) -> float | np.ndarray:
        lo, hi = self.target_range
        return (mos - lo) / (hi - lo)

    def denormalise(self, score: float | np.ndarray) -> float | np.ndarray:
        lo, hi = self.target_range
        return score * (hi - lo) + lo

    def fingerprint(self) -> str:
        """SHA-256 of the labels ``(image, prompt, mos)`` regardless of their row order."""
        return _digest(sorted((s.image, s.prompt, repr(float(s.mos))) for s in self.samples))


def _digest(records: Sequence) -> str:
    """SHA-256 (hex) of a list of JSON-able records."""
    text = json.dumps(list(records), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------- readers
def _number(text: str, path: Path, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LabelFileError(
            f"{path}:{line}: column {column!r} is {text!r}, not a number"
        ) from None
    if not math.isfinite(value):
        raise LabelFileError(f"{path}:{line}: column {column!r} is {text!r}, not a finite number")
    return value


def _text(value: str | None, path: Path, line: int, column: str) -> str:
    value = (value or "").strip()
    if not value:
        raise LabelFileError(f"{path}:{line}: column {column!r} is empty")
    return value


def _decode_error(path: Path, err: UnicodeDecodeError) -> LabelFileError:
    bad = err.object[err.start : err.start + 1]
    return LabelFileError(
        f"label file {path} is not UTF-8 text (byte {bad!r} at offset {err.start}; probably "
        "Latin-1 / Windows-1252, as some spreadsheet exports write). Re-save it as UTF-8, e.g. "
        f"iconv -f latin1 -t utf-8 {path} > fixed.csv"
    )


def _read_label_text(path: Path) -> str:
    """The whole label file as text: UTF-8, a leading byte-order mark dropped."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LabelFileError(f"cannot open label file {path}: {err}") from err
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _decode_error(path, err) from None


def _read_header_csv(path: Path, required: dict[str, str]) -> list[Sample]:
    """A CSV with a header; ``required`` maps our role (image/prompt/score) to a column."""
    samples = []
    with io.StringIO(_read_label_text(path), newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in required.values() if c not in header]
        if missing:
            raise LabelFileError(
                f"{path}:1: header {header} lacks column(s) {missing}; this format needs "
                f"{list(required.values())}"
            )
        for row in reader:
            line = reader.line_num
            if None in row or any(row[c] is None for c in required.values()):
                raise LabelFileError(
                    f"{path}:{line}: expected {len(header)} comma-separated fields as in the "
                    f"header, got {len([v for v in row.values() if v is not None])}"
                )
            samples.append(
                Sample(
                    image=_text(row[required["image"]], path, line, required["image"]),
                    prompt=_text(row[required["prompt"]], path, line, required["prompt"]),
                    mos=_number(row[required["score"]], path, line, required["score"]),
                    source=str(path),
                    line=line,
                )
            )
    if not samples:
        raise LabelFileError(f"{path} has a header but no rows")
    return samples


def read_agiqa3k_csv(path: str | os.PathLike) -> list[Sample]:
    """AGIQA-3K ``data.csv``: image ``name``, ``prompt``, target ``mos_align``."""
    return _read_header_csv(Path(path), {"image": "name", "prompt": "prompt", "score": "mos_align"})


def read_generic_csv(path: str | os.PathLike) -> list[Sample]:
    """A user CSV with header columns ``image,prompt,score``."""
    return _read_header_csv(Path(path), {"image": "image", "prompt": "prompt", "score": "score"})


# AMFF-Net split files: number of fields -> column names (target = second to last).
AMFF_COLUMNS = {
    4: ("path", "quality", "align", "prompt"),
    5: ("path", "quality", "authenticity", "correspondence", "prompt"),
}


def read_amff_file(path: str | os.PathLike) -> list[Sample]:
    """One AMFF-Net tab-separated split file (no header; 4 or 5 fields per line)."""
    path = Path(path)
    lines = _read_label_text(path).splitlines()
    samples = []
    n_fields = None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        fields_ = raw.split("\t")
        if n_fields is None:
            if len(fields_) not in AMFF_COLUMNS:
                raise LabelFileError(
                    f"{path}:{number}: expected 4 tab-separated fields (path, quality, align, "
                    "prompt) or 5 (path, quality, authenticity, correspondence, prompt), got "
                    f"{len(fields_)}"
                )
            n_fields = len(fields_)
        if len(fields_) != n_fields:
            raise LabelFileError(
                f"{path}:{number}: expected {n_fields} tab-separated fields "
                f"({', '.join(AMFF_COLUMNS[n_fields])}) like the first line, got {len(fields_)}"
            )
        names = AMFF_COLUMNS[n_fields]
        for name, value in zip(names[1:-1], fields_[1:-1]):
            _number(value, path, number, name)  # every score column must be numeric
        samples.append(
            Sample(
                image=_text(fields_[0], path, number, names[0]),
                prompt=_text(fields_[-1], path, number, names[-1]),
                mos=_number(fields_[-2], path, number, names[-2]),
                source=str(path),
                line=number,
            )
        )
    if not samples:
        raise LabelFileError(f"{path} has no label lines")
    return samples


def _numbered_dirs(path: Path) -> list[Path]:
    dirs = [p for p in path.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(dirs, key=lambda p: int(p.name))


def _amff_split_dir(path: Path) -> Path:
    """The folder holding ``train.txt``/``test.txt``: ``path`` itself or its first numbered one."""
    if (path / "train.txt").is_file() or (path / "test.txt").is_file():
        return path
    numbered = _numbered_dirs(path)
    if numbered:
        return numbered[0]
    raise LabelFileError(
        f"{path} is a directory without train.txt/test.txt or numbered split folders; pass an "
        "AMFF-Net split folder (e.g. amff_splits/AIGCIQA2023/1) or one of its .txt files"
    )


def read_amff(path: str | os.PathLike) -> list[Sample]:
    """An AMFF-Net split file, or a split folder's ``train.txt`` + ``test.txt`` together."""
    path = Path(path)
    if not path.is_dir():
        return read_amff_file(path)
    folder = _amff_split_dir(path)
    files = [folder / n for n in ("train.txt", "test.txt") if (folder / n).is_file()]
    return [s for f in files for s in read_amff_file(f)]


READERS: dict[str, Callable[[str | os.PathLike], list[Sample]]] = {
    "agiqa3k-csv": read_agiqa3k_csv,
    "amff-tsv": read_amff,
    "csv": read_generic_csv,
}
FORMATS = tuple(READERS)


@dataclass(frozen=True)
class DatasetSpec:
    """What the protocol needs to know about a dataset."""

    format: str  # a key of READERS
    test_fraction: float  # share of prompts held out for test (4:1 -> 0.2, 3:1 -> 0.25)
    labels_hint: str  # the label file in the reference data ($HYPERALIGN_SHARED_DATA)


DATASETS: dict[str, DatasetSpec] = {
    "agiqa3k": DatasetSpec("agiqa3k-csv", 0.2, "iqa/agiqa3k/data.csv"),
    "aigciqa2023": DatasetSpec("amff-tsv", 0.2, "iqa/amff_splits/AIGCIQA2023/1"),
    "pku-i2iqa": DatasetSpec("amff-tsv", 0.25, "iqa/amff_splits/PKU-I2IQA/1"),
    "csv": DatasetSpec("csv", 0.2, "a CSV with columns image,prompt,score"),
}


def get_spec(dataset: str) -> DatasetSpec:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[dataset]


def load_dataset(dataset: str, labels: str | os.PathLike, fmt: str | None = None) -> IQADataset:
    """Read a dataset's labels (``fmt`` defaults to the dataset's format).

    An image listed twice is an error naming both lines.
    """
    spec = get_spec(dataset)
    fmt = fmt or spec.format
    if fmt not in READERS:
        raise ValueError(f"unknown label format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if not Path(labels).exists():
        raise LabelFileError(
            f"label file {labels} does not exist (for {dataset}: {spec.labels_hint})"
        )
    samples = READERS[fmt](labels)
    seen: dict[str, Sample] = {}
    for s in samples:
        if s.image in seen:
            first = seen[s.image]
            raise LabelFileError(
                f"{s.source}:{s.line}: image {s.image!r} is already listed at "
                f"{first.source}:{first.line}; each image must appear once"
            )
        seen[s.image] = s
    return IQADataset.from_samples(dataset, samples)


# -------------------------------------------------------------------------------- splits
@dataclass
class Split:
    """Disjoint train / val / test subsets of one dataset."""

    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    seed: int
    mode: str  # "prompt" (our seeded prompt-grouped split) or "canonical:<folder>"

    def subsets(self) -> dict[str, list[Sample]]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def check(self) -> None:
        """Every subset non-empty and no prompt in two subsets (else a clear error)."""
        for name, items in self.subsets().items():
            if not items:
                raise EmptySplitError(f"the {name} subset of split {self.mode} is empty")
        prompts = {name: {s.prompt for s in items} for name, items in self.subsets().items()}
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = prompts[a] & prompts[b]
            if shared:
                raise ValueError(
                    f"split {self.mode}: {len(shared)} prompt(s) appear in both {a} and {b} "
                    f"(e.g. {sorted(shared)[:3]}); splits must be prompt-disjoint"
                )

    def fingerprint(self) -> dict[str, str]:
        """SHA-256 of each subset's sorted ``(image, prompt)`` keys: ``{"train": ..., ...}``."""
        return {
            name: _digest(sorted((s.image, s.prompt) for s in items))
            for name, items in self.subsets().items()
        }

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "seed": self.seed,
            **{
                name: {"images": len(items), "prompts": len({s.prompt for s in items})}
                for name, items in self.subsets().items()
            },
        }


def _count(n: int, fraction: float) -> int:
    return int(round(n * fraction))


def _carve(
    samples: Sequence[Sample], fraction: float, rng: np.random.Generator, what: str
) -> tuple[list[Sample], list[Sample]]:
    """Move ``fraction`` of the prompts of ``samples`` (seeded) out: ``(rest, carved)``."""
    prompts = list(dict.fromkeys(s.prompt for s in samples))
    n = _count(len(prompts), fraction)
    if n == 0 or n == len(prompts):
        which = what if n == 0 else f"what remains besides the {what}"
        raise EmptySplitError(
            f"the {which} subset would be empty: {len(prompts)} prompt(s) x fraction "
            f"{fraction} rounds to {n} {what} prompt(s); use more data or change the fraction"
        )
    order = rng.permutation(len(prompts))
    carved = {prompts[i] for i in order[:n]}
    rest = [s for s in samples if s.prompt not in carved]
    return rest, [s for s in samples if s.prompt in carved]


def prompt_split(
    dataset: IQADataset, test_fraction: float, val_fraction: float, seed: int
) -> Split:
    """Seeded prompt-grouped split: test, then validation carved from the rest, by prompt."""
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value}")
    rng = np.random.default_rng(seed)
    rest, test = _carve(dataset.samples, test_fraction, rng, "test")
    train, val = _carve(rest, val_fraction, rng, "val")
    split = Split(train, val, test, seed, "prompt")
    split.check()
    return split


def canonical_split_dirs(path: str | os.PathLike) -> list[Path]:
    """AMFF-Net split folders under ``path`` (``path`` itself when it holds train/test)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(
            f"canonical splits need the AMFF-Net split folder (e.g. amff_splits/AGIQA-3K with "
            f"1/ ... 10/), got {path}"
        )
    if (path / "train.txt").is_file():
        return [path]
    dirs = [d for d in _numbered_dirs(path) if (d / "train.txt").is_file()]
    if not dirs:
        raise ValueError(f"{path} holds no numbered split folders with train.txt and test.txt")
    return dirs


def canonical_split(
    dataset: IQADataset, split_dir: str | os.PathLike, val_fraction: float, seed: int
) -> Split:
    """One AMFF-Net split folder's train/test membership, validation carved from train.

    Labels come from ``dataset`` (matched by image file name); the split must be
    prompt-disjoint, which holds for AGIQA-3K's 10 folders and not for the AIGCIQA2023 /
    PKU-I2IQA files (use ``prompt_split`` there).
    """
    split_dir = Path(split_dir)
    by_name = {Path(s.image).name: s for s in dataset.samples}
    members = {}
    for part in ("train", "test"):
        chosen = []
        for s in read_amff_file(split_dir / f"{part}.txt"):
            name = Path(s.image).name
            if name not in by_name:
                raise LabelFileError(
                    f"{s.source}:{s.line}: image {s.image!r} is not in the {dataset.name} "
                    "labels; the split folder belongs to another dataset"
                )
            chosen.append(by_name[name])
        members[part] = chosen
    train_prompts = {s.prompt for s in members["train"]}
    shared = train_prompts & {s.prompt for s in members["test"]}
    if shared:
        raise ValueError(
            f"{split_dir} is not prompt-disjoint ({len(shared)} prompts in both train and test, "
            f"e.g. {sorted(shared)[:2]}): it splits by image. Leave out --canonical-splits to use "
            "seeded prompt-grouped splits of the same labels instead."
        )
    rng = np.random.default_rng(seed)
    train, val = _carve(members["train"], val_fraction, rng, "val")
    split = Split(train, val, members["test"], seed, f"canonical:{split_dir.name}")
    split.check()
    return split


# -------------------------------------------------------------------------------- images
def resolve_image(root: Path, image: str) -> Path | None:
    """``root/image``, else ``root/<file name>`` (a flat folder), else ``None``."""
    path = root / image
    if path.is_file():
        return path
    flat = root / Path(image).name
    return flat if flat.is_file() else None


def check_images(samples: Sequence[Sample], image_root: str | os.PathLike) -> list[Path]:
    """Resolve every image up front; one ``MissingImagesError`` lists what is missing."""
    root = Path(image_root)
    if not root.is_dir():
        raise MissingImagesError(
            f"--image-root {root} is not a directory; point it at the folder holding the "
            "dataset's images"
        )
    paths, missing = [], []
    for s in samples:
        found = resolve_image(root, s.image)
        if found is None:
            missing.append(s.image)
        paths.append(found)
    if missing:
        shown = ", ".join(missing[:_SHOW_MISSING])
        more = f" (and {len(missing) - _SHOW_MISSING} more)" if len(missing) > _SHOW_MISSING else ""
        raise MissingImagesError(
            f"{len(missing)} of {len(samples)} images named by the labels are missing under "
            f"--image-root {root}: {shown}{more}. Point --image-root at the folder that holds "
            "the paths as written in the label file (or a flat folder of the image files)."
        )
    return paths


def load_image(path: str | os.PathLike, size: tuple[int, int], sample: Sample | None = None):
    """Decode one image to a float tensor ``(3, H, W)`` in [0, 1] resized to ``size``."""
    from .reward_fn import to_pixels

    try:
        return to_pixels([str(path)], torch.device("cpu"), size)[0]  # (3, H, W)
    except (ValueError, OSError) as err:
        where = f" (label file {sample.source} line {sample.line})" if sample else ""
        raise UnreadableImageError(
            f"cannot read image {path}{where}: {err.__cause__ or err}. Replace the file or "
            "remove its line from the labels."
        ) from err


class PairDataset(Dataset):
    """Torch dataset of ``{"pixels" (3,H,W), "prompt", "target" (normalised), "index"}``."""

    def __init__(
        self,
        samples: Sequence[Sample],
        image_root: str | os.PathLike,
        image_size: tuple[int, int],
        target_range: tuple[float, float],
    ) -> None:
        self.samples = list(samples)
        self.paths = check_images(self.samples, image_root)
        self.image_size = tuple(image_size)
        self.lo, self.hi = target_range

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        return {
            "pixels": load_image(self.paths[index], self.image_size, s),
            "prompt": s.prompt,
            "target": torch.tensor((s.mos - self.lo) / (self.hi - self.lo), dtype=torch.float32),
            "index": torch.tensor(index),
        }
