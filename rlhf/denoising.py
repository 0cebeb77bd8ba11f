"""Reward-weighted denoising: RL modes that train the plain diffusion loss on the model's own
samples instead of a policy gradient through the sampler's log-probabilities.

Each epoch samples like DDPO (`DDPOTrainer.sample_epoch`, `sample_num_images_per_prompt`
images of each prompt), scores the images and computes advantages
(`DDPOTrainer.compute_advantages`); then the final latents x_0 are noised again with fresh
noise at trained timesteps of the sampler's schedule (`timestep_order`: the same
`train_timestep_fraction` / `train_timestep_selection` as PPO), and the UNet regresses the
noise, weighted by reward:

- "raft" (RAFT, Dong et al. 2023, "RAFT: Reward rAnked FineTuning for Generative Foundation
  Model Alignment"; their diffusion experiments fine-tune Stable Diffusion on the best-of-K
  images): only the `raft_keep` highest-rewarded images of each prompt's group are trained,
  with the plain loss `|eps_theta(x_t, c) - eps|^2`.
- "nft" (DiffusionNFT, Zheng et al. 2025, arXiv 2509.16117): every image is trained, with
  the optimality probability `r = 1/2 + 1/2 clip(A / A_max, -1, 1)` (A: its advantage,
  A_max = `train_adv_clip_max`) weighting a positive and a negative branch,
  `loss = A_max / beta * (r |eps_plus - eps|^2 + (1 - r) |eps_minus - eps|^2)`,
  `eps_plus = (1 - beta) eps_old + beta eps_theta`, `eps_minus = (1 + beta) eps_old - beta
  eps_theta`. Its minimiser moves the prediction from `eps_old` by `(2r - 1) / beta` of the
  way to `eps`: towards good samples, away from bad ones, and no further (see `nft_loss`).

Where this differs from the sources, and why:
- DiffusionNFT is written for flow matching (velocity, x_t = (1 - t) x_0 + t eps); Stable
  Diffusion 1.x predicts the noise of the DDPM forward process (`scheduler.add_noise`), and
  the loss keeps its form with the model's own target (`denoising_target`). Its adaptive
  x_0-space loss weighting is not used.
- The "old" policy is the one that sampled the epoch: its predictions are computed before
  the epoch's first optimizer step (NVlabs/DiffusionNFT `scripts/train_nft_sd3.py` keeps an
  EMA adapter whose decay ramps up from 0 by 1e-3 per step, i.e. ~0 over a short run).
- Which prediction is regressed: with `train_cfg` (the default) the guided one,
  `uncond + g (cond - uncond)` at the sampling scale g, i.e. the policy that made the
  images; with `train_cfg=False` the conditional one, as Stable Diffusion is pre-trained
  (the images were made with g times any learned change, so training the conditional
  branch on them can feed back through the next epoch's CFG). Measured with the oracle as
  the reward (docs/rlhf.md, "Training modes"): RAFT raised the training reward for about
  10 epochs and then collapsed either way (held-out oracle -0.39 conditional, -0.19
  guided, after 24 epochs): on its own samples the denoising loss drifts. NFT, whose
  weights are centred in each group, did better on the conditional prediction (+0.011 at
  lr 1e-2, +0.035 at 3e-3) than on the guided one (-0.023 at 1e-3, -0.073 at 1e-2).
  DiffusionNFT itself samples without CFG.
- With `train_kl_coef > 0` the loss adds `train_kl_coef * |eps_theta - eps_ref|^2` to the
  adapter-disabled model (DiffusionNFT's KL term on predictions).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhf.sampling import predict_noise
from rlhf.stat_tracking import nanmean

__all__ = [
    "optimality_probability",
    "nft_loss",
    "denoising_mse",
    "best_of_groups",
    "denoising_target",
    "denoising_epoch",
]


# ------------------------------------------------------------------------------- math ---
def optimality_probability(advantages: torch.Tensor, adv_clip: float) -> torch.Tensor:
    """DiffusionNFT's `r = 1/2 + 1/2 clip(A / adv_clip, -1, 1)` in [0, 1]; (N,) -> (N,)."""
    return 0.5 + 0.5 * (advantages.float() / adv_clip).clamp(-1.0, 1.0)


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32, or fp64 if it is: the losses are computed in fp32 whatever the model dtype."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over all non-batch dims, in >= fp32; (B, ...) -> (B,)."""
    return ((_at_least_fp32(a) - _at_least_fp32(b)) ** 2).mean(dim=tuple(range(1, a.ndim)))


