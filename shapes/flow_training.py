"""A tiny Stable Diffusion 3 (flow matching) of the shapes world, trained on the CPU.

:func:`train` writes a genuine diffusers ``StableDiffusion3Pipeline`` folder (safetensors) that
``StableDiffusion3Pipeline.from_pretrained(folder)`` loads offline; the shipped one is
``shapes/assets/flow`` (``scripts/train_shapes_flow.py`` rebuilds it). It reuses what the
shipped tiny Stable Diffusion (``shapes/assets/sd``, :mod:`shapes.sd_training`) already
learned about pixels and words, and trains only what is new:

- ``vae``: the shapes SD's ``AutoencoderKL``, frozen, with SD3's latent convention
  ``(z - shift_factor) * scaling_factor`` (mean and std of the training latents).
- ``tokenizer`` = ``tokenizer_2``: the shapes BPE tokenizer; no T5 (``text_encoder_3=None``,
  which diffusers supports: the T5 part of the prompt is zeros of
  ``flow_max_sequence_length`` tokens).
- ``text_encoder``, ``text_encoder_2``: two ``CLIPTextModelWithProjection`` whose text
  towers start from the shapes SD's text encoder, trained jointly with the transformer. SD3
  reads their penultimate hidden states (concatenated: the transformer's
  ``joint_attention_dim``) and their pooled projections (concatenated:
  ``pooled_projection_dim``).
- ``transformer``: a small ``SD3Transformer2DModel`` (MMDiT) on 16x16x4 latents, patch 2,
  trained with the rectified-flow loss of SD3 (Esser et al. 2024): ``x_t = (1 - t) x_0 +
  t eps``, target velocity ``eps - x_0``, ``t`` logit-normal (m = 0, s = 1), the caption
  dropped to the empty prompt ``p_uncond`` of the time (classifier-free guidance). Saved as an
  exponential moving average.
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with SD3's settings.

The conditioning in training is computed by ``pipe.encode_prompt`` itself, so what the
transformer learned from is exactly what the pipeline and the Flow-GRPO sampler feed it.
Steps and seeds fix the result (one thread on the shared 2-core box).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hyperalign.common import dumps_json
from shapes.sd_training import (
    EMA,
    SceneTrainingConfig,
    dir_size_mb,
    encode_latents,
    heldout_prompts,
    log,
    lr_factor,
    make_dataset,
    save_pipeline,
    to_model_range,
)

__all__ = ["FlowTrainConfig", "build_flow_pipeline", "flow_losses", "train"]


@dataclass
class FlowTrainConfig(SceneTrainingConfig):
    """Everything that determines the trained flow pipeline (saved in ``training.json``)."""

    sd_dir: str = ""
    """The shapes Stable Diffusion whose VAE, tokenizer and text encoder are reused (empty:
    the shipped ``shapes/assets/sd``)."""
    layers: int = 6
    """MMDiT blocks of the transformer."""
    heads: int = 4
    """Attention heads; the width is ``heads * head_dim``."""
    head_dim: int = 32
    """Width of one attention head."""
    max_sequence_length: int = 1
    """T5 tokens of the prompt (zeros without T5; diffusers needs at least one)."""
    steps: int = 4000
    """Optimisation steps of the transformer and the text encoders."""
    batch: int = 32
    """Batch size."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warm-up, cosine decay to 10 %)."""
    logit_mean: float = 0.0
    """Mean of the logit-normal density of the training times (SD3: 0)."""
    logit_std: float = 1.0
    """Std of the logit-normal density of the training times (SD3: 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError(
                f"max_sequence_length must be in [1, 512], got {self.max_sequence_length}"
            )
        if self.steps < 1 or self.batch < 1 or self.layers < 1:
            raise ValueError("steps, batch and layers must be at least 1")


def _sd_dir(cfg: FlowTrainConfig) -> Path:
    from shapes.assets import SD_DIR

    return Path(cfg.sd_dir) if cfg.sd_dir else SD_DIR


def _text_encoder_with_projection(sd_text_encoder):
    """A ``CLIPTextModelWithProjection`` whose text tower is a copy of ``sd_text_encoder``'s
    (a ``CLIPTextModel``); the projection is new (square, the hidden width)."""
    from transformers import CLIPTextModelWithProjection

    config = copy.deepcopy(sd_text_encoder.config)
    config.projection_dim = config.hidden_size
    model = CLIPTextModelWithProjection(config)
    tower = getattr(sd_text_encoder, "text_model", sd_text_encoder)  # transformers 4 / 5 layout
    model.text_model.load_state_dict(tower.state_dict())
    return model


def build_flow_pipeline(cfg: FlowTrainConfig, latent_shift: float, latent_scale: float):
    """A ``StableDiffusion3Pipeline`` (fp32, CPU) of the shapes SD's VAE, tokenizer and text
    encoder and a fresh transformer initialised from torch's global generator."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from rlhf.flow.tiny import sd3_flow_scheduler

    sd = _sd_dir(cfg)
    tokenizer = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    vae = AutoencoderKL.from_pretrained(sd / "vae").requires_grad_(False).eval()
    vae.register_to_config(shift_factor=latent_shift, scaling_factor=latent_scale)
    sd_text = CLIPTextModel.from_pretrained(sd / "text_encoder")
    text_1 = _text_encoder_with_projection(sd_text)
    text_2 = _text_encoder_with_projection(sd_text)
    hidden = sd_text.config.hidden_size
    latent = cfg.image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=2,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=2 * hidden,
        caption_projection_dim=cfg.heads * cfg.head_dim,
        pooled_projection_dim=2 * hidden,
        pos_embed_max_size=latent,
        qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=sd3_flow_scheduler(),
        vae=vae,
        text_encoder=text_1,
        tokenizer=tokenizer,
        text_encoder_2=text_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_for_training(pipe, captions: list[str], max_sequence_length: int):
    """``(prompt_embeds (B, L, D), pooled (B, P))`` of ``captions`` through
    ``pipe.encode_prompt``, with gradients to the text encoders."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions,
        prompt_2=captions,
        prompt_3=captions,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=max_sequence_length,
    )
    return embeds, pooled


def flow_losses(transformer, x0, noise, t, embeds, pooled) -> torch.Tensor:
    """Per-sample rectified-flow MSE (B,): latents ``x0`` (B, C, h, w) moved to time ``t``
    (B,) in (0, 1) towards ``noise``; the transformer predicts the velocity ``noise - x0``
    (its timestep input is ``1000 t``, as SD3's scheduler gives it)."""
    tt = t.view(-1, 1, 1, 1)
    xt = (1.0 - tt) * x0 + tt * noise
    pred = transformer(
        hidden_states=xt,
        timestep=1000.0 * t,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    return ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))


