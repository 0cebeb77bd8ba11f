"""DDPO trainer: sample -> rewards (overlapping the next sampling batch) -> advantages ->
PPO-clip on LoRA weights of the UNet, on accelerate.

Defects of earlier DDPO implementations that this loop avoids on purpose (see
../shared/design/rlhf.md):
- the training forward goes through the accelerate-*prepared* UNet, so DDP all-reduces the
  LoRA gradients (sampling and the reference forward use the unwrapped module, under no_grad);
- every rank calls `save_state` (only rank 0 writes model files, each rank its RNG state);
- reward calls are submitted to a thread pool right after each batch is sampled and only
  awaited after the last batch, so they overlap the next batches' sampling;
- LoRA is saved on its own, in the diffusers format (`pipe.load_lora_weights(dir)`).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, gather_object, set_seed
from tqdm.auto import tqdm

from rlhf.config import DDPOConfig
from rlhf.ddim_logprob import ddim_step_with_logprob
from rlhf.prompts import check_prompt_fn, get_prompt_fn
from rlhf.rewards import RewardError, check_reward_output, get_reward, reward_name
from rlhf.sampling import decode_latents, encode_prompts, predict_noise, sample_with_logprob
from rlhf.stat_tracking import PerPromptStatTracker, compute_advantages

__all__ = [
    "DDPOTrainer",
    "NonFiniteTrainingError",
    "ppo_clip_loss",
    "load_pipeline",
    "save_lora_diffusers",
    "LORA_CHECKPOINT_FILE",
]

logger = get_logger(__name__)

LORA_CHECKPOINT_FILE = "unet_lora.safetensors"
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had non-finite losses or gradients."""


@dataclass
class TrainingProgress:
    """Epoch counter, checkpointed with accelerate's `register_for_checkpointing`."""

    epoch: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip objective (to minimise) and its diagnostics; all inputs (B,).

    loss = mean(max(-A * r, -A * clip(r, 1 - eps, 1 + eps))), r = exp(logp - logp_old).
    Diagnostics: approx_kl = 0.5 * mean((logp - logp_old)^2) (as in DDPO/trl), clipfrac =
    fraction with |r - 1| > eps, ratio (B,).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "approx_kl": 0.5 * ((log_prob - old_log_prob) ** 2).mean(),
            "clipfrac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio": ratio.detach(),
        }
    return loss, stats


