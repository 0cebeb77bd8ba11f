"""The shapes world: procedural scenes of coloured shapes whose prompt alignment is known.

- :mod:`shapes.world` — scene objects, layout sampling, anti-aliased rendering.
- :mod:`shapes.prompts` — the prompt grammar, atomic facts, exact alignment scoring.
- :mod:`shapes.perturb` — faithful and perturbed scenes, simulated MOS.
- :mod:`shapes.dataset` — builds prompt-disjoint train/val/test splits (PNG + CSV).
- :mod:`shapes.oracle` — reads the facts back from any image and scores a prompt.
- :mod:`shapes.assets` — where the shipped checkpoints live (the ``"shapes"`` reward with its
  tiny CLIP, and the tiny Stable Diffusion).

The tiny models of the world and how they are trained (``scripts/train_shapes_*.py`` are
their entry points):

- :mod:`shapes.tokenizer` — CLIP-format BPE tokenizers built offline (byte-level, and one
  whose merges make every grammar word one token).
- :mod:`shapes.sd_training` — the tiny Stable Diffusion: model builders, VAE and UNet training.
- :mod:`shapes.clip_training` — contrastive pretraining of the tiny CLIP, retrieval metrics.
- :mod:`shapes.reward_training` — HyperAlign on the shapes MOS: the results table and the
  shipped reward.
- :mod:`shapes.config_args` — command-line options from a config dataclass.
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
