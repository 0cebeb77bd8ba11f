"""The main job, end to end on a CPU: RL with the HyperAlign reward on the shapes world.

``make demo`` runs ``accelerate launch --cpu -m hyperalign demo``:

1. loads the shipped tiny Stable Diffusion (``shapes/assets/sd``) and the shipped
   HyperAlign ``"shapes"`` reward (``shapes/assets/reward``), with the shapes-world oracle
   as a zero-weight critic (logged, never optimised);
2. generates images for held-out prompts (never seen by the diffusion model nor by RL) with
   fixed seeds and scores them: mean reward and oracle alignment *before*;
3. fine-tunes LoRA weights of the UNet against HyperAlign on training prompts, with DDPO
   (``--train-mode ppo``, the default) or DRaFT-K, RAFT or DiffusionNFT (``draft``,
   ``raft``, ``nft``; the presets of ``rlhf.config.DEMO_PRESETS``). ``--reward oracle``
   optimises the oracle itself instead (HyperAlign logged at weight 0): it measures what
   the RL algorithm can do when the reward is perfect;
4. regenerates the same prompts with the same seeds *after*, and reports means with
   bootstrap 95 % intervals, the paired improvement with its interval, and the correlation
   between reward and oracle on the generated images (the reward-hacking check).

Outputs in ``--out`` (default ``runs/demo``): ``report.md``, ``metrics.json``,
``curves.png`` (reward and oracle per epoch), ``grid_before_after.png``, the LoRA in
``lora/`` (``pipe.load_lora_weights``), and the trainer's config, checkpoints and logs.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperalign.common import atomic_write_json, atomic_write_text
from hyperalign.stats import ci_summary, correlations, paired_ci
from rlhf.config import DEMO_PRESETS, DDPOConfig, apply_overrides, shapes_demo_flow
from rlhf.pipeline import SamplerSettings, generate_batches, load_pipeline
from rlhf.prompts import FixedPrompts
from shapes.assets import FLOW_DIR, SD_DIR

DEFAULT_PIPELINE = SD_DIR
MODELS = {"sd": SD_DIR, "flow": FLOW_DIR}
"""``--model``: the shipped shapes pipeline it names (DDPO and the other modes on the Stable
Diffusion, Flow-GRPO on the flow-matching Stable Diffusion 3)."""
ORACLE_REWARD = "oracle"
"""``--reward`` value that optimises the shapes-world oracle (HyperAlign "shapes" logged)."""


def pipeline_dir(args: argparse.Namespace) -> Path:
    """``--pipeline``, else the shipped pipeline of ``--model``."""
    if getattr(args, "pipeline", None):
        return Path(args.pipeline)
    return MODELS[getattr(args, "model", "sd")]


def held_out_prompts(pipeline_dir: Path) -> list[str]:
    """The prompts the shapes pipeline never saw in training (``heldout_prompts.json``)."""
    path = Path(pipeline_dir) / "heldout_prompts.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; the shapes pipeline is built by scripts/train_shapes_sd.py"
        )
    return list(json.loads(path.read_text()))


def training_prompts(n: int, exclude: set[str], seed: int) -> list[str]:
    """``n`` distinct shapes-grammar prompts, none of them in ``exclude``."""
    from shapes.prompts import sample_prompt

    rng = np.random.default_rng(seed)
    out: list[str] = []
    for _ in range(100 * n):
        text = sample_prompt(rng).text
        if text not in exclude and text not in out:
            out.append(text)
            if len(out) == n:
                return out
    raise RuntimeError(f"could not draw {n} distinct training prompts")


def build_reward_fn(reward: str, device):
    """HyperAlign (weight 1) with the shapes oracle as a zero-weight critic; with
    ``reward="oracle"`` the other way round (the "shapes" HyperAlign measured, the oracle
    optimised). Either way ``info`` holds both, under "hyperalign" and "oracle"."""
    from reward import WeightedReward, build_reward
    from shapes.oracle import ShapesOracleReward

    oracle = reward == ORACLE_REWARD
    return WeightedReward(
        {
            "hyperalign": (
                build_reward("shapes" if oracle else reward, device=device),
                0.0 if oracle else 1.0,
            ),
            "oracle": (ShapesOracleReward(), 1.0 if oracle else 0.0),
        }
    )


@dataclass
class DemoPrompts:
    """The demo's prompts: held-out ones judged with fixed seeds, and RL training ones."""

    held_out: list[str]
    training: list[str]
    eval_prompts: list[str]  # each held-out prompt repeated --eval-images times
    eval_seeds: list[int]  # one noise seed per evaluation image


