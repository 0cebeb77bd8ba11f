"""The shapes world: procedural scenes of coloured shapes whose prompt alignment is known.

- :mod:`shapes.world` — scene objects, layout sampling, anti-aliased rendering.
- :mod:`shapes.prompts` — the prompt grammar, atomic facts, exact alignment scoring.
- :mod:`shapes.perturb` — faithful and perturbed scenes, simulated MOS.
- :mod:`shapes.dataset` — builds prompt-disjoint train/val/test splits (PNG + CSV).
- :mod:`shapes.oracle` — reads the facts back from any image and scores a prompt.
"""

from shapes.perturb import KINDS, Perturbed, RaterModel, faithful_scene, perturb
from shapes.prompts import Entity, Fact, PromptSpec, Relation, alignment, parse_prompt
from shapes.world import (
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
