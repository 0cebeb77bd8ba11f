"""The prompt grammar of the shapes world, its atomic facts, and exact (TIFA-style) scoring.

Grammar (lower case, an optional final period)::

    prompt   := entity
              | entity " and " entity
              | entity ", " entity " and " entity
              | entity " " relation " " entity        (both entities singular)
    entity   := ("a" | "an") [size] colour shape
              | ("two" | "three") [size] colour shape "s"
    relation := "left of" | "right of" | "above" | "below"

e.g. "a red circle", "two blue squares", "a large red circle left of a green triangle",
"two small yellow triangles and a cyan circle". A prompt describes the *whole* scene.

Facts. An entity with count ``n`` stands for ``n`` *slots* (one per object). The facts are:

- per slot: ``shape`` (the slot's object is a <shape>), ``color``, and ``size`` if the prompt
  gives one;
- per entity with ``n >= 2``: ``count`` (exactly ``n`` objects of that colour and shape, any
  size);
- ``total``: the scene has exactly as many objects as the prompt describes (the prompt describes
  the whole scene, so an extra object is an error);
- per relation: ``relation`` (the subject slot's object is <relation> the object slot's
  object, see :func:`shapes.world.relation_holds`).

Scoring a scene (any objects with ``shape, color, size, cx, cy``): slots are bound to distinct
objects (or to nothing) by the assignment that satisfies the most facts (exhaustive search;
objects are put in a canonical order first and ties go to the first assignment, so the result
does not depend on the order of the objects); the alignment is the fraction of facts
satisfied. A faithful scene scores exactly 1.

Public API: :class:`Entity`, :class:`Relation`, :class:`PromptSpec`, :class:`Fact`,
:func:`parse_prompt`, :func:`sample_prompt`, :func:`evaluate_facts`, :func:`alignment`,
:func:`as_facts`.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shapes.world import COLORS, RELATIONS, SHAPES, SIZES, relation_holds

NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
"""Count -> word (``a``/``an`` for one)."""

MAX_OBJECTS = 3
"""Most objects a prompt describes."""


class HasAttributes(Protocol):
    """What scoring needs from an object (a :class:`~shapes.world.SceneObject`, or a
    :class:`~shapes.oracle.DetectedObject`)."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float


@dataclass(frozen=True)
class Entity:
    """``count`` objects of one colour and shape, optionally of one size class."""

    color: str
    """One of :data:`~shapes.world.COLORS`."""
    shape: str
    """One of :data:`~shapes.world.SHAPES`."""
    size: str | None = None
    """One of :data:`~shapes.world.SIZES`, or ``None`` (unspecified: any size)."""
    count: int = 1
    """How many such objects (1-3)."""

    def __post_init__(self) -> None:
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; valid colours: {COLORS}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; valid shapes: {SHAPES}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; valid sizes: {SIZES} or None")
        if not 1 <= self.count <= MAX_OBJECTS:
            raise ValueError(f"entity count must be in 1..{MAX_OBJECTS}, got {self.count}")

    @property
    def text(self) -> str:
        """E.g. ``"a large red circle"``, ``"an orange square"``, ``"two blue triangles"``."""
        words = [self.size] if self.size else []
        words += [self.color, self.shape + ("s" if self.count > 1 else "")]
        det = NUMBER_WORDS[self.count]
        if self.count == 1 and words[0][0] in "aeiou":
            det = "an"
        return " ".join([det, *words])


@dataclass(frozen=True)
class Relation:
    """``entities[subject] <relation> entities[object]``; both entities have count 1."""

    subject: int
    """Index of the subject entity."""
    relation: str
    """One of :data:`~shapes.world.RELATIONS`."""
    object: int
    """Index of the object entity."""


