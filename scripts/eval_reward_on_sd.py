"""Rank rewards on the tiny shapes Stable Diffusion's own images, against the oracle.

Usage::

    HF_HUB_OFFLINE=1 python scripts/eval_reward_on_sd.py --rewards shapes shapes-cosine \\
        [--seeds 0 1 2] [--eval-prompts 128] [--eval-images 2]

The generated images are a rendering no reward was trained on (blurred edges, stray blobs,
wrong counts). For each seed S: the held-out images ``hyperalign demo --seed S`` judges before
training (the base model, its sampler, prompts and noise seeds), read back by the shapes
oracle; each reward (a preset name or a checkpoint folder) scores them. Prints, per reward,
the SRCC and Pearson correlation with the oracle alignment over all seeds' images.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from reward import build_reward
from reward.metrics import srcc
from rlhf import demo
from rlhf.pipeline import generate_batches, load_pipeline
from shapes.oracle import ShapesOracleReward


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rewards", nargs="+", default=["shapes", "shapes-cosine"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--eval-prompts", type=int, default=128)
    parser.add_argument("--eval-images", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    demo_parser = argparse.ArgumentParser()
    demo.add_arguments(demo_parser)
    images, prompts = [], []
    for seed in args.seeds:
        dargs = demo_parser.parse_args(
            [
                f"--seed={seed}",
                f"--eval-prompts={args.eval_prompts}",
                f"--eval-images={args.eval_images}",
            ]
        )
        cfg = demo.demo_config(dargs)
        p = demo.demo_prompts(dargs)
        pipe = load_pipeline(cfg.pretrained_model, device="cpu")
        settings = demo.eval_settings(cfg)
        for _, x in generate_batches(pipe, p.eval_prompts, p.eval_seeds, settings, 32):
            images.append(x.float().cpu())
        prompts += p.eval_prompts
    x = torch.cat(images)
    oracle, _ = ShapesOracleReward()(x, prompts)
    oracle = oracle.double().numpy()
    print(f"\n{len(prompts)} images of the base model ({len(args.seeds)} seeds)\n")
    print("| reward | SRCC vs oracle | Pearson vs oracle |")
    print("|---|---|---|")
    for name in args.rewards:
        r, _ = build_reward(name)(x, prompts)
        r = r.double().numpy()
        print(f"| {name} | {srcc(r, oracle):.3f} | {np.corrcoef(r, oracle)[0, 1]:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
