"""Configuration of DDPO fine-tuning: one typed dataclass, presets as functions.

Field names follow trl 0.23 `DDPOConfig` where one exists (`sample_*`, `train_*`,
`per_prompt_stat_tracking_*`, `async_reward_computation`, ...), so users of trl's
`DDPOTrainer` find their knobs. Differences from trl: `advantage_mode` replaces the boolean
`per_prompt_stat_tracking` (True <-> "per_prompt", False <-> "global") and adds "group";
`negative_prompt` is one string (trl: `negative_prompts`); reward and prompt functions are
named by registry specs (see `rlhf.rewards`, `rlhf.prompts`) so a run is fully described by
its saved JSON config.

Batch sizes are per process (per GPU) unless the name says "total". Values are type-checked
when a config is loaded, overridden or validated.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hyperalign.common import atomic_write_text, strict_json
from shapes.assets import FLOW_DIR, SD_DIR

__all__ = [
    "DDPOConfig",
    "base",
    "tiny_cpu",
    "sd15_hyperalign",
    "PRESETS",
    "get_preset",
    "apply_overrides",
    "RESUME_MAY_CHANGE",
    "resume_differences",
]

ADVANTAGE_MODES = ("per_prompt", "group", "group_centered", "global")
TIMESTEP_SELECTIONS = ("random", "early")
TRAIN_MODES = ("ppo", "draft", "raft", "nft")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LOG_WITH = ("tensorboard", "wandb", "all", "none")


@dataclass
class DDPOConfig:
    """All settings of one DDPO run. Every field is documented where it is defined."""

    # --- run / logging ---------------------------------------------------------------------
    run_name: str = "ddpo"
    """Name of the run; outputs go to `<logdir>/<run_name>/`."""
    logdir: str = "runs"
    """Root directory of run outputs (config, checkpoints, final LoRA, tracker logs)."""
    seed: int = 0
    """Global seed; each process uses `seed + process_index` for sampling noise."""
    log_with: str = "tensorboard"
    """Tracker(s) for accelerate: "tensorboard", "wandb", "all" or "none"."""
    log_image_freq: int = 1
    """Log an image grid (with prompts and rewards) every N epochs; 0 disables."""
    log_num_images: int = 8
    """Images per logged grid (taken from rank 0's samples)."""

    # --- model ----------------------------------------------------------------------------
    pretrained_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """Hub id or local directory of a Stable Diffusion 1.x pipeline; "tiny" builds the offline
    tiny test pipeline (`rlhf.tiny.build_tiny_pipeline`), "random-sd15" the SD 1.5
    architecture with random weights (`rlhf.tiny.build_random_sd15_pipeline`)."""
    pretrained_revision: str | None = None
    """Hub revision (branch, tag or commit) of `pretrained_model`."""
    resolution: int | None = None
    """Image height = width in pixels; None uses the UNet's native size (512 for SD 1.5)."""
    lora_rank: int = 4
    """LoRA rank r on the UNet attention projections."""
    lora_alpha: float = 4.0
    """LoRA alpha; the adapter output is scaled by alpha / r."""
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """UNet module names that receive LoRA adapters."""
    mixed_precision: str = "fp16"
    """"no", "fp16" or "bf16": dtype of the frozen weights and of autocast. LoRA weights and
    the optimizer state are always fp32."""
    allow_tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs (no effect on CPU)."""

    # --- epochs / checkpoints -------------------------------------------------------------
    num_epochs: int = 100
    """Number of epochs; one epoch = sample, score, then train on those samples."""
    save_freq: int = 20
    """Save a resumable checkpoint every N epochs (and always at the end); 0: only at the end."""
    num_checkpoint_limit: int = 5
    """Keep at most this many checkpoints (oldest deleted first); >= 1."""
    resume_from: str | None = None
    """Checkpoint directory to resume from, or "latest" for the newest one of this run."""

    # --- prompts and rewards --------------------------------------------------------------
    prompt_fn: str = "simple_animals"
    """Prompt function spec, see `rlhf.prompts.get_prompt_fn` (e.g. "simple_animals",
    "fixed:a red cube|a blue ball", "file:prompts.txt")."""
    reward_fn: str = "brightness"
    """Reward function spec, see `rlhf.rewards.get_reward` (e.g. "brightness",
    "hyperalign:<name_or_path>", "import:<package.module>:<function or class>")."""
    negative_prompt: str = ""
    """Negative prompt for the unconditional branch of CFG ("" is the plain unconditional)."""
    async_reward_computation: bool = True
    """Score each batch in a thread pool while the next batch is sampled."""
    max_workers: int = 2
    """Threads in the reward pool (only used with `async_reward_computation`)."""

    # --- sampling -------------------------------------------------------------------------
    sample_num_steps: int = 50
    """DDIM steps per sample (T)."""
    sample_eta: float = 1.0
    """DDIM eta in (0, 1]; 1 is DDPM-like noise. Log-probs need eta > 0."""
    sample_guidance_scale: float = 5.0
    """Classifier-free guidance scale (<= 1 disables CFG)."""
    sample_batch_size: int = 1
    """Images per sampling batch, per process."""
    sample_num_batches_per_epoch: int = 2
    """Sampling batches per epoch, per process."""
    sample_num_images_per_prompt: int = 1
    """Images drawn per prompt inside a sampling batch (>= 2 for group-relative advantages);
    must divide `sample_batch_size`."""

    # --- training -------------------------------------------------------------------------
    train_mode: str = "ppo"
    """"ppo": DDPO PPO-clip; "draft": differentiable reward, backprop through the last
    `draft_k` steps (DRaFT-K), needs a reward with a differentiable `score(images, prompts)`;
    "raft": the denoising loss on the best `raft_keep` images of each prompt's group (RAFT);
    "nft": the denoising loss on every image, split into a positive and a negative branch by
    its advantage (DiffusionNFT). See `rlhf.draft` and `rlhf.denoising`."""
    draft_k: int = 1
    """Steps backpropagated through in "draft" mode."""
    draft_straight_through: bool = False
    """"draft": pass the reward's gradient through the clamp of the decoded image to [0, 1]
    unchanged (straight-through). False keeps the plain clamp, whose gradient is zero wherever
    the VAE output leaves [0, 1] (on the shapes model: 93 % of the pixel values, mostly the
    white background)."""
    draft_random_k: bool = False
    """"draft": draw the number of backpropagated steps uniformly from 1..draft_k for every
    batch (AlignProp's randomized truncation) instead of always `draft_k`."""
    draft_grad_checkpointing: bool = False
    """"draft": recompute each backpropagated UNet forward during the backward pass
    (activation memory of one step instead of `draft_k`; about one more forward per step)."""
    raft_keep: int = 1
    """"raft": images kept for training out of each prompt's group of
    `sample_num_images_per_prompt` (those with the highest rewards; RAFT's best-of-K)."""
    nft_beta: float = 1.0
    """"nft": DiffusionNFT's beta, the step of the implicit positive / negative policies
    `old + beta * (new - old)` / `old - beta * (new - old)`; the loss's minimiser moves the
    prediction by `(2r - 1) / beta` of the way to the sample, so smaller is bolder."""
    train_batch_size: int = 1
    """Samples per training micro-batch, per process."""
    train_gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per optimizer step (each micro-batch already accumulates over
    its trained timesteps)."""
    train_learning_rate: float = 3e-4
    """AdamW learning rate."""
    train_adam_beta1: float = 0.9
    """AdamW beta1."""
    train_adam_beta2: float = 0.999
    """AdamW beta2."""
    train_adam_weight_decay: float = 1e-4
    """AdamW weight decay."""
    train_adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    train_max_grad_norm: float = 1.0
    """Gradient clipping norm (> 0)."""
    train_num_inner_epochs: int = 1
    """Passes over each epoch's samples."""
    train_cfg: bool = True
    """Use CFG (same scale as sampling) when recomputing log-probs in training ("ppo") and in
    the denoising loss ("raft", "nft": the guided prediction is regressed, see
    `rlhf.denoising`)."""
    train_adv_clip_max: float = 5.0
    """Clip advantages to [-x, x]."""
    train_clip_range: float = 1e-4
    """PPO clip range epsilon for the ratio."""
    train_timestep_fraction: float = 1.0
    """Fraction of each trajectory's timesteps trained on (which ones: `train_timestep_selection`)."""
    train_timestep_selection: str = "random"
    """"random": a random subset of all steps, drawn per sample (DDPO). "early": the first
    `num_train_timesteps` steps of the trajectory (the noisiest, where layout, colours and
    counts are decided), in random order. The last DDIM steps have the smallest std, so their
    log-probs move most per unit of parameter change; drawn at random they dominate the
    clipped gradient with changes to fine detail."""
    train_kl_coef: float = 0.0
    """Weight of the KL penalty to the adapter-disabled (reference) model; 0 disables it
    (saves one UNet forward per step)."""
    max_consecutive_nonfinite: int = 3
    """Stop the run after this many consecutive optimizer steps with non-finite gradients."""

    # --- advantages -----------------------------------------------------------------------
    advantage_mode: str = "per_prompt"
    """"per_prompt" (DDPO stat tracking), "group" (normalise inside each prompt's group in
    this epoch), "group_centered" (subtract the group mean, one std for the whole epoch: near-
    ties stay small) or "global" (normalise over the epoch)."""
    per_prompt_stat_tracking_buffer_size: int = 16
    """Rewards remembered per prompt for per-prompt tracking."""
    per_prompt_stat_tracking_min_count: int = 16
    """Below this many rewards for a prompt, the batch mean/std is used instead."""

    # --- flow-matching models (Flow-GRPO, `rlhf.flow`) -------------------------------------
    trainer: str = "auto"
    """"auto": chosen by the pipeline class of `pretrained_model` (Flow-GRPO for
    StableDiffusion3Pipeline and "tiny-sd3", DDPO otherwise); "flow_grpo" or "ddpo" choose
    explicitly (`rlhf.flow.select`). Flow-GRPO reads the other fields as DDPO does
    (`sample_num_steps`: SDE steps, `train_kl_coef`: its KL beta, `lora_*`: on the
    transformer), except `sample_eta`."""
    flow_noise_level: float = 0.7
    """Flow-GRPO's SDE noise level a (> 0): the step from flow time t to t' has std
    a * sqrt(t / (1 - t)) * sqrt(t - t')."""
    flow_max_sequence_length: int = 128
    """T5 tokens per prompt for Stable Diffusion 3, in [1, 512] (diffusers' default: 256)."""

    extra: dict = field(default_factory=dict)
    """Free-form notes stored with the run (not used by the trainer)."""

    # ---------------------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        """Timesteps trained per trajectory: int(sample_num_steps * train_timestep_fraction)."""
        return int(self.sample_num_steps * self.train_timestep_fraction)

    def derived(self, num_processes: int = 1) -> dict[str, int]:
        """Derived quantities, logged at start-up."""
        per_proc = self.sample_batch_size * self.sample_num_batches_per_epoch
        trained = per_proc
        if self.train_mode == "raft":  # only the best raft_keep of each group are trained
            trained = per_proc // self.sample_num_images_per_prompt * self.raft_keep
        micro_batches = trained // self.train_batch_size
        return {
            "num_processes": num_processes,
            "samples_per_epoch": per_proc * num_processes,
            "samples_per_epoch_per_process": per_proc,
            "total_train_batch_size": self.train_batch_size
            * num_processes
            * self.train_gradient_accumulation_steps,
            "trained_timesteps_per_sample": self.num_train_timesteps,
            "optimizer_steps_per_epoch": micro_batches
            // self.train_gradient_accumulation_steps
            * (self.train_num_inner_epochs if self.train_mode != "draft" else 1),
        }

    def validate(self) -> None:
        """Raise `ValueError` naming every impossible setting and how to fix it."""
        errs = type_errors(self)
        if not errs:  # the range checks below compare numbers: only with the right types
            errs = self._range_errors() + self._combination_errors()
        if errs:
            raise ValueError("invalid DDPOConfig:\n  - " + "\n  - ".join(errs))

    def _range_errors(self) -> list[str]:
        """Settings that are out of range on their own."""
        errs: list[str] = []

        def need(ok: bool, msg: str) -> None:
            if not ok:
                errs.append(msg)

        for name in (
            "num_epochs",
            "num_checkpoint_limit",
            "sample_num_steps",
            "sample_batch_size",
            "sample_num_batches_per_epoch",
            "sample_num_images_per_prompt",
            "train_batch_size",
            "train_gradient_accumulation_steps",
            "train_num_inner_epochs",
            "lora_rank",
            "max_workers",
            "max_consecutive_nonfinite",
            "per_prompt_stat_tracking_buffer_size",
        ):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.save_freq >= 0, f"save_freq must be >= 0, got {self.save_freq}")
        need(self.log_image_freq >= 0, f"log_image_freq must be >= 0, got {self.log_image_freq}")
        for name, value in dataclasses.asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                errs.append(f"{name} must be a finite number, got {value}")
        need(
            0 < self.sample_eta <= 1,
            f"sample_eta must be in (0, 1] (log-probs need a stochastic step), got {self.sample_eta}",
        )
        need(
            0 < self.train_timestep_fraction <= 1,
            f"train_timestep_fraction must be in (0, 1], got {self.train_timestep_fraction}",
        )
        need(self.train_clip_range > 0, "train_clip_range must be > 0")
        need(self.train_adv_clip_max > 0, "train_adv_clip_max must be > 0")
        need(self.train_max_grad_norm > 0, "train_max_grad_norm must be > 0")
        need(
            self.train_learning_rate > 0,
            f"train_learning_rate must be > 0, got {self.train_learning_rate}",
        )
        for name in ("train_adam_beta1", "train_adam_beta2"):
            need(
                0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}"
            )
        need(self.train_adam_epsilon > 0, "train_adam_epsilon must be > 0")
        need(self.train_adam_weight_decay >= 0, "train_adam_weight_decay must be >= 0")
        need(self.train_kl_coef >= 0, "train_kl_coef must be >= 0")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}")
        need(self.nft_beta > 0, f"nft_beta must be > 0, got {self.nft_beta}")
        need(self.raft_keep >= 1, f"raft_keep must be >= 1, got {self.raft_keep}")
        need(
            self.resolution is None or (self.resolution > 0 and self.resolution % 8 == 0),
            f"resolution must be a positive multiple of 8, got {self.resolution}",
        )
        need(
            _is_plain_name(self.run_name),
            f"run_name must be a plain folder name inside logdir (not empty or absolute, no "
            f"'/', '\\\\' or '..'), got {self.run_name!r}",
        )
        for name, valid in (
            ("train_timestep_selection", TIMESTEP_SELECTIONS),
            ("mixed_precision", MIXED_PRECISIONS),
            ("advantage_mode", ADVANTAGE_MODES),
            ("train_mode", TRAIN_MODES),
            ("log_with", LOG_WITH),
        ):
            value = getattr(self, name)
            need(value in valid, f"{name} must be one of {valid}, got {value!r}")
        return errs

    def _combination_errors(self) -> list[str]:
        """Settings that are valid alone but impossible together."""
        errs: list[str] = []
        if 0 < self.train_timestep_fraction <= 1 and self.num_train_timesteps < 1:
            errs.append(
                f"sample_num_steps * train_timestep_fraction = {self.sample_num_steps} * "
                f"{self.train_timestep_fraction} trains on 0 timesteps; raise either"
            )
        if self.sample_num_images_per_prompt >= 1 and (
            self.sample_batch_size % self.sample_num_images_per_prompt
        ):
            errs.append(
                f"sample_num_images_per_prompt={self.sample_num_images_per_prompt} must divide "
                f"sample_batch_size={self.sample_batch_size}"
            )
        if self.advantage_mode in ("group", "group_centered") and (
            self.sample_num_images_per_prompt < 2
        ):
            errs.append(
                f"advantage_mode={self.advantage_mode!r} normalises inside groups of images of "
                "the same prompt; set sample_num_images_per_prompt >= 2"
            )
        per_proc = self.sample_batch_size * self.sample_num_batches_per_epoch
        if self.train_batch_size >= 1 and per_proc >= 1:
            if per_proc % self.train_batch_size:
                errs.append(
                    f"samples per epoch per process (sample_batch_size * "
                    f"sample_num_batches_per_epoch = {per_proc}) must be divisible by "
                    f"train_batch_size={self.train_batch_size}"
                )
            elif self.train_gradient_accumulation_steps >= 1 and (
                (per_proc // self.train_batch_size) % self.train_gradient_accumulation_steps
            ):
                errs.append(
                    f"{per_proc // self.train_batch_size} training micro-batches per epoch are "
                    f"not divisible by train_gradient_accumulation_steps="
                    f"{self.train_gradient_accumulation_steps}: an optimizer step would span "
                    "two epochs; change train_batch_size or the accumulation steps"
                )
        if self.train_mode == "draft" and not 1 <= self.draft_k <= self.sample_num_steps:
            errs.append(
                f"draft_k must be in [1, sample_num_steps={self.sample_num_steps}], "
                f"got {self.draft_k}"
            )
        if self.train_mode == "raft":
            errs += self._raft_errors()
        return errs

    def _raft_errors(self) -> list[str]:
        """ "raft" trains the best `raft_keep` of each group: they must fill whole steps."""
        k = self.sample_num_images_per_prompt
        if not 1 <= self.raft_keep < k:
            return [
                f"train_mode='raft' keeps the best raft_keep of each prompt's "
                f"sample_num_images_per_prompt={k} images: need 1 <= raft_keep < {k} (set "
                f"sample_num_images_per_prompt >= 2), got raft_keep={self.raft_keep}"
            ]
        kept = self.sample_batch_size * self.sample_num_batches_per_epoch // k * self.raft_keep
        if kept % self.train_batch_size or (
            (kept // self.train_batch_size) % self.train_gradient_accumulation_steps
        ):
            return [
                f"train_mode='raft' trains {kept} kept images per epoch per process; "
                f"train_batch_size={self.train_batch_size} times "
                f"train_gradient_accumulation_steps={self.train_gradient_accumulation_steps} "
                "must divide it (change raft_keep, train_batch_size or the accumulation steps)"
            ]
        return []

    def to_dict(self) -> dict:
        """A JSON-ready dict of every field."""
        d = dataclasses.asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        return d

    def save(self, path: str | Path) -> None:
        """Write the resolved config as strict JSON, atomically."""
        text = json.dumps(strict_json(self.to_dict()), indent=2, sort_keys=True, allow_nan=False)
        atomic_write_text(path, text + "\n")

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> DDPOConfig:
        """A config from a dict such as `to_dict` returns; unknown fields and values of the
        wrong type raise `ValueError` naming the field, the expected type and `source`.
        Missing fields keep their defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"{source} must hold a JSON object, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = [k for k in d if k not in hints]
        if unknown:
            parts = []
            for k in unknown:
                close = difflib.get_close_matches(k, list(hints), n=2)
                parts.append(f"{k!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            raise ValueError(f"{source}: unknown config fields {', '.join(parts)}")
        values, errs = {}, []
        for key, value in d.items():
            try:
                values[key] = check_value(key, value, hints[key])
            except ValueError as err:
                errs.append(str(err))
        if errs:
            raise ValueError(f"{source}: " + "; ".join(errs))
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> DDPOConfig:
        """Read a config written by `save`; errors name the file and the field."""
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot parse config file {path}: {err}") from err
        return cls.from_dict(d, source=f"config file {path}")


RESUME_MAY_CHANGE: tuple[str, ...] = (
    "num_epochs",
    "resume_from",
    "save_freq",
    "num_checkpoint_limit",
    "logdir",
    "run_name",
    "log_with",
    "log_image_freq",
    "log_num_images",
    "async_reward_computation",
    "max_workers",
    "max_consecutive_nonfinite",
    "allow_tf32",
    "extra",
)
"""Fields a resumed run may set differently from its checkpoint: run length, bookkeeping,
logging and throughput. They take effect as given and are recorded in the run's config.json.
Every other field shapes the saved optimizer, RNG or tracker state or what is optimised (a
resumed optimizer keeps its learning rate, for example), so the trainer refuses to resume
with a different value."""


def resume_differences(saved: DDPOConfig, current: DDPOConfig) -> list[tuple[str, object, object]]:
    """`(field, saved value, current value)` for every field outside `RESUME_MAY_CHANGE`
    that differs between a checkpoint's config and the current one."""
    a, b = saved.to_dict(), current.to_dict()
    return [(k, a[k], b[k]) for k in a if k not in RESUME_MAY_CHANGE and a[k] != b[k]]


def _is_plain_name(name: str) -> bool:
    """True when `name` is one folder name that stays inside its parent directory."""
    return (
        bool(name.strip())
        and not any(sep in name for sep in ("/", "\\", "\0"))
        and ".." not in name
        and name != "."
        and not Path(name).is_absolute()
    )


# --- presets: functions that build on each other -------------------------------------------
def base() -> DDPOConfig:
    """trl 0.23 `DDPOConfig` defaults, with reward overlap on and per-prompt tracking."""
    return DDPOConfig()


def tiny_cpu() -> DDPOConfig:
    """Offline tiny random-weight pipeline on CPU, brightness reward: seconds per epoch.

    Used by tests and the benchmark; it checks the machinery, not image quality.
    """
    cfg = base()
    cfg.run_name = "tiny-cpu"
    cfg.pretrained_model = "tiny"
    cfg.mixed_precision = "no"
    cfg.prompt_fn = "fixed:a red cube|a blue ball|a green cone|a yellow star"
    cfg.reward_fn = "brightness"
    cfg.num_epochs = 4
    cfg.save_freq = 2
    cfg.sample_num_steps = 10
    cfg.sample_batch_size = 4
    cfg.sample_num_batches_per_epoch = 2
    cfg.train_batch_size = 4
    cfg.train_learning_rate = 3e-3
    cfg.train_clip_range = 0.2
    cfg.advantage_mode = "global"
    cfg.log_with = "none"
    return cfg


def sd15_hyperalign() -> DDPOConfig:
    """Stable Diffusion 1.5 with the HyperAlign reward on DDPO's simple-animals prompts.

    Sizes per GPU follow ddpo-pytorch's multi-GPU runs: 32 samples per GPU per epoch
    (4 batches of 8), train micro-batch 4, 2 accumulation steps -> 4 optimizer steps per
    epoch; 50 DDIM steps, CFG 5, clip range 1e-4, lr 3e-4 (trl/ddpo defaults); fp16.
    """
    cfg = base()
    cfg.run_name = "sd15-hyperalign"
    cfg.pretrained_model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # A HyperAlign checkpoint trained with `hyperalign train-reward` (README); override with
    # --set reward_fn=hyperalign:<checkpoint dir or hub id>.
    cfg.reward_fn = "hyperalign:runs/agiqa3k/split_0/best"
    cfg.prompt_fn = "simple_animals"
    cfg.mixed_precision = "fp16"
    cfg.sample_batch_size = 8
    cfg.sample_num_batches_per_epoch = 4
    cfg.train_batch_size = 4
    cfg.train_gradient_accumulation_steps = 2
    cfg.advantage_mode = "per_prompt"
    cfg.save_freq = 20
    return cfg


def shapes_demo() -> DDPOConfig:
    """The main job (`make demo`): the shipped tiny shapes-world Stable Diffusion
    (`shapes/assets/sd`) with the shipped HyperAlign "shapes" reward, on 2 CPU cores in
    a few minutes. Group-relative advantages over several images per prompt; a larger clip
    range and learning rate than SD 1.5's, since the model and the run are tiny.
    """
    cfg = base()
    cfg.run_name = "demo"
    cfg.pretrained_model = str(SD_DIR)
    cfg.reward_fn = "hyperalign:shapes"
    cfg.prompt_fn = "fixed:a red circle"  # the demo passes its own training prompts
    cfg.mixed_precision = "no"
    cfg.log_with = "tensorboard"
    cfg.num_epochs = 24
    cfg.save_freq = 8
    cfg.sample_num_steps = 20
    cfg.sample_eta = 1.0
    cfg.sample_guidance_scale = 3.0  # this model's best CFG with eta 1 (BENCHMARKS.md)
    cfg.sample_batch_size = 16
    cfg.sample_num_batches_per_epoch = 2
    cfg.sample_num_images_per_prompt = 4
    # Centred group advantages: near-tied groups stay small instead of being blown up to unit
    # variance.
    cfg.advantage_mode = "group_centered"
    cfg.train_batch_size = 8
    # The learning rate and advantage mode were chosen by the comparisons in BENCHMARKS.md
    # ("The main job").
    cfg.train_learning_rate = 1e-3
    cfg.train_clip_range = 0.2
    cfg.train_timestep_fraction = 0.5
    cfg.lora_rank = 8
    cfg.lora_alpha = 8.0
    return cfg


# Flow-GRPO's LoRA targets on the SD3 transformer (yifan123/flow_grpo scripts/train_sd3.py):
# the image and the text stream's attention projections of every joint block.
SD3_LORA_TARGETS: tuple[str, ...] = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)


def tiny_sd3_cpu() -> DDPOConfig:
    """`tiny_cpu` on the offline tiny Stable Diffusion 3 pipeline (`rlhf.flow.tiny`), trained
    by Flow-GRPO with groups of 4 images per prompt: seconds per epoch. Used by tests; it
    checks the machinery, not image quality."""
    cfg = tiny_cpu()
    cfg.run_name = "tiny-sd3-cpu"
    cfg.pretrained_model = "tiny-sd3"
    cfg.sample_num_images_per_prompt = 4
    cfg.advantage_mode = "group"
    cfg.flow_max_sequence_length = 16  # the tiny byte-level tokenizer's length
    cfg.lora_target_modules = SD3_LORA_TARGETS
    return cfg


def sd35m_hyperalign() -> DDPOConfig:
    """Stable Diffusion 3.5 Medium with the HyperAlign reward, trained by Flow-GRPO.

    Settings of Flow-GRPO (Liu et al. 2025; yifan123/flow_grpo `config/grpo.py`, the SD3.5-M
    runs, on `config/base.py`) unless noted. Sizes are per GPU: one group of 24 images per
    sampling batch, 6 batches per GPU, so 8 GPUs sample the paper's 48 groups per epoch;
    train micro-batch 8 with 9 accumulation steps gives its 2 optimizer steps per epoch.
    `pretrained_model` may be a local folder of the pipeline instead of the hub id.
    """
    cfg = base()
    cfg.run_name = "sd35m-hyperalign"
    cfg.trainer = "flow_grpo"
    cfg.pretrained_model = "stabilityai/stable-diffusion-3.5-medium"  # grpo.py
    # A HyperAlign checkpoint trained with `hyperalign train-reward` (README); override with
    # --set reward_fn=hyperalign:<checkpoint dir or hub id>.
    cfg.reward_fn = "hyperalign:runs/agiqa3k/split_0/best"
    cfg.prompt_fn = "simple_animals"
    # base.py trains in fp16; bf16 is the dtype of the SD3.5 model card's examples and needs
    # no loss scaling.
    cfg.mixed_precision = "bf16"
    cfg.resolution = 512  # grpo.py: resolution
    cfg.sample_num_steps = 10  # grpo.py: sample.num_steps (training)
    # grpo.py: sample.eval_num_steps = 40; the trainer does not evaluate, generate with
    # pipe(num_inference_steps=40) after load_lora_weights.
    cfg.extra = {"eval_num_steps": 40}
    cfg.sample_guidance_scale = 4.5  # grpo.py: sample.guidance_scale
    cfg.flow_noise_level = 0.7  # base.py: sample.noise_level
    cfg.flow_max_sequence_length = 128  # train_sd3.py: compute_text_embeddings(..., 128)
    cfg.sample_num_images_per_prompt = 24  # grpo.py: sample.num_image_per_prompt
    cfg.sample_batch_size = 24  # a group lies inside one sampling batch here
    cfg.sample_num_batches_per_epoch = 6  # README: 48 groups per epoch (with 8 GPUs)
    # The paper's group-normalised advantage; grpo.py sets sample.global_std = True (one std
    # for the epoch), closest here: "group_centered".
    cfg.advantage_mode = "group"
    cfg.train_batch_size = 8  # grpo.py: train.batch_size = 9, which does not divide 144
    cfg.train_gradient_accumulation_steps = 9  # 144 / 8 / 9 = 2 optimizer steps per epoch
    cfg.train_num_inner_epochs = 1  # grpo.py
    cfg.train_timestep_fraction = 0.99  # grpo.py: 9 of the 10 steps
    cfg.train_timestep_selection = "early"  # train_sd3.py trains the first 9 steps
    cfg.train_kl_coef = 0.04  # grpo.py: train.beta (GenEval, OCR; PickScore 0.01)
    cfg.train_clip_range = 1e-4  # base.py: train.clip_range
    cfg.train_learning_rate = 3e-4  # base.py: train.learning_rate
    cfg.train_adv_clip_max = 5.0  # base.py: train.adv_clip_max
    cfg.lora_rank = 32  # train_sd3.py: LoraConfig(r=32, lora_alpha=64)
    cfg.lora_alpha = 64.0
    cfg.lora_target_modules = SD3_LORA_TARGETS
    cfg.save_freq = 60  # grpo.py: save_freq
    return cfg


def shapes_demo_flow() -> DDPOConfig:
    """The main job on the shipped tiny shapes-world Stable Diffusion 3
    (`shapes/assets/flow`, flow matching), trained by Flow-GRPO.

    The sample budget of `shapes_demo` (24 epochs x 32 images, groups of 4 per prompt, the
    same LoRA rank, learning rate and clip range: sized for the CPU, not Flow-GRPO's 1e-4
    clip range, which this run's ratios would never reach). From Flow-GRPO (Liu et al. 2025,
    yifan123/flow_grpo `config/base.py`): noise level 0.7 and the first steps of each
    trajectory trained; its KL term is off (`train_kl_coef` 0): it doubles the training cost,
    and the held-out oracle judges whether the reward was gamed.
    """
    cfg = shapes_demo()
    cfg.run_name = "demo-flow"
    cfg.pretrained_model = str(FLOW_DIR)
    cfg.trainer = "flow_grpo"
    cfg.sample_num_steps = 10
    cfg.sample_guidance_scale = 3.0
    cfg.flow_noise_level = 0.7
    cfg.flow_max_sequence_length = 1  # no T5 in the shapes model: its part is one zero token
    cfg.train_timestep_selection = "early"
    cfg.train_kl_coef = 0.0
    cfg.lora_target_modules = SD3_LORA_TARGETS
    return cfg


def shapes_demo_draft() -> DDPOConfig:
    """The main job with DRaFT-K: the reward's gradient through the last `draft_k` steps.

    Same model, sampler and sample budget as `shapes_demo` (24 epochs x 32 images), one
    image per prompt (no groups needed), batches of 8 so each epoch takes 4 optimizer steps;
    lr 1e-3 as AlignProp (`config/alignprop_config.py`: train_learning_rate).
    """
    cfg = shapes_demo()
    cfg.run_name = "demo-draft"
    cfg.train_mode = "draft"
    cfg.draft_k = 10
    cfg.draft_straight_through = True
    cfg.sample_num_images_per_prompt = 1
    cfg.advantage_mode = "global"  # unused by DRaFT; the group modes need groups
    cfg.sample_batch_size = 8
    cfg.sample_num_batches_per_epoch = 4
    cfg.train_batch_size = 8
    return cfg


def shapes_demo_raft() -> DDPOConfig:
    """The main job with RAFT: the denoising loss on the best images of each prompt's group.

    Same model, sampler and sample budget as `shapes_demo`; groups of 8 images per prompt
    (4 prompts per epoch), the best 2 of each trained (RAFT's best-of-K with an acceptance
    ratio of 1/4), micro-batches of 4, lr 1e-4: the least harmful of the pilot with the
    oracle as the reward (docs/rlhf.md, "Training modes": held-out oracle gain -0.186 at the
    PPO preset's 1e-3, -0.045 at 3e-4, -0.017 at 1e-4, seed 0).
    """
    cfg = shapes_demo()
    cfg.run_name = "demo-raft"
    cfg.train_mode = "raft"
    cfg.sample_num_images_per_prompt = 8
    cfg.raft_keep = 2
    cfg.train_batch_size = 4
    cfg.train_num_inner_epochs = 1
    cfg.train_learning_rate = 1e-4
    return cfg


def shapes_demo_nft() -> DDPOConfig:
    """The main job with DiffusionNFT: the denoising loss on every image, split into a
    positive and a negative branch by its advantage.

    Same model, sampler and sample budget as `shapes_demo`; groups of 8 images per prompt;
    beta 1 (NVlabs/DiffusionNFT `config/nft.py`: config.beta = 1.0, 0.1 for OCR). The loss
    is on the conditional prediction at lr 3e-3, the best of the pilot with the oracle as
    the reward (docs/rlhf.md, "Training modes": guided prediction -0.023, conditional at lr
    1e-2 +0.011, at 3e-3 +0.035 held-out oracle gain).
    """
    cfg = shapes_demo()
    cfg.run_name = "demo-nft"
    cfg.train_mode = "nft"
    cfg.sample_num_images_per_prompt = 8
    cfg.nft_beta = 1.0
    cfg.train_cfg = False
    cfg.train_learning_rate = 3e-3
    return cfg


DEMO_PRESETS: dict[str, typing.Callable[[], DDPOConfig]] = {
    "ppo": shapes_demo,
    "draft": shapes_demo_draft,
    "raft": shapes_demo_raft,
    "nft": shapes_demo_nft,
}
"""The main job's preset for each `train_mode` (`hyperalign demo --train-mode`)."""


PRESETS: dict[str, typing.Callable[[], DDPOConfig]] = {
    "base": base,
    "tiny-cpu": tiny_cpu,
    "sd15-hyperalign": sd15_hyperalign,
    "shapes-demo": shapes_demo,
    "shapes-demo-draft": shapes_demo_draft,
    "shapes-demo-raft": shapes_demo_raft,
    "shapes-demo-nft": shapes_demo_nft,
    "shapes-demo-flow": shapes_demo_flow,
    "tiny-sd3-cpu": tiny_sd3_cpu,
    "sd35m-hyperalign": sd35m_hyperalign,
}


def get_preset(name: str) -> DDPOConfig:
    """The preset called `name`; unknown names raise `ValueError` listing the valid ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]()


def _describe(annotation) -> str:
    """The expected type in words, for error messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return f"{_describe(inner[0])} or null"
    return {
        bool: "a boolean (true/false)",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a JSON object",
    }.get(annotation, "a list of strings" if origin is tuple else str(annotation))


def check_value(name: str, value, annotation):
    """`value` as the type `annotation` of field `name` (ints accepted for floats, integral
    floats for ints, lists for tuples); anything else raises `ValueError` naming the field
    and the expected type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return check_value(name, value, inner[0])
        except ValueError:
            pass
    elif annotation is bool and isinstance(value, bool):
        return value
    elif annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    elif annotation is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    elif annotation is str and isinstance(value, str):
        return value
    elif origin is tuple and isinstance(value, list | tuple):
        if all(isinstance(v, str) for v in value):
            return tuple(value)
    elif (annotation is dict or origin is dict) and isinstance(value, dict):
        return value
    raise ValueError(
        f"{name} must be {_describe(annotation)}, got {value!r} ({type(value).__name__})"
    )


def type_errors(cfg: DDPOConfig) -> list[str]:
    """One message per field of `cfg` whose value does not have the field's type."""
    errs = []
    for name, annotation in typing.get_type_hints(DDPOConfig).items():
        try:
            check_value(name, getattr(cfg, name), annotation)
        except ValueError as err:
            errs.append(str(err))
    return errs


def _parse_value(raw: str, annotation) -> object:
    """A `--set` string as the field type `annotation`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.lower() in ("none", "null", ""):
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_value(raw, inner[0])
    if annotation is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {raw!r}")
    try:
        if annotation is int:
            return int(raw)
        if annotation is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"expected {_describe(annotation)}, got {raw!r}") from None
    if origin is tuple:
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    if annotation is dict or origin is dict:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as err:
            raise ValueError(f"expected a JSON object, got {raw!r}: {err}") from None
        if not isinstance(value, dict):
            raise ValueError(f"expected a JSON object, got {raw!r}")
        return value
    return raw


def apply_overrides(cfg: DDPOConfig, overrides: list[str]) -> DDPOConfig:
    """Apply `key=value` strings to `cfg` (in place, returned), parsing by the field type.

    Tuples are comma-separated; `None` clears optional fields. Unknown keys raise a
    `ValueError` suggesting the closest field names; a value that does not parse as the
    field's type raises one naming the field and the expected type.
    """
    hints = typing.get_type_hints(DDPOConfig)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown config field {key!r}{hint}")
        try:
            value = _parse_value(raw.strip(), hints[key])
        except ValueError as e:
            raise ValueError(f"bad value for {key}: {e}") from e
        setattr(cfg, key, value)
    return cfg
