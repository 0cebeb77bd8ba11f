"""How much does the demo's reward tell RL about the oracle? Measured on base-model samples.

Usage:
    HF_HUB_OFFLINE=1 python scripts/diagnose_demo_signal.py [--prompts 64] [--images 8]
        [--reward shapes] [--seed 0] [--cache /tmp/demo_signal.safetensors]

Draws ``--images`` images for each of the first ``--prompts`` held-out prompts of the shipped
shapes pipeline with the demo's sampler settings (20 DDIM steps, eta 1, CFG 3), scores them
with the HyperAlign reward and the shapes-world oracle, and prints:

- the reward-oracle correlation over all images and *within* prompts (what group advantages
  see);
- best-of-K: the oracle gain of the reward's pick over the group mean, for K = 2, 4, 8, next
  to the oracle's own best pick (the ceiling);
- for each advantage scheme of ``rlhf.stat_tracking`` on groups of 4 and 8: the correlation
  between the advantages and the oracle's within-group-centred values (the "true"
  advantages), and the signal share ``mean(a * o_c) / mean(a^2)``.

- what the reward sees: on faithful renders of ``--prompts`` fresh prompts, the mean reward
  drop caused by each perturbation kind of ``shapes.perturb`` (and how often it
  drops at all); a kind the reward barely punishes is a direction RL can exploit.

With ``--loras DIR ...`` (LoRA folders written by the demo), it instead judges the base model
and each LoRA on ``--prompts`` held-out prompts x 2 images: per-kind fact accuracy and the
mean number of objects the oracle reads minus the number asked for (reward hacking by extra
objects shows up there).

Images are cached (``--cache FILE.safetensors``, prompts and settings in ``FILE.json``) so
other rewards can be compared on the same samples; a cache made with other prompts, image
counts or seed is regenerated.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from hyperalign.common import atomic_write_json
from rlhf.demo import DEFAULT_PIPELINE, held_out_prompts
from rlhf.pipeline import (
    SamplerSettings,
    check_lora_file,
    check_lora_fits,
    generate_images,
    load_pipeline,
    lora_applied,
)

DEMO_SAMPLER = SamplerSettings(steps=20, guidance_scale=3.0, eta=1.0)
"""The demo's sampler settings (its RL sampler and its before/after judgement)."""

KIND_COLUMNS = ("color", "shape", "size", "count", "total", "relation")


