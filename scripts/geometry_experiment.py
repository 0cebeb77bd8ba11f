"""Run the pre-registered geometry experiment (docs/experiments/geometry.md) on the shapes world.

Usage::

    python scripts/geometry_experiment.py --clip shapes/assets/reward/clip.safetensors \\
        --out runs/geometry --seeds 0 1 2 3 4 5 6 7 8 9

Each seed's results are written to ``<out>/seed_<s>.json`` as soon as they exist and reused
when the command runs again (so seeds can run as separate processes). With every seed done it
selects the loss on validation, prints the results and contrast tables, and writes
``<out>/results.json`` and ``<out>/results.md``. ``--analyse-only`` skips training.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hyperalign.common import atomic_write_json, atomic_write_text
from shapes import geometry_experiment as ge
from shapes.reward_training import ShapesHyperAlignConfig, stage_clip


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the missing seeds, then analyse."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clip", type=Path, required=True, help="shapes CLIP (.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--n-prompts", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--style", default="default", help="style family of the datasets")
    parser.add_argument("--truth", default="closed", help="truth model: closed or open")
    parser.add_argument("--unmentioned-weight", type=float, default=1.0)
    parser.add_argument(
        "--clip-arch", default="", help="open_clip JSON of the CLIP (default: shipped)"
    )
    parser.add_argument("--analyse-only", action="store_true")
    parser.add_argument(
        "--exploratory",
        action="store_true",
        help="also run the exploratory rows (shapes.geometry_experiment.EXPLORATORY_ROWS) on "
        "each seed, adding them to seeds already done",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = ShapesHyperAlignConfig(
        seeds=tuple(args.seeds),
        n_prompts=args.n_prompts,
        style=args.style,
        truth=args.truth,
        unmentioned_weight=args.unmentioned_weight,
        clip_arch=args.clip_arch,
    )
    rows = list(ge.EXPERIMENT_ROWS)
    extra = list(ge.EXPLORATORY_ROWS) if args.exploratory else []
    per_seed = []
    for seed in args.seeds:
        path = args.out / f"seed_{seed}.json"
        done = json.loads(path.read_text()) if path.is_file() else {}
        missing = [r for r in rows + extra if r not in done]
        if missing and not args.analyse_only:
            staged = stage_clip(args.clip, args.out)
            done.update(ge.run_seed(seed, staged, args.out, cfg, missing))
            atomic_write_json(path, done)
        if all(r in done for r in rows):
            per_seed.append(done)
    if len(per_seed) < 2:
        print(f"{len(per_seed)} seed(s) done; the analysis needs at least 2")
        return 0
    loss = ge.select_loss(per_seed)
    table = ge.results_table(per_seed, rows)
    from shapes.fresh import fresh_set

    fresh = fresh_set(
        ge.SHARED_SEED, ge.SHARED_PROMPTS, cfg.style, cfg.truth, cfg.unmentioned_weight
    )
    shared = (fresh.truth, fresh.prompts)
    contrast = ge.contrasts(per_seed, ge.planned_contrasts(loss), shared=shared)
    text = (
        f"{len(per_seed)} seeds; loss selected on validation: {loss}\n\n{table}\n\n"
        f"SRCC vs true alignment, paired by seed (first two rows primary):\n\n"
        f"{ge.contrast_table(contrast)}\n"
    )
    trained = [r for r in rows if ge.ALL_ROWS[r] is not None]
    fixed = [s for s in per_seed if all(ge.fixed_name(r) in s for r in trained)]
    if len(fixed) >= 2:
        pairs = [(ge.fixed_name(a), ge.fixed_name(b)) for a, b in ge.planned_contrasts(loss)]
        text += (  # paired by seed; the prompt bootstrap is for the early-stopped models
            f"\nFixed epochs ({cfg.epochs}, no early stopping), {len(fixed)} seeds:\n\n"
            f"{ge.results_table(fixed, [ge.fixed_name(r) for r in trained])}\n\n"
            f"{ge.contrast_table(ge.contrasts(fixed, pairs))}\n"
        )
    explored = [s for s in per_seed if all(r in s for r in ge.EXPLORATORY_ROWS)]
    if len(explored) >= 2:
        pairs = ge.exploratory_contrasts()
        text += (
            f"\nExploratory rows (added after the protocol), {len(explored)} seeds:\n\n"
            f"{ge.results_table(explored, list(ge.EXPLORATORY_ROWS))}\n\n"
            f"{ge.contrast_table(ge.contrasts(explored, pairs, shared=shared))}\n"
        )
    print(text)
    atomic_write_text(args.out / "results.md", text)
    atomic_write_json(
        args.out / "results.json", {"loss": loss, "per_seed": per_seed, "contrasts": contrast}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