def _latents(vae, images: np.ndarray) -> tuple[torch.Tensor, float, float]:
    """Posterior means (N, C, h, w) of ``images`` and the SD3 shift and scale that normalise
    them to mean 0, std 1."""
    raw = encode_latents(vae, images)
    shift = float(raw.mean())
    scale = 1.0 / float((raw - shift).std())
    return raw, shift, scale


@torch.no_grad()
def _roundtrip_oracle(vae, images: np.ndarray, captions: list[str]) -> float:
    """Mean oracle alignment of the VAE's reconstructions (the ceiling through the decoder)."""
    from shapes.oracle import oracle_alignment_batch

    rec = vae.decode(vae.encode(to_model_range(images)).latent_dist.mode()).sample
    return float(oracle_alignment_batch((rec / 2 + 0.5).clamp(0, 1), captions).mean())


def train(cfg: FlowTrainConfig, out: str | Path, command: str = "") -> dict:
    """Train the flow pipeline from ``cfg`` and save it to ``out`` (replacing it atomically).
    Returns the report written to ``training.json``."""
    from diffusers import AutoencoderKL

    out = Path(out)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    t_start = time.time()
    held = heldout_prompts(cfg.n_heldout, cfg.heldout_seed)
    images, captions = make_dataset(cfg.n_train, cfg.seed, set(held), cfg.image_size)
    vae = AutoencoderKL.from_pretrained(_sd_dir(cfg) / "vae").eval()
    raw, shift, scale = _latents(vae, images)
    latents = (raw - shift) * scale  # (N, C, h, w), mean 0, std 1
    pipe = build_flow_pipeline(cfg, shift, scale)
    params = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("transformer", "text_encoder", "text_encoder_2", "vae")
    }
    log(
        f"data: {len(captions)} pairs, {len(set(captions))} distinct captions, {len(held)} "
        f"held-out prompts; latents {tuple(latents.shape)} shift {shift:.3f} scale "
        f"{scale:.3f}; params {params}; {time.time() - t_start:.0f}s"
    )
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    trained = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.steps, cfg.warmup_steps)
    )
    ema = EMA(trained, cfg.ema_decay)
    for m in modules:
        m.train()
    n = latents.shape[0]
    hist: list[float] = []
    t0 = time.time()
    for step in range(cfg.steps):
        idx = torch.randint(0, n, (cfg.batch,), generator=gen)
        drop = (torch.rand(cfg.batch, generator=gen) < cfg.p_uncond).tolist()
        batch_captions = ["" if d else captions[i] for d, i in zip(drop, idx.tolist())]
        u = cfg.logit_mean + cfg.logit_std * torch.randn(cfg.batch, generator=gen)
        t = torch.sigmoid(u)  # (B,) logit-normal times
        noise = torch.randn(latents[idx].shape, generator=gen)
        embeds, pooled = encode_for_training(pipe, batch_captions, cfg.max_sequence_length)
        per = flow_losses(pipe.transformer, latents[idx], noise, t, embeds, pooled)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        opt.step()
        sched.step()
        ema.update(step)
        hist.append(loss.item())
        if step % 50 == 0 or step == cfg.steps - 1:
            log(
                f"[flow] step {step:5d}/{cfg.steps} v-mse {np.mean(hist[-50:]):.4f} "
                f"lr {sched.get_last_lr()[0]:.2e} {time.time() - t0:.0f}s"
            )
    ema.copy_to(trained)
    for m in modules:
        m.eval()
    n_rt = min(64, n)
    window = max(1, min(100, cfg.steps // 4))  # steps averaged at the start and the end
    report = {
        "config": dataclasses.asdict(cfg),
        "command": command,
        "params": params,
        "n_distinct_train_captions": len(set(captions)),
        "latent_shift": shift,
        "latent_scale": scale,
        "vae_roundtrip_oracle_alignment": _roundtrip_oracle(vae, images[:n_rt], captions[:n_rt]),
        "v_mse_first": float(np.mean(hist[:window])),
        "v_mse_last": float(np.mean(hist[-window:])),
        "v_mse_window": window,
        "train_seconds": time.time() - t0,
        "total_seconds": time.time() - t_start,
        "torch": torch.__version__,
    }
    extra = {
        "training.json": dumps_json(report, indent=2),
        "heldout_prompts.json": dumps_json(held, indent=0),
        "train_prompts.txt": "".join(t + "\n" for t in sorted(set(captions))),
    }
    save_pipeline(pipe, out, extra)
    log(f"saved {out} ({dir_size_mb(out):.1f} MB) in {report['total_seconds'] / 60:.1f} min")
    return report
