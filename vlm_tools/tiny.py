"""A tiny random LLaVA (model + processor) built offline, for tests and CPU benchmarks.

Architecture follows the LLaVA-1.5 layout at toy size: CLIP vision tower (image 8 px,
patch 2 → 16 patch tokens, CLS dropped by the "default" feature strategy), a two-layer
projector, and a Llama decoder (hidden 32, 4 layers, 4 heads, vocab 64). The tokenizer is a
word-level ``tokenizers`` model over a fixed word list (no download); words outside it map to
``<unk>``. Weights are random: outputs mean nothing, only shapes and plumbing are real.
"""

from __future__ import annotations

import torch

TINY_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
# Words of the prompt template and VQAScore question, plus a few scene words.
TINY_WORDS = (
    'USER ASSISTANT : " ? . , Does this figure show Please answer yes or no Yes No '
    "a an the of and on left right above below red green blue yellow circle square "
    "triangle star small large one two three cat dog photo"
).split()
TINY_VOCAB_SIZE = 64


def build_tiny_tokenizer():
    """Word-level fast tokenizer with LLaVA's special tokens, left padding, ``<s>`` prefix."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(TINY_SPECIAL_TOKENS) + TINY_WORDS
    if len(words) > TINY_VOCAB_SIZE:
        raise AssertionError(f"tiny vocabulary has {len(words)} words > {TINY_VOCAB_SIZE}")
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        extra_special_tokens={"image_token": "<image>"},
    )


def build_tiny_llava(
    seed: int = 0,
    num_layers: int = 4,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
):
    """Return ``(model, processor)``: a random tiny ``LlavaForConditionalGeneration`` in eval
    mode on CPU and a matching ``LlavaProcessor``. Same seed, same weights."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessor,
        LlavaProcessor,
    )

    tokenizer = build_tiny_tokenizer()
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=2,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token (dropped by "default")
    )
    vision = CLIPVisionConfig(
        image_size=8,
        patch_size=2,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=32,
    )
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=processor.image_token_id,
        image_seq_length=16,  # (8 / 2)^2 patches
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.set_attn_implementation(attn_implementation)
    return model, processor
