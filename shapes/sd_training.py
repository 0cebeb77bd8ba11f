"""A tiny Stable Diffusion of the shapes world, trained on the CPU from scratch with a fixed seed.

:func:`train` writes a genuine diffusers ``StableDiffusionPipeline`` folder (safetensors) that
``StableDiffusionPipeline.from_pretrained(folder)`` loads offline; the shipped one is
``shapes/assets/sd`` (``scripts/train_shapes_sd.py`` rebuilds it):

- ``tokenizer``: a ``CLIPTokenizer`` whose BPE is learned from the words of the shapes grammar
  (:func:`shapes.tokenizer.build_shapes_tokenizer`), so every grammar word is one token; all
  single bytes stay in the vocabulary, so any text still tokenizes.
- ``text_encoder``: a tiny ``CLIPTextModel`` trained jointly with the UNet.
- ``vae``: an ``AutoencoderKL`` 64x64 RGB -> 16x16x4 latents, trained first on rendered scenes
  (:func:`train_vae`); ``scaling_factor`` = 1 / (std of the training latents).
- ``unet``: a small ``UNet2DConditionModel`` with cross-attention at 8x8 and 4x4, trained to
  predict epsilon under the DDPM noise schedule of the saved ``DDIMScheduler`` (SD 1.5 betas),
  with the caption dropped to the empty prompt ``p_uncond`` of the time, so classifier-free
  guidance works at sampling (:func:`train_unet`). The saved weights are an exponential moving
  average (:class:`EMA`).
- ``scheduler``: ``DDIMScheduler`` (the RL sampler uses DDIM with ``eta``).

Next to the weights: ``training.json`` (resolved config, losses, timings, latent statistics),
``heldout_prompts.json`` (prompts never used in training, for evaluation:
``scripts/eval_shapes_sd.py``) and ``train_prompts.txt`` (every training caption, one a line,
so the split can be checked).

Steps and seeds fix the result; on a shared 2-core machine one thread is faster than two
(thread contention), hence ``threads = 1`` by default.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hyperalign.common import atomic_write_text, dumps_json, make_tmp_dir, replace_dir
from rlhf.tiny import assemble_pipeline, sd15_ddim_scheduler
from shapes.perturb import faithful_scene
from shapes.prompts import PromptSampler, sample_prompt
from shapes.tokenizer import build_shapes_tokenizer
from shapes.world import RenderConfig, render

__all__ = [
    "SceneTrainingConfig",
    "EMA",
    "SDTrainConfig",
    "build_models",
    "heldout_prompts",
    "make_dataset",
    "pipeline_with_ema",
    "save_pipeline",
    "train",
    "train_unet",
    "train_vae",
]


@dataclass
class SceneTrainingConfig:
    """The settings shared by the shapes-world diffusion trainings (this Stable Diffusion and
    the flow-matching model of ``shapes.flow_training``): data, schedule and machine."""

    seed: int = 0
    """Seeds the data, the initialisation and the noise of training."""
    heldout_seed: int = 12345
    """Seeds the held-out prompt set (drawn first; training never uses these prompts; the
    flow model uses the SD's, so both are judged on the same)."""
    n_heldout: int = 200
    """Number of distinct held-out prompts."""
    n_train: int = 20000
    """Training scene-caption pairs (one faithful scene per sampled prompt)."""
    image_size: int = 64
    """Rendered image width = height in pixels (the VAE makes 16x16 latents of it)."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps (of each training stage)."""
    p_uncond: float = 0.1
    """Probability of replacing a caption by the empty prompt (classifier-free guidance)."""
    ema_decay: float = 0.995
    """Largest EMA decay; the decay warms up as (1 + step) / (10 + step)."""
    grad_clip: float = 1.0
    """Gradient-norm clip (of each training stage)."""
    threads: int = 1
    """torch CPU threads (1 or 2: on a shared 2-core machine more threads contend)."""

    def __post_init__(self) -> None:
        if not 1 <= self.threads <= 2:
            raise ValueError(f"threads must be 1 or 2 on the shared machine, got {self.threads}")


@dataclass
class SDTrainConfig(SceneTrainingConfig):
    """Everything that determines the trained pipeline (saved in ``training.json``)."""

    max_length: int = 20
    """Tokenizer/text-encoder sequence length in tokens (the longest grammar prompt is 17)."""
    # --- VAE ---
    vae_channels: tuple[int, ...] = (16, 32, 64)
    """AutoencoderKL block widths; len - 1 = number of 2x downsamplings (64 px -> 16)."""
    vae_norm_groups: int = 8
    """GroupNorm groups of the VAE (divides every width)."""
    latent_channels: int = 4
    """Latent channels (as SD)."""
    vae_steps: int = 800
    """VAE optimisation steps."""
    vae_batch: int = 32
    """VAE batch size (crops)."""
    vae_crop: int = 32
    """VAE trains on random crops of this many pixels (convolutions are shift-equivariant;
    4x cheaper than full 64 px images)."""
    vae_lr: float = 1e-3
    """VAE peak learning rate (AdamW, cosine decay to 10 %)."""
    vae_kl_weight: float = 1e-6
    """KL weight of the VAE loss (the LDM KL-f8 autoencoder used 1e-6)."""
    # --- UNet + text encoder ---
    unet_channels: tuple[int, ...] = (32, 64, 128)
    """UNet block widths: 16x16, 8x8, 4x4 latent resolutions."""
    unet_norm_groups: int = 16
    """GroupNorm groups of the UNet (divides every width)."""
    unet_heads: int = 4
    """Attention heads per transformer block (diffusers' ``attention_head_dim`` argument)."""
    text_hidden: int = 64
    """Text-encoder width = UNet cross-attention width."""
    text_layers: int = 2
    """Text-encoder transformer layers."""
    unet_steps: int = 2400
    """UNet + text-encoder optimisation steps."""
    unet_batch: int = 32
    """UNet batch size."""
    unet_lr: float = 1e-3
    """Peak learning rate (AdamW, linear warm-up, cosine decay to 10 %)."""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weighting min(SNR, gamma) / SNR (Hang et al. 2023); 0 disables it."""
    n_roundtrip: int = 64
    """Fresh faithful scenes whose VAE reconstructions the oracle reads (reported)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for w in self.vae_channels:
            if w % self.vae_norm_groups:
                raise ValueError(f"vae_norm_groups={self.vae_norm_groups} must divide width {w}")
        for w in self.unet_channels:
            if w % self.unet_norm_groups or w % self.unet_heads:
                raise ValueError(f"unet_norm_groups and unet_heads must divide width {w}")


def log(msg: str) -> None:
    """Print a progress line at once."""
    print(msg, flush=True)


# ------------------------------------------------------------------------------------ data


def heldout_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct prompts of the default grammar sampler, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        text = sample_prompt(rng).text
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def make_dataset(
    n: int, seed: int, exclude: set[str], image_size: int
) -> tuple[np.ndarray, list[str]]:
    """``n`` (faithful scene, caption) pairs with captions not in ``exclude``.

    Returns uint8 images (n, H, W, 3) and the captions.
    """
    rng = np.random.default_rng(seed)
    rcfg = RenderConfig(image_size=image_size)
    sampler = PromptSampler()
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    while len(captions) < n:
        spec = sampler.sample(rng)
        if spec.text in exclude:
            continue
        images[len(captions)] = render(faithful_scene(spec, rng), rcfg)
        captions.append(spec.text)
    return images, captions


def to_model_range(images_u8: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1] (the VAE's pixel range)."""
    x = torch.from_numpy(images_u8).permute(0, 3, 1, 2).float()  # (B, 3, H, W)
    return x / 127.5 - 1.0


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids (B, L) exactly as ``StableDiffusionPipeline.encode_prompt`` makes them."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# ---------------------------------------------------------------------------------- models


def build_vae(cfg: SDTrainConfig):
    """A fresh ``AutoencoderKL`` (64 px RGB -> latents downsampled ``2 ** (len - 1)`` times)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        latent_channels=cfg.latent_channels,
        layers_per_block=1,
        norm_num_groups=cfg.vae_norm_groups,
        sample_size=cfg.image_size,
        mid_block_add_attention=False,
    )


def build_unet(cfg: SDTrainConfig):
    """A fresh ``UNet2DConditionModel``: no attention at the finest latent level (costly at
    16x16 on a CPU), cross-attention below it."""
    from diffusers import UNet2DConditionModel

    latent_size = cfg.image_size // 2 ** (len(cfg.vae_channels) - 1)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(cfg.unet_channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(cfg.unet_channels) - 1) + ("UpBlock2D",)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=cfg.unet_channels,
        layers_per_block=1,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=cfg.unet_heads,  # diffusers: this argument is the number of heads
        norm_num_groups=cfg.unet_norm_groups,
    )


def build_text_encoder(cfg: SDTrainConfig, tokenizer):
    """A fresh tiny ``CLIPTextModel`` over ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cfg.text_hidden,
            intermediate_size=2 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            max_position_embeddings=cfg.max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_models(cfg: SDTrainConfig, tokenizer):
    """Fresh (vae, unet, text_encoder, scheduler) from ``cfg`` (fp32, CPU), initialised from
    torch's global generator in this order. The scheduler has SD 1.5's noise schedule
    (epsilon prediction); training noises with its alphas."""
    vae = build_vae(cfg)
    unet = build_unet(cfg)
    text_encoder = build_text_encoder(cfg, tokenizer)
    return vae, unet, text_encoder, sd15_ddim_scheduler()


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))


