"""Score a shapes-world HyperAlign reward on fresh held-out sets, in each style family.

Usage::

    HF_HUB_OFFLINE=1 python scripts/eval_shapes_reward.py [--reward shapes] \\
        [--styles default heldout] [--seed 20260] [--n-prompts 48]

For each style: the fresh set of ``shapes.fresh.fresh_set`` (prompts of the CLIP's held-out
bucket, their faithful scenes and every applicable perturbation, rated by the simulated
raters; seed 20260 and 48 prompts are the set of ``tests/test_shapes_reward.py``). Prints a
Markdown table: SRCC of the reward and of the zero-shot cosine of its CLIP vs the true
alignment and vs the MOS, and the share of (faithful, perturbed) pairs of one prompt where the
reward prefers the faithful scene, per perturbation kind.
"""

from __future__ import annotations

import argparse

import torch

from reward import build_reward
from reward.metrics import srcc
from shapes.fresh import faithful_preference, fresh_set


def evaluate(reward, style: str, seed: int, n_prompts: int) -> dict[str, float]:
    """The table's figures for one style."""
    fresh = fresh_set(seed, n_prompts, style)
    rewards, _ = reward(fresh.images, fresh.prompts)
    r = rewards.double().numpy()
    model = reward.model
    with torch.no_grad():
        f_i = model.clip.encode_image(model.preprocess(fresh.images))
        f_t = model.clip.encode_text(model.tokenize(fresh.prompts))
        cos = torch.nn.functional.cosine_similarity(f_i, f_t, dim=-1).double().numpy()
    out = {
        "n": len(r),
        "reward_vs_truth": srcc(r, fresh.truth),
        "reward_vs_mos": srcc(r, fresh.mos),
        "cosine_vs_truth": srcc(cos, fresh.truth),
        "cosine_vs_mos": srcc(cos, fresh.mos),
    }
    out.update({f"pair_{k}": v for k, v in faithful_preference(fresh, r).items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reward", default="shapes", help="preset name or checkpoint folder")
    parser.add_argument("--styles", nargs="+", default=["default", "heldout"])
    parser.add_argument("--seed", type=int, default=20260)
    parser.add_argument("--n-prompts", type=int, default=48)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    reward = build_reward(args.reward)
    results = {s: evaluate(reward, s, args.seed, args.n_prompts) for s in args.styles}
    keys = list(next(iter(results.values())))
    print(f"\nreward {args.reward}, fresh set seed {args.seed}, {args.n_prompts} prompts\n")
    print("| metric | " + " | ".join(args.styles) + " |")
    print("|---|" + "---|" * len(args.styles))
    for k in keys:
        cells = [f"{results[s][k]:.3f}" if k != "n" else str(results[s][k]) for s in args.styles]
        print(f"| {k} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