@dataclass(frozen=True)
class Fact:
    """One atomic, checkable statement about a scene.

    ``kind`` is ``shape``/``color``/``size`` (about slot ``slot``: ``value`` is the expected
    attribute), ``count`` (``value`` objects of ``color`` and ``shape``), ``total`` (``value``
    objects in all) or ``relation`` (slot ``slot`` is ``relation`` slot ``other``).
    """

    kind: str
    slot: int = -1
    other: int = -1
    value: str | int = ""
    color: str = ""
    shape: str = ""
    relation: str = ""

    @property
    def text(self) -> str:
        """A readable rendering, e.g. ``"object 0 is red"``."""
        if self.kind in ("shape", "color", "size"):
            return f"object {self.slot} is {self.value}"
        if self.kind == "count":
            return f"there are exactly {self.value} {self.color} {self.shape}s"
        if self.kind == "total":
            return f"there are exactly {self.value} shapes in all"
        return f"object {self.slot} is {self.relation} object {self.other}"


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: its entities and an optional relation between two of them."""

    entities: tuple[Entity, ...]
    relation: Relation | None = None

    def __post_init__(self) -> None:
        if not self.entities:
            raise ValueError("a prompt needs at least one entity")
        if self.n_objects > MAX_OBJECTS:
            raise ValueError(f"a prompt describes at most {MAX_OBJECTS} objects")
        r = self.relation
        if r is not None:
            if len(self.entities) != 2 or {r.subject, r.object} != {0, 1}:
                raise ValueError("a relation links the two entities of a two-entity prompt")
            if any(e.count != 1 for e in self.entities):
                raise ValueError("related entities must be singular")
            if r.relation not in RELATIONS:
                raise ValueError(f"unknown relation {r.relation!r}; valid: {RELATIONS}")

    @property
    def n_objects(self) -> int:
        """Objects described (= number of slots)."""
        return sum(e.count for e in self.entities)

    @property
    def text(self) -> str:
        """The prompt string (inverse of :func:`parse_prompt`)."""
        parts = [e.text for e in self.entities]
        if self.relation is not None:
            r = self.relation
            return f"{parts[r.subject]} {r.relation} {parts[r.object]}"
        if len(parts) == 1:
            return parts[0]
        return ", ".join(parts[:-1]) + " and " + parts[-1]

    def slots(self) -> list[int]:
        """Entity index of each slot: e.g. ``[0, 0, 1]`` for "two X and a Y"."""
        return [i for i, e in enumerate(self.entities) for _ in range(e.count)]

    def facts(self) -> list[Fact]:
        """The prompt's atomic facts, in a fixed order (see the module docstring)."""
        out: list[Fact] = []
        for s, i in enumerate(self.slots()):
            e = self.entities[i]
            out.append(Fact("shape", slot=s, value=e.shape))
            out.append(Fact("color", slot=s, value=e.color))
            if e.size is not None:
                out.append(Fact("size", slot=s, value=e.size))
        for e in self.entities:
            if e.count > 1:
                out.append(Fact("count", value=e.count, color=e.color, shape=e.shape))
        out.append(Fact("total", value=self.n_objects))
        if self.relation is not None:
            first = {i: self.slots().index(i) for i in range(len(self.entities))}
            r = self.relation
            out.append(
                Fact("relation", slot=first[r.subject], other=first[r.object], relation=r.relation)
            )
        return out


_ENTITY_RE = re.compile(r"^(a|an|two|three)\s+(?:(small|large)\s+)?([a-z]+)\s+([a-z]+)$")