# --------------------------------------------------------------------------- stage 1: VAE


def _vae_step(vae, crops: np.ndarray, cfg: SDTrainConfig, gen: torch.Generator):
    """Loss of one VAE batch: (reconstruction L1 + MSE, KL) as tensors."""
    x = to_model_range(crops)  # (B, 3, c, c)
    post = vae.encode(x).latent_dist
    z = post.sample(generator=gen)  # (B, 4, c/4, c/4)
    rec = vae.decode(z).sample  # (B, 3, c, c)
    return F.l1_loss(rec, x) + F.mse_loss(rec, x), post.kl().mean()


def train_vae(vae, images: np.ndarray, cfg: SDTrainConfig, gen: torch.Generator) -> dict:
    """Train ``vae`` on random crops of ``images`` (uint8 (N, H, W, 3)); returns loss stats."""
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.vae_steps, cfg.warmup_steps)
    )
    vae.train()
    n, size = images.shape[0], images.shape[1]
    c = cfg.vae_crop
    hist: list[float] = []
    t0 = time.time()
    for step in range(cfg.vae_steps):
        idx = torch.randint(0, n, (cfg.vae_batch,), generator=gen).numpy()
        offs = torch.randint(0, size - c + 1, (cfg.vae_batch, 2), generator=gen).numpy()
        crops = np.stack([images[i, y : y + c, x : x + c] for i, (y, x) in zip(idx, offs)])
        rec_loss, kl = _vae_step(vae, crops, cfg, gen)
        loss = rec_loss + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        hist.append(rec_loss.item())
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log(
                f"[vae] step {step:5d}/{cfg.vae_steps} rec {np.mean(hist[-50:]):.4f} "
                f"kl {kl.item():.1f} {time.time() - t0:.0f}s"
            )
    vae.eval()
    return {
        "vae_rec_loss_last50": float(np.mean(hist[-50:])),
        "vae_seconds": time.time() - t0,
    }


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Posterior means (N, 4, h, w) of ``images`` (uint8 (N, H, W, 3)), unscaled."""
    out = []
    for i in range(0, images.shape[0], batch):
        out.append(vae.encode(to_model_range(images[i : i + batch])).latent_dist.mode())
    return torch.cat(out)


@torch.no_grad()
def vae_roundtrip_oracle(vae, n: int, seed: int, image_size: int) -> float:
    """Mean oracle alignment of VAE reconstructions of ``n`` fresh faithful scenes (ceiling of
    what the pipeline can reach through this decoder)."""
    from shapes.oracle import oracle_alignment_batch

    images, captions = make_dataset(n, seed, set(), image_size)
    rec = vae.decode(vae.encode(to_model_range(images)).latent_dist.mode()).sample
    rec = (rec / 2 + 0.5).clamp(0, 1)  # (n, 3, H, W) in [0, 1]
    return float(oracle_alignment_batch(rec, captions).mean())


# -------------------------------------------------------------------------- stage 2: UNet


class EMA:
    """Exponential moving average of a list of parameters (decay warms up with the step)."""

    def __init__(self, params: list[torch.nn.Parameter], max_decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.max_decay = max_decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the current parameters (decay ``(1 + s) / (10 + s)``,
        at most ``max_decay``)."""
        d = min(self.max_decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        """Write the averaged values into ``params`` (same order as at construction)."""
        for s, p in zip(self.shadow, params):
            p.copy_(s)


def _unet_losses(unet, text_encoder, alphas_cumprod, z0, tok, t, noise) -> torch.Tensor:
    """Per-sample epsilon-prediction MSE (B,) of latents ``z0`` (B, 4, h, w) noised to
    timesteps ``t`` (B,) with ``noise``, conditioned on token ids ``tok`` (B, L)."""
    ab = alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    zt = ab.sqrt() * z0 + (1.0 - ab).sqrt() * noise
    emb = text_encoder(tok)[0]  # (B, L, D) last hidden state, as the pipeline uses
    pred = unet(zt, t, encoder_hidden_states=emb).sample  # (B, 4, h, w)
    return ((pred - noise) ** 2).mean(dim=(1, 2, 3))  # (B,)


def _snr_weight(snr: torch.Tensor, per: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR weights min(SNR, gamma) / SNR (epsilon-prediction form); ones if gamma <= 0."""
    if gamma > 0:
        return torch.clamp(snr, max=gamma) / snr
    return torch.ones_like(per)


def train_unet(
    unet,
    text_encoder,
    scheduler,
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    cfg: SDTrainConfig,
    gen: torch.Generator,
    on_step: Callable[[int, EMA], None] | None = None,
) -> tuple[dict, EMA]:
    """Epsilon-prediction training of ``unet`` and ``text_encoder`` on scaled ``latents``
    (N, 4, h, w) with caption token ids ``ids`` (N, L). Returns loss stats and the EMA."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.unet_steps, cfg.warmup_steps)
    )
    ema = EMA(params, cfg.ema_decay)
    alphas_cumprod = scheduler.alphas_cumprod.float()  # (T,)
    snr_all = alphas_cumprod / (1.0 - alphas_cumprod)  # (T,)
    n_t = scheduler.config.num_train_timesteps
    unet.train()
    text_encoder.train()
    n = latents.shape[0]
    hist: list[float] = []
    t0 = time.time()
    for step in range(cfg.unet_steps):
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.p_uncond  # (B,)
        tok = torch.where(drop[:, None], empty_ids[None, :], ids[idx])  # (B, L)
        t = torch.randint(0, n_t, (cfg.unet_batch,), generator=gen)  # (B,)
        noise = torch.randn(latents[idx].shape, generator=gen)
        per = _unet_losses(unet, text_encoder, alphas_cumprod, latents[idx], tok, t, noise)
        loss = (_snr_weight(snr_all[t], per, cfg.min_snr_gamma) * per).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update(step)
        hist.append(per.detach().mean().item())
        if step % 50 == 0 or step == cfg.unet_steps - 1:
            log(
                f"[unet] step {step:5d}/{cfg.unet_steps} eps-mse {np.mean(hist[-50:]):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s"
            )
        if on_step is not None:
            on_step(step, ema)
    unet.eval()
    text_encoder.eval()
    stats = {
        "unet_eps_mse_last100": float(np.mean(hist[-100:])),
        "unet_eps_mse_first100": float(np.mean(hist[:100])),
        "unet_seconds": time.time() - t0,
    }
    return stats, ema


# ---------------------------------------------------------------------------------- saving


def pipeline_with_ema(vae, unet, text_encoder, tokenizer, scheduler, ema: EMA | None):
    """A ``StableDiffusionPipeline`` of copies of the modules, with the EMA weights if given."""
    unet_s, text_s = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    if ema is not None:
        ema.copy_to(list(unet_s.parameters()) + list(text_s.parameters()))
    return assemble_pipeline(unet_s, vae, text_s, tokenizer, scheduler)


def save_pipeline(pipe, out_dir: str | Path, extra_files: dict[str, str]) -> None:
    """``pipe.save_pretrained`` (safetensors) plus ``extra_files`` (name -> text) into a
    temporary sibling folder, then swapped in for ``out_dir`` (:func:`replace_dir`)."""
    out_dir = Path(out_dir).resolve()
    tmp = make_tmp_dir(out_dir)
    tmp.chmod(0o755)  # a temporary folder is private; the result is a normal shared folder
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, text in extra_files.items():
            atomic_write_text(tmp / name, text)
            (tmp / name).chmod(0o644)
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def dir_size_mb(path: Path) -> float:
    """Total size of the files under ``path`` in MiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# ---------------------------------------------------------------------------------- a run


def _param_counts(**modules) -> dict[str, int]:
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def _caption_ids(tokenizer, captions: list[str], max_length: int):
    """Token ids (N, L) of ``captions`` and of the empty prompt (L,); refuses captions longer
    than ``max_length`` tokens."""
    ids = tokenize(tokenizer, captions)  # (N, L)
    longest = int((ids != tokenizer.pad_token_id).sum(dim=1).max()) + 1  # + the final eos
    if longest > max_length:
        raise ValueError(f"captions need {longest} tokens > max_length {max_length}")
    return ids, tokenize(tokenizer, [""])[0]


def _scaled_latents(vae, images: np.ndarray, cfg: SDTrainConfig) -> tuple[torch.Tensor, dict]:
    """Latents (N, 4, h, w) of ``images`` scaled to unit std (the VAE's ``scaling_factor`` is
    set to match), and their statistics with the VAE round-trip oracle alignment."""
    vae.requires_grad_(False)
    t_enc = time.time()
    raw = encode_latents(vae, images)  # (N, 4, h, w)
    std, mean = float(raw.std()), float(raw.mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    latents = raw * vae.config.scaling_factor  # (N, 4, h, w), unit std
    vae_rt = vae_roundtrip_oracle(vae, cfg.n_roundtrip, cfg.seed + 1, cfg.image_size)
    log(
        f"latents {tuple(latents.shape)} mean {mean:.3f} std {std:.3f} -> scaling_factor "
        f"{vae.config.scaling_factor:.4f}; VAE round-trip oracle alignment {vae_rt:.3f} "
        f"({time.time() - t_enc:.0f}s)"
    )
    stats = {
        "latent_mean": mean,
        "latent_std": std,
        "scaling_factor": vae.config.scaling_factor,
        "vae_roundtrip_oracle_alignment": vae_rt,
    }
    return latents, stats


def train(
    cfg: SDTrainConfig,
    out: str | Path,
    snapshot_dir: str | Path | None = None,
    snapshot_every: int = 500,
    command: str = "",
) -> dict:
    """Train the whole pipeline from ``cfg`` and save it to ``out`` (replacing it).

    With ``snapshot_dir``, the EMA pipeline is also saved there every ``snapshot_every`` UNet
    steps (monitoring). ``command`` is recorded in ``training.json``. Returns that report.
    """
    out = Path(out)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_start = time.time()

    tokenizer = build_shapes_tokenizer(cfg.max_length)
    held = heldout_prompts(cfg.n_heldout, cfg.heldout_seed)
    images, captions = make_dataset(cfg.n_train, cfg.seed, set(held), cfg.image_size)
    ids, empty_ids = _caption_ids(tokenizer, captions, cfg.max_length)
    vae, unet, text_encoder, scheduler = build_models(cfg, tokenizer)
    params = _param_counts(unet=unet, vae=vae, text_encoder=text_encoder)
    log(
        f"data: {len(captions)} pairs, {len(set(captions))} distinct captions, {len(held)} "
        f"held-out prompts; vocab {len(tokenizer)}; params unet {params['unet'] / 1e6:.2f}M "
        f"vae {params['vae'] / 1e6:.2f}M text {params['text_encoder'] / 1e6:.2f}M; "
        f"threads {cfg.threads}"
    )

    vae_stats = train_vae(vae, images, cfg, gen)
    latents, latent_stats = _scaled_latents(vae, images, cfg)

    def on_step(step: int, ema: EMA) -> None:
        if snapshot_dir is not None and (step + 1) % snapshot_every == 0:
            snap = pipeline_with_ema(vae, unet, text_encoder, tokenizer, scheduler, ema)
            save_pipeline(snap, snapshot_dir, {"heldout_prompts.json": dumps_json(held, None)})
            log(f"snapshot at step {step + 1} -> {snapshot_dir}")

    unet_stats, ema = train_unet(
        unet, text_encoder, scheduler, latents, ids, empty_ids, cfg, gen, on_step
    )
    pipe = pipeline_with_ema(vae, unet, text_encoder, tokenizer, scheduler, ema)
    total = time.time() - t_start
    report = {
        "config": dataclasses.asdict(cfg),
        "command": command,
        "params": params,
        "vocab_size": len(tokenizer),
        "n_distinct_train_captions": len(set(captions)),
        **latent_stats,
        **vae_stats,
        **unet_stats,
        "total_seconds": total,
        "torch": torch.__version__,
    }
    extra = {
        "training.json": dumps_json(report, indent=2),
        "heldout_prompts.json": dumps_json(held, indent=0),
        "train_prompts.txt": "".join(t + "\n" for t in sorted(set(captions))),
    }
    save_pipeline(pipe, out, extra)
    log(f"saved {out} ({dir_size_mb(out):.1f} MB) in {total / 60:.1f} min total")
    return report
