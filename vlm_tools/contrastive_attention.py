"""Contrastive attention in LLaVA: capture, layer selection, refinement, masking analysis.

Method: Song, Li, Yu, "Where Does Vision Meet Language? Understanding and Refining Visual
Fusion in MLLMs via Contrastive Attention" (arXiv 2601.08151). No official code is public;
every value marked [ours] is our reading of the paper and is a config field.

Pieces, in data-flow order:

- ``image_token_mask``: where the image tokens are (``input_ids == image_token_id``), with the
  per-sample count checked.
- ``last_token_image_attention``: attention of the last prompt token to the image tokens at
  one layer, averaged over heads and renormalised over the image tokens (``A^(i)``).
  It is recomputed inside a hook from the attention module's own projections for the last
  query row only, so it works with any attention kernel (sdpa, flash, eager) and costs one
  (1 x T) score row per layer instead of the (T x T) matrices ``output_attentions`` keeps.
- ``hellinger``, ``select_pre_integration_layer``, ``contrastive_map``, ``refinement_scale``:
  pure tensor math.
- ``AttentionCapture``: context manager with hooks on the ``self_attn`` of the needed layers.
- ``ContrastiveRefinement``: context manager that captures ``A^(i)`` for the candidate layers
  and ``A^(k)``, forms ``IA`` and scales the low-``IA`` image tokens at the look-back layer,
  all inside one prefill forward pass. Its hooks are removed on exit, also on exceptions.
- ``layerwise_masking_curve``: the per-layer drop of the answer log-likelihood when the image
  tokens' hidden states are zeroed at one layer.

Layers are 0-based indices into the language model's decoder layers (HF order).
All hooks expect transformers 5 decoder layers, which take the hidden states as their first
positional argument and return a tensor (not a tuple).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

# Layer-index conventions and defaults for LLaVA-1.5-7B (32 decoder layers).
LLAVA15_POST_LAYER = 28  # paper: post-integration layer k = 28 (we read it as 0-based)


@dataclass
class ContrastiveAttentionConfig:
    """Settings of the contrastive-attention method (layers are 0-based decoder indices)."""

    post_layer: int = LLAVA15_POST_LAYER
    """Post-integration layer ``k`` (paper: 28 for LLaVA-1.5-7B)."""
    candidate_layers: tuple[int, ...] | None = None
    """Candidate set ``C`` for ``i*``. [ours] None = the shallow half of the layers before
    ``k``: ``0 .. ceil(k/2) - 1``."""
    refine_layer: int | None = None
    """Look-back layer whose *input* hidden states are refined. [ours] None = ``post_layer``.
    Must be >= ``post_layer`` so that ``IA`` is known before the layer runs (one pass)."""
    rho: float = 0.5
    """[ours] Quantile ``ρ``: image tokens with ``IA`` below the per-sample ρ-quantile are
    suppressed."""
    lam: float = 0.1
    """[ours] Scale ``λ ≪ 1`` applied to the suppressed image tokens' hidden states."""
    renormalize: bool = True
    """[ours, as ViCrop/FastV] Renormalise ``A^(i)`` over the image tokens to sum to 1;
    False keeps the raw attention mass (then H compares sub-probability vectors)."""

    def resolved_candidates(self) -> tuple[int, ...]:
        """The candidate layers ``C`` with the default filled in."""
        if self.candidate_layers is not None:
            return tuple(int(i) for i in self.candidate_layers)
        return tuple(range(max(1, math.ceil(self.post_layer / 2))))

    def resolved_refine_layer(self) -> int:
        """The look-back layer with the default filled in."""
        return self.post_layer if self.refine_layer is None else int(self.refine_layer)

    def validate(self, num_layers: int) -> None:
        """Raise ``ValueError`` naming the problem when the layers do not fit the model."""
        k = self.post_layer
        if not 0 < k < num_layers:
            raise ValueError(
                f"post_layer={k} is outside the model's decoder layers 1..{num_layers - 1}; "
                f"set post_layer (the paper's k=28 is for 32-layer LLaVA-1.5-7B)."
            )
        cands = self.resolved_candidates()
        if not cands:
            raise ValueError("candidate_layers is empty; give at least one layer below post_layer")
        bad = [i for i in cands if not 0 <= i < k]
        if bad:
            raise ValueError(
                f"candidate_layers {bad} are not in [0, post_layer={k}); "
                "the pre-integration layer must come before the post-integration layer."
            )
        r = self.resolved_refine_layer()
        if not k <= r < num_layers:
            raise ValueError(
                f"refine_layer={r} must be in [post_layer={k}, {num_layers - 1}] so that IA is "
                "known before the look-back layer runs."
            )
        if not 0.0 <= self.rho <= 1.0:
            raise ValueError(f"rho={self.rho} must be a quantile in [0, 1]")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam={self.lam} must be in [0, 1] (a down-scaling factor)")


