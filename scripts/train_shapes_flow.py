"""Train the tiny shapes-world Stable Diffusion 3 (flow matching) on the CPU, fixed seed.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_shapes_flow.py          # the shipped run
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_shapes_flow.py --out /tmp/flow \\
        --n-train 256 --steps 20                                            # a smoke run

Writes a diffusers ``StableDiffusion3Pipeline`` folder (default ``shapes/assets/flow``,
replaced atomically) with ``training.json``, ``heldout_prompts.json`` and ``train_prompts.txt``
beside the weights. Every option of ``shapes.flow_training.FlowTrainConfig`` is a
``--option``; what is trained and what is reused is described in ``shapes/flow_training.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shapes.assets import FLOW_DIR
from shapes.config_args import add_config_arguments, config_from_args
from shapes.flow_training import FlowTrainConfig, train


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run :func:`shapes.flow_training.train`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=FLOW_DIR, help="output pipeline folder")
    add_config_arguments(parser, FlowTrainConfig)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(FlowTrainConfig, args)
    except ValueError as err:
        parser.error(str(err))
    argv = sys.argv[1:] if argv is None else argv
    train(cfg, args.out, " ".join([Path(sys.argv[0]).name, *argv]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
