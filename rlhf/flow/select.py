"""Which trainer runs a config: Flow-GRPO (`rlhf.flow.trainer`) for flow-matching pipelines,
DDPO (`rlhf.trainer`) for Stable Diffusion 1.x; and the settings only Flow-GRPO reads.

`DDPOConfig.trainer` decides: "flow_grpo" or "ddpo" explicitly, or "auto": the pipeline's
class, read from `model_index.json` (`_class_name`) of the local folder or hub id
`pretrained_model` without loading any weights; the built-in names are known without reading
anything ("tiny-sd3" is flow-matching, "tiny" and "random-sd15" are not).
"""

from __future__ import annotations

from pathlib import Path

from rlhf.config import DDPOConfig
from rlhf.flow.pipeline import BUILT_IN_FLOW_PIPELINES, FLOW_PIPELINE_CLASSES

__all__ = [
    "TRAINERS",
    "flow_config_errors",
    "pipeline_class_name",
    "resolve_trainer",
    "trainer_class",
]

TRAINERS = ("auto", "ddpo", "flow_grpo")
"""Valid values of `DDPOConfig.trainer`."""
# The most tokens SD3's `encode_prompt` accepts for T5 (`StableDiffusion3Pipeline.check_inputs`).
_SD3_MAX_SEQUENCE_LENGTH = 512


def flow_config_errors(cfg: DDPOConfig) -> list[str]:
    """One message per setting the Flow-GRPO trainer cannot run with (empty: fine)."""
    errs = []
    if cfg.trainer not in TRAINERS:
        errs.append(f"trainer must be one of {TRAINERS}, got {cfg.trainer!r}")
    if not cfg.flow_noise_level > 0:
        errs.append(
            f"flow_noise_level must be > 0 (the SDE needs noise for its log-probs), got "
            f"{cfg.flow_noise_level}"
        )
    if not 1 <= cfg.flow_max_sequence_length <= _SD3_MAX_SEQUENCE_LENGTH:
        errs.append(
            f"flow_max_sequence_length must be in [1, {_SD3_MAX_SEQUENCE_LENGTH}], got "
            f"{cfg.flow_max_sequence_length}"
        )
    if cfg.train_mode != "ppo":
        errs.append(
            f"the Flow-GRPO trainer trains with PPO-clip only (train_mode='ppo'), got "
            f"train_mode={cfg.train_mode!r}"
        )
    return errs


def pipeline_class_name(name_or_path: str, revision: str | None = None) -> str:
    """The diffusers pipeline class of `name_or_path` (`_class_name` in its
    `model_index.json`); raises `ValueError` when it cannot be read, saying how to choose
    the trainer explicitly."""
    from rlhf.pipeline import BUILT_IN_PIPELINES

    if name_or_path in BUILT_IN_FLOW_PIPELINES:
        return "StableDiffusion3Pipeline"
    if name_or_path in BUILT_IN_PIPELINES:
        return "StableDiffusionPipeline"
    from diffusers import DiffusionPipeline

    try:
        if Path(name_or_path).is_dir():
            index = DiffusionPipeline.load_config(str(name_or_path))
        else:
            index = DiffusionPipeline.load_config(name_or_path, revision=revision)
    except Exception as err:
        raise ValueError(
            f"cannot tell which trainer fits {name_or_path!r}: its model_index.json could not "
            f"be read ({type(err).__name__}: {err}); set trainer=flow_grpo (Stable Diffusion "
            "3) or trainer=ddpo (Stable Diffusion 1.x)"
        ) from err
    return str(index.get("_class_name", ""))


def resolve_trainer(cfg: DDPOConfig) -> str:
    """ "flow_grpo" or "ddpo" for `cfg` (see the module docstring); invalid Flow-GRPO settings
    raise `ValueError` listing all of them."""
    errs = [e for e in flow_config_errors(cfg) if e.startswith("trainer ")]
    if errs:
        raise ValueError("invalid DDPOConfig:\n  - " + "\n  - ".join(errs))
    choice = cfg.trainer
    if choice == "auto":
        cls = pipeline_class_name(cfg.pretrained_model, cfg.pretrained_revision)
        choice = "flow_grpo" if cls in FLOW_PIPELINE_CLASSES else "ddpo"
    if choice == "flow_grpo":
        errs = flow_config_errors(cfg)
        if errs:
            raise ValueError("invalid DDPOConfig for Flow-GRPO:\n  - " + "\n  - ".join(errs))
    return choice


def trainer_class(cfg: DDPOConfig) -> type:
    """The trainer class that runs `cfg`: `FlowGRPOTrainer` or `DDPOTrainer`."""
    if resolve_trainer(cfg) == "flow_grpo":
        from rlhf.flow.trainer import FlowGRPOTrainer

        return FlowGRPOTrainer
    from rlhf.trainer import DDPOTrainer

    return DDPOTrainer
