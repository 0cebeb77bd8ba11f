"""Faithful and perturbed scenes for a prompt, and their labels (true alignment, simulated MOS).

Perturbation kinds (each changes a faithful scene in one controlled way; ``expected_broken``
is the number of the prompt's facts it breaks, by construction):

================  ==========================================================  ================
kind              change                                                      facts broken
================  ==========================================================  ================
color_swap        one object gets a colour no entity of the prompt uses        1 (+1 count)
shape_swap        one object gets another shape, (colour, shape) new           1 (+1 count)
size_change       one object whose size the prompt states flips small/large   1
relation_flip     the scene is mirrored along the relation's axis             1
binding_swap      two singular objects of different colour and shape swap     2
                  colours ("a red circle and a blue square" -> blue circle,
                  red square)
missing_object    one object is removed                                        its slot facts
                                                                              + total (+count)
                                                                              (+relation)
extra_object      an object of a (colour, shape) not in the prompt is added   1 (total)
wrong_count       an entity with count >= 2 gets one copy more or fewer       2 / slot + 2
================  ==========================================================  ================

"(+1 count)": when the object belongs to an entity with a count. Prompts from
:class:`~shapes.prompts.PromptSampler` never repeat a (colour, shape) across entities,
which keeps these numbers exact (``tests/test_shapes_world.py`` checks each against the scorer).
``double`` applies two different kinds in turn; its alignment comes from the scorer only.

The true alignment of any scene is always computed from the scene's objects
(:func:`alignment_under`, which is :func:`shapes.prompts.alignment` in the closed world),
never from these tables; the "facts broken" column counts closed-world facts.

Truth models (:data:`TRUTH_MODELS`), a setting of the oracle and the dataset builder too:

- ``closed`` (default): the prompt describes the whole scene. Its facts are those of
  :meth:`~shapes.prompts.PromptSpec.facts`, ``total`` included, so an unmentioned object
  breaks ``total``.
- ``open``: the facts are what the prompt states: every fact but ``total``; stated counts
  stay exact ("two red circles" with three red circles breaks ``count``). Each object beyond
  the number the prompt describes (an *unmentioned* object) costs ``unmentioned_weight``
  facts: alignment = satisfied / (facts + unmentioned_weight * unmentioned). With weight 1
  one extra object costs exactly what it costs in the closed world; with weight 0 it costs
  nothing, and clutter can only help (more objects, more chances to match a slot).

Simulated MOS (:class:`RaterModel`): a pool of raters, each with a fixed bias
``b_r ~ N(0, bias_std)``; each image is rated by ``n_raters`` raters drawn from the pool
without replacement; rating = clip(round(1 + 4 * alignment + b_r + e), 1, 5) with
``e ~ N(0, noise_std)`` per rating; MOS = mean rating.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from shapes.prompts import Fact, PromptSpec, alignment, as_facts, evaluate_facts
from shapes.world import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    WorldConfig,
    fits,
    place_objects,
)


@dataclass(frozen=True)
class Perturbed:
    """A scene derived from a prompt, with its provenance."""

    scene: Scene
    kind: str
    """``faithful``, one of :data:`KINDS`, or ``double:<kind1>+<kind2>``."""
    expected_broken: int | None
    """Facts this perturbation breaks by construction (``None`` for ``double``)."""


def faithful_scene(
    spec: PromptSpec, rng: np.random.Generator, config: WorldConfig | None = None
) -> Scene:
    """A random scene that satisfies every fact of ``spec``.

    Objects follow the slot order of ``spec`` (``scene.objects[k]`` is slot ``k``); entities
    without a stated size get a random one.
    """
    items = []
    for i in spec.slots():
        e = spec.entities[i]
        items.append((e.shape, e.color, e.size or str(rng.choice(SIZES))))
    relation = None
    if spec.relation is not None:
        slots = spec.slots()
        r = spec.relation
        relation = (slots.index(r.subject), r.relation, slots.index(r.object))
    return Scene(place_objects(items, rng, config, relation=relation))


def _entity_of(spec: PromptSpec, k: int):
    """The entity that slot ``k`` belongs to."""
    return spec.entities[spec.slots()[k]]


def _count_extra(spec: PromptSpec, k: int) -> int:
    """1 if slot ``k``'s entity states a count (its count fact breaks too), else 0."""
    return int(_entity_of(spec, k).count > 1)


