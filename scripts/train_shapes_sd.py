"""Train a tiny Stable Diffusion on the shapes world, on the CPU, from scratch, with a fixed seed.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_shapes_sd.py            # the shipped run
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_shapes_sd.py --out /tmp/sd \\
        --n-train 512 --vae-steps 20 --unet-steps 20                        # a smoke run

The result is a genuine diffusers ``StableDiffusionPipeline`` directory (default
``shapes/assets/sd/``, safetensors) that ``StableDiffusionPipeline.from_pretrained(dir)``
loads offline:

- ``tokenizer``: a ``CLIPTokenizer`` (CLIP BPE format) whose ``vocab.json``/``merges.txt`` are
  learned here from the words of the shapes grammar, so every grammar word is one token; all
  single bytes stay in the vocabulary, so any text still tokenizes.
- ``text_encoder``: a tiny ``CLIPTextModel`` trained jointly with the UNet (no pretrained text
  encoder exists here).
- ``vae``: an ``AutoencoderKL`` 64x64 RGB -> 16x16x4 latents, trained first on rendered scenes;
  ``scaling_factor`` = 1 / (std of the training latents).
- ``unet``: a small ``UNet2DConditionModel`` with cross-attention at 8x8 and 4x4, trained to
  predict epsilon under the DDPM noise schedule of the saved ``DDIMScheduler`` (SD 1.5 betas),
  with the caption dropped to the empty prompt ``p_uncond`` of the time, so classifier-free
  guidance works at sampling. The saved weights are an exponential moving average.
- ``scheduler``: ``DDIMScheduler`` (the RL sampler uses DDIM with ``eta``).

Next to the weights: ``training.json`` (resolved config, losses, timings, latent statistics),
``heldout_prompts.json`` (prompts never used in training, for evaluation: see
``scripts/eval_shapes_sd.py``) and ``train_prompts.txt`` (every training caption, one a line, so
the split can be checked).

Steps and seeds fix the result; on a shared 2-core machine one thread is faster than two
(thread contention), hence ``--threads 1`` by default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rlhf.tiny import assemble_pipeline, bytes_to_unicode, sd15_ddim_scheduler
from shapes.assets import SD_DIR
from shapes.perturb import faithful_scene
from shapes.prompts import NUMBER_WORDS, PromptSampler, sample_prompt
from shapes.world import COLORS, RELATIONS, SHAPES, SIZES, RenderConfig, render

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = SD_DIR


@dataclass
class TrainConfig:
    """Everything that determines the trained pipeline (saved in ``training.json``)."""

    seed: int = 0
    """Seeds the data, the initialisation and the noise of training."""
    heldout_seed: int = 12345
    """Seeds the held-out prompt set (drawn first; training never uses these prompts)."""
    n_heldout: int = 200
    """Number of distinct held-out prompts."""
    n_train: int = 20000
    """Training scene-caption pairs (one faithful scene per sampled prompt)."""
    image_size: int = 64
    """Rendered image width = height in pixels."""
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
    warmup_steps: int = 100
    """Linear learning-rate warm-up steps (both stages)."""
    p_uncond: float = 0.1
    """Probability of replacing a caption by the empty prompt (classifier-free guidance)."""
    min_snr_gamma: float = 5.0
    """Min-SNR loss weighting min(SNR, gamma) / SNR (Hang et al. 2023); 0 disables it."""
    ema_decay: float = 0.995
    """Largest EMA decay; the decay warms up as (1 + step) / (10 + step)."""
    grad_clip: float = 1.0
    """Gradient-norm clip of both stages."""
    n_roundtrip: int = 64
    """Fresh faithful scenes whose VAE reconstructions the oracle reads (reported)."""
    threads: int = 1
    """torch CPU threads (at most 2 on the shared machine)."""


# ----------------------------------------------------------------------------- tokenizer


def grammar_words() -> list[str]:
    """Every word of the shapes grammar (``shapes.prompts``), punctuation included."""
    words = {"a", "an", "and", ",", "."}
    words |= {w for n, w in NUMBER_WORDS.items() if n > 1}
    words |= set(COLORS) | set(SIZES) | set(SHAPES) | {s + "s" for s in SHAPES}
    words |= {w for rel in RELATIONS for w in rel.split()}
    return sorted(words)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE on ``words`` (each counted once) until every word is a single symbol.

    Symbols follow CLIP: the last character of a word carries ``</w>``. Ties between equally
    frequent pairs go to the lexicographically smallest pair, so the result is deterministic.
    """
    seqs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter((s[i], s[i + 1]) for s in seqs for i in range(len(s) - 1))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for k, s in enumerate(seqs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[k] = out
    return merges


def build_shapes_tokenizer(max_length: int):
    """A ``CLIPTokenizer`` whose BPE makes each grammar word one token (built offline).

    The vocabulary holds every byte symbol (plain and word-final), the merge results and the
    two specials; transformers 5 ignores ``vocab_file=`` keyword arguments, so the files go to
    a temporary directory loaded with ``from_pretrained(dir)``.
    """
    from transformers import CLIPTokenizer

    words = grammar_words()
    merges = learn_merges(words)
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges]:
        vocab.setdefault(s, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory(prefix="shapes_clip_tok_") as tmp:
        Path(tmp, "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        merge_lines = "".join(f"{a} {b}\n" for a, b in merges)
        Path(tmp, "merges.txt").write_text("#version: 0.2\n" + merge_lines, encoding="utf-8")
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"tokenizer splits grammar word {w!r} into {ids}; BPE is broken")
    return tok


# ----------------------------------------------------------------------------- data


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


# ----------------------------------------------------------------------------- models


def build_models(cfg: TrainConfig, tokenizer):
    """Fresh (vae, unet, text_encoder, scheduler) from ``cfg`` (fp32, CPU)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    for w in cfg.vae_channels:
        if w % cfg.vae_norm_groups:
            raise ValueError(f"vae_norm_groups={cfg.vae_norm_groups} must divide width {w}")
    for w in cfg.unet_channels:
        if w % cfg.unet_norm_groups or w % cfg.unet_heads:
            raise ValueError(f"unet_norm_groups and unet_heads must divide width {w}")
    n_down = len(cfg.vae_channels) - 1
    latent_size = cfg.image_size // 2**n_down
    vae = AutoencoderKL(
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
    # No attention at the finest latent level (costly at 16x16 on a CPU); cross-attention
    # below it.
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(cfg.unet_channels) - 1)
    up = ("CrossAttnUpBlock2D",) * (len(cfg.unet_channels) - 1) + ("UpBlock2D",)
    unet = UNet2DConditionModel(
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
    text_encoder = CLIPTextModel(
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
    # SD 1.5's noise schedule (epsilon prediction); training noises with these alphas.
    scheduler = sd15_ddim_scheduler()
    return vae, unet, text_encoder, scheduler


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac))


def log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------- stage 1: VAE


def train_vae(vae, images: np.ndarray, cfg: TrainConfig, gen: torch.Generator) -> dict:
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
        x = to_model_range(crops)  # (B, 3, c, c)
        post = vae.encode(x).latent_dist
        z = post.sample(generator=gen)  # (B, 4, c/4, c/4)
        rec = vae.decode(z).sample  # (B, 3, c, c)
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = post.kl().mean()
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


# ----------------------------------------------------------------------------- stage 2: UNet


class EMA:
    """Exponential moving average of a list of parameters (decay warms up with the step)."""

    def __init__(self, params: list[torch.nn.Parameter], max_decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone() for p in params]
        self.max_decay = max_decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.max_decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach(), alpha=1.0 - d)

    @torch.no_grad()
    def copy_to(self, params: list[torch.nn.Parameter]) -> None:
        for s, p in zip(self.shadow, params):
            p.copy_(s)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids (B, L) exactly as ``StableDiffusionPipeline.encode_prompt`` makes them."""
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_unet(
    unet,
    text_encoder,
    scheduler,
    latents: torch.Tensor,
    ids: torch.Tensor,
    empty_ids: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    on_step=None,
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
        z0 = latents[idx]  # (B, 4, h, w)
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.p_uncond  # (B,)
        tok = torch.where(drop[:, None], empty_ids[None, :], ids[idx])  # (B, L)
        t = torch.randint(0, n_t, (cfg.unet_batch,), generator=gen)  # (B,)
        noise = torch.randn(z0.shape, generator=gen)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1.0 - ab).sqrt() * noise
        emb = text_encoder(tok)[0]  # (B, L, D) last hidden state, as the pipeline uses
        pred = unet(zt, t, encoder_hidden_states=emb).sample  # (B, 4, h, w)
        per = ((pred - noise) ** 2).mean(dim=(1, 2, 3))  # (B,)
        if cfg.min_snr_gamma > 0:
            snr = snr_all[t]
            weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # epsilon-prediction form
        else:
            weight = torch.ones_like(per)
        loss = (weight * per).mean()
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


# ----------------------------------------------------------------------------- saving


def pipeline_with_ema(vae, unet, text_encoder, tokenizer, scheduler, ema: EMA | None):
    """A ``StableDiffusionPipeline`` of copies of the modules, with the EMA weights if given."""
    unet_s, text_s = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    if ema is not None:
        ema.copy_to(list(unet_s.parameters()) + list(text_s.parameters()))
    return assemble_pipeline(unet_s, vae, text_s, tokenizer, scheduler)


def save_atomic(pipe, out_dir: Path, extra_files: dict[str, str]) -> None:
    """``pipe.save_pretrained`` (safetensors) plus ``extra_files`` into a temporary sibling
    directory, then swapped in with ``os.replace`` (an existing ``out_dir`` is replaced)."""
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is a normal shared directory
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name, text in extra_files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def dir_size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output pipeline directory")
    p.add_argument(
        "--snapshot-dir",
        type=Path,
        default=None,
        help="also save the EMA pipeline here every --snapshot-every UNet steps (monitoring)",
    )
    p.add_argument("--snapshot-every", type=int, default=500)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        val = getattr(defaults, f.name)
        if isinstance(val, tuple):
            p.add_argument(f"--{f.name.replace('_', '-')}", type=int, nargs="+", default=val)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(val), default=val)
    args = p.parse_args(argv)
    values = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name)
        values[f.name] = tuple(v) if isinstance(v, list) else v
    cfg = TrainConfig(**values)
    if not 1 <= cfg.threads <= 2:
        raise ValueError(f"--threads must be 1 or 2 on the shared machine, got {cfg.threads}")
    return cfg, args


