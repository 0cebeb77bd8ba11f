"""Linear probes of relation layout in a shapes CLIP: image embedding, caption embedding and
(ResNet towers) the last feature map before the attention pool.

Usage::

    python scripts/probe_clip_positions.py [--clip shapes/assets/reward/clip.safetensors] \\
        [--arch shapes/assets/reward/shapes-clip-rn.json] [--quads 384] [--style train]

Prints one row per feature and the shuffled-target control (``shapes.clip_training.
position_probe_accuracy``; 0.5 is chance).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from shapes.assets import CLIP_CONFIG, CLIP_WEIGHTS
from shapes.clip_training import ClipTrainConfig, Encoder, clip_arch, position_probe_accuracy


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, probe, print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clip", default=str(CLIP_WEIGHTS), help="CLIP weights (.safetensors)")
    parser.add_argument("--arch", default=str(CLIP_CONFIG), help="open_clip architecture JSON")
    parser.add_argument("--quads", type=int, default=384, help="relation quadruples drawn")
    parser.add_argument("--style", default="train", help="style family of the renders")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from reward.backbone import load_backbone

    torch.set_num_threads(1)
    backbone = load_backbone(clip_arch(ClipTrainConfig(arch=args.arch)), args.clip)
    enc = Encoder(backbone)
    real = position_probe_accuracy(enc, np.random.default_rng(args.seed), args.quads, args.style)
    control = position_probe_accuracy(
        enc, np.random.default_rng(args.seed), args.quads, args.style, shuffle=True
    )
    print("| features | probe accuracy (held-out quarter) | shuffled targets |")
    print("|---|---|---|")
    for name, acc in real.items():
        print(f"| {name} | {acc:.3f} | {control[name]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
