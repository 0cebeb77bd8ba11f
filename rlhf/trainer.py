"""DDPO trainer: sample -> rewards (overlapping the next sampling batch) -> advantages ->
PPO-clip on LoRA weights of the UNet, on accelerate. `train_mode="draft"` runs DRaFT-K
instead (`rlhf.draft`), "raft" and "nft" the reward-weighted denoising loss
(`rlhf.denoising`).

What this loop does on purpose:
- the training forward goes through the accelerate-*prepared* UNet, so DDP all-reduces the
  LoRA gradients (sampling and the reference forward use the unwrapped module, under no_grad);
- every rank calls `save_checkpoint` (rank 0 writes the shared state, each rank its RNG
  state), between barriers; checkpoints are safetensors and JSON (`rlhf.checkpointing`), so
  resuming never unpickles anything;
- reward calls are submitted to a thread pool right after each batch is sampled and only
  awaited after the last batch, so they overlap the next batches' sampling;
- LoRA is saved on its own, in the diffusers format (`pipe.load_lora_weights(dir)`).
"""

from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from tqdm.auto import tqdm

from hyperalign.common import parse_dtype, recover_dir
from rlhf import checkpointing as ckpt
from rlhf.config import RESUME_MAY_CHANGE, DDPOConfig, resume_differences
from rlhf.ddim_logprob import ddim_step_with_logprob
from rlhf.denoising import denoising_epoch
from rlhf.draft import check_draft_reward, draft_epoch
from rlhf.pipeline import load_pipeline
from rlhf.prompts import check_prompt_fn, get_prompt_fn
from rlhf.rewards import RewardError, check_reward_output, get_reward, reward_name
from rlhf.sampling import encode_prompts, predict_noise, sample_with_logprob
from rlhf.stat_tracking import PerPromptStatTracker, compute_advantages, nanmean

__all__ = [
    "DDPOTrainer",
    "NonFiniteTrainingError",
    "NonFiniteSamplesError",
    "ppo_clip_loss",
    "save_lora_diffusers",
    "LORA_CHECKPOINT_FILE",
]

logger = get_logger(__name__)

LORA_CHECKPOINT_FILE = ckpt.LORA_FILE
# The per-sample tensors of an epoch that PPO trains on, and those indexed per timestep.
_TRAIN_KEYS = (
    "timesteps",
    "latents",
    "next_latents",
    "log_probs",
    "prompt_embeds",
    "negative_prompt_embeds",
    "advantages",
)
_PER_STEP_KEYS = ("timesteps", "latents", "next_latents", "log_probs")


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive optimizer steps had non-finite losses or gradients."""


class NonFiniteSamplesError(RuntimeError):
    """The diffusion model produced non-finite images (NaN/inf weights or activations)."""


@dataclass
class TrainingProgress:
    """Epoch and optimizer-step counters, saved in every checkpoint."""

    epoch: int = 0
    optimizer_steps: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`'s output; counters must be non-negative integers."""
        for key in ("epoch", "optimizer_steps", "skipped_steps"):
            value = state.get(key) if isinstance(state, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"progress counter {key} must be an integer >= 0, got {value!r}")
            setattr(self, key, value)


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


def add_lora(denoiser, cfg: DDPOConfig) -> None:
    """A LoRA adapter of ``cfg`` (rank, alpha, target modules) on ``denoiser`` (a UNet or a
    transformer), kept in fp32 whatever the frozen weights' dtype. Its B matrices start at
    zero, so the adapted model starts as the base one."""
    from peft import LoraConfig

    denoiser.add_adapter(
        LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            init_lora_weights="gaussian",  # B = 0
            target_modules=list(cfg.lora_target_modules),
        )
    )
    for p in denoiser.parameters():
        if p.requires_grad:  # only LoRA weights
            p.data = p.data.float()


