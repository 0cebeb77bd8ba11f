"""A genuine, tiny `StableDiffusion3Pipeline` built offline from configs (random weights).

Used by tests and the `tiny-sd3-cpu` preset, in the spirit of diffusers' own
`get_dummy_components` helpers: every component is the real diffusers / transformers class
(SD3Transformer2DModel, AutoencoderKL, two CLIPTextModelWithProjection, T5EncoderModel,
FlowMatchEulerDiscreteScheduler), only the sizes are tiny. Nothing is downloaded.

How the sizes fit together (SD3's `encode_prompt`): each CLIP encoder gives hidden states of
`TINY_CLIP_HIDDEN` and a pooled projection of `TINY_CLIP_HIDDEN`; the two hidden states are
concatenated (2 * TINY_CLIP_HIDDEN wide) and zero-padded to the T5 width, which is the
transformer's `joint_attention_dim`; the two pooled vectors are concatenated into the
transformer's `pooled_projection_dim`. All three tokenizers are the byte-level CLIP tokenizer
of `rlhf.tiny` (the T5 call only needs `padding`, `max_length` and `truncation`).
`StableDiffusion3Pipeline` also runs without T5 (`text_encoder_3=None`, as diffusers
documents for saving memory): the T5 part of the prompt is then zeros.
"""

from __future__ import annotations

import torch

from rlhf.tiny import build_tiny_tokenizer, tiny_vae

__all__ = ["build_tiny_sd3_pipeline", "sd3_flow_scheduler", "TINY_CLIP_HIDDEN", "TINY_JOINT_DIM"]

TINY_CLIP_HIDDEN = 8
"""Hidden and projection width of each tiny CLIP text encoder."""
TINY_JOINT_DIM = 2 * TINY_CLIP_HIDDEN
"""T5 width = the transformer's `joint_attention_dim` (>= both CLIP widths together)."""


def sd3_flow_scheduler():
    """A `FlowMatchEulerDiscreteScheduler` with Stable Diffusion 3's settings (1000 training
    timesteps, static shift 3.0, as in the scheduler config of stable-diffusion-3.5-medium)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _clip_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TINY_CLIP_HIDDEN,
            intermediate_size=2 * TINY_CLIP_HIDDEN,
            projection_dim=TINY_CLIP_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()


def build_tiny_sd3_pipeline(seed: int = 0, sample_size: int = 8, with_t5: bool = True):
    """Build a tiny random-weight `StableDiffusion3Pipeline` on CPU in fp32.

    Args:
        seed: seeds the random initialisation of all weights (same seed -> same weights).
        sample_size: latent height/width; images are `2 * sample_size` pixels square (the
            tiny VAE downsamples by 2) and the transformer sees `(sample_size / 2) ** 2`
            patches of 2 x 2 latents.
        with_t5: include the tiny T5 encoder; False passes `text_encoder_3=None`.

    Returns:
        A quiet `diffusers.StableDiffusion3Pipeline` with SD3's flow-matching scheduler
        (`sd3_flow_scheduler`). Move it with `.to(device, dtype)`.
    """
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=TINY_JOINT_DIM,
            caption_projection_dim=16,
            pooled_projection_dim=2 * TINY_CLIP_HIDDEN,
            pos_embed_max_size=sample_size,
        )
        # A shift as SD3's VAE has one (0.0609 in stable-diffusion-3.5-medium), so the
        # decoding convention is exercised; the scale is SD 1.x's: with SD3's 1.5305 the
        # random decoder's images barely vary with the latents, and rewards with them.
        vae = tiny_vae(
            sample_size,
            scaling_factor=0.18215,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = _clip_encoder(tokenizer)
        text_encoder_2 = _clip_encoder(tokenizer)
        text_encoder_3 = (
            T5EncoderModel(
                T5Config(
                    vocab_size=len(tokenizer),
                    d_model=TINY_JOINT_DIM,
                    d_kv=4,
                    d_ff=2 * TINY_JOINT_DIM,
                    num_layers=1,
                    num_heads=2,
                    relative_attention_num_buckets=8,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    decoder_start_token_id=tokenizer.pad_token_id,
                )
            ).eval()
            if with_t5
            else None
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        scheduler=sd3_flow_scheduler(),
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer if with_t5 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
