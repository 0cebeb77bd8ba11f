"""Stable Diffusion sampling that records the trajectory and per-step log-probs.

Works on the components of a diffusers (0.42) `StableDiffusionPipeline`: the tokenizer and
text encoder through `pipe.encode_prompt`, the VAE, the DDIM scheduler, and a UNet that may be
a different module than `pipe.unet` (e.g. the accelerate-prepared one). The denoising loop is
the one of `StableDiffusionPipeline.__call__` (CFG as `uncond + g * (cond - uncond)` on a
doubled batch), with `rlhf.ddim_logprob.ddim_step_with_logprob` in place of
`scheduler.step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf.ddim_logprob import check_scheduler, ddim_step_with_logprob

__all__ = ["Trajectory", "encode_prompts", "predict_noise", "decode_latents", "sample_with_logprob"]


@dataclass
class Trajectory:
    """One sampled batch. B = batch size, T = number of denoising steps.

    Attributes:
        prompt_embeds: (B, L, D) text-encoder states of the prompts.
        negative_prompt_embeds: (B, L, D) states of the negative prompt (the "unconditional"
            branch of CFG; the empty prompt by default).
        timesteps: (B, T) int64, the timestep of each step (identical rows at sampling time).
        latents: (B, T, C, h, w) x_t fed to each step.
        next_latents: (B, T, C, h, w) x_{t-1} produced by each step.
        log_probs: (B, T) fp32 log p(next | latent) under the sampling policy.
        images: (B, 3, H, W) decoded images in [0, 1].
        prompts, metadata: the prompts and their metadata dicts, length B.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    timesteps: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device) -> torch.Tensor:
    """Text-encoder states (B, L, D) for `prompts`, padded to the tokenizer max length."""
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return embeds


def predict_noise(
    unet,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """The (CFG-guided) UNet prediction at x_t, (B, C, h, w).

    Args:
        unet: any callable with the `UNet2DConditionModel` forward signature (a prepared,
            DDP-wrapped module included).
        latents: x_t, (B, C, h, w).
        timesteps: (B,) or a scalar tensor.
        prompt_embeds, negative_prompt_embeds: (B, L, D).
        guidance_scale: CFG scale; <= 1 disables guidance (one forward, like diffusers).
    """
    dtype = prompt_embeds.dtype
    t = torch.as_tensor(timesteps, device=latents.device).reshape(-1)
    t = t.expand(latents.shape[0]) if t.numel() == 1 else t  # (B,)
    if guidance_scale > 1.0:
        model_in = torch.cat([latents, latents]).to(dtype)  # (2B, C, h, w)
        embeds = torch.cat([negative_prompt_embeds, prompt_embeds])  # (2B, L, D)
        out = unet(model_in, torch.cat([t, t]), encoder_hidden_states=embeds, return_dict=False)[0]
        uncond, cond = out.chunk(2)  # 2 x (B, C, h, w)
        return uncond + guidance_scale * (cond - uncond)
    return unet(latents.to(dtype), t, encoder_hidden_states=prompt_embeds, return_dict=False)[0]


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode latents (B, C, h, w) to images (B, 3, H, W) in [0, 1] (float32), as
    `output_type="pt"` does in diffusers."""
    vae = pipe.vae
    images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_with_logprob(
    pipe,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    eta: float = 1.0,
    unet=None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    decode: bool = True,
    stop_at: int | None = None,
) -> Trajectory:
    """Sample images with DDIM(eta) and CFG, recording the whole trajectory.

    Args:
        pipe: a `StableDiffusionPipeline` whose scheduler is a `DDIMScheduler`.
        prompt_embeds, negative_prompt_embeds: (B, L, D), see `encode_prompts`.
        num_steps: denoising steps T.
        guidance_scale: CFG scale (<= 1: no guidance).
        eta: DDIM eta (> 0).
        unet: the module to run; defaults to `pipe.unet`.
        height, width: image size in pixels; default from the UNet config.
        generator: RNG for the initial noise and every step's noise; None uses the global one.
        latents: optional initial noise (B, C, h, w).
        decode: decode the final latents to images.
        stop_at: run only the first `stop_at` steps of the `num_steps` schedule (then
            `next_latents[:, -1]` is the partially denoised x; implies no decoding).
    """
    unet = pipe.unet if unet is None else unet
    scheduler = pipe.scheduler
    device = prompt_embeds.device
    batch = prompt_embeds.shape[0]
    scheduler.set_timesteps(num_steps, device=device)
    check_scheduler(scheduler)
    cfg = pipe.unet.config
    height = height or cfg.sample_size * pipe.vae_scale_factor
    width = width or cfg.sample_size * pipe.vae_scale_factor
    x = pipe.prepare_latents(
        batch, cfg.in_channels, height, width, prompt_embeds.dtype, device, generator, latents
    )

    all_latents, all_next, all_logp = [], [], []
    timesteps = scheduler.timesteps
    if stop_at is not None:
        timesteps, decode = timesteps[:stop_at], False
    for t in timesteps:
        noise_pred = predict_noise(
            unet, x, t, prompt_embeds, negative_prompt_embeds, guidance_scale
        )
        out = ddim_step_with_logprob(scheduler, noise_pred, t, x, eta=eta, generator=generator)
        all_latents.append(x)
        all_next.append(out.prev_sample)
        all_logp.append(out.log_prob)
        x = out.prev_sample

    images = decode_latents(pipe, x) if decode else x.new_zeros(batch, 3, height, width)
    return Trajectory(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        timesteps=timesteps.reshape(1, -1).expand(batch, -1).clone(),  # (B, T)
        latents=torch.stack(all_latents, dim=1),  # (B, T, C, h, w)
        next_latents=torch.stack(all_next, dim=1),  # (B, T, C, h, w)
        log_probs=torch.stack(all_logp, dim=1),  # (B, T)
        images=images,
    )