def write_lora_diffusers(unet, directory: str | Path) -> None:
    """Write the UNet's LoRA in the diffusers format into `directory` (not atomic)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(directory),
        unet_lora_layers=state,
        safe_serialization=True,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )


def save_lora_diffusers(unet, directory: str | Path, is_main_process: bool = True) -> None:
    """Save the UNet's LoRA in the diffusers format (`StableDiffusionPipeline.load_lora_weights`
    loads it), atomically: written to a temporary sibling directory, then swapped in with the
    recoverable `hyperalign.common.replace_dir` (readers call `recover_dir` first)."""
    if not is_main_process:
        return
    tmp = ckpt.staging_dir(directory)
    write_lora_diffusers(unet, tmp)
    ckpt.publish_dir(tmp, directory)


class DDPOTrainer:
    """Run DDPO (or DRaFT-K with `train_mode="draft"`) on a Stable Diffusion pipeline.

    Args:
        config: the run's `DDPOConfig` (validated here).
        reward_fn: a reward callable `(images, prompts, metadata) -> (rewards, info)`;
            None builds `config.reward_fn` from the registry.
        prompt_fn: a callable `() -> (str, dict | None)`; None builds `config.prompt_fn`.
        pipeline: a `StableDiffusionPipeline`; None loads `config.pretrained_model`.

    Use: `DDPOTrainer(cfg).train()`; returns the per-epoch metrics. Outputs go to
    `<logdir>/<run_name>/`: `config.json`, `checkpoints/checkpoint_<epoch>/`, `lora/` (final
    LoRA in diffusers format) and tracker logs in `logs/`.
    """

    def __init__(self, config: DDPOConfig, reward_fn=None, prompt_fn=None, pipeline=None):
        config.validate()
        self.config = cfg = config
        self.run_dir = Path(cfg.logdir) / cfg.run_name
        self.accelerator = acc = self._build_accelerator()
        # Checked before anything is written, so a refused resume leaves the run untouched.
        self._resume_dir = self._find_resume_checkpoint(cfg.resume_from)
        set_seed(cfg.seed, device_specific=True)  # seed + process index on every rank
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.device = acc.device
        self.weight_dtype = parse_dtype(cfg.mixed_precision)

        if pipeline is None:
            pipeline = load_pipeline(
                cfg.pretrained_model, revision=cfg.pretrained_revision, resolution=cfg.resolution
            )
        self.pipe = pipeline
        self._prepare_pipeline()
        self.unet = self._denoiser()  # unwrapped, with the LoRA adapter
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
        self._build_reward_and_prompts(reward_fn, prompt_fn)
        self.executor = ThreadPoolExecutor(max_workers=cfg.max_workers)
        self._consecutive_bad = 0
        self._window_bad = 0
        self._neg_embeds = None
        self._dropped_info_keys: set[str] = set()
        self._start_logging()
        if self._resume_dir is not None:
            self._load_checkpoint(self._resume_dir)

    # ---------------------------------------------------------------------------- setup ---
    def _build_accelerator(self) -> Accelerator:
        cfg = self.config
        # In PPO and the denoising modes each trained timestep is one backward: accumulate
        # over all of them. DRaFT has one backward per sampled batch.
        per_step = cfg.train_mode != "draft"
        accum = cfg.train_gradient_accumulation_steps * (cfg.num_train_timesteps if per_step else 1)
        self._log_with = {"none": None, "all": "all"}.get(cfg.log_with, [cfg.log_with])
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            log_with=self._log_with,
            gradient_accumulation_steps=accum,
            project_config=ProjectConfiguration(
                project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")
            ),
        )

    def _prepare_pipeline(self) -> None:
        """DDIM scheduler, frozen fp16/bf16/fp32 weights on the device, a LoRA adapter (fp32)."""
        from diffusers import DDIMScheduler

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
        add_lora(pipe.unet, cfg)

    def _build_reward_and_prompts(self, reward_fn, prompt_fn) -> None:
        cfg = self.config
        self.reward_fn = (
            reward_fn
            if reward_fn is not None
            else get_reward(cfg.reward_fn, device=self.device, dtype=torch.float32)
        )
        self.reward_name = reward_name(self.reward_fn)
        if cfg.train_mode == "draft":
            check_draft_reward(self.reward_fn, self.reward_name)
        self.prompt_fn = prompt_fn if prompt_fn is not None else get_prompt_fn(cfg.prompt_fn)
        check_prompt_fn(self.prompt_fn)

    def _start_logging(self) -> None:
        """Write the run's config.json, start the trackers, log the derived sizes."""
        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.json")
        if self._log_with is not None:
            acc.init_trackers(cfg.run_name, config=_scalar_config(cfg))
        self.derived = cfg.derived(acc.num_processes)
        logger.info(
            "DDPO run %s: %s; trainable LoRA params %d",
            cfg.run_name,
            ", ".join(f"{k}={v}" for k, v in self.derived.items()),
            sum(p.numel() for p in self.trainable),
            main_process_only=True,
        )

    # --------------------------------------------------------------------------- main loop ---
    def train(self) -> list[dict[str, float]]:
        """Run from the current epoch to `num_epochs`; returns one metrics dict per epoch."""
        cfg, acc = self.config, self.accelerator
        history = []
        epochs = range(self.progress.epoch, cfg.num_epochs)
        try:
            for epoch in tqdm(epochs, desc="epochs", disable=not acc.is_local_main_process):
                samples, metrics = self.train_epoch(epoch)
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
                self.save_final_lora(self.run_dir / "lora")
                acc.wait_for_everyone()
        finally:
            self.executor.shutdown(wait=True)
            acc.end_training()
        return history

    def _denoiser(self):
        """The pipeline's denoising network that carries the LoRA (`pipe.unet` here)."""
        return self.pipe.unet

    def write_lora(self, directory) -> None:
        """Write the LoRA into `directory` (not atomic) in the pipeline's diffusers format:
        `StableDiffusionPipeline.load_lora_weights(directory)` loads it."""
        write_lora_diffusers(self.unet, directory)

    def save_final_lora(self, directory) -> None:
        """`write_lora`, atomically (staged, then swapped in), on the main process."""
        if self.accelerator.is_main_process:
            tmp = ckpt.staging_dir(directory)
            self.write_lora(tmp)
            ckpt.publish_dir(tmp, directory)

    def train_epoch(self, epoch: int) -> tuple[dict, dict[str, float]]:
        """One epoch: PPO (sample, score, advantages, PPO-clip), DRaFT-K, or RAFT /
        DiffusionNFT (sample, score, advantages, denoising loss); returns (samples, metrics)."""
        if self.config.train_mode == "draft":
            return draft_epoch(self, epoch)
        if self.config.train_mode in ("raft", "nft"):
            return denoising_epoch(self, epoch)
        samples, timings = self.sample_epoch(epoch)
        metrics = self.compute_advantages(samples)
        t0 = time.perf_counter()
        metrics.update(self.train_ppo(samples, epoch))
        timings["time_training"] = time.perf_counter() - t0
        metrics.update(timings)
        return samples, metrics

    # ---------------------------------------------------------------------------- sampling ---
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
            traj = self._sample_batch(prompts)
            traj.prompts, traj.metadata = prompts, metadata
            where = f"epoch {epoch}, batch {i}, rank {acc.process_index}, prompts {prompts[:3]}"
            self._check_images(traj.images, where)
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
        samples = _collate(trajs, results)
        timings = {
            "time_sampling": t_sampled - t_start,
            "time_reward_wait": t_done - t_sampled,
            "time_reward_calls": sum(d for _, _, d in results),
        }
        return samples, timings

    def _draw_prompts(self) -> tuple[list[str], list[dict]]:
        """`sample_batch_size` prompts, each drawn one appears `sample_num_images_per_prompt`
        times in a row; metadata `None` becomes `{}`."""
        cfg = self.config
        k = cfg.sample_num_images_per_prompt
        drawn = [self.prompt_fn() for _ in range(cfg.sample_batch_size // k)]
        prompts = [p for p, _ in drawn for _ in range(k)]  # each prompt k times in a row
        metadata = [dict(m) if m is not None else {} for _, m in drawn for _ in range(k)]
        return prompts, metadata

    def _negative_embeds(self, batch: int) -> torch.Tensor:
        if self._neg_embeds is None:
            self._neg_embeds = encode_prompts(self.pipe, [self.config.negative_prompt], self.device)
        return self._neg_embeds.expand(batch, -1, -1)  # (B, L, D)

    def _sample_batch(self, prompts: list[str]):
        """One `Trajectory` of `prompts` with the unwrapped UNet (no grad)."""
        cfg = self.config
        embeds = encode_prompts(self.pipe, prompts, self.device)
        with self.accelerator.autocast():
            return sample_with_logprob(
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

    def _check_images(self, images: torch.Tensor, where: str) -> None:
        """Raise `NonFiniteSamplesError` if sampled images hold NaN/inf: the model is broken,
        not the reward, and the message says which LoRA tensors are non-finite."""
        if bool(torch.isfinite(images).all()):
            return
        bad = [
            name
            for name, p in self.unet.named_parameters()
            if p.requires_grad and not bool(torch.isfinite(p).all())
        ]
        cause = (
            f"{len(bad)} of {len(self.trainable)} LoRA tensors hold non-finite weights "
            f"(e.g. {bad[:2]}): the checkpoint is damaged or training diverged; resume from an "
            "earlier checkpoint, or lower train_learning_rate"
            if bad
            else "the LoRA weights are finite, so the base model or its precision overflowed; "
            "try mixed_precision='bf16' or 'no'"
        )
        raise NonFiniteSamplesError(
            f"the diffusion model produced non-finite images ({where}), before any reward "
            f"was computed; {cause}"
        )

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
            out, len(prompts), images.device, self.reward_name, where, self._dropped_info_keys
        )
        return rewards, info, time.perf_counter() - t0

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
    def train_ppo(self, samples: dict, epoch: int) -> dict[str, float]:
        """PPO-clip over shuffled samples and per-sample shuffled timesteps; returns metrics."""
        cfg = self.config
        n = samples["log_probs"].shape[0]
        log: dict[str, list] = {
            k: [] for k in ("loss", "approx_kl", "clipfrac", "kl_ref", "ratio", "grad_norm")
        }
        self.unet_prepared.train()
        for _inner in range(cfg.train_num_inner_epochs):
            shuffled = self._shuffle_for_training(samples)
            for b in tqdm(
                range(0, n, cfg.train_batch_size),
                desc=f"epoch {epoch}: training",
                disable=not self.accelerator.is_local_main_process,
                leave=False,
            ):
                batch = {k: v[b : b + cfg.train_batch_size] for k, v in shuffled.items()}
                self._train_micro_batch(batch, log)
        return _ppo_metrics(log)

    def _shuffle_for_training(self, samples: dict) -> dict[str, torch.Tensor]:
        """The training tensors with samples in a random order and, per sample, its own
        random order of timesteps; per-step tensors become (N, T, ...), whose first
        `num_train_timesteps` columns are trained ("early": a shuffle of the first ones)."""
        device = self.device
        n, num_steps = samples["log_probs"].shape
        perm = torch.randperm(n, device=device)
        s = {k: v[perm] for k, v in samples.items() if k in _TRAIN_KEYS}
        order = self.timestep_order(n, num_steps)  # (N, T)
        rows = torch.arange(n, device=device)[:, None]  # (N, 1)
        for k in _PER_STEP_KEYS:
            s[k] = s[k][rows, order]  # (N, T, ...)
        return s

    def timestep_order(self, n: int, num_steps: int) -> torch.Tensor:
        """(N, T) int64: for each of `n` samples its own order of the `num_steps` trajectory
        steps, whose first `num_train_timesteps` are trained: a random permutation
        ("random"), or a shuffle of the first ones followed by the rest ("early")."""
        cfg, device = self.config, self.device
        if cfg.train_timestep_selection == "early":
            k = cfg.num_train_timesteps
            rest = torch.arange(k, num_steps, device=device)
            return torch.stack(
                [torch.cat([torch.randperm(k, device=device), rest]) for _ in range(n)]
            )
        return torch.stack([torch.randperm(num_steps, device=device) for _ in range(n)])

    def _train_micro_batch(self, batch: dict, log: dict[str, list]) -> None:
        """Backward through each trained timestep of `batch`; the optimizer steps whenever
        accelerate's accumulation reaches a sync step."""
        acc = self.accelerator
        loss_ok = True
        for j in range(self.config.num_train_timesteps):
            with acc.accumulate(self.unet_prepared):
                loss = self._timestep_loss(batch, j, log)
                loss_ok = loss_ok and bool(torch.isfinite(loss))
                acc.backward(loss)
                if acc.sync_gradients:
                    log["grad_norm"].append(self._optimizer_step(loss_ok)["grad_norm"])
                    loss_ok = True

    def _timestep_loss(self, batch: dict, j: int, log: dict[str, list]) -> torch.Tensor:
        """PPO loss (plus the KL penalty) of the `j`-th trained timestep of `batch`."""
        cfg = self.config
        guidance = cfg.sample_guidance_scale if cfg.train_cfg else 1.0
        latents, t = batch["latents"][:, j], batch["timesteps"][:, j]
        embeds, neg = batch["prompt_embeds"], batch["negative_prompt_embeds"]
        next_latents = batch["next_latents"][:, j]
        with self.accelerator.autocast():
            pred = predict_noise(self.unet_prepared, latents, t, embeds, neg, guidance)
        out = ddim_step_with_logprob(
            self.pipe.scheduler, pred, t, latents, cfg.sample_eta, prev_sample=next_latents
        )
        loss, st = self._ppo_loss(out.log_prob, batch["log_probs"][:, j], batch["advantages"])
        if cfg.train_kl_coef > 0:
            ref_mean = self._reference_mean(latents, t, embeds, neg, guidance, next_latents)
            # KL of two Gaussians with the same std: |mu - mu_ref|^2 / (2 std^2), mean over
            # non-batch dims (Flow-GRPO's KL term for SDE samplers).
            kl = ((out.mean - ref_mean) ** 2 / (2 * out.std**2)).mean(dim=(1, 2, 3))
            loss = loss + cfg.train_kl_coef * kl.mean()
            log["kl_ref"].append(kl.mean().item())
        log["loss"].append(loss.item())
        log["approx_kl"].append(st["approx_kl"].item())
        log["clipfrac"].append(st["clipfrac"].item())
        log["ratio"].append(st["ratio"].float().cpu())
        return loss

    def _ppo_loss(self, log_prob, old_log_prob, advantages):
        return ppo_clip_loss(log_prob, old_log_prob, advantages, self.config.train_clip_range)

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
            self._count_bad_step(grad_norm)
        return {"grad_norm": grad_norm, "step_ok": float(ok)}

    def _count_bad_step(self, grad_norm: float) -> None:
        self._consecutive_bad += 1
        self.progress.skipped_steps += 1
        logger.warning(
            "non-finite loss or gradient (grad norm %s): optimizer step skipped (%d in a row)",
            grad_norm,
            self._consecutive_bad,
        )
        if self._consecutive_bad >= self.config.max_consecutive_nonfinite:
            raise NonFiniteTrainingError(
                f"{self._consecutive_bad} consecutive optimizer steps had non-finite losses "
                f"or gradients (last grad norm {grad_norm}); stopping. Lower "
                f"train_learning_rate, check the reward scale, or try mixed_precision='bf16'/'no'."
            )

    # ----------------------------------------------------------------------------- logging ---
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

    # ------------------------------------------------------------------------- checkpoints ---
    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Save LoRA, optimizer, stat tracker, counters and every rank's RNG state (safetensors
        and JSON, see `rlhf.checkpointing`); called on all ranks. `lora/` inside holds the
        LoRA in the diffusers format (`pipe.load_lora_weights`).

        Assembled in a temporary directory and swapped in when complete, so a crash never
        leaves a half-written `checkpoint_<epoch>`; then all but the newest
        `num_checkpoint_limit` checkpoints are deleted.
        """
        acc = self.accelerator
        final = self.checkpoint_root / f"checkpoint_{self.progress.epoch:05d}"
        if acc.is_main_process:
            ckpt.recover_leftovers(self.checkpoint_root)  # dead processes' temporary folders
        tmp = [str(ckpt.staging_dir(final)) if acc.is_main_process else None]
        tmp = Path(broadcast_object_list(tmp, from_process=0)[0])  # one folder for all ranks
        rng_tensors, rng_meta = ckpt.capture_rng_state()
        safetensors_name, json_name = ckpt.rng_files(acc.process_index)
        ckpt.write_tensors(tmp / safetensors_name, rng_tensors)
        ckpt.write_json(tmp / json_name, rng_meta)
        if acc.is_main_process:
            self._write_shared_state(tmp)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.publish_dir(tmp, final)
            ckpt.prune_checkpoints(self.checkpoint_root, self.config.num_checkpoint_limit, final)
        acc.wait_for_everyone()
        return final

    def _write_shared_state(self, directory: Path) -> None:
        """Rank 0's part of a checkpoint: LoRA, optimizer, trainer state, config, `lora/`."""
        from peft.utils import get_peft_model_state_dict

        acc = self.accelerator
        ckpt.write_tensors(
            directory / ckpt.LORA_FILE,
            {k: v.detach().float() for k, v in get_peft_model_state_dict(self.unet).items()},
        )
        opt_tensors, opt_meta = ckpt.optimizer_to_tensors(self.optimizer.state_dict())
        ckpt.write_tensors(directory / ckpt.OPTIMIZER_TENSORS, opt_tensors)
        ckpt.write_json(directory / ckpt.OPTIMIZER_JSON, opt_meta)
        state = {
            **ckpt.state_header(),
            "progress": self.progress.state_dict(),
            "stat_tracker": self.stat_tracker.state_dict(),
            "grad_scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "accelerator_step": acc.step,
            "num_processes": acc.num_processes,
        }
        ckpt.write_json(directory / ckpt.STATE_FILE, state)
        self.config.save(directory / ckpt.CONFIG_FILE)
        # The same LoRA in the diffusers format, so `hyperalign eval-checkpoints --lora` and
        # `pipe.load_lora_weights` can compare the epochs of a run.
        self.write_lora(directory / "lora")

    def _find_resume_checkpoint(self, path: str | None) -> Path | None:
        """The checkpoint `resume_from` names ("latest": the newest of this run), checked to
        fit this run; None when not resuming. Leftovers of interrupted saves are repaired
        first (by rank 0)."""
        if not path:
            return None
        acc = self.accelerator
        if acc.is_main_process:
            ckpt.recover_leftovers(self.checkpoint_root)
            if path != "latest":
                recover_dir(path)
        acc.wait_for_everyone()
        if path == "latest":
            found = ckpt.list_checkpoints(self.checkpoint_root)
            if not found:
                raise FileNotFoundError(
                    f"resume_from='latest' but {self.checkpoint_root} holds no checkpoint"
                )
            directory = found[-1]
        else:
            directory = Path(path)
        self._check_checkpoint(directory)
        return directory

    def _check_checkpoint(self, directory: Path) -> None:
        """Refuse a checkpoint this run cannot continue exactly: not one of this trainer's,
        written with other settings, or without this rank's RNG state."""
        if not (directory / ckpt.STATE_FILE).is_file():
            pickled = sorted(p.name for p in directory.glob("*.pkl")) if directory.is_dir() else []
            extra = (
                f"; it holds pickle files ({', '.join(pickled[:3])}), which are never loaded "
                "because unpickling can run code"
                if pickled
                else ""
            )
            raise FileNotFoundError(
                f"{directory} is not a checkpoint of this trainer (no {ckpt.STATE_FILE}){extra}"
            )
        saved = DDPOConfig.load(directory / ckpt.CONFIG_FILE)
        changed = resume_differences(saved, self.config)
        if changed:
            lines = "\n".join(f"  {k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in changed)
            raise ValueError(
                f"cannot resume from {directory}: these settings differ from the ones the "
                f"checkpoint was trained with:\n{lines}\nIts optimizer, RNG and tracker state "
                f"belong to those settings. Resume with them (--config "
                f"{directory / ckpt.CONFIG_FILE} --set resume_from={directory}; only "
                f"{', '.join(RESUME_MAY_CHANGE)} may change), or start a new run without "
                "resume_from."
            )
        rank = self.accelerator.process_index
        for name in ckpt.rng_files(rank):
            if not (directory / name).is_file():
                raise FileNotFoundError(
                    f"{directory} has no RNG state for process {rank} ({name}): a resumed run "
                    "would not continue the saved one. Resume with the number of processes "
                    "the checkpoint was written by, or start a new run."
                )

    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint written by `save_checkpoint` ("latest": the newest of
        this run), after the checks of `_check_checkpoint`."""
        self._load_checkpoint(self._find_resume_checkpoint(str(path)))

    def _load_checkpoint(self, directory: Path) -> None:
        source = str(directory)
        self._load_lora(directory / ckpt.LORA_FILE)
        opt_meta = ckpt.read_json(directory / ckpt.OPTIMIZER_JSON)
        opt_tensors = ckpt.read_tensors(directory / ckpt.OPTIMIZER_TENSORS)
        self.optimizer.load_state_dict(
            ckpt.optimizer_from_tensors(opt_tensors, opt_meta, self.optimizer, source)
        )
        self._load_trainer_state(directory / ckpt.STATE_FILE)
        safetensors_name, json_name = ckpt.rng_files(self.accelerator.process_index)
        ckpt.restore_rng_state(
            ckpt.read_tensors(directory / safetensors_name),
            ckpt.read_json(directory / json_name),
            str(directory / json_name),
        )
        logger.info("resumed from %s at epoch %d", directory, self.progress.epoch)

    def _load_lora(self, path: Path) -> None:
        """Load the LoRA weights; non-finite or unexpected tensors refuse the checkpoint."""
        from peft.utils import set_peft_model_state_dict

        state = ckpt.read_tensors(path)
        bad = [k for k, v in state.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ckpt.CheckpointError(
                f"{path} holds non-finite LoRA weights in {len(bad)} tensors (e.g. {bad[:2]}); "
                "the run diverged before this checkpoint: resume from an earlier one"
            )
        result = set_peft_model_state_dict(self.unet, state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ckpt.CheckpointError(f"{path} has unexpected LoRA keys {unexpected[:3]}")

    def _load_trainer_state(self, path: Path) -> None:
        """Counters, stat tracker, gradient scaler and accelerate's micro-step counter."""
        acc = self.accelerator
        state = ckpt.read_json(path)
        ckpt.check_state_header(state, str(path))
        try:
            self.progress.load_state_dict(state["progress"])
            self.stat_tracker.load_state_dict(state["stat_tracker"])
            if acc.scaler is not None and state.get("grad_scaler"):
                acc.scaler.load_state_dict(state["grad_scaler"])
            step = state["accelerator_step"]
            if not isinstance(step, int) or step < 0:
                raise ValueError(f"accelerator_step must be an integer >= 0, got {step!r}")
            acc.step = step
        except (KeyError, TypeError, ValueError) as err:
            raise ckpt.CheckpointError(f"{path} is not a valid trainer state: {err}") from err
        saved_processes = state.get("num_processes")
        if saved_processes != acc.num_processes:
            warnings.warn(
                f"{path} was written by {saved_processes} processes, this run has "
                f"{acc.num_processes}: the resumed run will not match an uninterrupted one",
                RuntimeWarning,
                stacklevel=2,
            )


def _collate(trajs: list, results: list) -> dict:
    """One epoch's samples from its trajectories and `_score` results (see `sample_epoch`)."""
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
    return samples


def _ppo_metrics(log: dict[str, list]) -> dict[str, float]:
    """Epoch metrics from the per-step records of `train_ppo`."""
    ratio = torch.cat(log["ratio"]) if log["ratio"] else torch.zeros(1)
    metrics = {
        "loss": nanmean(log["loss"]),
        "approx_kl": nanmean(log["approx_kl"]),
        "clipfrac": nanmean(log["clipfrac"]),
        "ratio_mean": float(ratio.mean()),
        "ratio_std": float(ratio.std()) if ratio.numel() > 1 else 0.0,
        "ratio_min": float(ratio.min()),
        "ratio_max": float(ratio.max()),
        "grad_norm": nanmean(log["grad_norm"]),
    }
    if log["kl_ref"]:
        metrics["kl_ref"] = nanmean(log["kl_ref"])
    return metrics


def _scalar_config(cfg: DDPOConfig) -> dict:
    """Config as tracker hyper-parameters (TensorBoard accepts only scalars and strings)."""
    out = {}
    for k, v in cfg.to_dict().items():
        out[k] = v if isinstance(v, int | float | str | bool) else str(v)
    return out
