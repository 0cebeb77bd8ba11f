"""A genuine, tiny `StableDiffusionPipeline` built offline from configs (random weights).

Used by tests, benchmarks and the `tiny-cpu` preset: every component is the real diffusers /
transformers class (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer,
DDIMScheduler), only the sizes are tiny, in the spirit of diffusers' own
`get_dummy_components` test helpers. Nothing is downloaded.

The tokenizer is a byte-level BPE with no merges (`shapes.tokenizer.byte_level_tokenizer`):
every byte is a token, so any text tokenizes (one token per character plus an end-of-word
variant).
"""

from __future__ import annotations

import torch

__all__ = [
    "assemble_pipeline",
    "sd15_ddim_scheduler",
    "build_tiny_pipeline",
    "build_random_sd15_pipeline",
    "build_tiny_tokenizer",
    "TINY_TEXT_HIDDEN",
]

# Width of the tiny text encoder; the UNet's cross-attention width must equal it.
TINY_TEXT_HIDDEN = 16
# Maximum prompt length in tokens (SD 1.5 uses 77; short keeps the tiny model fast).
TINY_MAX_LENGTH = 16


def build_tiny_tokenizer(max_length: int = TINY_MAX_LENGTH):
    """A `CLIPTokenizer` over single bytes (vocab 512 + 2 specials), built offline
    (:func:`shapes.tokenizer.byte_level_tokenizer`)."""
    from shapes.tokenizer import byte_level_tokenizer

    return byte_level_tokenizer(max_length)


def sd15_ddim_scheduler():
    """A `DDIMScheduler` with Stable Diffusion 1.5's noise schedule (scaled-linear betas
    0.00085..0.012, `set_alpha_to_one=False`, `steps_offset=1`)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler=None):
    """A `StableDiffusionPipeline` from its parts (eval mode, no safety checker, quiet)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet.eval(),
        scheduler=scheduler if scheduler is not None else sd15_ddim_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae(sample_size: int, **extra):
    """A random two-block VAE with 4 latent channels for ``sample_size`` latents (images of
    twice that: one downsampling); ``extra`` (e.g. ``shift_factor``) goes to its config."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        sample_size=2 * sample_size,
        **extra,
    )


def build_tiny_pipeline(seed: int = 0, sample_size: int = 8):
    """Build a tiny random-weight `StableDiffusionPipeline` on CPU in fp32.

    Args:
        seed: seeds the random initialisation of all weights (same seed -> same weights).
        sample_size: latent height/width; images are `2 * sample_size` pixels square
            (the tiny VAE downsamples by 2).

    Returns:
        A `diffusers.StableDiffusionPipeline` with a DDIM scheduler (SD 1.5 noise schedule:
        scaled_linear betas 0.00085..0.012, `set_alpha_to_one=False`, `steps_offset=1`) and no
        safety checker. Move it with `.to(device, dtype)`.
    """
    from diffusers import (
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    cpu_rng = torch.random.fork_rng(devices=[])
    with cpu_rng:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(8, 16),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=TINY_TEXT_HIDDEN,
            attention_head_dim=4,
            norm_num_groups=2,
        )
        vae = tiny_vae(sample_size)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=TINY_TEXT_HIDDEN,
                intermediate_size=2 * TINY_TEXT_HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=TINY_MAX_LENGTH,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return assemble_pipeline(unet, vae, text_encoder, tokenizer)


def build_random_sd15_pipeline(seed: int = 0, sample_size: int = 64):
    """A `StableDiffusionPipeline` with the Stable Diffusion 1.5 *architecture* (UNet 860M,
    VAE, CLIP ViT-L/14 text encoder sizes from the published v1-5 configs) and random weights,
    built offline. For real-size cost measurements and slow tests, not for images.

    `sample_size` is the latent size (64 = 512 px); smaller values reduce the cost. The
    tokenizer is the byte-level one of `build_tiny_tokenizer` with 77 positions.
    """
    from diffusers import (
        AutoencoderKL,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer(max_length=77)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=2,
            sample_size=8 * sample_size,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=max(49408, len(tokenizer)),
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return assemble_pipeline(unet, vae, text_encoder, tokenizer)