def _parse_entity(text: str, prompt: str) -> Entity:
    m = _ENTITY_RE.match(text.strip())
    if m is None:
        raise ValueError(
            f"cannot parse {text.strip()!r} in shapes prompt {prompt!r}: expected "
            "'a|an|two|three [small|large] <colour> <shape>'"
        )
    det, size, color, shape = m.groups()
    count = {"a": 1, "an": 1, "two": 2, "three": 3}[det]
    if count > 1:
        if not shape.endswith("s"):
            raise ValueError(f"{text!r} in {prompt!r}: a count needs a plural shape")
        shape = shape[:-1]
    if color not in COLORS:
        raise ValueError(f"unknown colour {color!r} in {prompt!r}; valid colours: {COLORS}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} in {prompt!r}; valid shapes: {SHAPES}")
    return Entity(color=color, shape=shape, size=size, count=count)


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a prompt of the grammar in the module docstring; ``ValueError`` if it is not one."""
    text = " ".join(prompt.lower().strip().rstrip(".").split())
    for rel in RELATIONS:
        key = f" {rel} "
        if key in text:
            left, right = text.split(key, 1)
            return PromptSpec(
                (_parse_entity(left, prompt), _parse_entity(right, prompt)), Relation(0, rel, 1)
            )
    parts = [p for chunk in text.split(",") for p in chunk.split(" and ")]
    return PromptSpec(tuple(_parse_entity(p, prompt) for p in parts))


@dataclass(frozen=True)
class PromptSampler:
    """Probabilities of the prompt templates and of giving a size."""

    p_single: float = 0.2
    """"a red circle"."""
    p_count: float = 0.15
    """"two blue squares"."""
    p_pair: float = 0.2
    """"a red circle and a blue square"."""
    p_relation: float = 0.3
    """"a red circle left of a blue square"."""
    p_triple: float = 0.15
    """Three objects: "two X and a Y" or "X, Y and Z"."""
    p_size: float = 0.5
    """Probability that an entity states its size."""

    def sample(self, rng: np.random.Generator) -> PromptSpec:
        """Draw one prompt; entities always differ in (colour, shape)."""
        probs = np.array([self.p_single, self.p_count, self.p_pair, self.p_relation, self.p_triple])
        kind = int(rng.choice(5, p=probs / probs.sum()))
        if kind == 0:
            counts = [1]
        elif kind == 1:
            counts = [int(rng.integers(2, 4))]
        elif kind in (2, 3):
            counts = [1, 1]
        else:
            counts = [2, 1] if rng.random() < 0.5 else [1, 1, 1]
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        chosen = rng.choice(len(pairs), size=len(counts), replace=False)
        entities = []
        for n, k in zip(counts, chosen):
            color, shape = pairs[int(k)]
            size = str(rng.choice(SIZES)) if rng.random() < self.p_size else None
            entities.append(Entity(color, shape, size, n))
        relation = None
        if kind == 3:
            relation = Relation(0, str(rng.choice(RELATIONS)), 1)
        return PromptSpec(tuple(entities), relation)


def sample_prompt(rng: np.random.Generator, sampler: PromptSampler | None = None) -> PromptSpec:
    """One random prompt (see :class:`PromptSampler`)."""
    return (sampler or PromptSampler()).sample(rng)


def as_facts(prompt: str | PromptSpec | Sequence[Fact]) -> list[Fact]:
    """The facts of a prompt string, a :class:`PromptSpec`, or a list of facts (returned)."""
    if isinstance(prompt, str):
        return parse_prompt(prompt).facts()
    if isinstance(prompt, PromptSpec):
        return prompt.facts()
    facts = list(prompt)
    if not facts or not all(isinstance(f, Fact) for f in facts):
        raise TypeError("expected a prompt string, a PromptSpec or a non-empty list of Fact")
    return facts


def _unary(fact: Fact, obj: HasAttributes | None) -> bool:
    if obj is None:
        return False
    return getattr(obj, fact.kind) == fact.value


def evaluate_facts(
    prompt: str | PromptSpec | Sequence[Fact], objects: Sequence[HasAttributes]
) -> list[bool]:
    """Truth value of each fact of ``prompt`` in the scene ``objects`` (same order as
    :meth:`PromptSpec.facts`), under the best slot-to-object assignment."""
    facts = as_facts(prompt)
    # Canonical order, so that ties between equally good assignments break the same way
    # whatever order the objects come in (a detector's order vs. the scene's).
    objs = sorted(objects, key=lambda o: (o.color, o.shape, o.size, o.cx, o.cy))
    slot_ids = sorted(
        {f.slot for f in facts if f.slot >= 0} | {f.other for f in facts if f.other >= 0}
    )
    n_slots, n_objs = len(slot_ids), len(objs)
    col = {s: k for k, s in enumerate(slot_ids)}
    unary = [f for f in facts if f.kind in ("shape", "color", "size")]
    rels = [f for f in facts if f.kind == "relation"]
    # gain[k, o]: unary facts of slot k satisfied by object o (o = n_objs means "no object").
    gain = np.zeros((n_slots, n_objs + 1), dtype=np.int64)
    for f in unary:
        for o in range(n_objs):
            gain[col[f.slot], o] += _unary(f, objs[o])

    best, best_assign = -1, None
    # Candidate targets: each object, or "none" (one per slot so that all may be empty).
    targets = list(range(n_objs)) + [None] * n_slots
    seen = set()
    for perm in itertools.permutations(range(len(targets)), n_slots):
        assign = tuple(targets[p] for p in perm)
        if assign in seen:
            continue
        seen.add(assign)
        score = sum(int(gain[k, n_objs if o is None else o]) for k, o in enumerate(assign))
        for f in rels:
            a, b = assign[col[f.slot]], assign[col[f.other]]
            score += (
                a is not None and b is not None and relation_holds(objs[a], objs[b], f.relation)
            )
        if score > best:
            best, best_assign = score, assign
    assign = best_assign if best_assign is not None else ()

    def bound(slot: int) -> HasAttributes | None:
        o = assign[col[slot]]
        return None if o is None else objs[o]

    out = []
    for f in facts:
        if f.kind in ("shape", "color", "size"):
            out.append(_unary(f, bound(f.slot)))
        elif f.kind == "count":
            n = sum(o.color == f.color and o.shape == f.shape for o in objs)
            out.append(n == f.value)
        elif f.kind == "total":
            out.append(n_objs == f.value)
        elif f.kind == "relation":
            a, b = bound(f.slot), bound(f.other)
            out.append(a is not None and b is not None and relation_holds(a, b, f.relation))
        else:
            raise ValueError(f"unknown fact kind {f.kind!r}")
    return out


def alignment(prompt: str | PromptSpec | Sequence[Fact], objects: Sequence[HasAttributes]) -> float:
    """Fraction of the prompt's facts that the scene ``objects`` satisfies, in [0, 1]."""
    truth = evaluate_facts(prompt, objects)
    return sum(truth) / len(truth)