def main(argv=None) -> int:
    cfg, args = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_start = time.time()

    tokenizer = build_shapes_tokenizer(cfg.max_length)
    held = heldout_prompts(cfg.n_heldout, cfg.heldout_seed)
    images, captions = make_dataset(cfg.n_train, cfg.seed, set(held), cfg.image_size)
    ids = tokenize(tokenizer, captions)  # (N, L)
    longest = int((ids != tokenizer.pad_token_id).sum(dim=1).max()) + 1  # + the final eos
    if longest > cfg.max_length:
        raise ValueError(f"captions need {longest} tokens > --max-length {cfg.max_length}")
    empty_ids = tokenize(tokenizer, [""])[0]  # (L,)
    vae, unet, text_encoder, scheduler = build_models(cfg, tokenizer)
    n_unet = sum(p.numel() for p in unet.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    n_text = sum(p.numel() for p in text_encoder.parameters())
    log(
        f"data: {len(captions)} pairs, {len(set(captions))} distinct captions, {len(held)} "
        f"held-out prompts; vocab {len(tokenizer)}; params unet {n_unet / 1e6:.2f}M vae "
        f"{n_vae / 1e6:.2f}M text {n_text / 1e6:.2f}M; threads {cfg.threads}"
    )

    vae_stats = train_vae(vae, images, cfg, gen)
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

    def on_step(step: int, ema: EMA) -> None:
        if args.snapshot_dir is not None and (step + 1) % args.snapshot_every == 0:
            snap = pipeline_with_ema(vae, unet, text_encoder, tokenizer, scheduler, ema)
            save_atomic(snap, args.snapshot_dir, {"heldout_prompts.json": json.dumps(held)})
            log(f"snapshot at step {step + 1} -> {args.snapshot_dir}")

    unet_stats, ema = train_unet(
        unet, text_encoder, scheduler, latents, ids, empty_ids, cfg, gen, on_step
    )
    pipe = pipeline_with_ema(vae, unet, text_encoder, tokenizer, scheduler, ema)
    total = time.time() - t_start
    report = {
        "config": dataclasses.asdict(cfg),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
        "params": {"unet": n_unet, "vae": n_vae, "text_encoder": n_text},
        "vocab_size": len(tokenizer),
        "n_distinct_train_captions": len(set(captions)),
        "latent_mean": mean,
        "latent_std": std,
        "scaling_factor": vae.config.scaling_factor,
        "vae_roundtrip_oracle_alignment": vae_rt,
        **vae_stats,
        **unet_stats,
        "total_seconds": total,
        "torch": torch.__version__,
    }
    extra = {
        "training.json": json.dumps(report, indent=2),
        "heldout_prompts.json": json.dumps(held, indent=0),
        "train_prompts.txt": "".join(t + "\n" for t in sorted(set(captions))),
    }
    save_atomic(pipe, args.out, extra)
    log(f"saved {args.out} ({dir_size_mb(args.out):.1f} MB) in {total / 60:.1f} min total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
