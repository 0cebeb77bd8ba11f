"""LLaVA critic: VQAScore-style ``P("Yes")`` with optional contrastive-attention refinement.

Reward contract (:mod:`reward.contract`)::

    rewards, info = critic(images, prompts, metadata)

images: float (B, 3, H, W) in [0, 1] on any device; prompts: B strings; metadata: B dicts.
rewards: float32 (B,) on the images' device, ``P("Yes")`` for the question
``Does this figure show "{prompt}"? Please answer yes or no.``; info: per-sample lists.

Refinement (``refine=True``) is the method of ``contrastive_attention.py`` applied during
the prefill that scores the answer; with ``heatmap_dir`` set, the ``IA`` map of each sample is
saved as a PNG overlay on its image.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hyperalign.common import parse_dtype, save_png
from vlm_tools.contrastive_attention import (
    ContrastiveAttentionConfig,
    ContrastiveRefinement,
    MaskingConfig,
    image_token_mask,
    layerwise_masking_curve,
    position_ids_from_mask,
)

DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"


@dataclass
class LlavaCriticConfig:
    """Settings of the LLaVA critic."""

    model: str = DEFAULT_LLAVA
    """Hub id or local directory of a LLaVA-1.5 checkpoint in transformers format."""
    device: str = "cpu"
    """Device to load the model on ("cpu", "cuda", "cuda:1", ...)."""
    dtype: str = "float32"
    """Weights dtype, any name :func:`hyperalign.common.parse_dtype` reads: float32/fp32 (CPU
    default), float16/fp16 or bfloat16/bf16 (GPU)."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel; capture does not need "eager" (it recomputes one row)."""
    batch_size: int = 8
    """Image–prompt pairs per forward pass."""
    refine: bool = True
    """Apply contrastive-attention refinement while scoring."""
    contrastive: ContrastiveAttentionConfig = field(default_factory=ContrastiveAttentionConfig)
    """Layers k, C, look-back layer, ρ and λ of the method."""
    question_template: str = 'Does this figure show "{prompt}"? Please answer yes or no.'
    """VQAScore question; ``{prompt}`` is the text-to-image prompt."""
    prompt_template: str = "USER: <image>\n{question} ASSISTANT:"
    """LLaVA-1.5 conversation format; exactly one ``<image>`` placeholder."""
    answer: str = "Yes"
    """Answer whose next-token probability is the reward (must be one token)."""
    heatmap_dir: str | None = None
    """If set, save each sample's IA map as a PNG overlay here (needs the maps: always
    computed then, also with refine=False)."""
    heatmap_alpha: float = 0.5
    """Opacity of the heat-map over the image in the overlays."""


class LlavaWeightsNotFoundError(OSError):
    """The LLaVA checkpoint is neither a local directory nor reachable/cached on the hub."""


def load_llava(
    name_or_path: str = DEFAULT_LLAVA,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
):
    """Load ``(model, processor)`` of a LLaVA-1.5 checkpoint onto ``device`` in ``dtype``.

    ``name_or_path``: hub id (downloaded/cached by huggingface_hub) or a local directory
    written by ``save_pretrained``. Raises ``LlavaWeightsNotFoundError`` with the fix when the
    weights are absent and the hub cannot be reached (offline).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    local = os.path.isdir(name_or_path)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        model = LlavaForConditionalGeneration.from_pretrained(
            name_or_path,
            dtype=dtype,
            attn_implementation=attn_implementation,
            device_map={"": str(device)},
        )
    except (OSError, ValueError) as e:
        if not (local or isinstance(e, OSError)):
            raise
        if local:
            raise LlavaWeightsNotFoundError(
                f"{name_or_path!r} is a directory but not a complete LLaVA checkpoint "
                f"({e}); it needs config.json, the safetensors weights and the processor files "
                "(tokenizer + preprocessor), as written by model/processor.save_pretrained."
            ) from e
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise LlavaWeightsNotFoundError(
            f"LLaVA weights {name_or_path!r} are not in the local Hugging Face cache and could "
            f"not be downloaded{' (HF_HUB_OFFLINE is set)' if offline else ''}. Fix: on a "
            f"machine with internet run `hf download {name_or_path}` (about 14 GB), or pass "
            "a local directory with the checkpoint. Original error: "
            f"{type(e).__name__}: {str(e).splitlines()[0]}"
        ) from e
    tok = processor.tokenizer
    tok.padding_side = "left"  # the last prompt token must sit at position -1 of every row
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return model.eval(), processor


def num_image_tokens(model) -> int:
    """Image placeholder tokens one image expands to: (image_size / patch_size)^2, plus the
    CLS token with the "full" feature strategy (576 for LLaVA-1.5 at 336 px)."""
    cfg = model.config
    n = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    return n + (1 if cfg.vision_feature_select_strategy == "full" else 0)


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shortest side to ``size`` (bicubic, antialiased) and centre-crop ``size``²,
    on the images' device. (B,3,H,W) in [0,1] -> (B,3,S,S) float32 in [0,1].

    Mirrors ``LlavaImageProcessor`` (shortest-edge resize + centre crop) without a CPU/PIL
    round trip; resampling differs from PIL's bicubic by interpolation round-off only.
    """
    _, _, h, w = images.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = images.float()
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)  # clamp: bicubic overshoots outside the [0, 1] pixel range
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top : top + size, left : left + size]  # (B, 3, S, S)


