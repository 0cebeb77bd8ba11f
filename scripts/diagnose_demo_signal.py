"""How much does the demo's reward tell RL about the oracle? Measured on base-model samples.

Usage:
    HF_HUB_OFFLINE=1 python scripts/diagnose_demo_signal.py [--prompts 64] [--images 8]
        [--reward shapes] [--seed 0] [--cache /tmp/demo_signal.safetensors]
    HF_HUB_OFFLINE=1 python scripts/diagnose_demo_signal.py --branch 0 4 9 14 19 [--prompts 64]
    HF_HUB_OFFLINE=1 python scripts/diagnose_demo_signal.py --gradient-agreement 8

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
objects shows up there), and the mean oracle alignment. ``--on training [--run-seed S]``
judges on the RL training prompts of the demo run with ``--seed S`` instead: in-sample
against held-out gain.

With ``--branch S ...``, it instead measures where the oracle's outcome is decided: for each S,
the ``--images`` images of a prompt share the initial noise and the first S denoising steps
(the same trajectory) and diverge after; it prints the within-prompt oracle variance and the
oracle's best-of-K gain. What is left at S is the part of the outcome the steps after S
decide, i.e. what their log-probabilities can be credited with in a policy gradient. Then,
per step, the noise std and the step's share of the squared gradient norm of the log-prob
(w.r.t. the attention projections the LoRA adapts): how much of a DDPO gradient it supplies.

With ``--gradient-agreement N``, the oracle-rewarded policy gradient of N independent demo
epochs (8 of the seed's RL training prompts x 4 images each, group-centred advantages, at
the base weights) and the mean cosine between every pair: near 0, one epoch's gradient is
mostly noise. ``--same-prompts`` puts every epoch on the same 8 prompts (fresh noise), so a
direction particular to those prompts would show too; ``--one-step FIRST LAST`` samples each
epoch with one stochastic step per prompt (drawn in FIRST..LAST; the other steps DDIM with
eta 0, the prompt's images sharing the initial noise), so a group's reward differences come
from that step alone and only its log-prob is differentiated: single-step branching, the
sharpest per-step credit. ``--draft K`` compares DRaFT-K gradients of the HyperAlign
``shapes`` reward instead (8 prompts x 1 image per batch, as the ``draft`` preset): a
pathwise gradient, not a score-function one.

Images are cached (``--cache FILE.safetensors``, prompts and settings in ``FILE.json``) so
other rewards can be compared on the same samples; a cache made with other prompts, image
counts or seed is regenerated.
"""

from __future__ import annotations

import argparse
import json
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


def judged_prompts(n_prompts: int, on: str, run_seed: int) -> list[str]:
    """The first ``n_prompts`` held-out prompts (``on="held-out"``), or of the RL training
    prompts of ``hyperalign demo --seed run_seed`` with its defaults (``on="training"``)."""
    if on == "training":
        from rlhf import demo

        parser = argparse.ArgumentParser()
        demo.add_arguments(parser)
        run = parser.parse_args(["--seed", str(run_seed)])  # the demo's defaults
        return demo.demo_prompts(run).training[:n_prompts]
    return held_out_prompts(DEFAULT_PIPELINE)[:n_prompts]


