"""Train the tiny shapes-world Stable Diffusion on the CPU, from scratch, with a fixed seed.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_shapes_sd.py            # the shipped run
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_shapes_sd.py --out /tmp/sd \\
        --n-train 512 --vae-steps 20 --unet-steps 20                        # a smoke run

Writes a diffusers ``StableDiffusionPipeline`` folder (default ``shapes/assets/sd``, replaced
atomically) with ``training.json``, ``heldout_prompts.json`` and ``train_prompts.txt`` beside
the weights. Every option of ``shapes.sd_training.SDTrainConfig`` is a ``--option``; the
library, its stages and the folder layout are described in ``shapes/sd_training.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shapes.assets import SD_DIR
from shapes.config_args import add_config_arguments, config_from_args
from shapes.sd_training import SDTrainConfig, train


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run :func:`shapes.sd_training.train`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=SD_DIR, help="output pipeline folder")
    parser.add_argument(
        "--snapshot-dir",
        type=Path,
        default=None,
        help="also save the EMA pipeline here every --snapshot-every UNet steps (monitoring)",
    )
    parser.add_argument("--snapshot-every", type=int, default=500)
    add_config_arguments(parser, SDTrainConfig)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(SDTrainConfig, args)
    except ValueError as err:
        parser.error(str(err))
    argv = sys.argv[1:] if argv is None else argv
    command = " ".join([Path(sys.argv[0]).name, *argv])
    train(cfg, args.out, args.snapshot_dir, args.snapshot_every, command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
