"""DRaFT-K (Clark et al. 2023, "Directly Fine-Tuning Diffusion Models on Differentiable
Rewards"): sample without gradients except through the last `draft_k` denoising steps,
decode, and ascend the differentiable reward `reward_fn.score(images, prompts)`.

Options beside the paper's fixed K: AlignProp's randomized truncation (Prabhudesai et al.
2023, "Aligning Text-to-Image Diffusion Models with Reward Backpropagation": K drawn per
batch; `draft_random_k`), gradient checkpointing of the backpropagated UNet calls (AlignProp
does it to fit all 50 steps in memory; `draft_grad_checkpointing`), and a straight-through
clamp of the decoded image (`draft_straight_through`): the plain clamp to [0, 1] has zero
gradient wherever the VAE overshoots.

Why DRaFT-1 "did not move" the shapes demo (measured on one batch of 16, the demo's model,
sampler and HyperAlign reward): nothing is detached (the gradient reaches the LoRA through
`WeightedReward.score`), and although 93 % of the decoded pixel values lie outside [0, 1],
the straight-through clamp changes the gradient little (cosine 0.998 with the plain one at
K = 20): the clamped pixels carry little of the reward's gradient. What limits K = 1
is the gradient itself: its norm is 3.1e-3 against 0.28 through all 20 steps, and it points
elsewhere (cosine 0.31 with the full gradient; 0.40 at K = 5, 0.44 at K = 10): the last
step only touches fine detail, while counts, colours and layout are decided early. One
Adam step at lr 1e-3 raises the batch's reward by +0.005 (K = 1) or +0.006 (K = 20); at lr
3e-3 by +0.013 (K = 1) but +0.056 (K = 20). The old runs also took only 2 optimizer steps
per epoch (2 batches of 16), 32 in 16 epochs.
"""

from __future__ import annotations

import random
import time

import torch
from torch.utils.checkpoint import checkpoint

from rlhf.ddim_logprob import ddim_step_with_logprob
from rlhf.sampling import encode_prompts, predict_noise, sample_with_logprob
from rlhf.stat_tracking import nanmean

__all__ = ["check_draft_reward", "draft_epoch", "clamp_straight_through"]


def clamp_straight_through(x: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """`x.clamp(lo, hi)` in the forward pass, the identity in the backward pass (any shape).

    A pixel the VAE draws at 1.05 is shown to the reward as 1.0, and the reward's gradient
    for it still reaches the latents (a plain clamp would zero it)."""
    return x + (x.clamp(lo, hi) - x).detach()


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


def _num_grad_steps(cfg) -> int:
    """K for this batch: `draft_k`, or uniform in 1..draft_k with `draft_random_k` (drawn
    from Python's RNG, which the checkpoints save)."""
    return random.randint(1, cfg.draft_k) if cfg.draft_random_k else cfg.draft_k


def _denoise_with_last_k_grad(trainer, x, size: int, embeds, neg, k: int) -> torch.Tensor:
    """Run the schedule from noise `x` (B, C, h, w) of a `size`-pixel image: the first T - k
    steps under no_grad with the unwrapped UNet, the last k with gradients through the
    prepared one (each UNet call checkpointed with `draft_grad_checkpointing`); returns x_0
    (B, C, h, w)."""
    cfg, acc, pipe = trainer.config, trainer.accelerator, trainer.pipe
    first = cfg.sample_num_steps - k
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

    def guided(x_t, t):
        with acc.autocast():
            return predict_noise(
                trainer.unet_prepared, x_t, t, embeds, neg, cfg.sample_guidance_scale
            )

    for t in scheduler.timesteps[first:]:
        if cfg.draft_grad_checkpointing:
            pred = checkpoint(guided, x, t, use_reentrant=False)
        else:
            pred = guided(x, t)
        x = ddim_step_with_logprob(scheduler, pred, t, x, cfg.sample_eta).prev_sample
    return x


def _decode(trainer, latents: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Images (B, 3, H, W) in [0, 1] from latents, differentiably, and the fraction of pixel
    values the clamp to [0, 1] changed. Like `rlhf.sampling.decode_latents`, with the
    clamp made straight-through when `draft_straight_through` is set."""
    vae = trainer.pipe.vae
    with trainer.accelerator.autocast():
        raw = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    raw = raw.float() / 2 + 0.5  # (B, 3, H, W), [-1, 1] -> [0, 1] before clamping
    clamped = float(((raw < 0) | (raw > 1)).float().mean())
    if trainer.config.draft_straight_through:
        return clamp_straight_through(raw), clamped
    return raw.clamp(0, 1), clamped


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
        k = _num_grad_steps(trainer.config)
        x = _denoise_with_last_k_grad(trainer, x, size, embeds, neg, k)
        images, clamped = _decode(trainer, x)
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
        "k": k,
        "clamped": clamped,
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
        "draft_k_mean": nanmean([b["k"] for b in batches]),
        "clamped_fraction": nanmean([b["clamped"] for b in batches]),
        "time_sampling_and_training": elapsed,
    }
    return samples, metrics
