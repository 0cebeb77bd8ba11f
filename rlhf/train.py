"""Fine-tune Stable Diffusion with DDPO, or Stable Diffusion 3 with Flow-GRPO (PPO on LoRA
weights, both) against a reward function.

Tiny offline run on CPU (random-weight tiny pipeline, brightness reward, seconds):

    hyperalign rl-train --preset tiny-cpu
    hyperalign rl-train --preset tiny-sd3-cpu   # tiny Stable Diffusion 3, Flow-GRPO

Stable Diffusion 3.5 Medium with Flow-GRPO (the trainer follows the pipeline class, or
`--set trainer=flow_grpo`; LoRA loads with `StableDiffusion3Pipeline.load_lora_weights`):

    accelerate launch -m hyperalign rl-train --preset sd35m-hyperalign \\
        --set reward_fn=hyperalign:<name_or_path> --set run_name=my-sd3-run

Stable Diffusion 1.5 with the HyperAlign reward on GPUs (hub id or a local directory):

    accelerate launch -m hyperalign rl-train --preset sd15-hyperalign \\
        --set pretrained_model=stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --set reward_fn=hyperalign:<name_or_path> --set run_name=my-run

Change any setting with `--set key=value` (repeatable; tuples comma-separated, `None` clears
an optional field); `--list-fields` prints every field with its documentation and
`--print-config` shows the resolved config without training. Batch sizes are per GPU.
Outputs go to `<logdir>/<run_name>/`: `config.json`, resumable `checkpoints/`, the final LoRA
in `lora/` (load with `StableDiffusionPipeline.load_lora_weights(dir)`) and TensorBoard logs
in `logs/`. Resume with `--set resume_from=latest` (or a checkpoint directory); a resume
with other settings than the checkpoint's is refused, except for the fields of
`rlhf.config.RESUME_MAY_CHANGE` (run length, logging, bookkeeping).
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from rlhf.config import PRESETS, DDPOConfig, apply_overrides, get_preset

__all__ = ["add_arguments", "run", "build_config", "field_docs"]


def field_docs() -> dict[str, str]:
    """{field name: its documentation string}, read from the docstrings in rlhf/config.py."""
    import rlhf.config as config_module

    tree = ast.parse(Path(config_module.__file__).read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DDPOConfig")
    docs, last = {}, None
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            last = node.target.id
        elif (
            last
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[last] = " ".join(node.value.value.split())
            last = None
        else:
            last = None
    return docs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default="tiny-cpu",
        choices=sorted(PRESETS),
        help="starting configuration (default: tiny-cpu)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a config.json saved by an earlier run (replaces --preset)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set num_epochs=10 (repeatable)",
    )
    parser.add_argument(
        "--list-fields", action="store_true", help="print every config field with its help and exit"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )


def build_config(args: argparse.Namespace) -> DDPOConfig:
    cfg = DDPOConfig.load(args.config) if args.config else get_preset(args.preset)
    apply_overrides(cfg, args.overrides)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    if args.list_fields:
        docs = field_docs()
        default = DDPOConfig()
        for name in DDPOConfig.__dataclass_fields__:
            print(f"{name} (default {getattr(default, name)!r}):\n    {docs.get(name, '')}")
        return 0
    cfg = build_config(args)  # a bad setting: ValueError, reported by the command line
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        return 0
    from rlhf.flow.select import trainer_class

    # DDPO for Stable Diffusion 1.x, Flow-GRPO for Stable Diffusion 3 (`trainer` field).
    trainer = trainer_class(cfg)(cfg)
    history = trainer.train()
    if trainer.accelerator.is_main_process and history:
        first, last = history[0], history[-1]
        print(
            f"done: {len(history)} epochs, reward_mean {first['reward_mean']:.4f} -> "
            f"{last['reward_mean']:.4f}; LoRA in {trainer.run_dir / 'lora'}"
        )
    return 0