def preprocess_images(
    images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """CLIP preprocessing on device: ``resize_center_crop`` then normalise with mean/std."""
    x = resize_center_crop(images, size)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def save_heatmap_overlay(image: torch.Tensor, ia: torch.Tensor, path: str | Path, alpha=0.5):
    """Save ``IA`` (N,) on a √N×√N patch grid as a heat-map over ``image`` (3,H,W) in [0,1]."""
    import matplotlib

    n = ia.numel()
    g = math.isqrt(n)
    if g * g != n:
        raise ValueError(f"IA has {n} entries, not a square patch grid; cannot draw it")
    heat = ia.detach().float().cpu().view(1, 1, g, g)  # (1, 1, g, g) patch grid, row-major
    h, w = image.shape[-2:]
    heat = F.interpolate(heat, size=(h, w), mode="nearest")[0, 0]  # (H, W)
    # normalise to [0, 1] for the colour map; clamp: a constant map has zero range
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    rgb = torch.from_numpy(matplotlib.colormaps["jet"](heat.numpy())[..., :3]).float()
    base = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0)  # (H, W, 3)
    out = ((1 - alpha) * base + alpha * rgb).clamp(0, 1)
    save_png((out.numpy() * 255).round().astype("uint8"), path)  # (H, W, 3) uint8, atomic