@dataclass
class Judgement:
    """Held-out images and their scores, at one point of training."""

    images: torch.Tensor  # (N, 3, H, W) in [0, 1], CPU
    reward: np.ndarray  # (N,) HyperAlign
    oracle: np.ndarray  # (N,) oracle alignment


def is_flow(cfg: DDPOConfig) -> bool:
    """Whether ``cfg`` runs Flow-GRPO (its pipeline is a flow-matching one)."""
    from rlhf.flow.select import resolve_trainer

    return resolve_trainer(cfg) == "flow_grpo"


def eval_settings(cfg: DDPOConfig) -> SamplerSettings:
    """The sampler of the before/after judgement: the RL sampler's steps and CFG, with its
    eta (DDIM), or for flow models the pipeline's own deterministic Euler sampler."""
    if is_flow(cfg):
        return SamplerSettings(
            steps=cfg.sample_num_steps,
            guidance_scale=cfg.sample_guidance_scale,
            eta=None,
            max_sequence_length=cfg.flow_max_sequence_length,
        )
    return SamplerSettings(
        steps=cfg.sample_num_steps, guidance_scale=cfg.sample_guidance_scale, eta=cfg.sample_eta
    )


@torch.no_grad()
def generate_and_score(pipe, prompts, seeds, settings: SamplerSettings, reward_fn, batch: int):
    """Images for (prompt, seed) pairs with the HyperAlign reward and the oracle alignment of
    each (a :class:`Judgement`)."""
    images, hyper, oracle = [], [], []
    for start, x in generate_batches(pipe, prompts, seeds, settings, batch):
        p = prompts[start : start + batch]
        _, info = reward_fn(x, p, [{} for _ in p])
        images.append(x.cpu())
        hyper += info["hyperalign"]
        oracle += info["oracle"]
    return Judgement(torch.cat(images), np.array(hyper), np.array(oracle))


