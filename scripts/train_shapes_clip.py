"""Pretrain the tiny shapes CLIP (``shapes.assets.CLIP_ARCH``) contrastively on scene-caption pairs.

Usage::

    python scripts/train_shapes_clip.py --out runs/shapes_clip/clip.safetensors
        [--steps 600] [--batch-size 128] [--lr 2e-3] [--seed 0] [--threads 1]
        [--hard-negative-images 1.0] [--init WEIGHTS.safetensors]
    python scripts/train_shapes_clip.py --check-repro --steps 20   # two runs, bit-identical?

Writes the open_clip weights (safetensors, atomically) and ``<out>.json`` (config, held-out
retrieval metrics). Every option of ``shapes.clip_training.ClipTrainConfig`` is a
``--option``; the loss, the negatives and the metrics are described in
``shapes/clip_training.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from shapes.clip_training import ClipTrainConfig, train
from shapes.config_args import add_config_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run :func:`shapes.clip_training.train` (or the reproducibility check)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="output .safetensors file")
    add_config_arguments(parser, ClipTrainConfig)
    parser.add_argument(
        "--check-repro",
        action="store_true",
        help="train twice for --steps steps without saving and compare the weights bit for bit",
    )
    args = parser.parse_args(argv)
    cfg = config_from_args(ClipTrainConfig, args)
    if args.check_repro:
        a, b = train(cfg, None), train(cfg, None)
        same = all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        print(f"bit-identical weights over two runs: {same}")
        return 0 if same else 1
    if args.out is None:
        parser.error("--out is required (or --check-repro)")
    if args.out.suffix != ".safetensors":
        parser.error(f"--out must end in .safetensors, got {args.out}")
    train(cfg, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