def judge_loras(
    loras: list[str], n_prompts: int, seed: int, on: str = "held-out", run_seed: int = 0
) -> None:
    """Fact accuracy per kind, surplus objects and oracle alignment, base model vs each LoRA,
    on held-out or RL training prompts (:func:`judged_prompts`)."""
    from shapes.oracle import OracleConfig, fact_breakdown_of_scenes, read_objects
    from shapes.perturb import alignment_under

    oracle = OracleConfig()  # the oracle reward's default truth model

    prompts = [p for p in judged_prompts(n_prompts, on, run_seed) for _ in range(2)]
    print(f"{len(prompts) // 2} {on} prompts x 2 images")
    print("| model | oracle (Δ) | objects read − asked | " + " | ".join(KIND_COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(KIND_COLUMNS))
    base = None
    for lora in [None, *loras]:
        x = sample_model(prompts, seed, lora)
        scenes = [read_objects(img.double(), oracle) for img in x]
        kinds = fact_breakdown_of_scenes(scenes, prompts, oracle)
        scores = [
            alignment_under(text, objs, oracle.truth, oracle.unmentioned_weight)
            for objs, text in zip(scenes, prompts)
        ]
        acc = " | ".join(f"{kinds[k]:.3f}" if k in kinds else "—" for k in KIND_COLUMNS)
        o = float(np.mean(scores))
        base = o if base is None else base
        print(
            f"| {lora or 'base'} | {o:.3f} ({o - base:+.3f}) | {kinds['objects_excess']:+.2f} | {acc} |"
        )


@torch.no_grad()
def branched_latents(pipe, prompt: str, k: int, shared: int, gen: torch.Generator):
    """Final latents (k, C, h, w) of ``k`` images of ``prompt`` that share the initial noise
    and the first ``shared`` steps of the demo's sampler (0: only the initial noise) and draw
    independent step noise after. Image 0 follows the same trajectory whatever ``shared``
    (the group copies it), so one generator state gives one shared prefix for every S."""
    from rlhf.ddim_logprob import ddim_step_with_logprob
    from rlhf.sampling import predict_noise

    s, sched, unet = DEMO_SAMPLER, pipe.scheduler, pipe.unet
    embeds, neg = _prompt_states(pipe, [prompt] * k)  # (k, L, D) each
    size = unet.config.sample_size
    x = torch.randn(1, unet.config.in_channels, size, size, generator=gen).expand(k, -1, -1, -1)
    sched.set_timesteps(s.steps)
    for i, t in enumerate(sched.timesteps):
        eps = predict_noise(unet, x, t, embeds, neg, s.guidance_scale)
        x = ddim_step_with_logprob(sched, eps, t, x, eta=s.eta, generator=gen).prev_sample
        if i < shared:
            x = x[:1].expand(k, -1, -1, -1)  # the group keeps image 0's trajectory
    return x


def branched_oracle(pipe, prompts: list[str], k: int, shared: int, seed: int) -> np.ndarray:
    """Oracle alignments (P, k) of :func:`branched_latents` for each prompt."""
    from rlhf.sampling import decode_latents
    from shapes.oracle import ShapesOracleReward

    gen = torch.Generator().manual_seed(seed)
    out = []
    for prompt in prompts:
        with torch.no_grad():
            images = decode_latents(pipe, branched_latents(pipe, prompt, k, shared, gen))
        out.append(ShapesOracleReward()(images, [prompt] * k, [{}] * k)[0].numpy())
    return np.stack(out)


def step_gradient_shares(pipe, prompts: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(std (T,), share (T,)): each step's noise std and its share of the summed squared norm
    of grad log p(x_{t-1} | x_t) w.r.t. the attention projections (the LoRA's targets), over
    one demo-sampler trajectory per prompt: how much of a DDPO gradient each step supplies."""
    from rlhf.sampling import sample_with_logprob

    params = _adapted_params(pipe.unet)
    embeds, neg = _prompt_states(pipe, prompts)
    s = DEMO_SAMPLER
    traj = sample_with_logprob(
        pipe, embeds, neg, s.steps, s.guidance_scale, s.eta,
        generator=torch.Generator().manual_seed(seed), decode=False,
    )  # fmt: skip
    sq = np.zeros((len(prompts), s.steps))
    std = np.zeros(s.steps)
    for j in range(s.steps):
        for b in range(len(prompts)):
            step = _recorded_step(pipe, traj, j, embeds, neg, slice(b, b + 1))
            grads = torch.autograd.grad(step.log_prob.sum(), params)
            sq[b, j] = float(sum((g.double() ** 2).sum() for g in grads))
        std[j] = float(step.std.reshape(-1)[0])
    total = sq.mean(0)
    return std, total / total.sum()


def _prompt_states(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder states (B, L, D) of ``prompts`` and of the empty negative prompt."""
    from rlhf.sampling import encode_prompts

    embeds = encode_prompts(pipe, prompts, pipe.device)
    return embeds, encode_prompts(pipe, [""], pipe.device).expand(len(prompts), -1, -1)


def _flat_grad(objective: torch.Tensor, params) -> torch.Tensor:
    """The gradient of the scalar ``objective`` w.r.t. ``params``, flattened into one vector."""
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, params)])


def _adapted_params(unet) -> list[torch.nn.Parameter]:
    """The UNet weights the demo's LoRA adapts (its preset's ``lora_target_modules``)."""
    from rlhf.config import shapes_demo

    targets = shapes_demo().lora_target_modules
    return [p for n, p in unet.named_parameters() if any(t in n for t in targets)]


