"""Where the shapes world's shipped checkpoints live (all safetensors + JSON, in ``assets/``).

- ``assets/reward/`` — the shipped HyperAlign ``"shapes"`` reward: ``config.json`` +
  ``model.safetensors`` (head and adapters), ``clip.safetensors`` (its tiny CLIP) and
  ``shapes-clip-rn.json`` (that CLIP's open_clip architecture: a ResNet image tower).
- ``assets/sd/`` — the tiny Stable Diffusion of the shapes world (diffusers folder layout:
  ``StableDiffusionPipeline.from_pretrained(SD_DIR)``), with ``heldout_prompts.json`` (the
  prompts it never saw in training) and ``train_prompts.txt``.

README.md ("The shapes world") gives the commands that rebuild each of them.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
REWARD_DIR = ASSETS / "reward"
CLIP_WEIGHTS = REWARD_DIR / "clip.safetensors"
CLIP_CONFIG = REWARD_DIR / "shapes-clip-rn.json"
SD_DIR = ASSETS / "sd"
FLOW_DIR = ASSETS / "flow"
HELDOUT_PROMPTS = SD_DIR / "heldout_prompts.json"
CLIP_ARCH = CLIP_CONFIG.stem  # "shapes-clip-rn"


def register_clip_config() -> str:
    """Register the shapes CLIP architecture with open_clip (idempotent); returns its name."""
    from reward.backbone import register_model_config

    return register_model_config(CLIP_CONFIG)