class LlavaCritic:
    """Picklable reward function: ``P("Yes")`` of LLaVA for the VQAScore question.

    Build with ``LlavaCritic(config)`` (loads ``config.model``) or pass an already-built
    ``model`` and ``processor`` (tests use the tiny random LLaVA).
    """

    def __init__(self, config: LlavaCriticConfig | None = None, model=None, processor=None):
        self.config = config or LlavaCriticConfig()
        if (model is None) != (processor is None):
            raise ValueError("pass both model and processor, or neither (then config.model)")
        self._loaded_from_config = model is None
        if model is None:
            model, processor = load_llava(
                self.config.model,
                self.config.device,
                parse_dtype(self.config.dtype),  # raises, listing the valid names
                self.config.attn_implementation,
            )
        self.model, self.processor = model.eval(), processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.config.batch_size < 1:
            raise ValueError(f"batch_size={self.config.batch_size} must be >= 1")
        if self.config.prompt_template.count("<image>") != 1:
            raise ValueError("prompt_template must contain exactly one '<image>' placeholder")
        n_layers = model.config.text_config.num_hidden_layers
        self.config.contrastive.validate(n_layers)
        self.n_image_tokens = num_image_tokens(model)
        ids = self.tokenizer(self.config.answer, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"answer {self.config.answer!r} tokenizes to {len(ids)} tokens {ids}; "
                "P(answer) needs a single-token answer such as 'Yes'"
            )
        self.answer_id = ids[0]
        ip = processor.image_processor
        self.image_size = int(ip.crop_size["height"])
        vis = model.config.vision_config.image_size
        if self.image_size != vis:
            raise ValueError(f"processor crop size {self.image_size} != vision tower {vis} px")
        self.image_mean, self.image_std = list(ip.image_mean), list(ip.image_std)
        self._calls = 0

    # Pickling: transformers 5 models carry hook closures and do not pickle. A critic loaded
    # from config.model is re-loaded from it on unpickling; an injected model travels as its
    # config + state dict and is rebuilt on the same device and dtype.
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("model", "tokenizer")}
        if not self._loaded_from_config:
            state["_model_config"] = self.model.config
            state["_model_state"] = {k: v.cpu() for k, v in self.model.state_dict().items()}
            state["_model_device"] = str(self.device)
            state["_model_dtype"] = self.model.dtype
        return state

    def __setstate__(self, state: dict) -> None:
        from transformers import LlavaForConditionalGeneration

        model_config = state.pop("_model_config", None)
        model_state = state.pop("_model_state", None)
        device = state.pop("_model_device", None)
        dtype = state.pop("_model_dtype", None)
        self.__dict__.update(state)
        if model_config is None:
            cfg = self.config
            self.model, _ = load_llava(
                cfg.model, cfg.device, parse_dtype(cfg.dtype), cfg.attn_implementation
            )
        else:
            model = LlavaForConditionalGeneration(model_config)
            model.load_state_dict(model_state)
            self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --------------------------------------------------------------- inputs
    def build_text(self, prompt: str) -> str:
        question = self.config.question_template.format(prompt=prompt)
        text = self.config.prompt_template.format(question=question)
        return text.replace("<image>", self.processor.image_token * self.n_image_tokens)

    def build_inputs(self, images: torch.Tensor, texts: Sequence[str]) -> dict:
        """Tokenise (left padding) and preprocess; checks image count and image tokens."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        if len(texts) != images.shape[0]:
            raise ValueError(
                f"got {images.shape[0]} images but {len(texts)} prompts; pass one prompt per image"
            )
        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True)
        input_ids = enc.input_ids.to(self.device)
        attention_mask = enc.attention_mask.to(self.device)
        image_mask = image_token_mask(
            input_ids, self.model.config.image_token_id, self.n_image_tokens
        )
        pixel_values = preprocess_images(
            images.to(self.device), self.image_size, self.image_mean, self.image_std
        ).to(self.model.dtype)
        return dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            image_mask=image_mask,
        )

    # --------------------------------------------------------------- scoring
    @torch.no_grad()
    def score_batch(
        self, images: torch.Tensor, prompts: Sequence[str], refine: bool | None = None
    ) -> dict:
        """Score one batch (not differentiable, so not the reward contract's ``score``). Returns p_yes (B,) float32 on the model's device, and, when the
        maps were computed, ia (B, N), i_star (B,)."""
        refine = self.config.refine if refine is None else refine
        need_maps = refine or self.config.heatmap_dir is not None
        inputs = self.build_inputs(images, [self.build_text(p) for p in prompts])
        image_mask = inputs.pop("image_mask")
        kw = dict(
            **inputs,
            position_ids=position_ids_from_mask(inputs["attention_mask"]),
            use_cache=False,
            logits_to_keep=1,
        )
        out: dict = {}
        if need_maps:
            with ContrastiveRefinement(
                self.model, self.config.contrastive, image_mask, inputs["attention_mask"], refine
            ) as ref:
                logits = self.model(**kw).logits[:, -1]  # (B, V)
            out["ia"], out["i_star"] = ref.result.ia, ref.result.i_star
        else:
            logits = self.model(**kw).logits[:, -1]  # (B, V)
        out["p_yes"] = logits.float().softmax(dim=-1)[:, self.answer_id]
        return out

    @torch.no_grad()
    def masking_analysis(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        answer: str | None = None,
        config: MaskingConfig | None = None,
    ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """Layer-wise image masking on the VQAScore question with ``answer`` appended.

        Returns ``(layers, base, drop)`` as ``layerwise_masking_curve``: base (B,) answer
        log-likelihood, drop (L, B). Runs in chunks of ``batch_size``.
        """
        answer = self.config.answer if answer is None else answer
        ans = self.tokenizer(answer, add_special_tokens=False).input_ids
        if not ans:
            raise ValueError("answer is empty; give the answer text whose likelihood to measure")
        bases, drops, layers = [], [], []
        bs = self.config.batch_size
        for start in range(0, images.shape[0], bs):
            chunk, texts = images[start : start + bs], prompts[start : start + bs]
            inputs = self.build_inputs(chunk, [self.build_text(p) for p in texts])
            b = chunk.shape[0]
            ans_ids = torch.tensor(ans, device=self.device).expand(b, -1)  # (B, n)
            input_ids = torch.cat([inputs["input_ids"], ans_ids], dim=1)  # (B, T + n)
            attention_mask = torch.cat([inputs["attention_mask"], torch.ones_like(ans_ids)], 1)
            image_mask = torch.cat(
                [inputs["image_mask"], torch.zeros_like(ans_ids, dtype=torch.bool)], 1
            )
            layers, base, drop = layerwise_masking_curve(
                self.model,
                input_ids,
                attention_mask,
                inputs["pixel_values"],
                image_mask,
                len(ans),
                config,
            )
            bases.append(base)
            drops.append(drop)
        return layers, torch.cat(bases), torch.cat(drops, dim=1)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict]):
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise TypeError("images must be a float tensor (B, 3, H, W) in [0, 1]")
        b = images.shape[0]
        if len(prompts) != b or len(metadata) != b:
            raise ValueError(
                f"got {b} images, {len(prompts)} prompts and {len(metadata)} metadata dicts; "
                "pass one prompt and one metadata dict per image"
            )
        p_yes, i_star, paths = [], [], []
        bs = self.config.batch_size
        for start in range(0, b, bs):
            chunk = images[start : start + bs]
            res = self.score_batch(chunk, list(prompts[start : start + bs]))
            p_yes.append(res["p_yes"])
            if "i_star" in res:
                i_star += res["i_star"].tolist()
            if self.config.heatmap_dir is not None:
                for j in range(chunk.shape[0]):
                    path = Path(self.config.heatmap_dir) / f"{self._calls:06d}_{start + j:04d}.png"
                    seen = resize_center_crop(chunk[j : j + 1], self.image_size)[0]  # model's view
                    save_heatmap_overlay(seen, res["ia"][j], path, self.config.heatmap_alpha)
                    paths.append(str(path))
        self._calls += 1
        rewards = torch.cat(p_yes).to(device=images.device, dtype=torch.float32)
        info: dict = {"llava_p_yes": rewards.tolist()}
        if i_star:
            info["llava_i_star"] = i_star
        if paths:
            info["llava_heatmap"] = paths
        return rewards, info
