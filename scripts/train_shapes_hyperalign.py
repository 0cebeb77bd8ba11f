"""Train HyperAlign on the shapes-world MOS with the tiny shapes CLIP; print the results table.

Usage::

    python scripts/train_shapes_hyperalign.py --clip runs/shapes_clip/clip.safetensors \\
        --out runs/shapes_hyperalign [--seeds 0 1 2] [--n-prompts 1000] \\
        [--rows "zero-shot cosine" "full HyperAlign"] [--ship shapes/assets/reward]

Builds (or reuses) one shapes dataset per seed under ``<out>/data_<seed>``, trains every row
of the table on cached CLIP features, prints the Markdown table of test mean ± std over
seeds and writes ``<out>/results.json`` and ``<out>/results.md``. ``--ship DIR`` saves the
full HyperAlign with the best validation SRCC (with its CLIP beside it) to ``DIR``
atomically. Every option of ``shapes.reward_training.ShapesHyperAlignConfig`` is a
``--option``; the rows and the training are described in ``shapes/reward_training.py``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from shapes.config_args import add_config_arguments, config_from_args
from shapes.reward_training import ROWS, SHIPPABLE, ShapesHyperAlignConfig, run_experiment


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run :func:`shapes.reward_training.run_experiment`."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clip", type=Path, required=True, help="tiny CLIP weights (.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="run folder (datasets, results)")
    parser.add_argument("--ship", type=Path, default=None, help="save the best model here")
    parser.add_argument(
        "--rows",
        nargs="+",
        default=list(ROWS),
        choices=list(ROWS),
        metavar="ROW",
        help=f"table rows to run (default: all): {', '.join(repr(r) for r in ROWS)}",
    )
    parser.add_argument(
        "--ship-rows",
        nargs="+",
        default=list(SHIPPABLE),
        metavar="ROW",
        help="rows --ship may pick from, by best validation SRCC (default: the cone rows "
        f"{', '.join(repr(r) for r in SHIPPABLE)}); e.g. 'calibrated cosine'",
    )
    add_config_arguments(parser, ShapesHyperAlignConfig)
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(ShapesHyperAlignConfig, args)
        run_experiment(cfg, args.clip, args.out, tuple(args.rows), args.ship, tuple(args.ship_rows))
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