# ----------------------------------------------------------------------------- pure math


def hellinger(p: torch.Tensor, q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Hellinger distance ``H(P,Q) = (1/√2)·‖√P − √Q‖₂`` between distributions along ``dim``.

    p, q: non-negative, each summing to 1 along ``dim`` (same shape). Returns the shape with
    ``dim`` removed, values in [0, 1]. Computed in float32 (or float64 if given).
    """
    if p.shape != q.shape:
        raise ValueError(f"hellinger needs equal shapes, got {tuple(p.shape)} and {tuple(q.shape)}")
    dt = torch.promote_types(torch.promote_types(p.dtype, q.dtype), torch.float32)
    # clamp: tiny negative values from renormalisation round-off would give NaN in sqrt
    sp = p.to(dt).clamp_min(0).sqrt()
    sq = q.to(dt).clamp_min(0).sqrt()
    h = torch.linalg.vector_norm(sp - sq, dim=dim) / math.sqrt(2.0)
    # clamp: round-off can push the distance of disjoint supports a hair above 1
    return h.clamp(0.0, 1.0)


def select_pre_integration_layer(
    maps: dict[int, torch.Tensor], post_layer: int, candidates: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``i* = argmax_{i ∈ C} H(A^(i), A^(k))`` per sample.

    maps: layer -> (B, N) attention maps; must contain ``post_layer`` and every candidate.
    Returns ``(i_star, dist)``: i_star (B,) long layer indices, dist (B, |C|) distances in the
    order of ``candidates``.
    """
    missing = [i for i in (post_layer, *candidates) if i not in maps]
    if missing:
        raise ValueError(f"attention maps missing for layers {missing}; capture them first")
    post = maps[post_layer]
    stacked = torch.stack([maps[i] for i in candidates], dim=1)  # (B, |C|, N)
    dist = hellinger(stacked, post.unsqueeze(1).expand_as(stacked))  # (B, |C|)
    idx = dist.argmax(dim=1)  # (B,)
    layer_ids = torch.tensor(list(candidates), device=idx.device, dtype=torch.long)
    return layer_ids[idx], dist


def contrastive_map(post_map: torch.Tensor, pre_map: torch.Tensor) -> torch.Tensor:
    """``IA = |A^(k) − A^(i*)|``; (B, N) each, returns (B, N) float32."""
    return (post_map.float() - pre_map.float()).abs()


def refinement_scale(ia: torch.Tensor, rho: float, lam: float) -> torch.Tensor:
    """Per-token factors: ``λ`` where ``IA_j < Q_ρ(IA)`` (per-sample quantile), else 1.

    ia: (B, N). Returns (B, N) float32.
    """
    thr = torch.quantile(ia.float(), rho, dim=-1, keepdim=True)  # (B, 1)
    low = ia.float() < thr
    return torch.where(low, torch.full_like(ia, lam, dtype=torch.float32), torch.ones_like(ia))


# ----------------------------------------------------------------------------- model plumbing


def image_token_mask(
    input_ids: torch.Tensor, image_token_id: int, num_image_tokens: int
) -> torch.Tensor:
    """Boolean (B, T) mask of image-token positions, checking each row has exactly
    ``num_image_tokens`` of them (one image per sample)."""
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    mask = input_ids == image_token_id
    counts = mask.sum(dim=1)
    wrong = (counts != num_image_tokens).nonzero().flatten().tolist()
    if wrong:
        got = [int(counts[i]) for i in wrong]
        raise ValueError(
            f"samples {wrong} have {got} image tokens (id {image_token_id}) but one image needs "
            f"{num_image_tokens}; put exactly one '<image>' placeholder per prompt and expand it "
            "to the vision tower's patch count (see LlavaCritic.build_inputs)."
        )
    return mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that ignore left padding: (B, T) long, 0 at each sample's first token.

    Passing these makes a left-padded row compute exactly what the row computes alone
    (transformers' own default is ``arange(T)`` for every row).
    """
    pos = attention_mask.long().cumsum(dim=-1) - 1
    return pos.clamp_min(0)


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """The last position must be a real token in every row (left padding)."""
    if not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "the last position is padding in some rows; tokenize with padding_side='left' so "
            "that the last prompt token sits at position -1 of every row"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers of a LlavaForConditionalGeneration (or LlavaModel)."""
    inner = getattr(model, "model", model)
    lm = getattr(inner, "language_model", None)
    layers = getattr(lm, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"cannot find decoder layers in {type(model).__name__}; expected a transformers 5 "
            "LlavaForConditionalGeneration (model.model.language_model.layers)"
        )
    return layers


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as in transformers 5 ``llama.modeling_llama.apply_rotary_pos_emb``
    (non-interleaved halves). x: (B, H, T, hd); cos, sin: (B or 1, T, hd)."""
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def last_token_image_attention(
    attn: nn.Module,
    normed_hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    key_mask: torch.Tensor,
    image_mask: torch.Tensor,
    renormalize: bool = True,
) -> torch.Tensor:
    """``A^(i)``: attention of the last token to the image tokens, head-averaged, renormalised.

    Recomputes the last query row of a Llama-family attention module (q/k projections, RoPE,
    grouped KV heads, ``attn.scaling``) the way transformers 5 ``eager_attention_forward``
    does, in float32. The last token attends to every earlier real token, so the only mask
    is the padding mask.

    attn: the layer's ``self_attn``; normed_hidden: (B, T, D), its input (after the layer's
    input norm); position_embeddings: (cos, sin) as the layer received them; key_mask: (B, T)
    bool/int, 1 for real tokens; image_mask: (B, T) bool with the same count in every row.
    Returns (B, N) float32, each row summing to 1 (``renormalize``) or to the attention mass
    the last token puts on the image.
    """
    bsz, t, _ = normed_hidden.shape
    hd = attn.head_dim
    cos, sin = position_embeddings
    q = attn.q_proj(normed_hidden[:, -1:]).view(bsz, 1, -1, hd).transpose(1, 2)  # (B, H, 1, hd)
    k = attn.k_proj(normed_hidden).view(bsz, t, -1, hd).transpose(1, 2)  # (B, Hkv, T, hd)
    q = _apply_rope(q.float(), cos[:, -1:].float(), sin[:, -1:].float())
    k = _apply_rope(k.float(), cos.float(), sin.float())
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)  # (B, H, T, hd), as transformers' repeat_kv
    scores = (q @ k.transpose(2, 3)).squeeze(2) * attn.scaling  # (B, H, T)
    scores = scores.masked_fill(~key_mask.bool()[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).mean(dim=1)  # (B, T), head average
    n_img = int(image_mask[0].sum())
    img = probs[image_mask].view(bsz, n_img)  # (B, N): image positions in order
    if not renormalize:
        return img
    # clamp: a row with ~zero image attention must not divide by zero
    return img / img.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(img.dtype).tiny)


def _hidden_from_call(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _HookSet:
    """Registered hook handles, removed all at once; base of the context managers."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def active_hooks(self) -> int:
        return len(self._handles)

    def __exit__(self, *exc) -> None:
        self.remove()


class AttentionCapture(_HookSet):
    """Capture ``A^(i)`` for the given layers during one prefill forward pass.

    Hooks only the ``self_attn`` of the listed layers (forward hook with kwargs). Rows are
    per sample; the batch must be left-padded. Use::

        with AttentionCapture(model, layers, image_mask, attention_mask) as cap:
            model(...)
        cap.maps[layer]  # (B, N)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[int],
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        renormalize: bool = True,
    ) -> None:
        super().__init__()
        self.model = model
        self.renormalize = renormalize
        self.layers = tuple(sorted(set(int(i) for i in layers)))
        self.image_mask = image_mask.bool()
        self.key_mask = attention_mask.bool()
        check_left_padded(attention_mask)
        n = decoder_layers(model).__len__()
        bad = [i for i in self.layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"layers {bad} do not exist; the model has {n} decoder layers")
        self.maps: dict[int, torch.Tensor] = {}

    def _is_prefill(self, hidden: torch.Tensor) -> bool:
        return hidden.shape[1] == self.image_mask.shape[1]

    def _attn_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            hidden = _hidden_from_call(args, kwargs)
            if not self._is_prefill(hidden):  # decode steps of generate(): nothing to capture
                return None
            with torch.no_grad():
                self.maps[layer] = last_token_image_attention(
                    module,
                    hidden,
                    kwargs["position_embeddings"],
                    self.key_mask,
                    self.image_mask,
                    self.renormalize,
                )
            return None

        return hook

    def __enter__(self) -> AttentionCapture:
        layers = decoder_layers(self.model)
        try:
            for i in self.layers:
                h = layers[i].self_attn.register_forward_hook(self._attn_hook(i), with_kwargs=True)
                self._handles.append(h)
        except BaseException:
            self.remove()
            raise
        return self


@dataclass
class RefinementResult:
    """What one refined forward pass computed (all per sample)."""

    maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (B, N)
    i_star: torch.Tensor | None = None  # (B,) long
    distances: torch.Tensor | None = None  # (B, |C|)
    ia: torch.Tensor | None = None  # (B, N)
    scale: torch.Tensor | None = None  # (B, N), 1 or λ
    applied: bool = False


class ContrastiveRefinement(AttentionCapture):
    """Contrastive attention + refinement in one prefill pass, as a context manager.

    Captures ``A^(i)`` for ``i ∈ C`` and ``A^(k)``; a forward pre-hook on the look-back layer
    ``r ≥ k`` then computes ``i*``, ``IA = |A^(k) − A^(i*)|`` and multiplies the input hidden
    state of every image token with ``IA < Q_ρ(IA)`` by ``λ`` (when ``refine`` is True).
    If ``r == k``, ``A^(k)`` is computed in that pre-hook from the layer's own input norm and
    attention projections (exactly what the layer is about to see). Only the prefill call is
    touched (decode steps of ``generate`` have a different length). Hooks are removed on exit,
    also when the body raises.

    ``refine=False`` computes the same maps without changing the forward pass.
    """

    def __init__(
        self,
        model: nn.Module,
        config: ContrastiveAttentionConfig,
        image_mask: torch.Tensor,
        attention_mask: torch.Tensor,
        refine: bool = True,
    ) -> None:
        self.config = config
        num_layers = len(decoder_layers(model))
        config.validate(num_layers)
        self.k = config.post_layer
        self.r = config.resolved_refine_layer()
        self.candidates = config.resolved_candidates()
        hooked = set(self.candidates) | ({self.k} if self.k < self.r else set())
        super().__init__(model, sorted(hooked), image_mask, attention_mask, config.renormalize)
        self.refine = refine
        self.result = RefinementResult(maps=self.maps)

    def _refine_pre_hook(self, layer_module, args, kwargs):
        hidden = _hidden_from_call(args, kwargs)
        if not self._is_prefill(hidden) or self.result.applied:
            return None
        with torch.no_grad():
            if self.k == self.r:
                normed = layer_module.input_layernorm(hidden)
                self.maps[self.k] = last_token_image_attention(
                    layer_module.self_attn,
                    normed,
                    kwargs["position_embeddings"],
                    self.key_mask,
                    self.image_mask,
                    self.renormalize,
                )
            i_star, dist = select_pre_integration_layer(self.maps, self.k, self.candidates)
            pre = torch.stack([self.maps[i] for i in self.candidates], dim=1)  # (B, |C|, N)
            pos = dist.argmax(dim=1)  # (B,) index of i* in C
            pre_map = pre[torch.arange(pre.shape[0], device=pre.device), pos]  # (B, N)
            ia = contrastive_map(self.maps[self.k], pre_map)
            scale = refinement_scale(ia, self.config.rho, self.config.lam)
        self.result.i_star, self.result.distances, self.result.ia = i_star, dist, ia
        self.result.scale, self.result.applied = scale, True
        if not self.refine:
            return None
        factors = torch.ones(hidden.shape[:2], dtype=hidden.dtype, device=hidden.device)  # (B,T)
        factors[self.image_mask] = scale.to(hidden.dtype).flatten()  # row-major = mask order
        new_hidden = hidden * factors.unsqueeze(-1)  # new tensor: never edit the input in place
        if args:
            return (new_hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new_hidden}

    def __enter__(self) -> ContrastiveRefinement:
        super().__enter__()
        try:
            layer = decoder_layers(self.model)[self.r]
            self._handles.append(
                layer.register_forward_pre_hook(self._refine_pre_hook, with_kwargs=True)
            )
        except BaseException:
            self.remove()
            raise
        return self


# ----------------------------------------------------------------------------- masking analysis


@dataclass
class MaskingConfig:
    """Settings of the layer-wise image-masking analysis."""

    mode: str = "layer"
    """[ours] "layer": only layer ℓ sees zeroed image-token hidden states (the image tokens'
    own outputs at ℓ are kept, so later layers are untouched apart from what the text tokens
    read at ℓ); "from_layer": image-token hidden states are zeroed at the input of ℓ and the
    zeros propagate through every later layer."""
    layers: tuple[int, ...] | None = None
    """Layers to mask, one at a time; None = all decoder layers."""

    def validate(self) -> None:
        if self.mode not in MASKING_MODES:
            raise ValueError(f"unknown masking mode {self.mode!r}; valid: {sorted(MASKING_MODES)}")


MASKING_MODES = ("layer", "from_layer")


class _ImageMaskingHook(_HookSet):
    """Zero the image tokens' hidden states at one decoder layer (see MaskingConfig.mode)."""

    def __init__(self, model: nn.Module, layer: int, image_mask: torch.Tensor, mode: str):
        super().__init__()
        self.layer = decoder_layers(model)[layer]
        self.mask = image_mask.bool().unsqueeze(-1)  # (B, T, 1)
        self.mode = mode

    def _pre(self, module, args, kwargs):
        hidden = _hidden_from_call(args, kwargs)
        zeroed = hidden.masked_fill(self.mask, 0.0)
        if args:
            return (zeroed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": zeroed}

    def _post(self, module, args, kwargs, output):
        # Rerun the layer on zeroed image rows (bypassing hooks via .forward) and keep the
        # text rows of that run; image rows keep the normal output.
        hidden = _hidden_from_call(args, kwargs)
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        masked_out = module.forward(hidden.masked_fill(self.mask, 0.0), *args[1:], **rest)
        return torch.where(self.mask, output, masked_out)

    def __enter__(self):
        if self.mode == "from_layer":
            h = self.layer.register_forward_pre_hook(self._pre, with_kwargs=True)
        else:
            h = self.layer.register_forward_hook(self._post, with_kwargs=True)
        self._handles.append(h)
        return self


def answer_log_likelihood(logits: torch.Tensor, input_ids: torch.Tensor, answer_len: int):
    """Sum of log-probs of the last ``answer_len`` tokens of each row (teacher forcing).

    logits: (B, T', V), the logits of the last T' >= answer_len + 1 positions (all T, or
    ``logits_to_keep``); input_ids: (B, T) with the answer at the end (left padding).
    Returns (B,) float32.
    """
    if logits.shape[1] < answer_len + 1:
        raise ValueError(
            f"need logits of the last {answer_len + 1} positions, got {logits.shape[1]}"
        )
    pred = logits[:, -answer_len - 1 : -1].float().log_softmax(-1)  # (B, n, V)
    target = input_ids[:, -answer_len:].unsqueeze(-1)  # (B, n, 1)
    return pred.gather(-1, target).squeeze(-1).sum(-1)


@torch.no_grad()
def layerwise_masking_curve(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixel_values: torch.Tensor,
    image_mask: torch.Tensor,
    answer_len: int,
    config: MaskingConfig | None = None,
) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """Drop of the answer's log-likelihood when the image tokens are zeroed at each layer.

    Inputs are one left-padded batch whose rows end with the answer tokens (``answer_len``
    of them). Returns ``(layers, base, drop)``: base (B,) log-likelihood without masking,
    drop (L, B) = base − masked log-likelihood per masked layer (positive = the layer
    needed the image).
    """
    config = config or MaskingConfig()
    config.validate()
    check_left_padded(attention_mask)
    n_layers = len(decoder_layers(model))
    layers = list(range(n_layers)) if config.layers is None else [int(i) for i in config.layers]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist; the model has {n_layers} decoder layers")
    kw = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        logits_to_keep=answer_len + 1,
    )
    base = answer_log_likelihood(model(**kw).logits, input_ids, answer_len)
    drops = []
    for layer in layers:
        with _ImageMaskingHook(model, layer, image_mask, config.mode):
            masked = answer_log_likelihood(model(**kw).logits, input_ids, answer_len)
        drops.append(base - masked)
    return layers, base, torch.stack(drops, dim=0)  # (L, B)
