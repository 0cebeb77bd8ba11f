"""Stable Diffusion 3 sampling with the Flow-GRPO SDE, recording the trajectory and the
per-step log-probs.

Works on the components of a diffusers (0.42) `StableDiffusion3Pipeline`: the three text
encoders through `pipe.encode_prompt`, the VAE, the `FlowMatchEulerDiscreteScheduler` (only
for its time schedule) and a transformer that may be a different module than
`pipe.transformer` (e.g. the accelerate-prepared one). The denoising loop is the one of
`StableDiffusion3Pipeline.__call__` (CFG as `uncond + g * (cond - uncond)` on a doubled
batch), with `rlhf.flow.sde.sde_step_with_logprob` in place of `scheduler.step`. Latents stay
in fp32; only the transformer's input is cast to the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlhf.flow.sde import schedule_sigma_cap, sde_step_with_logprob

__all__ = [
    "FlowTrajectory",
    "check_flow_scheduler",
    "decode_latents",
    "encode_prompts",
    "flow_schedule",
    "predict_velocity",
    "sample_with_logprob",
]


@dataclass
class FlowTrajectory:
    """One sampled batch. B = batch size, T = number of denoising steps, L = text tokens.

    Attributes:
        prompt_embeds: (B, L, D) joint text states (CLIP + T5) of the prompts.
        pooled_prompt_embeds: (B, P) pooled CLIP states of the prompts.
        negative_prompt_embeds, negative_pooled_prompt_embeds: the same for the negative
            prompt (the "unconditional" branch of CFG).
        timesteps: (B, T) float, the transformer's timestep input (sigma * 1000 for SD3).
        sigmas, next_sigmas: (B, T) fp32, the flow times t and t' of each step.
        latents: (B, T, C, h, w) fp32 x_t fed to each step.
        next_latents: (B, T, C, h, w) fp32 x_{t'} produced by each step.
        log_probs: (B, T) fp32 log p(next | latent) under the sampling policy.
        images: (B, 3, H, W) decoded images in [0, 1].
        prompts, metadata: the prompts and their metadata dicts, length B.
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    next_sigmas: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor
    prompts: list[str] = field(default_factory=list)
    metadata: list[dict] = field(default_factory=list)


@torch.no_grad()
def encode_prompts(
    pipe, prompts: list[str], device, max_sequence_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(prompt_embeds (B, L, D), pooled_prompt_embeds (B, P))` of `prompts`, every text
    encoder fed the same prompt; T5 sees `max_sequence_length` tokens."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=device,
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return embeds, pooled


def check_flow_scheduler(scheduler) -> None:
    """Raise a clear `ValueError` when `scheduler` cannot give the SDE's time schedule."""
    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(
            f"Flow-GRPO sampling needs a FlowMatchEulerDiscreteScheduler, got "
            f"{type(scheduler).__name__}; fix: pipe.scheduler = "
            "FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)"
        )
    if scheduler.config.get("invert_sigmas"):
        raise ValueError("FlowMatchEulerDiscreteScheduler(invert_sigmas=True) is not supported")


def flow_schedule(pipe, num_steps: int, height: int, width: int, device) -> torch.Tensor:
    """Set the scheduler's timesteps for `num_steps` steps and return its sigmas (T + 1,),
    fp32, descending from the first time to 0. Resolution-dependent shifting
    (`use_dynamic_shifting`) gets the `mu` that `StableDiffusion3Pipeline.__call__` computes."""
    scheduler = pipe.scheduler
    check_flow_scheduler(scheduler)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting"):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        patch = pipe.transformer.config.patch_size
        seq_len = (height // pipe.vae_scale_factor // patch) * (
            width // pipe.vae_scale_factor // patch
        )
        kwargs["mu"] = calculate_shift(
            seq_len,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    scheduler.set_timesteps(num_steps, device=device, **kwargs)
    sigmas = scheduler.sigmas.to(device=device, dtype=torch.float32)
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[-1]) != 0:
        raise ValueError(f"the scheduler's sigmas must descend to 0, got {sigmas.tolist()}")
    return sigmas


def predict_velocity(
    transformer,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    negative_pooled_prompt_embeds: torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """The (CFG-guided) velocity prediction at x_t, (B, C, h, w) fp32.

    Args:
        transformer: any callable with the `SD3Transformer2DModel` forward signature (a
            prepared, DDP-wrapped module included).
        latents: x_t, (B, C, h, w).
        timesteps: (B,) or a scalar tensor, the transformer's timestep input.
        prompt_embeds, negative_prompt_embeds: (B, L, D); pooled ones (B, P).
        guidance_scale: CFG scale; <= 1 disables guidance (one forward, like diffusers).
    """
    dtype = prompt_embeds.dtype
    t = torch.as_tensor(timesteps, device=latents.device).reshape(-1)
    t = t.expand(latents.shape[0]) if t.numel() == 1 else t  # (B,)
    if guidance_scale > 1.0:
        out = transformer(
            hidden_states=torch.cat([latents, latents]).to(dtype),  # (2B, C, h, w)
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([negative_prompt_embeds, prompt_embeds]),
            pooled_projections=torch.cat([negative_pooled_prompt_embeds, pooled_prompt_embeds]),
            return_dict=False,
        )[0].float()
        uncond, cond = out.chunk(2)  # 2 x (B, C, h, w)
        return uncond + guidance_scale * (cond - uncond)
    return transformer(
        hidden_states=latents.to(dtype),
        timestep=t,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_prompt_embeds,
        return_dict=False,
    )[0].float()


def decode_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """VAE-decode SD3 latents (B, C, h, w) to images (B, 3, H, W) in [0, 1] (fp32), as
    `StableDiffusion3Pipeline.__call__` with `output_type="pt"` does (latents / scaling +
    shift)."""
    vae = pipe.vae
    z = latents / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def sample_with_logprob(
    pipe,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    negative_pooled_prompt_embeds: torch.Tensor,
    num_steps: int,
    guidance_scale: float,
    noise_level: float,
    transformer=None,
    height: int | None = None,
    width: int | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
) -> FlowTrajectory:
    """Sample images with the Flow-GRPO SDE and CFG, recording the whole trajectory.

    Args:
        pipe: a `StableDiffusion3Pipeline` (FlowMatchEulerDiscreteScheduler).
        prompt_embeds, pooled_prompt_embeds, negative_*: see `encode_prompts`.
        num_steps: denoising steps T.
        guidance_scale: CFG scale (<= 1: no guidance).
        noise_level: the SDE's noise level a (> 0).
        transformer: the module to run; defaults to `pipe.transformer`.
        height, width: image size in pixels; default from the transformer config.
        generator: RNG for the initial noise and every step's noise; None uses the global one.
        latents: optional initial noise (B, C, h, w).
    """
    transformer = pipe.transformer if transformer is None else transformer
    device = prompt_embeds.device
    batch = prompt_embeds.shape[0]
    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    multiple = pipe.vae_scale_factor * pipe.patch_size
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}, {width}")
    sigmas = flow_schedule(pipe, num_steps, height, width, device)  # (T + 1,)
    sigma_cap = schedule_sigma_cap(sigmas)
    timesteps = pipe.scheduler.timesteps.to(device)  # (T,)
    x = pipe.prepare_latents(
        batch,
        pipe.transformer.config.in_channels,
        height,
        width,
        torch.float32,
        device,
        generator,
        latents,
    )

    all_latents, all_next, all_logp = [], [], []
    for i, t in enumerate(timesteps):
        v = predict_velocity(
            transformer,
            x,
            t,
            prompt_embeds,
            pooled_prompt_embeds,
            negative_prompt_embeds,
            negative_pooled_prompt_embeds,
            guidance_scale,
        )
        out = sde_step_with_logprob(
            x, v, sigmas[i], sigmas[i + 1], noise_level, sigma_cap, generator=generator
        )
        all_latents.append(x)
        all_next.append(out.prev_sample)
        all_logp.append(out.log_prob)
        x = out.prev_sample

    def per_sample(values: torch.Tensor) -> torch.Tensor:  # (T,) -> (B, T)
        return values.reshape(1, -1).expand(batch, -1).clone()

    return FlowTrajectory(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        timesteps=per_sample(timesteps),
        sigmas=per_sample(sigmas[:-1]),
        next_sigmas=per_sample(sigmas[1:]),
        latents=torch.stack(all_latents, dim=1),  # (B, T, C, h, w)
        next_latents=torch.stack(all_next, dim=1),  # (B, T, C, h, w)
        log_probs=torch.stack(all_logp, dim=1),  # (B, T)
        images=decode_latents(pipe, x),
    )