def denoising_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The plain diffusion loss `|pred - target|^2` per sample (RAFT); (B, ...) -> (B,)."""
    return _per_sample_mse(pred, target)


def nft_loss(
    pred: torch.Tensor,
    old_pred: torch.Tensor,
    target: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    scale: float = 1.0,
) -> torch.Tensor:
    """DiffusionNFT's loss per sample; pred, old_pred, target (B, ...), r (B,) in [0, 1].

    `scale / beta * (r |p_plus - target|^2 + (1 - r) |p_minus - target|^2)` with
    `p_plus = (1 - beta) old + beta pred` and `p_minus = (1 + beta) old - beta pred`
    (`old_pred` is a constant). It is quadratic in `pred`, minimised at
    `old + (2r - 1) / beta * (target - old)`; at `pred = old` its gradient is
    `2 scale (2r - 1) (old - target) / D` (D: elements per sample), the advantage-weighted
    denoising gradient. r = 1/2 gives no signal: both branches pull the same amount.
    """
    old = _at_least_fp32(old_pred.detach())
    pred = _at_least_fp32(pred)
    plus = (1.0 - beta) * old + beta * pred
    minus = (1.0 + beta) * old - beta * pred
    r = _at_least_fp32(r)
    return (
        scale
        / beta
        * (r * _per_sample_mse(plus, target) + (1 - r) * _per_sample_mse(minus, target))
    )


def best_of_groups(rewards: torch.Tensor, group: int, keep: int) -> torch.Tensor:
    """Indices (N // group * keep,) of the `keep` highest rewards of each block of `group`
    consecutive samples (the images of one prompt; `DDPOTrainer._draw_prompts` puts them
    next to each other), block by block; ties go to the earlier sample. rewards: (N,)."""
    n = rewards.shape[0]
    if n % group or not 1 <= keep <= group:
        raise ValueError(f"need N % group == 0 and 1 <= keep <= group, got {n}, {group}, {keep}")
    blocks = rewards.detach().float().reshape(n // group, group)  # (G, group)
    # A stable sort keeps ties in index order (topk does not promise any order).
    top = torch.sort(blocks, dim=1, descending=True, stable=True).indices[:, :keep]  # (G, keep)
    offsets = torch.arange(0, n, group, device=rewards.device)[:, None]  # (G, 1)
    return (top + offsets).reshape(-1)


def denoising_target(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """What the UNet regresses at x_t = add_noise(x0, noise, t): the noise ("epsilon"),
    the velocity ("v_prediction") or x0 ("sample"); (B, C, h, w)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {kind!r}")


# ---------------------------------------------------------------------------- training ---
@dataclass
class _Pass:
    """One inner epoch's training items: sample order, timesteps and noise (old predictions
    for "nft"). perm (n,); t (n, J); noise and old (n, J, C, h, w)."""

    perm: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    old: torch.Tensor | None = None


def _training_set(trainer, samples: dict) -> dict[str, torch.Tensor]:
    """The images trained this epoch: x0 (n, C, h, w), prompt_embeds (n, L, D), timesteps
    (n, T) and r (n,) (1 for RAFT's kept images, the optimality probability for NFT)."""
    cfg = trainer.config
    data = {
        "x0": samples["next_latents"][:, -1],  # (N, C, h, w): the final latents
        "prompt_embeds": samples["prompt_embeds"],
        "timesteps": samples["timesteps"],
    }
    if cfg.train_mode == "raft":
        idx = best_of_groups(samples["rewards"], cfg.sample_num_images_per_prompt, cfg.raft_keep)
        data = {k: v[idx] for k, v in data.items()}
        data["r"] = torch.ones(idx.shape[0], device=trainer.device)
    else:
        data["r"] = optimality_probability(samples["advantages"], cfg.train_adv_clip_max)
    return data


def _plan_pass(trainer, data: dict) -> _Pass:
    """Draw one inner epoch's order, timesteps and noise (global torch RNG)."""
    x0, steps = data["x0"], data["timesteps"]
    n, num_steps = steps.shape
    perm = torch.randperm(n, device=trainer.device)
    order = trainer.timestep_order(n, num_steps)[:, : trainer.config.num_train_timesteps]
    t = steps.gather(1, order)  # (n, J)
    noise = torch.randn((n, t.shape[1], *x0.shape[1:]), device=x0.device, dtype=torch.float32)
    return _Pass(perm=perm, t=t, noise=noise)


def _prediction(trainer, unet, data: dict, idx, t, noise) -> torch.Tensor:
    """The UNet's prediction at x_t = add_noise(x0[idx], noise, t), guided at the sampling
    scale with `train_cfg`, else conditional; (B, C, h, w)."""
    cfg = trainer.config
    x0 = data["x0"][idx].float()
    x_t = trainer.pipe.scheduler.add_noise(x0, noise, t)
    embeds = data["prompt_embeds"][idx]
    guidance = cfg.sample_guidance_scale if cfg.train_cfg else 1.0
    neg = trainer._negative_embeds(embeds.shape[0])
    with trainer.accelerator.autocast():
        return predict_noise(unet, x_t, t, embeds, neg, guidance)


@torch.no_grad()
def _old_predictions(trainer, data: dict, plan: _Pass) -> torch.Tensor:
    """Predictions (n, J, C, h, w) of the weights that sampled this epoch (the unwrapped UNet,
    before any update), for every training item of `plan`."""
    bs, out = trainer.config.train_batch_size, torch.empty_like(plan.noise)
    n, num = plan.t.shape
    for b in range(0, n, bs):
        idx = torch.arange(b, min(b + bs, n), device=trainer.device)
        for j in range(num):
            pred = _prediction(trainer, trainer.unet, data, idx, plan.t[idx, j], plan.noise[idx, j])
            out[idx, j] = pred.float()
    return out


@torch.no_grad()
def _reference_prediction(trainer, data, idx, t, noise) -> torch.Tensor:
    """The adapter-disabled (base) model's prediction, no grad; (B, C, h, w)."""
    trainer.unet.disable_adapters()
    try:
        return _prediction(trainer, trainer.unet, data, idx, t, noise).float()
    finally:
        trainer.unet.enable_adapters()


def _item_loss(trainer, data: dict, plan: _Pass, idx, j: int, log: dict) -> torch.Tensor:
    """Loss of the `j`-th trained timestep of the samples `idx` (through the prepared UNet)."""
    cfg = trainer.config
    t, noise = plan.t[idx, j], plan.noise[idx, j]
    pred = _prediction(trainer, trainer.unet_prepared, data, idx, t, noise)
    target = denoising_target(trainer.pipe.scheduler, data["x0"][idx].float(), noise, t)
    if cfg.train_mode == "raft":
        loss = denoising_mse(pred, target).mean()
    else:
        old = plan.old[idx, j]
        loss = nft_loss(pred, old, target, data["r"][idx], cfg.nft_beta, cfg.train_adv_clip_max)
        loss = loss.mean()
        log["old_deviation"].append(_per_sample_mse(pred.detach(), old).mean().item())
    if cfg.train_kl_coef > 0:
        kl = _per_sample_mse(pred, _reference_prediction(trainer, data, idx, t, noise)).mean()
        loss = loss + cfg.train_kl_coef * kl
        log["kl_ref"].append(kl.item())
    log["loss"].append(loss.item())
    return loss


def train_denoising(trainer, samples: dict, epoch: int) -> dict[str, float]:
    """RAFT / DiffusionNFT updates on one epoch's samples; returns metrics."""
    cfg, acc = trainer.config, trainer.accelerator
    data = _training_set(trainer, samples)
    plans = [_plan_pass(trainer, data) for _ in range(cfg.train_num_inner_epochs)]
    if cfg.train_mode == "nft":
        for plan in plans:  # all before the first update: the sampling policy's predictions
            plan.old = _old_predictions(trainer, data, plan)
    log: dict[str, list] = {k: [] for k in ("loss", "grad_norm", "old_deviation", "kl_ref")}
    trainer.unet_prepared.train()
    n, bs = data["x0"].shape[0], cfg.train_batch_size
    for plan in plans:
        for b in range(0, n, bs):
            idx = plan.perm[b : b + bs]
            loss_ok = True
            for j in range(cfg.num_train_timesteps):
                with acc.accumulate(trainer.unet_prepared):
                    loss = _item_loss(trainer, data, plan, idx, j, log)
                    loss_ok = loss_ok and bool(torch.isfinite(loss))
                    acc.backward(loss)
                    if acc.sync_gradients:
                        log["grad_norm"].append(trainer._optimizer_step(loss_ok)["grad_norm"])
                        loss_ok = True
    metrics = {k: nanmean(v) for k, v in log.items() if v}
    metrics["trained_images"] = n
    if cfg.train_mode == "raft":
        metrics["kept_reward_mean"] = float(
            samples["rewards"][
                best_of_groups(samples["rewards"], cfg.sample_num_images_per_prompt, cfg.raft_keep)
            ].mean()
        )
    else:
        metrics["r_std"] = float(data["r"].std()) if n > 1 else 0.0
    return metrics


def denoising_epoch(trainer, epoch: int) -> tuple[dict, dict[str, float]]:
    """One "raft" / "nft" epoch of `trainer`: sample, score, advantages, denoising updates;
    returns (samples, metrics) like the PPO epoch."""
    samples, timings = trainer.sample_epoch(epoch)
    metrics = trainer.compute_advantages(samples)
    t0 = time.perf_counter()
    metrics.update(train_denoising(trainer, samples, epoch))
    timings["time_training"] = time.perf_counter() - t0
    metrics.update(timings)
    return samples, metrics