def _plot_curves(history: list[dict], path: Path) -> None:
    """Mean reward and oracle alignment of each epoch's training samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] + 1 for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(epochs, [h["reward_mean"] for h in history], "o-")
    ax[0].set(title="HyperAlign reward (training samples)", xlabel="epoch", ylabel="mean")
    ax[1].plot(
        epochs, [h.get("reward_info/oracle_mean", np.nan) for h in history], "o-", color="C1"
    )
    ax[1].set(title="oracle alignment (training samples)", xlabel="epoch", ylabel="mean")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_grid(before: Judgement, after: Judgement, prompts, path: Path, n: int = 8) -> None:
    """The first ``n`` held-out images before (top) and after (bottom), with their scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(prompts))
    fig, axes = plt.subplots(2, n, figsize=(1.9 * n, 4.6), squeeze=False)
    for j in range(n):
        for i, (judged, tag) in enumerate(((before, "before"), (after, "after"))):
            h, o = judged.reward, judged.oracle
            ax = axes[i][j]
            ax.imshow(judged.images[j].permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
            ax.axis("off")
            title = f"{tag}: r {h[j]:.2f} o {o[j]:.2f}"
            prompt = "\n".join(textwrap.wrap(prompts[j], 26))  # the whole prompt
            ax.set_title(f"{prompt}\n{title}" if i == 0 else title, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hyperalign demo``."""
    parser.add_argument(
        "--model",
        default="sd",
        choices=sorted(MODELS),
        help="the shipped shapes model: sd (Stable Diffusion, DDPO and the other modes) or "
        "flow (Stable Diffusion 3, flow matching, Flow-GRPO)",
    )
    parser.add_argument(
        "--pipeline", default=None, help="diffusers pipeline dir (default: the --model's)"
    )
    parser.add_argument(
        "--reward",
        default="shapes",
        help=f"HyperAlign preset or checkpoint, or {ORACLE_REWARD!r} to optimise the oracle",
    )
    parser.add_argument(
        "--train-mode",
        default="ppo",
        choices=sorted(DEMO_PRESETS),
        help="RL algorithm: its preset of rlhf.config.DEMO_PRESETS (default: ppo, DDPO)",
    )
    parser.add_argument("--out", default="runs/demo", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-prompts", type=int, default=128, help="held-out prompts to judge")
    parser.add_argument("--eval-images", type=int, default=2, help="images per held-out prompt")
    parser.add_argument("--train-prompts", type=int, default=64, help="RL training prompts")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a DDPOConfig field of the --train-mode preset (repeatable)",
    )


def demo_config(args: argparse.Namespace) -> DDPOConfig:
    """The ``--train-mode`` preset with the pipeline, seed, output folder and ``--set``
    overrides; refuses DRaFT on the oracle, which has no gradient."""
    out = Path(args.out)
    mode = getattr(args, "train_mode", "ppo")
    if mode not in DEMO_PRESETS:
        raise ValueError(f"unknown --train-mode {mode!r}; valid: {', '.join(DEMO_PRESETS)}")
    model = getattr(args, "model", "sd")
    if model == "flow":
        if mode != "ppo":
            raise ValueError(
                f"--model flow trains with Flow-GRPO (PPO-clip on group advantages); "
                f"--train-mode {mode!r} runs on --model sd only"
            )
        cfg = shapes_demo_flow()
    else:
        cfg = DEMO_PRESETS[mode]()
    cfg.pretrained_model = str(pipeline_dir(args))
    cfg.seed = args.seed
    cfg.logdir, cfg.run_name = str(out.parent), out.name
    cfg = apply_overrides(cfg, args.set)
    cfg.validate()
    if cfg.train_mode == "draft" and args.reward == ORACLE_REWARD:
        raise ValueError(
            "train_mode 'draft' backpropagates through the reward, and the oracle is not "
            "differentiable; use --reward shapes (or another HyperAlign) with draft"
        )
    return cfg


def demo_prompts(args: argparse.Namespace) -> DemoPrompts:
    """Held-out prompts with their evaluation seeds, and training prompts disjoint from them."""
    held = held_out_prompts(pipeline_dir(args))[: args.eval_prompts]
    train = training_prompts(args.train_prompts, set(held), seed=1000 + args.seed)
    eval_prompts = [p for p in held for _ in range(args.eval_images)]
    eval_seeds = [10_000 * (args.seed + 1) + i for i in range(len(eval_prompts))]
    return DemoPrompts(held, train, eval_prompts, eval_seeds)


def build_trainer(cfg: DDPOConfig, args: argparse.Namespace, prompts: DemoPrompts):
    """The trainer on the training prompts, rewarded by HyperAlign (oracle logged) or, with
    ``--reward oracle``, by the oracle (HyperAlign logged)."""
    from accelerate import PartialState

    from rlhf.flow.select import trainer_class

    reward_fn = build_reward_fn(args.reward, PartialState().device)
    if is_flow(cfg):
        from rlhf.flow.pipeline import load_flow_pipeline

        pipe = load_flow_pipeline(cfg.pretrained_model, revision=cfg.pretrained_revision)
    else:
        pipe = load_pipeline(
            cfg.pretrained_model, revision=cfg.pretrained_revision, resolution=cfg.resolution
        )
    return trainer_class(cfg)(
        cfg, reward_fn=reward_fn, prompt_fn=FixedPrompts(prompts.training), pipeline=pipe
    )


def judge(trainer, prompts: DemoPrompts, cfg: DDPOConfig) -> Judgement:
    """Generate the held-out images with the trainer's current weights and score them."""
    trainer.unet.eval()
    return generate_and_score(
        trainer.pipe,
        prompts.eval_prompts,
        prompts.eval_seeds,
        eval_settings(cfg),
        trainer.reward_fn,
        cfg.sample_batch_size,
    )


def demo_metrics(args, prompts: DemoPrompts, before: Judgement, after: Judgement) -> dict:
    """Means with bootstrap intervals before and after, the paired improvement, the
    reward-oracle correlation and the per-image scores."""
    pearson, spearman = correlations(
        np.concatenate([before.reward, after.reward]),
        np.concatenate([before.oracle, after.oracle]),
    )
    return {
        "seed": args.seed,
        "reward": getattr(args, "reward", "shapes"),
        "held_out_prompts": len(prompts.held_out),
        "images_per_prompt": args.eval_images,
        "training_prompts": len(prompts.training),
        "before": {"reward": ci_summary(before.reward), "oracle": ci_summary(before.oracle)},
        "after": {"reward": ci_summary(after.reward), "oracle": ci_summary(after.oracle)},
        "improvement": {
            "reward": paired_ci(after.reward, before.reward),
            "oracle": paired_ci(after.oracle, before.oracle),
        },
        "reward_oracle_correlation": {"pearson": pearson, "spearman": spearman},
        "facts": fact_changes(before, after, prompts.eval_prompts),
        "drift": drift(before, after),
        "per_image": {
            "prompt": prompts.eval_prompts,
            "seed": prompts.eval_seeds,
            "reward_before": before.reward.tolist(),
            "reward_after": after.reward.tolist(),
            "oracle_before": before.oracle.tolist(),
            "oracle_after": after.oracle.tolist(),
        },
    }


def fact_changes(before: Judgement, after: Judgement, prompts: list[str]) -> dict:
    """Per fact kind, the share of the held-out prompts' facts the oracle reads as true before
    and after, and the change; ``objects_excess`` is objects read - objects stated."""
    from shapes.oracle import fact_breakdown

    b, a = fact_breakdown(before.images, prompts), fact_breakdown(after.images, prompts)
    return {k: {"before": b[k], "after": a[k], "change": a[k] - b[k]} for k in b}


DRIFT_THRESHOLD = 0.05
"""Mean absolute pixel change (in [0, 1] units) above which an image counts as changed."""


def drift(before: Judgement, after: Judgement) -> dict:
    """How far the fine-tuned model moved from the base on the same noise: the mean absolute
    pixel difference of the paired images, and the share of images changed by more than
    :data:`DRIFT_THRESHOLD`."""
    per_image = (after.images - before.images).abs().mean(dim=(1, 2, 3)).numpy()
    return {
        "mean_abs_pixel": float(per_image.mean()),
        "share_changed": float((per_image > DRIFT_THRESHOLD).mean()),
        "threshold": DRIFT_THRESHOLD,
    }


def write_demo_outputs(out: Path, metrics: dict, history, before, after, prompts) -> str:
    """``metrics.json`` (strict JSON), ``curves.png``, ``grid_before_after.png`` and
    ``report.md``; returns the summary table."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", metrics, indent=1)
    _plot_curves(history, out / "curves.png")
    _plot_grid(before, after, prompts.eval_prompts, out / "grid_before_after.png")
    table = summary_table(metrics)
    atomic_write_text(out / "report.md", render_report(metrics, table))
    return table


def run(args: argparse.Namespace) -> int:
    """Judge the held-out prompts, fine-tune, judge them again, write the report."""
    t_start = time.perf_counter()
    cfg = demo_config(args)
    prompts = demo_prompts(args)
    trainer = build_trainer(cfg, args, prompts)

    t0 = time.perf_counter()
    before = judge(trainer, prompts, cfg)
    t_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    history = trainer.train()
    t_train = time.perf_counter() - t0
    after = judge(trainer, prompts, cfg)
    if not trainer.accelerator.is_main_process:
        return 0

    metrics = demo_metrics(args, prompts, before, after)
    metrics["history"] = history
    total = time.perf_counter() - t_start
    metrics["time_s"] = {"eval_once": t_eval, "train": t_train, "total": total}
    metrics["config"] = cfg.to_dict()
    out = Path(args.out)
    table = write_demo_outputs(out, metrics, history, before, after, prompts)
    print(table)
    print(f"\nreport: {out / 'report.md'}")
    return 0


def _row(name: str, m: dict) -> str:
    return f"| {name} | {m['mean']:.4f} | [{m['ci95'][0]:.4f}, {m['ci95'][1]:.4f}] | {m['n']} |"


def summary_table(m: dict) -> str:
    """The Markdown table of means, intervals and paired improvements, and the correlation."""
    lines = ["| quantity (held-out prompts) | mean | 95 % CI | n |", "|---|---|---|---|"]
    for what in ("reward", "oracle"):
        lines.append(_row(f"{what} before", m["before"][what]))
        lines.append(_row(f"{what} after", m["after"][what]))
        lines.append(_row(f"{what} after − before (paired)", m["improvement"][what]))
    c = m["reward_oracle_correlation"]
    lines.append(
        f"\nreward vs oracle on generated images: Pearson {c['pearson']:.3f}, "
        f"Spearman {c['spearman']:.3f}"
    )
    if "facts" in m:
        lines += [
            "",
            "| facts read as true (oracle) | before | after | change |",
            "|---|---|---|---|",
        ]
        for kind, v in m["facts"].items():
            name = "objects read − stated" if kind == "objects_excess" else kind
            lines.append(f"| {name} | {v['before']:.3f} | {v['after']:.3f} | {v['change']:+.3f} |")
    if "drift" in m:
        d = m["drift"]
        lines.append(
            f"\ndrift from the base model on the same noise: mean |Δpixel| "
            f"{d['mean_abs_pixel']:.4f}, {100 * d['share_changed']:.0f} % of images changed by "
            f"more than {d['threshold']}"
        )
    return "\n".join(lines)


def render_report(m: dict, table: str) -> str:
    """``report.md``: the setup, the table, a verdict on the oracle, and the output files."""
    cfg = m["config"]
    verdict = (
        "The oracle alignment rose: the improvement's interval is above zero."
        if m["improvement"]["oracle"]["ci95"][0] > 0
        else "The oracle alignment did NOT rise significantly (its improvement interval "
        "includes or is below zero)."
    )
    if m["improvement"]["reward"]["ci95"][0] > 0 and m["improvement"]["oracle"]["ci95"][0] <= 0:
        verdict += " The reward rose while the oracle did not: a sign of reward hacking."
    algorithm = {"ppo": "DDPO", "draft": "DRaFT-K", "raft": "RAFT", "nft": "DiffusionNFT"}
    algorithm = algorithm.get(cfg["train_mode"], cfg["train_mode"])
    sampler = f"{cfg['sample_num_steps']} DDIM steps"
    if cfg["trainer"] == "flow_grpo":
        algorithm = "Flow-GRPO"
        sampler = (
            f"{cfg['sample_num_steps']} SDE steps (noise level {cfg['flow_noise_level']}; "
            "judged with the Euler ODE sampler)"
        )
    optimised = (
        "the oracle as the reward"
        if m.get("reward") == ORACLE_REWARD
        else f"the reward `{m.get('reward', 'shapes')}`"
    )
    return f"""# Demo: {algorithm} on the shapes world with {optimised}

Seed {m["seed"]}; {cfg["num_epochs"]} epochs of {cfg["sample_batch_size"] * cfg["sample_num_batches_per_epoch"]}
samples ({cfg["sample_num_images_per_prompt"]} per prompt, `{cfg["advantage_mode"]}` advantages),
{sampler}, CFG {cfg["sample_guidance_scale"]}, LoRA rank {cfg["lora_rank"]},
lr {cfg["train_learning_rate"]}; {m["training_prompts"]} training prompts; judged on
{m["held_out_prompts"]} held-out prompts × {m["images_per_prompt"]} images with the same seeds
before and after. Wall time {m["time_s"]["total"]:.0f} s.

{table}

{verdict}

- `curves.png`: mean reward and oracle alignment of each epoch's training samples.
- `grid_before_after.png`: held-out prompts, before (top) and after (bottom), same noise;
  r = HyperAlign reward, o = oracle alignment.
- `lora/`: the LoRA weights (`pipe.load_lora_weights(dir)` of the pipeline class).
"""