def load_pipeline(config: DDPOConfig):
    """The Stable Diffusion pipeline named by `config.pretrained_model` on CPU in fp32 (the
    trainer moves and casts it): a hub id or local directory; "tiny" builds the offline tiny
    one; "random-sd15" the SD 1.5 architecture with random weights (cost measurements)."""
    if config.pretrained_model == "tiny":
        from rlhf.tiny import build_tiny_pipeline

        return build_tiny_pipeline(seed=0)
    if config.pretrained_model == "random-sd15":
        from rlhf.tiny import build_random_sd15_pipeline

        return build_random_sd15_pipeline(seed=0, sample_size=(config.resolution or 512) // 8)
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(
        config.pretrained_model,
        revision=config.pretrained_revision,
        safety_checker=None,
        requires_safety_checker=False,
    )


def save_lora_diffusers(unet, directory: str | Path, is_main_process: bool = True) -> None:
    """Save the UNet's LoRA in the diffusers format (`StableDiffusionPipeline.load_lora_weights`
    loads it), atomically: written to a temporary sibling directory, then renamed."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    if not is_main_process:
        return
    directory = Path(directory)
    tmp = directory.with_name(f".tmp_{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(tmp),
        unet_lora_layers=state,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)


class DDPOTrainer:
    """Run DDPO (or DRaFT-K with `train_mode="draft"`) on a Stable Diffusion pipeline.

    Args:
        config: the run's `DDPOConfig` (validated here).
        reward_fn: a reward callable `(images, prompts, metadata) -> (rewards, info)`;
            None builds `config.reward_fn` from the registry.
        prompt_fn: a callable `() -> (str, dict)`; None builds `config.prompt_fn`.
        pipeline: a `StableDiffusionPipeline`; None loads `config.pretrained_model`.

    Use: `DDPOTrainer(cfg).train()`; returns the per-epoch metrics. Outputs go to
    `<logdir>/<run_name>/`: `config.json`, `checkpoints/checkpoint_<epoch>/`, `lora/` (final
    LoRA in diffusers format) and tracker logs in `logs/`.
    """

    def __init__(self, config: DDPOConfig, reward_fn=None, prompt_fn=None, pipeline=None):
        config.validate()
        self.config = cfg = config
        self.run_dir = Path(cfg.logdir) / cfg.run_name
        ppo = cfg.train_mode == "ppo"
        # In PPO mode each trained timestep is one backward: accumulate over all of them.
        accum = cfg.train_gradient_accumulation_steps * (cfg.num_train_timesteps if ppo else 1)
        log_with = {"none": None, "all": "all"}.get(cfg.log_with, [cfg.log_with])
        self.accelerator = acc = Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            gradient_accumulation_steps=accum,
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")
            ),
        )
        set_seed(cfg.seed, device_specific=True)  # seed + process index on every rank
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.device = acc.device
        self.weight_dtype = _DTYPES[cfg.mixed_precision]

        self.pipe = pipe = pipeline if pipeline is not None else load_pipeline(cfg)
        self._prepare_pipeline()
        self.unet = pipe.unet  # unwrapped, with the LoRA adapter
        self.trainable = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=cfg.train_learning_rate,
            betas=(cfg.train_adam_beta1, cfg.train_adam_beta2),
            weight_decay=cfg.train_adam_weight_decay,
            eps=cfg.train_adam_epsilon,
        )
        # The training forward goes through this prepared (DDP-wrapped) module.
        self.unet_prepared, self.optimizer = acc.prepare(self.unet, self.optimizer)

        self.stat_tracker = PerPromptStatTracker(
            cfg.per_prompt_stat_tracking_buffer_size, cfg.per_prompt_stat_tracking_min_count
        )
        self.progress = TrainingProgress()
        acc.register_for_checkpointing(self.stat_tracker, self.progress)
        acc.register_save_state_pre_hook(self._save_model_hook)
        acc.register_load_state_pre_hook(self._load_model_hook)

        self.reward_fn = (
            reward_fn
            if reward_fn is not None
            else get_reward(cfg.reward_fn, device=self.device, dtype=torch.float32)
        )
        self.reward_name = reward_name(self.reward_fn)
        if cfg.train_mode == "draft" and not callable(getattr(self.reward_fn, "score", None)):
            raise ValueError(
                f"train_mode='draft' needs a differentiable reward with a "
                f"score(images, prompts) method; {self.reward_name} has none"
            )
        self.prompt_fn = prompt_fn if prompt_fn is not None else get_prompt_fn(cfg.prompt_fn)
        check_prompt_fn(self.prompt_fn)
        self.executor = ThreadPoolExecutor(max_workers=cfg.max_workers)
        self._consecutive_bad = 0
        self._window_bad = 0
        self._neg_embeds = None

        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
        if log_with is not None:
            acc.init_trackers(cfg.run_name, config=_scalar_config(cfg))
        self.derived = cfg.derived(acc.num_processes)
        logger.info(
            "DDPO run %s: %s; trainable LoRA params %d",
            cfg.run_name,
            ", ".join(f"{k}={v}" for k, v in self.derived.items()),
            sum(p.numel() for p in self.trainable),
            main_process_only=True,
        )
        if cfg.resume_from:
            self.resume(cfg.resume_from)

    # ---------------------------------------------------------------------------- setup ---
    def _prepare_pipeline(self) -> None:
        from diffusers import DDIMScheduler
        from peft import LoraConfig

        cfg, pipe = self.config, self.pipe
        if type(pipe.scheduler).__name__ != "DDIMScheduler":
            # SD 1.5 ships a PNDM scheduler; DDIM over the same noise schedule.
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if pipe.scheduler.config.set_alpha_to_one:
            pipe.scheduler = DDIMScheduler.from_config(
                pipe.scheduler.config, set_alpha_to_one=False
            )
        pipe.set_progress_bar_config(disable=True)
        pipe.safety_checker = None
        for module in (pipe.vae, pipe.text_encoder, pipe.unet):
            module.requires_grad_(False)
        pipe.vae.to(self.device, dtype=self.weight_dtype)
        pipe.text_encoder.to(self.device, dtype=self.weight_dtype)
        pipe.unet.to(self.device, dtype=self.weight_dtype)
        pipe.unet.add_adapter(
            LoraConfig(
                r=cfg.lora_rank,
                lora_alpha=cfg.lora_alpha,
                init_lora_weights="gaussian",  # B = 0: the adapted model starts as the base one
                target_modules=list(cfg.lora_target_modules),
            )
        )
        for p in pipe.unet.parameters():
            if p.requires_grad:  # only LoRA weights: trained and kept in fp32
                p.data = p.data.float()

    def _save_model_hook(self, models, weights, output_dir) -> None:
        """Replace accelerate's full-UNet save by the LoRA weights alone (safetensors)."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        for _ in range(len(models)):
            weights.pop()
        if self.accelerator.is_main_process:
            state = get_peft_model_state_dict(self.unet)
            state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
            save_file(state, str(Path(output_dir) / LORA_CHECKPOINT_FILE))

    def _load_model_hook(self, models, input_dir) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        while models:
            models.pop()
        state = load_file(str(Path(input_dir) / LORA_CHECKPOINT_FILE), device=str(self.device))
        result = set_peft_model_state_dict(self.unet, state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"checkpoint {input_dir} has unexpected LoRA keys {unexpected[:3]}")

    # ------------------------------------------------------------------------ checkpoints ---
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Save LoRA, optimizer, stat tracker, RNG states and epoch; called on all ranks.
        `lora/` inside holds the LoRA in the diffusers format (`pipe.load_lora_weights`).

        Written to a temporary directory first and renamed when complete, so a crash never
        leaves a half-written `checkpoint_<epoch>`.
        """
        acc = self.accelerator
        name = f"checkpoint_{self.progress.epoch:05d}"
        final = self.checkpoint_root / name
        tmp = self.checkpoint_root / f".tmp_{name}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # every rank: RNG state per rank, model/optimizer on rank 0
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.config.save(tmp / "config.json")
            # The same LoRA in the diffusers format, so `hyperalign eval-checkpoints --lora` and
            # `pipe.load_lora_weights` can compare the epochs of a run.
            save_lora_diffusers(self.unet, tmp / "lora")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            ckpts = sorted(self.checkpoint_root.glob("checkpoint_*"))
            for old in ckpts[: max(0, len(ckpts) - self.config.num_checkpoint_limit)]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def resume(self, path: str) -> None:
        """Load a checkpoint written by `save_checkpoint` ("latest": the newest of this run)."""
        if path == "latest":
            ckpts = sorted(self.checkpoint_root.glob("checkpoint_*"))
            if not ckpts:
                raise FileNotFoundError(f"resume_from='latest' but {self.checkpoint_root} is empty")
            path = str(ckpts[-1])
        if not (Path(path) / LORA_CHECKPOINT_FILE).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint (no {LORA_CHECKPOINT_FILE})")
        self.accelerator.load_state(path)
        logger.info("resumed from %s at epoch %d", path, self.progress.epoch)

    # ---------------------------------------------------------------------------- sampling ---
    def _negative_embeds(self, batch: int) -> torch.Tensor:
        if self._neg_embeds is None:
            self._neg_embeds = encode_prompts(self.pipe, [self.config.negative_prompt], self.device)
        return self._neg_embeds.expand(batch, -1, -1)  # (B, L, D)

    def _draw_prompts(self) -> tuple[list[str], list[dict]]:
        cfg = self.config
        k = cfg.sample_num_images_per_prompt
        drawn = [self.prompt_fn() for _ in range(cfg.sample_batch_size // k)]
        prompts = [p for p, _ in drawn for _ in range(k)]  # each prompt k times in a row
        metadata = [dict(m) for _, m in drawn for _ in range(k)]
        return prompts, metadata

    def _score(self, images, prompts, metadata, where: str):
        """Call the reward function and enforce the contract (runs in the thread pool)."""
        t0 = time.perf_counter()
        try:
            out = self.reward_fn(images, prompts, metadata)
        except Exception as e:
            raise RewardError(
                f"reward function {self.reward_name} raised {type(e).__name__}: {e} ({where})"
            ) from e
        rewards, info = check_reward_output(
            out, len(prompts), images.device, self.reward_name, where
        )
        return rewards, info, time.perf_counter() - t0

    def sample_epoch(self, epoch: int) -> tuple[dict, dict]:
        """Sample this process's batches and score them; returns (samples, timings).

        samples: prompt_embeds / negative_prompt_embeds (N, L, D), timesteps (N, T),
        latents / next_latents (N, T, C, h, w), log_probs (N, T), rewards (N,), images
        (N, 3, H, W), prompts, metadata and info (per-sample lists).
        """
        cfg, acc = self.config, self.accelerator
        t_start = time.perf_counter()
        trajs, futures = [], []
        for i in tqdm(
            range(cfg.sample_num_batches_per_epoch),
            desc=f"epoch {epoch}: sampling",
            disable=not acc.is_local_main_process,
            leave=False,
        ):
            prompts, metadata = self._draw_prompts()
            embeds = encode_prompts(self.pipe, prompts, self.device)
            with acc.autocast():
                traj = sample_with_logprob(
                    self.pipe,
                    embeds,
                    self._negative_embeds(len(prompts)),
                    cfg.sample_num_steps,
                    cfg.sample_guidance_scale,
                    cfg.sample_eta,
                    unet=self.unet,
                    height=cfg.resolution,
                    width=cfg.resolution,
                )
            traj.prompts, traj.metadata = prompts, metadata
            where = f"epoch {epoch}, batch {i}, rank {acc.process_index}, prompts {prompts[:3]}"
            if cfg.async_reward_computation:
                fut = self.executor.submit(self._score, traj.images, prompts, metadata, where)
            else:
                fut = Future()
                fut.set_result(self._score(traj.images, prompts, metadata, where))
            trajs.append(traj)
            futures.append(fut)
        t_sampled = time.perf_counter()
        results = [f.result() for f in futures]  # re-raises a reward's RewardError here
        t_done = time.perf_counter()

        info: dict[str, list] = {}
        for _, inf, _ in results:
            for k, v in inf.items():
                info.setdefault(k, []).extend(v)
        samples = {
            k: torch.cat([getattr(t, k) for t in trajs])
            for k in (
                "prompt_embeds",
                "negative_prompt_embeds",
                "timesteps",
                "latents",
                "next_latents",
                "log_probs",
                "images",
            )
        }
        samples["rewards"] = torch.cat([r for r, _, _ in results])  # (N,)
        samples["prompts"] = [p for t in trajs for p in t.prompts]
        samples["metadata"] = [m for t in trajs for m in t.metadata]
        samples["info"] = info
        timings = {
            "time_sampling": t_sampled - t_start,
            "time_reward_wait": t_done - t_sampled,
            "time_reward_calls": sum(d for _, _, d in results),
        }
        return samples, timings

    # -------------------------------------------------------------------------- advantages ---
    def compute_advantages(self, samples: dict) -> dict[str, float]:
        """Gather rewards and prompts over ranks, compute advantages on the whole epoch and
        keep this rank's slice in `samples["advantages"]` (N,). Returns reward metrics."""
        cfg, acc = self.config, self.accelerator
        rewards_all = acc.gather(samples["rewards"]).cpu().numpy()  # (N * P,), rank-major
        prompts_all = gather_object(samples["prompts"])
        if len(prompts_all) != rewards_all.shape[0]:
            raise RuntimeError(
                f"gathered {len(prompts_all)} prompts for {rewards_all.shape[0]} rewards"
            )
        adv_all = compute_advantages(
            cfg.advantage_mode,
            rewards_all,
            prompts_all,
            tracker=self.stat_tracker,
            clip=cfg.train_adv_clip_max,
        )
        n = samples["rewards"].shape[0]
        mine = adv_all.reshape(acc.num_processes, n)[acc.process_index]  # (N,)
        samples["advantages"] = torch.as_tensor(mine, device=self.device)
        metrics = {
            "reward_mean": float(rewards_all.mean()),
            "reward_std": float(rewards_all.std()),
            "num_samples": int(rewards_all.shape[0]),
            "num_unique_prompts": len(set(prompts_all)),
        }
        for key, values in samples["info"].items():
            values = gather_object(list(values))
            try:
                arr = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                continue  # non-numeric info is not logged as a scalar
            if arr.ndim == 1 and np.isfinite(arr).all():
                metrics[f"reward_info/{key}_mean"] = float(arr.mean())
        if cfg.advantage_mode == "per_prompt":
            metrics.update({f"stat_tracking/{k}": v for k, v in self.stat_tracker.stats().items()})
        return metrics

    # ---------------------------------------------------------------------------- training ---
    def _ppo_loss(self, log_prob, old_log_prob, advantages):
        return ppo_clip_loss(log_prob, old_log_prob, advantages, self.config.train_clip_range)

    def _optimizer_step(self, loss_finite_local: bool) -> dict[str, float]:
        """Called on sync steps: clip, then step unless the loss or gradients are non-finite.

        The decision is made on values identical on every rank (all-reduced loss flags and the
        synced gradient norm), so ranks never diverge. Raises `NonFiniteTrainingError` after
        `max_consecutive_nonfinite` consecutive bad steps.
        """
        acc, cfg = self.accelerator, self.config
        self._window_bad += 0 if loss_finite_local else 1
        bad = torch.tensor(float(self._window_bad), device=self.device)
        if acc.num_processes > 1:
            bad = acc.reduce(bad, reduction="sum")
        grad_norm = acc.clip_grad_norm_(self.unet_prepared.parameters(), cfg.train_max_grad_norm)
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        fp16_scaler = acc.scaler is not None
        ok = bad.item() == 0 and (math.isfinite(grad_norm) or fp16_scaler)
        if ok or fp16_scaler:
            # With fp16 loss scaling the GradScaler itself skips steps with inf/NaN gradients
            # (and adapts the scale); overflow there is routine and not counted as a failure.
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._window_bad = 0
        if ok:
            self._consecutive_bad = 0
            self.progress.optimizer_steps += 1
        else:
            self._consecutive_bad += 1
            self.progress.skipped_steps += 1
            logger.warning(
                "non-finite loss or gradient (grad norm %s): optimizer step skipped (%d in a row)",
                grad_norm,
                self._consecutive_bad,
            )
            if self._consecutive_bad >= cfg.max_consecutive_nonfinite:
                raise NonFiniteTrainingError(
                    f"{self._consecutive_bad} consecutive optimizer steps had non-finite losses "
                    f"or gradients (last grad norm {grad_norm}); stopping. Lower "
                    f"train_learning_rate, check the reward scale, or try mixed_precision='bf16'/'no'."
                )
        return {"grad_norm": grad_norm, "step_ok": float(ok)}

    def _reference_mean(self, latents, timesteps, embeds, neg, guidance, next_latents):
        """Transition mean of the adapter-disabled (base) model, no grad; (B, C, h, w)."""
        with torch.no_grad():
            self.unet.disable_adapters()
            try:
                with self.accelerator.autocast():
                    ref = predict_noise(self.unet, latents, timesteps, embeds, neg, guidance)
            finally:
                self.unet.enable_adapters()
            out = ddim_step_with_logprob(
                self.pipe.scheduler,
                ref,
                timesteps,
                latents,
                self.config.sample_eta,
                prev_sample=next_latents,
            )
        return out.mean

    def train_ppo(self, samples: dict, epoch: int) -> dict[str, float]:
        """PPO-clip over shuffled samples and per-sample shuffled timesteps; returns metrics."""
        cfg, acc = self.config, self.accelerator
        n, num_steps = samples["log_probs"].shape
        guidance = cfg.sample_guidance_scale if cfg.train_cfg else 1.0
        keys = ("timesteps", "latents", "next_latents", "log_probs")
        stats: dict[str, list] = {k: [] for k in ("loss", "approx_kl", "clipfrac", "kl_ref")}
        ratios, grad_norms = [], []
        self.unet_prepared.train()
        for _inner in range(cfg.train_num_inner_epochs):
            perm = torch.randperm(n, device=self.device)
            s = {
                k: v[perm]
                for k, v in samples.items()
                if k in keys + ("prompt_embeds", "negative_prompt_embeds", "advantages")
            }
            # An independent timestep order per sample: (N, T) indices; the first
            # num_train_timesteps columns are trained.
            if cfg.train_timestep_selection == "early":
                k = cfg.num_train_timesteps
                order = torch.stack(
                    [
                        torch.cat(
                            [
                                torch.randperm(k, device=self.device),
                                torch.arange(k, num_steps, device=self.device),
                            ]
                        )
                        for _ in range(n)
                    ]
                )
            else:
                order = torch.stack(
                    [torch.randperm(num_steps, device=self.device) for _ in range(n)]
                )
            rows = torch.arange(n, device=self.device)[:, None]  # (N, 1)
            for k in keys:
                s[k] = s[k][rows, order]  # (N, T, ...)
            for b in tqdm(
                range(0, n, cfg.train_batch_size),
                desc=f"epoch {epoch}: training",
                disable=not acc.is_local_main_process,
                leave=False,
            ):
                mb = {k: v[b : b + cfg.train_batch_size] for k, v in s.items()}
                loss_ok = True
                for j in range(cfg.num_train_timesteps):
                    with acc.accumulate(self.unet_prepared):
                        latents, t = mb["latents"][:, j], mb["timesteps"][:, j]
                        with acc.autocast():
                            pred = predict_noise(
                                self.unet_prepared,
                                latents,
                                t,
                                mb["prompt_embeds"],
                                mb["negative_prompt_embeds"],
                                guidance,
                            )
                        out = ddim_step_with_logprob(
                            self.pipe.scheduler,
                            pred,
                            t,
                            latents,
                            cfg.sample_eta,
                            prev_sample=mb["next_latents"][:, j],
                        )
                        loss, st = self._ppo_loss(
                            out.log_prob, mb["log_probs"][:, j], mb["advantages"]
                        )
                        if cfg.train_kl_coef > 0:
                            ref_mean = self._reference_mean(
                                latents,
                                t,
                                mb["prompt_embeds"],
                                mb["negative_prompt_embeds"],
                                guidance,
                                mb["next_latents"][:, j],
                            )
                            # KL of two Gaussians with the same std: |mu - mu_ref|^2 / (2 std^2),
                            # mean over non-batch dims (Flow-GRPO's KL term for SDE samplers).
                            kl = ((out.mean - ref_mean) ** 2 / (2 * out.std**2)).mean(dim=(1, 2, 3))
                            loss = loss + cfg.train_kl_coef * kl.mean()
                            stats["kl_ref"].append(kl.mean().item())
                        loss_ok = loss_ok and bool(torch.isfinite(loss))
                        stats["loss"].append(loss.item())
                        stats["approx_kl"].append(st["approx_kl"].item())
                        stats["clipfrac"].append(st["clipfrac"].item())
                        ratios.append(st["ratio"].float().cpu())
                        acc.backward(loss)
                        if acc.sync_gradients:
                            res = self._optimizer_step(loss_ok)
                            grad_norms.append(res["grad_norm"])
                            loss_ok = True
        ratio = torch.cat(ratios) if ratios else torch.zeros(1)
        metrics = {
            "loss": _nanmean(stats["loss"]),
            "approx_kl": _nanmean(stats["approx_kl"]),
            "clipfrac": _nanmean(stats["clipfrac"]),
            "ratio_mean": float(ratio.mean()),
            "ratio_std": float(ratio.std()) if ratio.numel() > 1 else 0.0,
            "ratio_min": float(ratio.min()),
            "ratio_max": float(ratio.max()),
            "grad_norm": _nanmean(grad_norms),
        }
        if stats["kl_ref"]:
            metrics["kl_ref"] = _nanmean(stats["kl_ref"])
        return metrics

    def train_draft(self, epoch: int) -> tuple[dict, dict, dict[str, float]]:
        """DRaFT-K: sample with no grad except the last `draft_k` steps, decode, and ascend
        the differentiable reward `reward_fn.score` (Clark et al. 2023). Returns
        (samples-like dict for logging, timings, metrics)."""
        cfg, acc = self.config, self.accelerator
        scheduler = self.pipe.scheduler
        rewards, prompts_all, images_all, losses, grad_norms = [], [], [], [], []
        t0 = time.perf_counter()
        self.unet_prepared.train()
        for _ in range(cfg.sample_num_batches_per_epoch):
            prompts, metadata = self._draw_prompts()
            embeds = encode_prompts(self.pipe, prompts, self.device)
            neg = self._negative_embeds(len(prompts))
            with acc.accumulate(self.unet_prepared):
                first = cfg.sample_num_steps - cfg.draft_k
                size = cfg.resolution or self.unet.config.sample_size * self.pipe.vae_scale_factor
                x = self.pipe.prepare_latents(
                    len(prompts),
                    self.unet.config.in_channels,
                    size,
                    size,
                    embeds.dtype,
                    self.device,
                    None,
                )  # (B, C, h, w) initial noise (DDIM init_noise_sigma = 1: no double scaling)
                if first > 0:  # the first T - K steps without gradients
                    with torch.no_grad(), acc.autocast():
                        tr = sample_with_logprob(
                            self.pipe,
                            embeds,
                            neg,
                            cfg.sample_num_steps,
                            cfg.sample_guidance_scale,
                            cfg.sample_eta,
                            unet=self.unet,
                            height=size,
                            width=size,
                            latents=x,
                            stop_at=first,
                        )
                    x = tr.next_latents[:, -1]
                scheduler.set_timesteps(cfg.sample_num_steps, device=self.device)
                timesteps = scheduler.timesteps
                for t in timesteps[first:]:
                    with acc.autocast():
                        pred = predict_noise(
                            self.unet_prepared, x, t, embeds, neg, cfg.sample_guidance_scale
                        )
                    x = ddim_step_with_logprob(scheduler, pred, t, x, cfg.sample_eta).prev_sample
                with acc.autocast():
                    images = decode_latents(self.pipe, x)
                score = self.reward_fn.score(images, prompts)
                loss = -score.float().mean()
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norms.append(self._optimizer_step(bool(torch.isfinite(loss)))["grad_norm"])
            rewards.append(score.detach().float())
            prompts_all += prompts
            images_all.append(images.detach())
            losses.append(loss.item())
        samples = {
            "rewards": torch.cat(rewards),
            "prompts": prompts_all,
            "images": torch.cat(images_all),
            "info": {},
        }
        timings = {"time_sampling_and_training": time.perf_counter() - t0}
        return samples, timings, {"loss": _nanmean(losses), "grad_norm": _nanmean(grad_norms)}

    # --------------------------------------------------------------------------- main loop ---
    def train(self) -> list[dict[str, float]]:
        """Run from the current epoch to `num_epochs`; returns one metrics dict per epoch."""
        cfg, acc = self.config, self.accelerator
        history = []
        epochs = range(self.progress.epoch, cfg.num_epochs)
        try:
            for epoch in tqdm(epochs, desc="epochs", disable=not acc.is_local_main_process):
                if cfg.train_mode == "ppo":
                    samples, timings = self.sample_epoch(epoch)
                    metrics = self.compute_advantages(samples)
                    t0 = time.perf_counter()
                    metrics.update(self.train_ppo(samples, epoch))
                    timings["time_training"] = time.perf_counter() - t0
                else:
                    samples, timings, train_metrics = self.train_draft(epoch)
                    rewards_all = acc.gather(samples["rewards"]).cpu().numpy()
                    metrics = {
                        "reward_mean": float(rewards_all.mean()),
                        "reward_std": float(rewards_all.std()),
                        "num_samples": int(rewards_all.shape[0]),
                    }
                    metrics.update(train_metrics)
                metrics.update(timings)
                self.progress.epoch = epoch + 1
                metrics["epoch"] = epoch
                metrics["optimizer_steps"] = self.progress.optimizer_steps
                metrics["skipped_steps"] = self.progress.skipped_steps
                history.append(metrics)
                acc.log(metrics, step=epoch)
                if cfg.log_image_freq and epoch % cfg.log_image_freq == 0:
                    self._log_images(samples, epoch)
                last = epoch + 1 == cfg.num_epochs
                if last or (cfg.save_freq and (epoch + 1) % cfg.save_freq == 0):
                    self.save_checkpoint()
            if self.progress.epoch >= cfg.num_epochs:
                acc.wait_for_everyone()
                save_lora_diffusers(
                    self.unet, self.run_dir / "lora", is_main_process=acc.is_main_process
                )
                acc.wait_for_everyone()
        finally:
            self.executor.shutdown(wait=True)
            acc.end_training()
        return history

    def _log_images(self, samples: dict, epoch: int) -> None:
        """Grid of rank 0's first images with prompts and rewards, for every tracker."""
        acc = self.accelerator
        if not acc.is_main_process or not acc.trackers:
            return
        from torchvision.utils import make_grid

        k = min(self.config.log_num_images, samples["images"].shape[0])
        images = samples["images"][:k].float().cpu()  # (k, 3, H, W)
        captions = [
            f"{i}: {p} | reward {r:.4f}"
            for i, (p, r) in enumerate(zip(samples["prompts"][:k], samples["rewards"][:k].tolist()))
        ]
        grid = make_grid(images, nrow=min(k, 4))  # (3, H', W')
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("samples", grid, epoch)
                tracker.writer.add_text("samples_captions", "  \n".join(captions), epoch)
            elif tracker.name == "wandb":
                import wandb

                tracker.log(
                    {"samples": [wandb.Image(im, caption=c) for im, c in zip(images, captions)]},
                    step=epoch,
                )


def _nanmean(values: list[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(arr)) if arr.size and not np.isnan(arr).all() else float("nan")


def _scalar_config(cfg: DDPOConfig) -> dict:
    """Config as tracker hyper-parameters (TensorBoard accepts only scalars and strings)."""
    out = {}
    for k, v in cfg.to_dict().items():
        out[k] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