def _slot_fact_count(spec: PromptSpec, k: int) -> int:
    """Facts of slot ``k`` alone: shape, colour and, if stated, size."""
    return 2 + int(_entity_of(spec, k).size is not None)


# Each perturbation takes (spec, objects in slot order (a list it may change), rng, config)
# and returns (new objects, facts broken by construction), or None where it does not apply.
Change = tuple[Sequence[SceneObject], int] | None


def _color_swap(spec: PromptSpec, objs: list, rng: np.random.Generator, cfg: WorldConfig) -> Change:
    """One object gets a colour no entity of the prompt uses."""
    used_colors = {e.color for e in spec.entities}
    k = int(rng.integers(len(objs)))
    choices = [c for c in COLORS if c not in used_colors]
    objs[k] = dataclasses.replace(objs[k], color=str(rng.choice(choices)))
    return objs, 1 + _count_extra(spec, k)


def _shape_swap(spec: PromptSpec, objs: list, rng: np.random.Generator, cfg: WorldConfig) -> Change:
    """One object gets another shape, its (colour, shape) pair new to the prompt."""
    used = {(e.color, e.shape) for e in spec.entities}
    options = [
        (k, s)
        for k in range(len(objs))
        for s in SHAPES
        if s != objs[k].shape and (objs[k].color, s) not in used
    ]
    if not options:
        return None
    k, shape = options[int(rng.integers(len(options)))]
    new = dataclasses.replace(objs[k], shape=shape, rotation=cfg.sample_rotation(shape, rng))
    # The new shape has the same area but maybe a larger circumradius: if it no longer fits,
    # move it (not in relation prompts, where moving could change the relation).
    others = objs[:k] + objs[k + 1 :]
    if not fits(new, others, cfg):
        if spec.relation is not None:
            return None
        try:
            moved = place_objects([(shape, new.color, new.size)], rng, cfg, existing=others)
        except RuntimeError:
            return None
        new = moved[0]
    objs[k] = new
    return objs, 1 + _count_extra(spec, k)


def _size_change(
    spec: PromptSpec, objs: list, rng: np.random.Generator, cfg: WorldConfig
) -> Change:
    """One object whose size the prompt states flips small/large (the first, in random order,
    that still fits)."""
    sized = [k for k in range(len(objs)) if _entity_of(spec, k).size is not None]
    if not sized:
        return None
    rng.shuffle(sized)
    for k in sized:
        size = "small" if objs[k].size == "large" else "large"
        new = dataclasses.replace(objs[k], size=size, scale=cfg.sample_scale(size, rng))
        if fits(new, objs[:k] + objs[k + 1 :], cfg):
            objs[k] = new
            return objs, 1
    return None


def _relation_flip(
    spec: PromptSpec, objs: list, rng: np.random.Generator, cfg: WorldConfig
) -> Change:
    """The scene is mirrored along the relation's axis."""
    if spec.relation is None:
        return None
    horizontal = spec.relation.relation in RELATIONS[:2]
    flipped = [
        dataclasses.replace(o, cx=1.0 - o.cx)
        if horizontal
        else dataclasses.replace(o, cy=1.0 - o.cy)
        for o in objs
    ]
    return flipped, 1


def _binding_swap(
    spec: PromptSpec, objs: list, rng: np.random.Generator, cfg: WorldConfig
) -> Change:
    """Two singular objects of different colour and shape swap colours."""
    n = len(objs)
    pairs = [
        (a, b)
        for a in range(n)
        for b in range(a + 1, n)
        if _count_extra(spec, a) == 0
        and _count_extra(spec, b) == 0
        and objs[a].color != objs[b].color
        and objs[a].shape != objs[b].shape
    ]
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    ca, cb = objs[a].color, objs[b].color
    objs[a] = dataclasses.replace(objs[a], color=cb)
    objs[b] = dataclasses.replace(objs[b], color=ca)
    return objs, 2


def _missing_object(
    spec: PromptSpec, objs: list, rng: np.random.Generator, cfg: WorldConfig
) -> Change:
    """One object is removed."""
    k = int(rng.integers(len(objs)))
    broken = _slot_fact_count(spec, k) + 1 + _count_extra(spec, k)
    if spec.relation is not None:
        broken += 1  # both slots of a relation prompt take part in the relation
    del objs[k]
    return objs, broken