def _recorded_step(pipe, traj, j: int, embeds, neg, rows: slice = slice(None)):
    """The demo sampler's step ``j`` of the ``rows`` of trajectory ``traj``, recomputed with
    gradients at the current weights and scored at the recorded next latents."""
    from rlhf.ddim_logprob import ddim_step_with_logprob
    from rlhf.sampling import predict_noise

    s = DEMO_SAMPLER
    x, t = traj.latents[rows, j], traj.timesteps[0, j]
    eps = predict_noise(pipe.unet, x, t, embeds[rows], neg[rows], s.guidance_scale)
    return ddim_step_with_logprob(
        pipe.scheduler, eps, t, x, eta=s.eta, prev_sample=traj.next_latents[rows, j]
    )


def epoch_gradients(pipe, reward_fn, prompts: list[str], k: int, seed: int) -> torch.Tensor:
    """(T, P): the per-step policy gradient of one demo epoch at the sampling weights (ratio
    1), ``mean_i A_i * grad log p_i(step)`` over ``k`` images of each prompt, with the demo's
    group-centred advantages of ``reward_fn``, w.r.t. the attention projections (flattened)."""
    from rlhf.sampling import sample_with_logprob
    from rlhf.stat_tracking import group_centered_advantages

    s = DEMO_SAMPLER
    params = _adapted_params(pipe.unet)
    batch = [p for p in prompts for _ in range(k)]
    embeds, neg = _prompt_states(pipe, batch)
    gen = torch.Generator().manual_seed(seed)
    traj = sample_with_logprob(pipe, embeds, neg, s.steps, s.guidance_scale, s.eta, generator=gen)
    rewards = reward_fn(traj.images, batch, [{}] * len(batch))[0]
    adv = torch.as_tensor(group_centered_advantages(np.asarray(rewards), batch)).float()
    rows = []
    for j in range(s.steps):
        step = _recorded_step(pipe, traj, j, embeds, neg)
        rows.append(_flat_grad((adv * step.log_prob).mean(), params))
    return torch.stack(rows)


def gradient_agreement(grads: list[torch.Tensor], steps: slice) -> tuple[float, float]:
    """Mean and standard error of the cosine between the gradients (summed over ``steps``) of
    every pair of epochs: about SNR^2 / (1 + SNR^2) of one epoch's gradient, 0 for noise."""
    vecs = [g[steps].sum(0) for g in grads]
    cos = [
        float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        for i, a in enumerate(vecs)
        for b in vecs[i + 1 :]
    ]
    return float(np.mean(cos)), float(np.std(cos) / np.sqrt(len(cos)))


def print_branching(n_prompts: int, k: int, shared_steps: list[int], seed: int) -> None:
    """Within-prompt oracle variance and best-of-K gain when images share the first S steps."""
    pipe = load_pipeline(DEFAULT_PIPELINE)
    prompts = held_out_prompts(DEFAULT_PIPELINE)[:n_prompts]
    print(f"{len(prompts)} held-out prompts x {k} images, {DEMO_SAMPLER.steps} steps\n")
    print(
        "| steps shared | within-prompt oracle variance | share of S = 0 | oracle best-of-K gain |"
    )
    print("|---|---|---|---|")
    base = None
    for shared in shared_steps:
        oo = branched_oracle(pipe, prompts, k, shared, seed)
        var = float(oo.var(1, ddof=1).mean())
        base = var if base is None else base
        gain = float((oo.max(1) - oo.mean(1)).mean())
        print(f"| {shared} | {var:.4f} | {var / base:.2f} | {gain:+.3f} |")
    std, share = step_gradient_shares(pipe, prompts[:8], seed)
    print("\n| step | noise std | share of the log-prob gradient (squared norm) |")
    print("|---|---|---|")
    for j, (sd, sh) in enumerate(zip(std, share), start=1):
        print(f"| {j} | {sd:.3f} | {sh:.3f} |")


