"""The shapes world: procedural scenes of coloured shapes whose prompt alignment is known.

- :mod:`reward.shapes.world` — scene objects, layout sampling, anti-aliased rendering.
- :mod:`reward.shapes.prompts` — the prompt grammar, atomic facts, exact alignment scoring.
- :mod:`reward.shapes.perturb` — faithful and perturbed scenes, simulated MOS.
- :mod:`reward.shapes.dataset` — builds prompt-disjoint train/val/test splits (PNG + CSV).
- :mod:`reward.shapes.oracle` — reads the facts back from any image and scores a prompt.
"""

from reward.shapes.perturb import KINDS, Perturbed, RaterModel, faithful_scene, perturb
from reward.shapes.prompts import Entity, Fact, PromptSpec, Relation, alignment, parse_prompt
from reward.shapes.world import (
    COLORS,
    PALETTE,
    SHAPES,
    SIZES,
    RenderConfig,
    Scene,
    SceneObject,
    WorldConfig,
    render,
)

__all__ = [
    "COLORS",
    "KINDS",
    "PALETTE",
    "SHAPES",
    "SIZES",
    "Entity",
    "Fact",
    "Perturbed",
    "PromptSpec",
    "RaterModel",
    "Relation",
    "RenderConfig",
    "Scene",
    "SceneObject",
    "WorldConfig",
    "alignment",
    "faithful_scene",
    "parse_prompt",
    "perturb",
    "render",
]
