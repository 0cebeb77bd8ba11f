"""Flow-GRPO trainer (Liu et al. 2025, arXiv 2505.05470) for Stable Diffusion 3: sample with
the SDE of `rlhf.flow.sde` -> rewards (overlapping the next sampling batch) -> group-relative
advantages -> PPO-clip on the per-step ratio, plus a KL penalty to the reference model (the
transformer with its LoRA disabled), on LoRA weights of the transformer, on accelerate.

It is the DDPO trainer (`rlhf.trainer.DDPOTrainer`) with the model-specific parts replaced,
so everything else is shared: the accelerator and gradient accumulation over timesteps, the
reward thread pool and its contract checks, advantages over the gathered epoch, the
optimizer step that skips non-finite gradients, image logging, and the pickle-free atomic
checkpoints and their resume checks (`rlhf.checkpointing`). What differs:

- the pipeline: a `StableDiffusion3Pipeline` (`rlhf.flow.pipeline.load_flow_pipeline`); VAE
  in fp32 as in Flow-GRPO's `scripts/train_sd3.py`, text encoders and transformer frozen in
  the mixed-precision dtype, LoRA (fp32) on the transformer's attention projections;
- sampling and the training log-probs: the SDE step (`rlhf.flow.sampling`), conditioned on
  the joint text states and the pooled CLIP states;
- the LoRA files: diffusers' SD3 format (`StableDiffusion3Pipeline.load_lora_weights(dir)`),
  in `lora/` of the run and of every checkpoint.
"""

from __future__ import annotations

import torch

from hyperalign.common import parse_dtype
from rlhf.config import DDPOConfig
from rlhf.flow.pipeline import (
    check_flow_pipeline,
    load_flow_pipeline,
    write_transformer_lora,
)
from rlhf.flow.sampling import encode_prompts, flow_schedule, predict_velocity, sample_with_logprob
from rlhf.flow.sde import schedule_sigma_cap, sde_step_with_logprob
from rlhf.flow.select import flow_config_errors
from rlhf.trainer import DDPOTrainer, add_lora

__all__ = ["FlowGRPOTrainer"]

# The per-sample tensors of an epoch that PPO trains on, and those indexed per timestep.
_TRAIN_KEYS = (
    "prompt_embeds",
    "pooled_prompt_embeds",
    "negative_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "timesteps",
    "sigmas",
    "next_sigmas",
    "latents",
    "next_latents",
    "log_probs",
    "advantages",
)
_PER_STEP_KEYS = ("timesteps", "sigmas", "next_sigmas", "latents", "next_latents", "log_probs")
# Tensors of a `FlowTrajectory` that `DDPOTrainer.sample_epoch` does not collate.
_FLOW_ONLY_KEYS = ("pooled_prompt_embeds", "negative_pooled_prompt_embeds", "sigmas", "next_sigmas")


