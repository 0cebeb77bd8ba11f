"""Description pools: per-class LLM descriptions, loaded, deduplicated and matched to classes.

Two file formats are read (both JSON):

- DCLIP (Menon & Vondrick, "Visual Classification via Description from Large Language
  Models"): ``{classname: [description, ...], ...}``; class order is the file's key order.
- DisCLIP (Ma et al., arXiv 2412.11917, CompVis/DisCLIP ``descriptions/*.json``):
  ``{"index_to_descriptions": {"0": [...], ...}, "index_to_classname": {"0": name, ...}}``
  (plus optional keys such as ``"super_category"``, ignored); class order is the integer
  order of the indices, which must be exactly ``0 .. C-1``.

Deduplication: inside a class, a repeated description keeps its first position; the global
pool is the list of distinct descriptions in order of first appearance over the classes (in
class order). The official code orders its global list after sorting the per-class lists;
the order only matters for tie-breaking between descriptions of exactly equal score.

Some pools have classes with no description (DisCLIP's ``con_llama`` pools, DCLIP's food101
and places365). DisCLIP's ``main.py`` fills those from the DCLIP pool of the same dataset;
:func:`load_pool` does the same when given ``fallback=``.

Class names are matched leniently (see :func:`normalize_classname`) so that image-folder
directory names such as ``001.Black_footed_Albatross`` find ``Black-footed Albatross``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hyperalign.common import SHARED_DATA_ENV, shared_data_dir

_NUMERIC_PREFIX = re.compile(r"^\d+[._ -]+")


def normalize_classname(name: str) -> str:
    """Key used to match class names: lower case, ``_`` and ``-`` as spaces, whitespace
    collapsed, a leading numeric index such as ``001.`` removed (image-folder datasets)."""
    name = _NUMERIC_PREFIX.sub("", name.strip())
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


@dataclass(frozen=True)
class DescriptionPool:
    """Classes with their LLM descriptions, and the deduplicated global description list.

    ``class_indices[c]`` lists, in the LLM's order, the positions in ``descriptions`` of
    class ``c``'s descriptions; ``class_descriptions(c)`` gives the texts.
    """

    classnames: tuple[str, ...]
    """Class names, in the pool's class order (index = class id)."""
    descriptions: tuple[str, ...]
    """All distinct descriptions (the global pool), in order of first appearance."""
    class_indices: tuple[tuple[int, ...], ...]
    """Per class, indices into ``descriptions`` in the LLM's order (no repeats)."""
    source: str = ""
    """Where the pool came from (a path, or a short label)."""

    def __post_init__(self) -> None:
        if len(self.classnames) != len(self.class_indices):
            raise ValueError(
                f"DescriptionPool: {len(self.classnames)} class names but "
                f"{len(self.class_indices)} description lists"
            )
        seen: dict[str, str] = {}
        for name in self.classnames:
            key = normalize_classname(name)
            if key in seen:
                raise ValueError(
                    f"DescriptionPool {self.source!r}: class names {seen[key]!r} and {name!r} "
                    "are the same after normalisation; rename one of them"
                )
            seen[key] = name
        n = len(self.descriptions)
        for c, idx in enumerate(self.class_indices):
            if any(not 0 <= i < n for i in idx):
                raise ValueError(
                    f"DescriptionPool: class {self.classnames[c]!r} has an index "
                    f"outside the {n} descriptions"
                )

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def class_descriptions(self, c: int) -> list[str]:
        """The LLM's descriptions of class ``c``, in its order."""
        return [self.descriptions[i] for i in self.class_indices[c]]

    def as_dict(self) -> dict[str, list[str]]:
        """``{classname: [descriptions]}`` (the DCLIP format)."""
        return {name: self.class_descriptions(c) for c, name in enumerate(self.classnames)}

    def empty_classes(self) -> list[str]:
        """Names of the classes that have no description."""
        return [n for n, idx in zip(self.classnames, self.class_indices) if not idx]

    def index_of(self, classname: str) -> int:
        """Class id of ``classname`` (lenient match); ``KeyError`` naming close classes."""
        key = normalize_classname(classname)
        for c, name in enumerate(self.classnames):
            if normalize_classname(name) == key:
                return c
        raise KeyError(f"class {classname!r} is not in the pool {self.source!r}")

    def for_classes(self, classnames: Sequence[str]) -> DescriptionPool:
        """The pool restricted to ``classnames``, in that order, with those names.

        Raises ``ValueError`` listing every class that the pool lacks.
        """
        lookup = {normalize_classname(n): c for c, n in enumerate(self.classnames)}
        missing = [n for n in classnames if normalize_classname(n) not in lookup]
        if missing:
            raise ValueError(
                f"{len(missing)} of {len(classnames)} classes are missing from the description "
                f"pool {self.source!r}: {missing}. Use a pool written for this dataset, or "
                "rename the class folders to the pool's class names (matching ignores case, "
                "'_'/'-' vs spaces and a leading '001.' index)."
            )
        return from_class_lists(
            [self.class_descriptions(lookup[normalize_classname(n)]) for n in classnames],
            list(classnames),
            source=self.source,
        )