def one_step_epoch_gradient(
    pipe, reward_fn, prompts: list[str], k: int, seed: int, window: tuple[int, int]
) -> tuple[torch.Tensor, float]:
    """((1, P), within-group oracle variance): the policy gradient of one epoch in which each
    prompt's ``k`` images share the initial noise and have one stochastic step, drawn per
    prompt uniformly in ``window`` (1-based steps, inclusive); every other step is DDIM with
    eta 0. All of a group's reward differences then come from that one step's noise, the
    most precise credit a single step can get (single-step branching). Group-centred
    advantages of ``reward_fn``, at the sampling weights, w.r.t. the attention projections."""
    from rlhf.ddim_logprob import ddim_step_with_logprob
    from rlhf.sampling import decode_latents, predict_noise
    from rlhf.stat_tracking import group_centered_advantages

    s, sched, unet = DEMO_SAMPLER, pipe.scheduler, pipe.unet
    batch = [p for p in prompts for _ in range(k)]
    embeds, neg = _prompt_states(pipe, batch)
    gen = torch.Generator().manual_seed(seed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(len(prompts), channels, size, size, generator=gen).repeat_interleave(k, 0)
    branch = torch.randint(window[0], window[1] + 1, (len(prompts),), generator=gen)
    branch = branch.repeat_interleave(k)  # (B,), 1-based
    xs, nexts = torch.empty_like(x), torch.empty_like(x)
    ts = torch.zeros(len(batch), dtype=torch.long)
    sched.set_timesteps(s.steps)
    with torch.no_grad():
        for j, t in enumerate(sched.timesteps, start=1):
            eps = predict_noise(unet, x, t, embeds, neg, s.guidance_scale)
            det = sched.step(eps, t, x, eta=0.0).prev_sample
            sto = ddim_step_with_logprob(sched, eps, t, x, eta=s.eta, generator=gen).prev_sample
            here = branch == j
            xs[here], nexts[here], ts[here] = x[here], sto[here], int(t)
            x = torch.where(here.reshape(-1, 1, 1, 1), sto, det)
        images = decode_latents(pipe, x)
    rewards = np.asarray(reward_fn(images, batch, [{}] * len(batch))[0], dtype=np.float64)
    adv = torch.as_tensor(group_centered_advantages(rewards, batch)).float()
    eps = predict_noise(unet, xs, ts, embeds, neg, s.guidance_scale)
    step = ddim_step_with_logprob(sched, eps, ts, xs, eta=s.eta, prev_sample=nexts)
    grad = _flat_grad((adv * step.log_prob).mean(), _adapted_params(unet))
    within = float(rewards.reshape(len(prompts), k).var(1, ddof=1).mean())
    return grad[None], within


def draft_batch_gradient(pipe, reward, prompts: list[str], k: int, seed: int) -> torch.Tensor:
    """(1, P): the DRaFT-K gradient of one batch (one image per prompt, the demo sampler, the
    gradient through its last ``k`` steps and the straight-through clamp, as the ``draft``
    preset) of ``reward.score``, w.r.t. the attention projections, at the base weights."""
    from rlhf.ddim_logprob import ddim_step_with_logprob
    from rlhf.draft import clamp_straight_through
    from rlhf.sampling import predict_noise

    s, sched, unet, vae = DEMO_SAMPLER, pipe.scheduler, pipe.unet, pipe.vae
    embeds, neg = _prompt_states(pipe, prompts)
    gen = torch.Generator().manual_seed(seed)
    size, channels = unet.config.sample_size, unet.config.in_channels
    x = torch.randn(len(prompts), channels, size, size, generator=gen)
    sched.set_timesteps(s.steps)
    for j, t in enumerate(sched.timesteps):
        with torch.set_grad_enabled(j >= s.steps - k):
            eps = predict_noise(unet, x, t, embeds, neg, s.guidance_scale)
            x = ddim_step_with_logprob(sched, eps, t, x, eta=s.eta, generator=gen).prev_sample
    raw = vae.decode(x / vae.config.scaling_factor, return_dict=False)[0].float() / 2 + 0.5
    score = reward.score(clamp_straight_through(raw), prompts).mean()
    return _flat_grad(score, _adapted_params(unet))[None]


def print_gradient_agreement(
    n_epochs: int,
    seed: int,
    same_prompts: bool = False,
    window: tuple[int, int] | None = None,
    draft_k: int = 0,
) -> None:
    """Agreement between the oracle-rewarded policy gradients of independent demo epochs:
    each epoch on its own 8 RL training prompts, or (``same_prompts``) all on the first 8
    with fresh noise; with ``window``, epochs of :func:`one_step_epoch_gradient`; with
    ``draft_k``, the DRaFT gradients of the HyperAlign ``shapes`` reward on those prompts
    (:func:`draft_batch_gradient`)."""
    from shapes.oracle import ShapesOracleReward

    pipe = load_pipeline(DEFAULT_PIPELINE)
    prompts = judged_prompts(64, "training", seed)
    per = 8  # prompts per epoch: the demo's 32 samples in groups of 4
    chunks = [
        prompts[:per] if same_prompts else prompts[per * i : per * (i + 1)] for i in range(n_epochs)
    ]
    which = "the same 8 training prompts" if same_prompts else "8 training prompts"
    n = DEMO_SAMPLER.steps
    if draft_k:
        from reward import build_reward

        reward = build_reward("shapes")
        grads = [
            draft_batch_gradient(pipe, reward, c, draft_k, seed + i) for i, c in enumerate(chunks)
        ]
        m, se = gradient_agreement(grads, slice(0, 1))
        print(
            f"{n_epochs} independent DRaFT-{draft_k} batches ({which}, 1 image each), "
            "the HyperAlign shapes reward's gradient"
        )
        print("| gradient | mean pairwise cosine | standard error |")
        print("|---|---|---|")
        print(f"| DRaFT-{draft_k} | {m:+.4f} | {se:.4f} |")
        return
    if window is not None:
        runs = [
            one_step_epoch_gradient(pipe, ShapesOracleReward(), c, 4, seed + i, window)
            for i, c in enumerate(chunks)
        ]
        m, se = gradient_agreement([g for g, _ in runs], slice(0, 1))
        within = np.mean([w for _, w in runs])
        print(f"{n_epochs} independent epochs ({which} x 4 images each), oracle reward, one")
        print(f"stochastic step per prompt in {window[0]}..{window[1]}, the others DDIM eta 0")
        print(
            "| trained step | mean pairwise cosine | standard error | within-group oracle variance |"
        )
        print("|---|---|---|---|")
        print(f"| the stochastic one | {m:+.4f} | {se:.4f} | {within:.4f} |")
        return
    grads = [
        epoch_gradients(pipe, ShapesOracleReward(), c, 4, seed + i) for i, c in enumerate(chunks)
    ]
    print(f"{n_epochs} independent demo epochs ({which} x 4 images each), oracle reward")
    print("| steps | mean pairwise cosine of the epochs' gradients | standard error |")
    print("|---|---|---|")
    for name, sl in (("all", slice(0, n)), ("1-18", slice(0, n - 2)), ("19-20", slice(n - 2, n))):
        m, se = gradient_agreement(grads, sl)
        print(f"| {name} | {m:+.4f} | {se:.4f} |")


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
    ap.add_argument(
        "--on",
        choices=("held-out", "training"),
        default="held-out",
        help="--loras: judge on held-out prompts or on the RL training prompts of --run-seed",
    )
    ap.add_argument("--run-seed", type=int, default=0, help="--on training: the demo's --seed")
    ap.add_argument(
        "--branch", nargs="*", type=int, default=None, help="steps shared, e.g. 0 4 9 14 19"
    )
    ap.add_argument(
        "--gradient-agreement",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="cosine between the policy gradients of this many independent demo epochs (<= 8)",
    )
    ap.add_argument(
        "--same-prompts",
        action="store_true",
        help="--gradient-agreement: every epoch on the same 8 prompts (fresh noise)",
    )
    ap.add_argument(
        "--one-step",
        nargs=2,
        type=int,
        default=None,
        metavar=("FIRST", "LAST"),
        help="--gradient-agreement: one stochastic step per prompt, drawn in FIRST..LAST",
    )
    ap.add_argument(
        "--draft",
        type=int,
        default=0,
        metavar="K",
        help="--gradient-agreement: DRaFT-K gradients of the shapes reward instead",
    )
    args = ap.parse_args(argv)
    if (args.same_prompts or args.one_step or args.draft) and not args.gradient_agreement:
        ap.error("--same-prompts, --one-step and --draft only apply to --gradient-agreement N")
    if args.one_step and args.draft:
        ap.error("--one-step and --draft are two kinds of gradient; give one")
    if not 0 <= args.draft <= DEMO_SAMPLER.steps:
        ap.error(f"--draft K takes K in 1..{DEMO_SAMPLER.steps}")
    if args.gradient_agreement:
        if not 2 <= args.gradient_agreement <= 8:
            ap.error("--gradient-agreement takes 2..8 epochs (8 prompts each of the 64)")
        window = tuple(args.one_step) if args.one_step else None
        if window and not 1 <= window[0] <= window[1] <= DEMO_SAMPLER.steps:
            ap.error(f"--one-step takes FIRST <= LAST in 1..{DEMO_SAMPLER.steps}")
        print_gradient_agreement(
            args.gradient_agreement, args.seed, args.same_prompts, window, args.draft
        )
        return 0
    if args.branch is not None:
        if (
            not args.branch
            or args.branch[0] != 0
            or any(not 0 <= b <= DEMO_SAMPLER.steps for b in args.branch)
        ):
            ap.error(f"--branch takes step counts in 0..{DEMO_SAMPLER.steps}, starting with 0")
        print_branching(args.prompts, args.images, args.branch, args.seed)
        return 0
    if args.loras is not None:
        judge_loras(args.loras, args.prompts, args.seed, args.on, args.run_seed)
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
