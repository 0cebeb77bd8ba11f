"""How much does the demo's reward tell RL about the oracle? Measured on base-model samples.

Usage:
    HF_HUB_OFFLINE=1 python scripts/diagnose_demo_signal.py [--prompts 64] [--images 8]
        [--reward shapes] [--seed 0] [--cache /tmp/demo_signal.pt]

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

Images are cached (``--cache``) so other rewards can be compared on the same samples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import stats


def load_pipeline(lora: str | None = None):
    """The shipped shapes pipeline, with ``lora`` loaded when given."""
    from diffusers import StableDiffusionPipeline

    from rlhf.demo import DEFAULT_PIPELINE

    pipe = StableDiffusionPipeline.from_pretrained(str(DEFAULT_PIPELINE), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    return pipe


def sample(pipe, prompts: list[str], seed: int) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] with the demo's sampler settings; image i uses seed
    ``seed * 100_003 + i``, so two models get the same noise."""
    images = []
    for s in range(0, len(prompts), 32):
        p = prompts[s : s + 32]
        gens = [torch.Generator().manual_seed(seed * 100_003 + s + i) for i in range(len(p))]
        out = pipe(
            prompt=p,
            num_inference_steps=20,
            guidance_scale=3.0,
            eta=1.0,
            generator=gens,
            output_type="pt",
        )
        images.append(out.images)
    return torch.cat(images)


def generate(n_prompts: int, k: int, seed: int):
    from rlhf.demo import DEFAULT_PIPELINE, held_out_prompts

    prompts = [p for p in held_out_prompts(DEFAULT_PIPELINE)[:n_prompts] for _ in range(k)]
    return sample(load_pipeline(), prompts, seed), prompts


def judge_loras(loras: list[str], n_prompts: int, seed: int) -> None:
    """Fact accuracy per kind and surplus objects, base model vs each LoRA."""
    from collections import defaultdict

    from rlhf.demo import DEFAULT_PIPELINE, held_out_prompts
    from shapes.oracle import read_objects
    from shapes.prompts import as_facts, evaluate_facts, parse_prompt

    prompts = [p for p in held_out_prompts(DEFAULT_PIPELINE)[:n_prompts] for _ in range(2)]
    print("| model | objects read − asked | " + " | ".join(KIND_COLUMNS) + " |")
    print("|---|---|" + "---|" * len(KIND_COLUMNS))
    for lora in [None, *loras]:
        x = sample(load_pipeline(lora), prompts, seed)
        hits, surplus = defaultdict(list), []
        for img, text in zip(x, prompts):
            objs = read_objects(img.double())
            surplus.append(len(objs) - parse_prompt(text).n_objects)
            facts = as_facts(text)
            for f, ok in zip(facts, evaluate_facts(facts, objs)):
                hits[f.kind].append(bool(ok))
        acc = " | ".join(f"{np.mean(hits[k]):.3f}" if hits[k] else "—" for k in KIND_COLUMNS)
        print(f"| {lora or 'base'} | {np.mean(surplus):+.2f} | {acc} |")


KIND_COLUMNS = ("color", "shape", "size", "count", "total", "relation")


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
    from rlhf.stat_tracking import (
        global_advantages,
        group_advantages,
        group_centered_advantages,
    )
    from shapes.oracle import ShapesOracleReward

    cache = Path(args.cache) if args.cache else None
    if cache and cache.is_file():
        blob = json.loads(cache.with_suffix(".json").read_text())
        images, prompts = torch.load(cache, weights_only=True), blob["prompts"]
    else:
        images, prompts = generate(args.prompts, args.images, args.seed)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(images, cache)
            cache.with_suffix(".json").write_text(json.dumps({"prompts": prompts}))
    k = args.images
    reward = build_reward(args.reward)
    with torch.no_grad():
        r = torch.cat(
            [
                reward.score(images[i : i + 64], prompts[i : i + 64])
                for i in range(0, len(prompts), 64)
            ]
        ).numpy()
    o = ShapesOracleReward()(images, prompts, [{}] * len(prompts))[0].numpy()

    rr, oo = r.reshape(-1, k), o.reshape(-1, k)
    within = [stats.spearmanr(a, b)[0] for a, b in zip(rr, oo) if a.std() > 0 and b.std() > 0]
    print(f"{len(rr)} held-out prompts x {k} images; oracle mean {o.mean():.3f}")
    print(
        f"reward vs oracle: Pearson {stats.pearsonr(r, o)[0]:.3f} over all images; "
        f"mean within-prompt Spearman {np.mean(within):.3f} ({len(within)} prompts)\n"
    )
    print("| K | oracle gain of reward's best-of-K | oracle's own best-of-K |")
    print("|---|---|---|")
    for g in (2, 4, 8):
        rg, og = rr[:, :g], oo[:, :g]
        pick = og[np.arange(len(og)), rg.argmax(1)] - og.mean(1)
        print(f"| {g} | {pick.mean():+.3f} | {(og.max(1) - og.mean(1)).mean():+.3f} |")

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

    from shapes.perturb import KINDS, faithful_scene, perturb
    from shapes.prompts import sample_prompt
    from shapes.world import render, to_tensor

    rng = np.random.default_rng(args.seed + 123)
    drops: dict[str, list[float]] = {kd: [] for kd in KINDS}
    for _ in range(4 * args.prompts):
        spec = sample_prompt(rng)
        scene = faithful_scene(spec, rng)
        variants = [(kd, perturb(spec, scene, kd, rng)) for kd in KINDS]
        variants = [(kd, v) for kd, v in variants if v is not None]
        imgs = to_tensor([render(scene)] + [render(v.scene) for _, v in variants])
        with torch.no_grad():
            sc = reward.score(imgs, [spec.text] * len(imgs)).numpy()
        for (kd, _), v in zip(variants, sc[1:]):
            drops[kd].append(float(sc[0] - v))
    print(f"\n| perturbation ({4 * args.prompts} renders) | mean reward drop | share dropped |")
    print("|---|---|---|")
    for kd, d in drops.items():
        print(f"| {kd} | {np.mean(d):+.3f} | {np.mean(np.array(d) > 0):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