def from_class_lists(
    lists: Sequence[Sequence[str]], classnames: Sequence[str], source: str = ""
) -> DescriptionPool:
    """Build a pool from per-class description lists, deduplicating (see module doc)."""
    if len(lists) != len(classnames):
        raise ValueError(f"{len(classnames)} class names but {len(lists)} description lists")
    position: dict[str, int] = {}
    descriptions: list[str] = []
    class_indices: list[tuple[int, ...]] = []
    for name, items in zip(classnames, lists):
        if isinstance(items, str) or not isinstance(items, Sequence):
            raise ValueError(
                f"pool {source!r}: class {name!r} must map to a list of strings, "
                f"got {type(items).__name__}"
            )
        idx: list[int] = []
        for d in items:
            if not isinstance(d, str):
                raise ValueError(f"pool {source!r}: class {name!r} has a non-string {d!r}")
            d = d.strip()
            if not d:
                continue
            if d not in position:
                position[d] = len(descriptions)
                descriptions.append(d)
            if position[d] not in idx:
                idx.append(position[d])
        class_indices.append(tuple(idx))
    return DescriptionPool(tuple(classnames), tuple(descriptions), tuple(class_indices), source)


def pool_from_json_obj(obj: object, source: str = "") -> DescriptionPool:
    """Parse a loaded JSON object in the DCLIP or DisCLIP format (detected by its keys)."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"pool {source!r}: expected a JSON object, got {type(obj).__name__}")
    if "index_to_descriptions" in obj or "index_to_classname" in obj:
        itd, itc = obj.get("index_to_descriptions"), obj.get("index_to_classname")
        if not isinstance(itd, Mapping) or not isinstance(itc, Mapping):
            raise ValueError(
                f"pool {source!r}: the DisCLIP format needs both 'index_to_descriptions' and "
                "'index_to_classname' objects"
            )
        try:
            keys = sorted(itc, key=int)
        except ValueError as e:
            raise ValueError(f"pool {source!r}: class indices must be integers: {e}") from None
        if [int(k) for k in keys] != list(range(len(keys))):
            raise ValueError(f"pool {source!r}: class indices must be 0..{len(keys) - 1}")
        if set(itd) != set(itc):
            diff = sorted(set(itd) ^ set(itc), key=int)
            raise ValueError(
                f"pool {source!r}: 'index_to_descriptions' and 'index_to_classname' differ in "
                f"indices {diff}"
            )
        return from_class_lists([itd[k] for k in keys], [itc[k] for k in keys], source)
    return from_class_lists(list(obj.values()), list(obj.keys()), source)


def load_pool(
    path: str | os.PathLike, fallback: str | os.PathLike | DescriptionPool | None = None
) -> DescriptionPool:
    """Load a pool file (DCLIP or DisCLIP format).

    ``fallback``: another pool (or its path); a class with no description takes the
    fallback's descriptions of the same class (as DisCLIP's ``main.py`` does with the DCLIP
    pool). A class the fallback lacks is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"description pool {str(path)!r} not found; pools shipped for tests are in "
            f"{shared_data_dir() / 'descriptions'} (or set {SHARED_DATA_ENV})"
        )
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"description pool {str(path)!r} is not valid JSON: {e}") from None
    pool = pool_from_json_obj(obj, source=str(path))
    if fallback is None or not pool.empty_classes():
        return pool
    fb = fallback if isinstance(fallback, DescriptionPool) else load_pool(fallback)
    empty = pool.empty_classes()
    filler = fb.for_classes(empty)  # raises, listing the classes the fallback lacks
    lists = [pool.class_descriptions(c) for c in range(pool.num_classes)]
    for name, descs in zip(empty, (filler.class_descriptions(c) for c in range(len(empty)))):
        lists[pool.classnames.index(name)] = descs
    return from_class_lists(lists, pool.classnames, source=f"{path} (+ fallback {fb.source})")
