"""``hyperalign score --model NAME_OR_PATH --prompt "..." IMAGE...``

Prints one row per image (score and geometry), or strict JSON (no NaN) with ``--json``.
A checkpoint that produces non-finite rewards is an error (exit 2) naming it.
"""

from __future__ import annotations

import argparse

from hyperalign.common import DTYPE_CHOICES, dumps_json, parse_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", help="image files to score")
    parser.add_argument(
        "--model",
        default="shapes",
        help="preset name (tiny-random, shapes), checkpoint directory or hub repo id "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="the prompt; give it once for all images or once per image",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help="backbone precision")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    from .reward_fn import NonFiniteRewardError, build_reward

    prompts = args.prompt
    if len(prompts) == 1:
        prompts = prompts * len(args.images)
    if len(prompts) != len(args.images):
        raise ValueError(
            f"{len(args.images)} images but {len(prompts)} --prompt values; give one prompt for "
            "all images or one per image"
        )
    reward_fn = build_reward(
        args.model,
        device=args.device,
        dtype=parse_dtype(args.dtype),
        max_batch_size=args.batch_size,
    )
    try:
        rewards, info = reward_fn(list(args.images), prompts)
    except NonFiniteRewardError as err:  # a broken checkpoint is a bad input, not a crash
        raise ValueError(str(err)) from err
    rows = []
    for i, (path, prompt) in enumerate(zip(args.images, prompts)):
        row = {"image": path, "prompt": prompt, "score": float(rewards[i])}
        row.update({k: v[i] for k, v in info.items()})
        rows.append(row)
    if args.json:
        print(dumps_json(rows))
        return 0
    cols = ["score", "s_base", "distance", "angle", "aperture", "alpha", "beta", "gamma"]
    width = max(len("image"), *(len(r["image"]) for r in rows))
    print(f"{'image':<{width}}  " + "  ".join(f"{c:>8}" for c in cols))
    for r in rows:
        print(f"{r['image']:<{width}}  " + "  ".join(f"{r[c]:8.4f}" for c in cols))
    return 0