def _extra_object(
    spec: PromptSpec, objs: list, rng: np.random.Generator, cfg: WorldConfig
) -> Change:
    """An object of a (colour, shape) not in the prompt is added (small if a random size
    does not fit)."""
    used = {(e.color, e.shape) for e in spec.entities}
    choices = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in used]
    color, shape = choices[int(rng.integers(len(choices)))]
    for size in (str(rng.choice(SIZES)), "small"):
        try:
            new = place_objects([(shape, color, size)], rng, cfg, existing=objs)
        except RuntimeError:
            continue
        return (*objs, *new), 1
    return None


def _wrong_count(
    spec: PromptSpec, objs: list, rng: np.random.Generator, cfg: WorldConfig
) -> Change:
    """An entity with a count gets one copy more (if below three, half of the time, when it
    fits) or one fewer."""
    counted = [i for i, e in enumerate(spec.entities) if e.count > 1]
    if not counted:
        return None
    i = counted[int(rng.integers(len(counted)))]
    e = spec.entities[i]
    members = [k for k in range(len(objs)) if spec.slots()[k] == i]
    if e.count < 3 and rng.random() < 0.5:
        try:
            new = place_objects(
                [(e.shape, e.color, e.size or str(rng.choice(SIZES)))], rng, cfg, existing=objs
            )
        except RuntimeError:
            new = ()
        if new:
            return (*objs, *new), 2  # count + total
    k = members[int(rng.integers(len(members)))]
    broken = _slot_fact_count(spec, k) + 2  # the slot, count, total
    del objs[k]
    return objs, broken


PERTURBATIONS: dict[str, Callable[..., Change]] = {
    "color_swap": _color_swap,
    "shape_swap": _shape_swap,
    "size_change": _size_change,
    "relation_flip": _relation_flip,
    "binding_swap": _binding_swap,
    "missing_object": _missing_object,
    "extra_object": _extra_object,
    "wrong_count": _wrong_count,
}
"""Kind -> the function that applies it (see the table in the module docstring)."""

KINDS: tuple[str, ...] = tuple(PERTURBATIONS)
"""Single perturbation kinds, in a fixed order."""


def perturb(
    spec: PromptSpec,
    scene: Scene,
    kind: str,
    rng: np.random.Generator,
    config: WorldConfig | None = None,
) -> Perturbed | None:
    """Apply perturbation ``kind`` to ``scene`` (a faithful scene of ``spec`` in slot order).

    Returns ``None`` when the kind does not apply (e.g. ``relation_flip`` without a relation,
    ``size_change`` when no size is stated, or no free space for an extra object).
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; valid kinds: {KINDS}")
    change = PERTURBATIONS[kind](spec, list(scene.objects), rng, config or WorldConfig())
    if change is None:
        return None
    objs, broken = change
    return Perturbed(Scene(tuple(objs)), kind, broken)


def perturbed_scenes(
    spec: PromptSpec,
    scene: Scene,
    rng: np.random.Generator,
    config: WorldConfig | None = None,
    n_double: int = 1,
) -> list[Perturbed]:
    """Every applicable single perturbation of ``scene`` once, plus ``n_double`` scenes with two
    different perturbations applied in turn."""
    out = []
    for kind in KINDS:
        p = perturb(spec, scene, kind, rng, config)
        if p is not None:
            out.append(p)
    for _ in range(n_double):
        for _attempt in range(10):
            k1, k2 = rng.choice(len(KINDS), size=2, replace=False)
            first = perturb(spec, scene, KINDS[int(k1)], rng, config)
            if first is None:
                continue
            # The second perturbation reads slots by position: only valid while the object
            # list still matches the slots, i.e. the first did not remove or add objects.
            if len(first.scene.objects) != len(scene.objects):
                continue
            second = perturb(spec, first.scene, KINDS[int(k2)], rng, config)
            if second is None:
                continue
            kind = f"double:{KINDS[int(k1)]}+{KINDS[int(k2)]}"
            out.append(Perturbed(second.scene, kind, None))
            break
    return out


@dataclass(frozen=True)
class RaterModel:
    """Simulated human raters giving 1-5 alignment ratings (see the module docstring)."""

    pool_size: int = 20
    """Number of distinct raters."""
    n_raters: int = 5
    """Ratings per image (raters drawn from the pool without replacement)."""
    bias_std: float = 0.3
    """Std of each rater's fixed bias, in rating points."""
    noise_std: float = 0.5
    """Std of the per-rating noise, in rating points."""

    def biases(self, seed: int) -> np.ndarray:
        """The pool's biases, shape (pool_size,), fixed by ``seed``."""
        return np.random.default_rng([seed, 7919]).normal(0.0, self.bias_std, self.pool_size)

    def ratings(self, true_alignment: float, biases: np.ndarray, rng: np.random.Generator):
        """Integer ratings in 1..5, shape (n_raters,). ``true_alignment`` is the scene's
        alignment under the truth model the raters judge by (:func:`true_alignment`)."""
        if self.n_raters > len(biases):
            raise ValueError(f"n_raters={self.n_raters} exceeds the pool of {len(biases)}")
        who = rng.choice(len(biases), size=self.n_raters, replace=False)
        latent = 1.0 + 4.0 * true_alignment + biases[who] + rng.normal(0, self.noise_std, len(who))
        return np.clip(np.rint(latent), 1, 5).astype(np.int64)

    def mos(self, true_alignment: float, biases: np.ndarray, rng: np.random.Generator) -> float:
        """Mean of :meth:`ratings`, in [1, 5]."""
        return float(self.ratings(true_alignment, biases, rng).mean())


