"""DRaFT-K (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable
Rewards"): sample without gradients except through the last `draft_k` denoising steps,
decode, and ascend the differentiable reward `reward_fn.score(images, prompts)`.

`draft_epoch(trainer, epoch)` runs one epoch with the components of a `DDPOTrainer`
(`train_mode="draft"`): its pipeline, prepared UNet, optimizer step and prompt function.
"""

from __future__ import annotations

import time

import torch

from rlhf.ddim_logprob import ddim_step_with_logprob
from rlhf.sampling import decode_latents, encode_prompts, predict_noise, sample_with_logprob
from rlhf.stat_tracking import nanmean

__all__ = ["check_draft_reward", "draft_epoch"]


def check_draft_reward(reward_fn, name: str) -> None:
    """Raise `ValueError` unless `reward_fn` has a differentiable `score(images, prompts)`."""
    if not callable(getattr(reward_fn, "score", None)):
        raise ValueError(
            f"train_mode='draft' needs a differentiable reward with a "
            f"score(images, prompts) method; {name} has none"
        )


def _image_size(trainer) -> int:
    """Image height = width in pixels: `resolution`, else the UNet's native size."""
    unet, pipe = trainer.unet, trainer.pipe
    return trainer.config.resolution or unet.config.sample_size * pipe.vae_scale_factor


def _denoise_with_last_k_grad(trainer, x, size: int, embeds, neg) -> torch.Tensor:
    """Run the schedule from noise `x` (B, C, h, w) of a `size`-pixel image: the first T - K
    steps under no_grad with the unwrapped UNet, the last K with gradients through the
    prepared one; returns x_0 (B, C, h, w)."""
    cfg, acc, pipe = trainer.config, trainer.accelerator, trainer.pipe
    first = cfg.sample_num_steps - cfg.draft_k
    if first > 0:
        with torch.no_grad(), acc.autocast():
            tr = sample_with_logprob(
                pipe,
                embeds,
                neg,
                cfg.sample_num_steps,
                cfg.sample_guidance_scale,
                cfg.sample_eta,
                unet=trainer.unet,
                height=size,
                width=size,
                latents=x,
                stop_at=first,
            )
        x = tr.next_latents[:, -1]
    scheduler = pipe.scheduler
    scheduler.set_timesteps(cfg.sample_num_steps, device=trainer.device)
    for t in scheduler.timesteps[first:]:
        with acc.autocast():
            pred = predict_noise(
                trainer.unet_prepared, x, t, embeds, neg, cfg.sample_guidance_scale
            )
        x = ddim_step_with_logprob(scheduler, pred, t, x, cfg.sample_eta).prev_sample
    return x


def _draft_batch(trainer, epoch: int, index: int) -> dict:
    """Sample, score and backpropagate one batch; steps the optimizer on sync steps."""
    acc = trainer.accelerator
    prompts, _ = trainer._draw_prompts()
    embeds = encode_prompts(trainer.pipe, prompts, trainer.device)
    neg = trainer._negative_embeds(len(prompts))
    grad_norm = None
    with acc.accumulate(trainer.unet_prepared):
        size = _image_size(trainer)
        unet = trainer.unet
        x = trainer.pipe.prepare_latents(
            len(prompts), unet.config.in_channels, size, size, embeds.dtype, trainer.device, None
        )  # (B, C, h, w) initial noise (DDIM init_noise_sigma = 1: no double scaling)
        x = _denoise_with_last_k_grad(trainer, x, size, embeds, neg)
        with acc.autocast():
            images = decode_latents(trainer.pipe, x)
        trainer._check_images(images, f"epoch {epoch}, batch {index}, rank {acc.process_index}")
        score = trainer.reward_fn.score(images, prompts)
        loss = -score.float().mean()
        acc.backward(loss)
        if acc.sync_gradients:
            grad_norm = trainer._optimizer_step(bool(torch.isfinite(loss)))["grad_norm"]
    return {
        "rewards": score.detach().float(),
        "prompts": prompts,
        "images": images.detach(),
        "loss": loss.item(),
        "grad_norm": grad_norm,
    }


def draft_epoch(trainer, epoch: int) -> tuple[dict, dict[str, float]]:
    """One DRaFT-K epoch of `trainer`: `sample_num_batches_per_epoch` batches, each sampled,
    scored and trained on. Returns (samples for logging: rewards (N,), prompts, images
    (N, 3, H, W); metrics: gathered reward statistics, loss, grad norm, time)."""
    cfg, acc = trainer.config, trainer.accelerator
    t0 = time.perf_counter()
    trainer.unet_prepared.train()
    batches = [_draft_batch(trainer, epoch, i) for i in range(cfg.sample_num_batches_per_epoch)]
    samples = {
        "rewards": torch.cat([b["rewards"] for b in batches]),
        "prompts": [p for b in batches for p in b["prompts"]],
        "images": torch.cat([b["images"] for b in batches]),
        "info": {},
    }
    elapsed = time.perf_counter() - t0
    rewards_all = acc.gather(samples["rewards"]).cpu().numpy()
    metrics = {
        "reward_mean": float(rewards_all.mean()),
        "reward_std": float(rewards_all.std()),
        "num_samples": int(rewards_all.shape[0]),
        "loss": nanmean([b["loss"] for b in batches]),
        "grad_norm": nanmean([b["grad_norm"] for b in batches if b["grad_norm"] is not None]),
        "time_sampling_and_training": elapsed,
    }
    return samples, metrics
