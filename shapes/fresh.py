"""Fresh evaluation sets of the shapes world, generated in memory from a seed.

- :func:`fresh_set`: prompts of the CLIP's held-out bucket (never seen in CLIP pretraining),
  each with a faithful scene and every applicable perturbation of it, rated by the simulated
  raters: what ``tests/test_shapes_reward.py`` scores the shipped reward on, and the shared
  test set of the geometry experiment.
- :func:`role_swap_set`: for prompts of two or more entities, the *sub-prompt* (one entity
  dropped) with the *full* scene against the *full* prompt with the *sub-scene*. Under either
  truth model the first pair is the better aligned (the full scene has one object the
  sub-prompt does not describe; the sub-scene lacks every fact of the dropped entity), and a
  model that reads the prompt-image asymmetry entailment cones are meant to encode should
  agree.

Styles: a layout world per prompt and a rendering per image of ``style``
(:mod:`shapes.styles`), drawn from a stream of their own, so ``default`` draws nothing and the
scenes and ratings are those of a plain build.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shapes.perturb import RaterModel, faithful_scene, perturbed_scenes, true_alignment
from shapes.prompts import PromptSpec
from shapes.styles import sample_style, sample_world_style
from shapes.world import render, to_tensor

__all__ = ["FreshSet", "faithful_preference", "fresh_set", "heldout_specs", "role_swap_set"]


@dataclass
class FreshSet:
    """``N`` images with their prompts, simulated MOS and true alignment."""

    images: torch.Tensor  # (N, 3, 64, 64) in [0, 1]
    prompts: list[str]
    mos: np.ndarray  # (N,)
    truth: np.ndarray  # (N,) true alignment under the set's truth model
    kinds: list[str]  # (N,) "faithful" or the perturbation kind


def faithful_preference(fresh: FreshSet, scores: np.ndarray) -> dict[str, float]:
    """Per single perturbation kind, the share of (faithful, perturbed) pairs of one prompt
    where ``scores`` (N,) rank the faithful scene strictly higher (ties count as losses)."""
    if len(scores) != len(fresh.prompts):
        raise ValueError(f"scores has {len(scores)} entries for a set of {len(fresh.prompts)}")
    faithful = {
        p: k for k, (p, kind) in enumerate(zip(fresh.prompts, fresh.kinds)) if kind == "faithful"
    }
    wins: dict[str, list[float]] = {}
    for k, (p, kind) in enumerate(zip(fresh.prompts, fresh.kinds)):
        if kind != "faithful" and "+" not in kind:
            wins.setdefault(kind, []).append(float(scores[faithful[p]] > scores[k]))
    return {kind: float(np.mean(v)) for kind, v in sorted(wins.items())}


def heldout_specs(rng: np.random.Generator, n: int) -> list[PromptSpec]:
    """``n`` distinct prompts of the CLIP's held-out bucket."""
    from shapes.clip_training import sample_specs

    specs, seen = [], set()
    while len(specs) < n:
        (spec,) = sample_specs(rng, 1, heldout=True)
        if spec.text not in seen:
            seen.add(spec.text)
            specs.append(spec)
    return specs


def fresh_set(
    seed: int,
    n_prompts: int,
    style: str = "default",
    truth: str = "closed",
    unmentioned_weight: float = 1.0,
) -> FreshSet:
    """Faithful scenes and every applicable perturbation of ``n_prompts`` held-out prompts."""
    rng = np.random.default_rng(seed)
    specs = heldout_specs(rng, n_prompts)
    raters = RaterModel()
    biases = raters.biases(seed)
    srng = np.random.default_rng([seed, 1])  # style draws (none for "default")
    images, prompts, mos, values, kinds = [], [], [], [], []
    for spec in specs:
        world = sample_world_style(srng, style)
        scene = faithful_scene(spec, rng, world)
        variants = [("faithful", scene)]
        variants += [(p.kind, p.scene) for p in perturbed_scenes(spec, scene, rng, world)]
        for kind, s in variants:
            a = true_alignment(spec, s, truth, unmentioned_weight)
            images.append(render(s, sample_style(srng, style)))
            prompts.append(spec.text)
            mos.append(raters.mos(a, biases, rng))
            values.append(a)
            kinds.append(kind)
    return FreshSet(to_tensor(np.stack(images)), prompts, np.array(mos), np.array(values), kinds)


def role_swap_set(
    seed: int,
    n_prompts: int,
    style: str = "default",
    truth: str = "closed",
    unmentioned_weight: float = 1.0,
) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """Images ``(2M, 3, 64, 64)``, prompts and true alignment of ``M`` role-swap pairs: item
    ``2j`` is (sub-prompt, full scene), item ``2j + 1`` (full prompt, sub-scene)."""
    rng = np.random.default_rng([seed, 2])
    srng = np.random.default_rng([seed, 3])
    specs = [s for s in heldout_specs(rng, n_prompts) if len(s.entities) >= 2]
    images, prompts, values = [], [], []
    for spec in specs:
        drop = int(rng.integers(len(spec.entities)))
        sub = PromptSpec(tuple(e for i, e in enumerate(spec.entities) if i != drop), None)
        world = sample_world_style(srng, style)
        full_scene, sub_scene = faithful_scene(spec, rng, world), faithful_scene(sub, rng, world)
        for prompt, scene in ((sub, full_scene), (spec, sub_scene)):
            images.append(render(scene, sample_style(srng, style)))
            prompts.append(prompt.text)
            values.append(true_alignment(prompt, scene, truth, unmentioned_weight))
    return to_tensor(np.stack(images)), prompts, np.array(values)