def sample(pipe, prompts: list[str], seed: int) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] with the demo's sampler settings; image i uses seed
    ``seed * 100_003 + i``, so two models get the same noise."""
    seeds = [seed * 100_003 + i for i in range(len(prompts))]
    return generate_images(pipe, prompts, seeds, DEMO_SAMPLER, batch_size=32)


def sample_model(prompts: list[str], seed: int, lora: str | None = None) -> torch.Tensor:
    """:func:`sample` with the shipped shapes pipeline, with the LoRA ``lora`` when given
    (checked: complete, finite, fits the UNet)."""
    pipe = load_pipeline(DEFAULT_PIPELINE)
    lora_file = check_lora_fits(pipe, check_lora_file(lora)) if lora else None
    with lora_applied(pipe, lora_file):
        return sample(pipe, prompts, seed)


def base_images(n_prompts: int, k: int, seed: int, cache: Path | None):
    """``(images, prompts)``: ``k`` base-model images of each of the first ``n_prompts``
    held-out prompts, read from ``cache`` when it was made with the same settings."""
    prompts = [p for p in held_out_prompts(DEFAULT_PIPELINE)[:n_prompts] for _ in range(k)]
    made_with = {"prompts": prompts, "seed": seed, "sampler": asdict(DEMO_SAMPLER)}
    meta = cache.with_suffix(".json") if cache else None
    if cache and cache.is_file() and meta.is_file():
        from safetensors.torch import load_file

        if json.loads(meta.read_text()) == made_with:
            return load_file(cache)["images"], prompts
        print(f"cache {cache} was made with other prompts or settings: regenerating")
    images = sample_model(prompts, seed)
    if cache:
        from safetensors.torch import save_file

        cache.parent.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.contiguous()}, str(cache))
        atomic_write_json(meta, made_with)
    return images, prompts


def judge_loras(loras: list[str], n_prompts: int, seed: int) -> None:
    """Fact accuracy per kind and surplus objects, base model vs each LoRA."""
    from shapes.oracle import read_objects
    from shapes.prompts import as_facts, evaluate_facts, parse_prompt

    prompts = [p for p in held_out_prompts(DEFAULT_PIPELINE)[:n_prompts] for _ in range(2)]
    print("| model | objects read − asked | " + " | ".join(KIND_COLUMNS) + " |")
    print("|---|---|" + "---|" * len(KIND_COLUMNS))
    for lora in [None, *loras]:
        x = sample_model(prompts, seed, lora)
        hits, surplus = defaultdict(list), []
        for img, text in zip(x, prompts):
            objs = read_objects(img.double())
            surplus.append(len(objs) - parse_prompt(text).n_objects)
            facts = as_facts(text)
            for f, ok in zip(facts, evaluate_facts(facts, objs)):
                hits[f.kind].append(bool(ok))
        acc = " | ".join(f"{np.mean(hits[k]):.3f}" if hits[k] else "—" for k in KIND_COLUMNS)
        print(f"| {lora or 'base'} | {np.mean(surplus):+.2f} | {acc} |")


def reward_and_oracle(reward, images: torch.Tensor, prompts: list[str]):
    """HyperAlign rewards (batches of 64) and oracle alignments of ``images``, (N,) each."""
    from shapes.oracle import ShapesOracleReward

    with torch.no_grad():
        r = torch.cat(
            [
                reward.score(images[i : i + 64], prompts[i : i + 64])
                for i in range(0, len(prompts), 64)
            ]
        ).numpy()
    o = ShapesOracleReward()(images, prompts, [{}] * len(prompts))[0].numpy()
    return r, o


def print_correlations(r, o, rr, oo, k: int) -> None:
    """Reward-oracle correlation over all images and within prompts."""
    within = [stats.spearmanr(a, b)[0] for a, b in zip(rr, oo) if a.std() > 0 and b.std() > 0]
    print(f"{len(rr)} held-out prompts x {k} images; oracle mean {o.mean():.3f}")
    print(
        f"reward vs oracle: Pearson {stats.pearsonr(r, o)[0]:.3f} over all images; "
        f"mean within-prompt Spearman {np.mean(within):.3f} ({len(within)} prompts)\n"
    )


def print_best_of_k(rr, oo) -> None:
    """Oracle gain of the reward's best-of-K pick over the group mean, and the oracle's own."""
    print("| K | oracle gain of reward's best-of-K | oracle's own best-of-K |")
    print("|---|---|---|")
    for g in (2, 4, 8):
        rg, og = rr[:, :g], oo[:, :g]
        pick = og[np.arange(len(og)), rg.argmax(1)] - og.mean(1)
        print(f"| {g} | {pick.mean():+.3f} | {(og.max(1) - og.mean(1)).mean():+.3f} |")


def print_advantage_schemes(rr, oo, prompts: list[str], k: int) -> None:
    """How well each advantage scheme's advantages follow the oracle's centred values."""
    from rlhf.stat_tracking import (
        global_advantages,
        group_advantages,
        group_centered_advantages,
    )

    print("\n| group size | advantages | corr. with true advantages | signal share |")
    print("|---|---|---|---|")
    schemes = {
        "group (per-group std)": group_advantages,
        "group_centered (one std)": group_centered_advantages,
        "global": lambda rw, _p: global_advantages(rw),
    }
    for g in (4, 8):
        rg, og = rr[:, :g].ravel(), oo[:, :g]
        pg = [p for p in prompts[::k] for _ in range(g)]
        true = (og - og.mean(1, keepdims=True)).ravel()
        for name, fn in schemes.items():
            a = fn(rg, pg)
            share = float((a * true).mean() / (a**2).mean())
            print(f"| {g} | {name} | {np.corrcoef(a, true)[0, 1]:.3f} | {share:.4f} |")


def print_perturbation_drops(reward, n: int, seed: int) -> None:
    """Mean reward drop caused by each perturbation kind on ``n`` faithful renders."""
    from shapes.perturb import KINDS, faithful_scene, perturb
    from shapes.prompts import sample_prompt
    from shapes.world import render, to_tensor

    rng = np.random.default_rng(seed)
    drops: dict[str, list[float]] = {kd: [] for kd in KINDS}
    for _ in range(n):
        spec = sample_prompt(rng)
        scene = faithful_scene(spec, rng)
        variants = [(kd, perturb(spec, scene, kd, rng)) for kd in KINDS]
        variants = [(kd, v) for kd, v in variants if v is not None]
        imgs = to_tensor([render(scene)] + [render(v.scene) for _, v in variants])
        with torch.no_grad():
            sc = reward.score(imgs, [spec.text] * len(imgs)).numpy()
        for (kd, _), v in zip(variants, sc[1:]):
            drops[kd].append(float(sc[0] - v))
    print(f"\n| perturbation ({n} renders) | mean reward drop | share dropped |")
    print("|---|---|---|")
    for kd, d in drops.items():
        print(f"| {kd} | {np.mean(d):+.3f} | {np.mean(np.array(d) > 0):.2f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--images", type=int, default=8, help="images per prompt (>= 8)")
    ap.add_argument("--reward", default="shapes", help="HyperAlign preset or checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="reuse / store the generated images here")
    ap.add_argument("--loras", nargs="*", default=None, help="judge these LoRA folders")
    args = ap.parse_args(argv)
    if args.loras is not None:
        judge_loras(args.loras, args.prompts, args.seed)
        return 0
    if args.images < 8:
        ap.error("--images must be >= 8 (best-of-8 and groups of 8 are reported)")

    from reward import build_reward

    cache = Path(args.cache) if args.cache else None
    images, prompts = base_images(args.prompts, args.images, args.seed, cache)
    k = args.images
    reward = build_reward(args.reward)
    r, o = reward_and_oracle(reward, images, prompts)
    rr, oo = r.reshape(-1, k), o.reshape(-1, k)  # (prompts, k)
    print_correlations(r, o, rr, oo, k)
    print_best_of_k(rr, oo)
    print_advantage_schemes(rr, oo, prompts, k)
    print_perturbation_drops(reward, 4 * args.prompts, args.seed + 123)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