def _move(module, device, dtype) -> None:
    """``module.to(device)``, cast to ``dtype`` only when some weight has another dtype
    (diffusers warns on every cast, needed or not)."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)


class FlowGRPOTrainer(DDPOTrainer):
    """Run Flow-GRPO on a Stable Diffusion 3 pipeline.

    Args:
        config: the run's `DDPOConfig` (validated here, Flow-GRPO settings included).
        reward_fn: a reward callable `(images, prompts, metadata) -> (rewards, info)`;
            None builds `config.reward_fn` from the registry.
        prompt_fn: a callable `() -> (str, dict | None)`; None builds `config.prompt_fn`.
        pipeline: a `StableDiffusion3Pipeline`; None loads `config.pretrained_model`.

    Use: `FlowGRPOTrainer(cfg).train()`; returns the per-epoch metrics. Outputs as
    `DDPOTrainer`'s: `<logdir>/<run_name>/config.json`, `checkpoints/checkpoint_<epoch>/`,
    `lora/` (final LoRA, `StableDiffusion3Pipeline.load_lora_weights(dir)`) and `logs/`.
    `self.unet` and `self.unet_prepared` (names shared with the DDPO trainer) hold the
    transformer, `self.transformer` too.
    """

    def __init__(self, config: DDPOConfig, reward_fn=None, prompt_fn=None, pipeline=None):
        config.validate()
        errs = flow_config_errors(config)
        if errs:
            raise ValueError("invalid DDPOConfig for Flow-GRPO:\n  - " + "\n  - ".join(errs))
        if pipeline is None:
            pipeline = load_flow_pipeline(
                config.pretrained_model,
                revision=config.pretrained_revision,
                dtype=parse_dtype(config.mixed_precision),
            )
        check_flow_pipeline(pipeline)
        self._flow_batches = []  # this epoch's trajectories, see `sample_epoch`
        self._neg_conditioning = None
        super().__init__(config, reward_fn, prompt_fn, pipeline)
        self.transformer = self.unet
        size = self._image_size()
        self.sigma_cap = schedule_sigma_cap(
            flow_schedule(self.pipe, config.sample_num_steps, size, size, self.device)
        )

    # ---------------------------------------------------------------------------- setup ---
    def _prepare_pipeline(self) -> None:
        """Frozen weights on the device (VAE fp32, the rest in the mixed-precision dtype) and
        a LoRA adapter (fp32) on the transformer."""
        cfg, pipe = self.config, self.pipe
        pipe.set_progress_bar_config(disable=True)
        encoders = [
            m
            for m in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
            if m is not None
        ]
        for module in (pipe.vae, pipe.transformer, *encoders):
            module.requires_grad_(False)
        # Flow-GRPO's scripts/train_sd3.py keeps the VAE in fp32.
        _move(pipe.vae, self.device, torch.float32)
        for module in (pipe.transformer, *encoders):
            _move(module, self.device, self.weight_dtype)
        add_lora(pipe.transformer, cfg)

    def _denoiser(self):
        """The transformer: it carries the LoRA (`self.unet`, the DDPO trainer's name)."""
        return self.pipe.transformer

    def _image_size(self) -> int:
        """Image height = width in pixels: `resolution`, else the transformer's native size."""
        return self.config.resolution or self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def write_lora(self, directory) -> None:
        """The transformer's LoRA in diffusers' SD3 format (not atomic):
        `StableDiffusion3Pipeline.load_lora_weights(directory)` loads it."""
        write_transformer_lora(self.transformer, directory)

    # ---------------------------------------------------------------------------- sampling ---
    def sample_epoch(self, epoch: int) -> tuple[dict, dict]:
        """`DDPOTrainer.sample_epoch` (prompts, overlapping rewards, timings), plus the
        tensors only flow trajectories have: pooled_prompt_embeds /
        negative_pooled_prompt_embeds (N, P), sigmas / next_sigmas (N, T)."""
        self._flow_batches = []
        samples, timings = super().sample_epoch(epoch)
        # The DDPO collation knows SD 1.x's tensors; ours come from the trajectories that
        # `_sample_batch` recorded, in the same (sampling) order.
        for key in _FLOW_ONLY_KEYS:
            samples[key] = torch.cat([getattr(t, key) for t in self._flow_batches])
        self._flow_batches = []
        return samples, timings

    def _negative_conditioning(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative prompt's (B, L, D) and pooled (B, P) states, encoded once."""
        if self._neg_conditioning is None:
            self._neg_conditioning = encode_prompts(
                self.pipe,
                [self.config.negative_prompt],
                self.device,
                self.config.flow_max_sequence_length,
            )
        embeds, pooled = self._neg_conditioning
        return embeds.expand(batch, -1, -1), pooled.expand(batch, -1)

    def _sample_batch(self, prompts: list[str]):
        """One `FlowTrajectory` of `prompts` with the unwrapped transformer (no grad)."""
        cfg = self.config
        embeds, pooled = encode_prompts(
            self.pipe, prompts, self.device, cfg.flow_max_sequence_length
        )
        neg, neg_pooled = self._negative_conditioning(len(prompts))
        size = self._image_size()
        with self.accelerator.autocast():
            traj = sample_with_logprob(
                self.pipe,
                embeds,
                pooled,
                neg,
                neg_pooled,
                cfg.sample_num_steps,
                cfg.sample_guidance_scale,
                cfg.flow_noise_level,
                transformer=self.transformer,
                height=size,
                width=size,
            )
        self._flow_batches.append(traj)
        return traj

    # ---------------------------------------------------------------------------- training ---
    def _shuffle_for_training(self, samples: dict) -> dict[str, torch.Tensor]:
        """`DDPOTrainer._shuffle_for_training` over the flow tensors: samples in a random
        order and, per sample, its own order of timesteps (`timestep_order`; "early" trains
        the first steps, as Flow-GRPO does); per-step tensors become (N, T, ...)."""
        device = self.device
        n, num_steps = samples["log_probs"].shape
        perm = torch.randperm(n, device=device)
        s = {k: v[perm] for k, v in samples.items() if k in _TRAIN_KEYS}
        order = self.timestep_order(n, num_steps)  # (N, T)
        rows = torch.arange(n, device=device)[:, None]  # (N, 1)
        for k in _PER_STEP_KEYS:
            s[k] = s[k][rows, order]  # (N, T, ...)
        return s

    def _velocity(self, transformer, batch: dict, j: int, guidance: float) -> torch.Tensor:
        """The guided velocity of `transformer` at the `j`-th trained step of `batch`."""
        with self.accelerator.autocast():
            return predict_velocity(
                transformer,
                batch["latents"][:, j],
                batch["timesteps"][:, j],
                batch["prompt_embeds"],
                batch["pooled_prompt_embeds"],
                batch["negative_prompt_embeds"],
                batch["negative_pooled_prompt_embeds"],
                guidance,
            )

    def _step(self, velocity: torch.Tensor, batch: dict, j: int):
        """The SDE transition of the `j`-th trained step under `velocity`, scoring the
        recorded next latents."""
        return sde_step_with_logprob(
            batch["latents"][:, j],
            velocity,
            batch["sigmas"][:, j],
            batch["next_sigmas"][:, j],
            self.config.flow_noise_level,
            self.sigma_cap,
            prev_sample=batch["next_latents"][:, j],
        )

    def _timestep_loss(self, batch: dict, j: int, log: dict[str, list]) -> torch.Tensor:
        """PPO loss of the `j`-th trained timestep of `batch`, plus `train_kl_coef` times the
        KL to the reference model."""
        cfg = self.config
        guidance = cfg.sample_guidance_scale if cfg.train_cfg else 1.0
        out = self._step(self._velocity(self.unet_prepared, batch, j, guidance), batch, j)
        loss, st = self._ppo_loss(out.log_prob, batch["log_probs"][:, j], batch["advantages"])
        if cfg.train_kl_coef > 0:
            with torch.no_grad():
                self.transformer.disable_adapters()
                try:
                    ref_velocity = self._velocity(self.transformer, batch, j, guidance)
                finally:
                    self.transformer.enable_adapters()
                ref_mean = self._step(ref_velocity, batch, j).mean
            # KL of two Gaussians with the same std: |mu - mu_ref|^2 / (2 std^2), mean over
            # non-batch dims (Flow-GRPO's KL term).
            kl = ((out.mean - ref_mean) ** 2 / (2 * out.std**2)).mean(dim=(1, 2, 3))  # (B,)
            loss = loss + cfg.train_kl_coef * kl.mean()
            log["kl_ref"].append(kl.mean().item())
        log["loss"].append(loss.item())
        log["approx_kl"].append(st["approx_kl"].item())
        log["clipfrac"].append(st["clipfrac"].item())
        log["ratio"].append(st["ratio"].float().cpu())
        return loss