TRUTH_MODELS: tuple[str, ...] = ("closed", "open")
"""Truth models (see the module docstring)."""


def check_truth(truth: str, unmentioned_weight: float) -> None:
    """``ValueError`` unless ``truth`` is one of :data:`TRUTH_MODELS` and
    ``unmentioned_weight >= 0``."""
    if truth not in TRUTH_MODELS:
        raise ValueError(f"unknown truth model {truth!r}; valid truth models: {TRUTH_MODELS}")
    if not unmentioned_weight >= 0:
        raise ValueError(
            f"unmentioned_weight must be >= 0 (0 = unmentioned objects are ignored), got "
            f"{unmentioned_weight}"
        )


def _described(facts: Sequence[Fact]) -> int:
    """Objects the prompt of ``facts`` describes: its number of slots."""
    return len({f.slot for f in facts if f.slot >= 0} | {f.other for f in facts if f.other >= 0})


def truth_facts(prompt: str | PromptSpec | Sequence[Fact], truth: str = "closed") -> list[Fact]:
    """The facts of ``prompt`` that ``truth`` scores: all of them (``closed``), or all but
    ``total`` (``open``)."""
    check_truth(truth, 0.0)
    facts = as_facts(prompt)
    return facts if truth == "closed" else [f for f in facts if f.kind != "total"]


def facts_under(
    prompt: str | PromptSpec | Sequence[Fact], objects: Sequence, truth: str = "closed"
) -> list[bool]:
    """Truth value of each of :func:`truth_facts` in the scene ``objects`` (any objects with
    ``shape, color, size, cx, cy``), under the best slot-to-object assignment."""
    return evaluate_facts(truth_facts(prompt, truth), objects)


def unmentioned_objects(prompt: str | PromptSpec | Sequence[Fact], objects: Sequence) -> int:
    """Objects beyond the number ``prompt`` describes. The best assignment binds every slot
    it can (binding never loses a fact), so exactly these objects stay unbound."""
    return max(0, len(objects) - _described(as_facts(prompt)))


def alignment_under(
    prompt: str | PromptSpec | Sequence[Fact],
    objects: Sequence,
    truth: str = "closed",
    unmentioned_weight: float = 1.0,
) -> float:
    """Alignment of the scene ``objects`` to ``prompt`` under truth model ``truth``, in [0, 1]:
    :func:`shapes.prompts.alignment` when ``closed`` (``unmentioned_weight`` is unused);
    satisfied / (facts + unmentioned_weight * unmentioned objects) when ``open``."""
    check_truth(truth, unmentioned_weight)
    if truth == "closed":
        return alignment(prompt, objects)
    truth_values = facts_under(prompt, objects, "open")
    penalty = unmentioned_weight * unmentioned_objects(prompt, objects)
    return sum(truth_values) / (len(truth_values) + penalty)


def true_alignment(
    spec: PromptSpec, scene: Scene, truth: str = "closed", unmentioned_weight: float = 1.0
) -> float:
    """Exact alignment of ``scene`` to ``spec`` under truth model ``truth`` (see
    :func:`alignment_under`)."""
    return alignment_under(spec, scene.objects, truth, unmentioned_weight)
