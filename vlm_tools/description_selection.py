"""Description selection for CLIP classification (DisCLIP).

Method: Ma, Rietdorf, Kotovenko, Hu, Ommer, "Does VLM Classification Benefit from LLM
Description Semantics?" (arXiv 2412.11917). We follow the semantics of the official code
(CompVis/DisCLIP ``method.py``/``main.py``), which differ from the paper's summary:

1. **Local label neighbourhood** of an image: its top-``k`` classes by cosine to
   ``"A photo of a {c}."``.
2. **Pool**: every class's descriptions, deduplicated into one global list
   (:mod:`vlm_tools.descriptions`).
3. **Lookup matrix** ``S[d, c]``: mean cosine between description ``d`` and the reference
   images of class ``c`` (the first ``n`` of each class, ``n = min(n_reference, smallest
   class)``).
4. **Selection** for candidate ``a`` in neighbourhood ``A``: ``diff = S[:, a] - S[:, A]``
   (``P x k``); a description survives only if every difference is ``>= 0`` (``a`` is its
   argmax within ``A``); survivors are ranked by the mean difference over the ``k`` columns
   (the zero self-difference included) and the top ``m`` kept. If nothing survives, the
   first ``m`` descriptions the LLM gave ``a`` are used (the fallback).
5. **Classname-free scoring** over the neighbourhood: ``score(c) = w_cls * cos(img,
   "A photo of a {c}.") + mean_{d in selected(c)} cos(img, d)``, descriptions embedded as raw
   text; ``w_cls = 0`` is fully classname-free. **Classname-containing** mode: the mean
   cosine to ``"A photo of a {c}, {d}."`` over the selected ``d``.

Baselines of the paper: the classname-only prompt over all classes, and the LLM-assigned
descriptions (``w_cls * caption + mean over the class's own LLM descriptions``, over all
classes).

Differences from the official code, on purpose: fp32 instead of fp16 similarities; ties
between survivors of exactly equal mean difference go to the earlier pool entry (stable
sort); the classname-containing mean is over the selected descriptions only (the official
code pads short lists to ``m`` by repeating their first entries); the fallback takes the
first ``m`` descriptions in the LLM's order (the official code takes them in global-pool
order).

All embeddings are L2-normalised, so dot products are cosines. Text embeddings are computed
once per backbone and text and cached (:func:`encode_texts`): the cache assumes a frozen
backbone (call :func:`clear_text_cache` after changing its weights).
"""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from hyperalign.common import atomic_write_bytes
from vlm_tools.descriptions import DescriptionPool

# ---------------------------------------------------------------------------------------------
# Configuration


@dataclass
class SelectionConfig:
    """Settings of description selection (defaults: the official code's)."""

    k: int = 3
    """Size of the local label neighbourhood (top-k classes by classname prompt)."""
    m: int = 5
    """Descriptions kept per candidate class."""
    n_reference: int = 1000
    """Reference images per class for the lookup matrix (lowered to the smallest class)."""
    caption_template: str = "A photo of a {c}."
    """Classname prompt; ``{c}`` is the class name."""
    combined_template: str = "A photo of a {c}, {d}."
    """Classname-containing description prompt; ``{c}`` class name, ``{d}`` description."""
    batch_size: int = 256
    """Images or texts per encoder call, and images per selection chunk."""

    def __post_init__(self) -> None:
        for name in ("k", "m", "n_reference", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SelectionConfig.{name} must be >= 1, got {getattr(self, name)}")
        if "{c}" not in self.caption_template:
            raise ValueError("SelectionConfig.caption_template must contain '{c}'")
        if "{c}" not in self.combined_template or "{d}" not in self.combined_template:
            raise ValueError("SelectionConfig.combined_template must contain '{c}' and '{d}'")


# ---------------------------------------------------------------------------------------------
# Encoding (batched, cached per backbone)

_TEXT_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of a model's first parameter."""
    return next(model.parameters()).device


def clear_text_cache(model: torch.nn.Module | None = None) -> None:
    """Forget cached text embeddings (of one model, or of all)."""
    if model is None:
        _TEXT_CACHE.clear()
    else:
        _TEXT_CACHE.pop(model, None)


@torch.no_grad()
def encode_texts(backbone, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """L2-normalised text embeddings ``(T, D)`` (fp32, CPU), each text encoded once per model.

    ``backbone``: a :class:`reward.backbone.Backbone` (``model.encode_text``, ``tokenizer``).
    """
    model = backbone.model
    cache: dict[str, torch.Tensor] = _TEXT_CACHE.setdefault(model, {})
    todo = list(dict.fromkeys(t for t in texts if t not in cache))
    if todo:
        device = model_device(model)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                tokens = backbone.tokenizer(chunk).to(device)
                emb = F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()
                for t, e in zip(chunk, emb):
                    cache[t] = e
        finally:
            model.train(was_training)
    if not texts:
        return torch.empty(0, backbone.embed_dim)
    return torch.stack([cache[t] for t in texts])  # (T, D)


def preprocess_images(images: torch.Tensor, backbone) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> resized to the backbone's input size and normalised."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    images = images.float()
    if tuple(images.shape[-2:]) != tuple(backbone.image_size):
        images = F.interpolate(
            images,
            size=tuple(backbone.image_size),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        ).clamp(0, 1)
    mean = torch.tensor(backbone.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


@torch.no_grad()
def encode_images(backbone, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """L2-normalised image embeddings ``(B, D)`` (fp32) on the model's device.

    ``images``: ``(B, 3, H, W)`` in [0, 1] on any device; resized and normalised here.
    """
    model = backbone.model
    device = model_device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = preprocess_images(images[start : start + batch_size].to(device), backbone)
            out.append(F.normalize(model.encode_image(x).float(), dim=-1))
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, backbone.embed_dim, device=device)
    return torch.cat(out)  # (B, D)


# ---------------------------------------------------------------------------------------------
# The method, as pure functions over tensors


def label_neighbourhood(image_emb: torch.Tensor, caption_emb: torch.Tensor, k: int) -> torch.Tensor:
    """Top-``k`` classes per image by cosine to the classname prompt.

    image_emb ``(N, D)``, caption_emb ``(C, D)``, both normalised -> ``(N, k)`` long, most
    similar first.
    """
    if k > caption_emb.shape[0]:
        raise ValueError(f"neighbourhood size k={k} exceeds the {caption_emb.shape[0]} classes")
    return (image_emb @ caption_emb.T).topk(k, dim=1).indices


def neighbourhood_with(
    image_emb: torch.Tensor, caption_emb: torch.Tensor, classes: torch.Tensor, k: int
) -> torch.Tensor:
    """Neighbourhood that always holds a given class: ``classes[i]`` first, then the ``k-1``
    other classes most similar to image ``i`` by classname prompt. -> ``(N, k)`` long."""
    if k > caption_emb.shape[0]:
        raise ValueError(f"neighbourhood size k={k} exceeds the {caption_emb.shape[0]} classes")
    sims = image_emb @ caption_emb.T  # (N, C)
    sims = sims.scatter(1, classes.view(-1, 1).to(sims.device), float("inf"))
    return sims.topk(k, dim=1).indices


def reference_indices(labels: torch.Tensor, num_classes: int, n_reference: int) -> torch.Tensor:
    """Indices of the first ``n`` samples of every class, ``n = min(n_reference, smallest
    class)``: ``(C, n)`` long. A class with no sample is an error naming it."""
    labels = labels.long().cpu()
    counts = torch.bincount(labels, minlength=num_classes)
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"reference labels must be in [0, {num_classes}), got "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    empty = [c for c in range(num_classes) if counts[c] == 0]
    if empty:
        raise ValueError(
            f"no reference image for class ids {empty}; every class needs at least "
            "one reference image to build the lookup matrix"
        )
    n = min(n_reference, int(counts.min()))
    rows = [torch.nonzero(labels == c).flatten()[:n] for c in range(num_classes)]
    return torch.stack(rows)  # (C, n)


def lookup_matrix(
    ref_emb: torch.Tensor,
    ref_labels: torch.Tensor,
    description_emb: torch.Tensor,
    num_classes: int,
    n_reference: int = 1000,
) -> tuple[torch.Tensor, int]:
    """``S[d, c]`` = mean cosine between description ``d`` and class ``c``'s first ``n``
    reference images. ref_emb ``(R, D)``, description_emb ``(P, D)`` normalised ->
    ``(S (P, C), n)``."""
    idx = reference_indices(ref_labels, num_classes, n_reference)  # (C, n)
    n = idx.shape[1]
    # The mean of cosines equals the cosine with the mean embedding (linearity).
    class_mean = ref_emb[idx.to(ref_emb.device)].mean(dim=1)  # (C, n, D) -> (C, D)
    return description_emb.to(ref_emb.device) @ class_mean.T, n  # (P, C)


@dataclass
class Selection:
    """Selected descriptions of every candidate in every image's neighbourhood."""

    neighbourhood: torch.Tensor
    """``(N, k)`` long: candidate class ids per image."""
    indices: torch.Tensor
    """``(N, k, m)`` long: selected pool indices per candidate, best first; ``-1`` pads."""
    fallback: torch.Tensor
    """``(N, k)`` bool: no description survived, the LLM's first ``m`` were used."""

    @property
    def valid(self) -> torch.Tensor:
        """``(N, k, m)`` bool: which entries of ``indices`` are real."""
        return self.indices >= 0

    def to(self, device) -> Selection:
        return Selection(
            self.neighbourhood.to(device), self.indices.to(device), self.fallback.to(device)
        )


def fallback_table(pool: DescriptionPool, m: int) -> torch.Tensor:
    """``(C, m)`` long: the first ``m`` LLM descriptions of each class, ``-1`` padded."""
    table = torch.full((pool.num_classes, m), -1, dtype=torch.long)
    for c, idx in enumerate(pool.class_indices):
        first = list(idx[:m])
        table[c, : len(first)] = torch.tensor(first, dtype=torch.long)
    return table


def select_descriptions(
    lookup: torch.Tensor,
    neighbourhood: torch.Tensor,
    m: int,
    fallback: torch.Tensor,
    chunk: int = 256,
) -> Selection:
    """Per-image selection with the dominance filter, ranking, top-``m`` and fallback.

    lookup ``S`` ``(P, C)``; neighbourhood ``(N, k)`` long; fallback ``(C, m)`` long
    (``-1`` padded, from :func:`fallback_table`). Runs on ``lookup``'s device, ``chunk``
    images at a time (memory ``chunk * k * P * k`` floats).
    """
    device = lookup.device
    neighbourhood = neighbourhood.to(device)
    fallback = fallback.to(device)
    if fallback.shape[1] != m:
        raise ValueError(f"fallback table has {fallback.shape[1]} columns, expected m={m}")
    num_desc = lookup.shape[0]
    keep = min(m, num_desc)
    s_t = lookup.T  # (C, P)
    all_idx, all_fb = [], []
    for start in range(0, neighbourhood.shape[0], chunk):
        hood = neighbourhood[start : start + chunk]  # (B, k)
        cols = s_t[hood]  # (B, k, P): S[:, a] for every candidate a
        # diff[b, j, p, l] = S[p, A_j] - S[p, A_l]
        diff = cols.unsqueeze(-1) - cols.transpose(1, 2).unsqueeze(1)  # (B, k, P, k)
        survives = (diff >= 0).all(dim=-1)  # (B, k, P)
        key = diff.mean(dim=-1).masked_fill(~survives, float("-inf"))  # (B, k, P)
        vals, order = torch.sort(key, dim=-1, descending=True, stable=True)
        vals, order = vals[..., :keep], order[..., :keep]  # (B, k, keep)
        idx = torch.where(torch.isfinite(vals), order, torch.full_like(order, -1))
        if keep < m:
            idx = F.pad(idx, (0, m - keep), value=-1)  # (B, k, m)
        no_survivor = idx[..., 0] < 0  # (B, k)
        idx = torch.where(no_survivor.unsqueeze(-1), fallback[hood], idx)
        all_idx.append(idx)
        all_fb.append(no_survivor)
    if not all_idx:
        empty = torch.empty(0, neighbourhood.shape[1], m, dtype=torch.long, device=device)
        return Selection(
            neighbourhood,
            empty,
            torch.empty(0, neighbourhood.shape[1], dtype=torch.bool, device=device),
        )
    return Selection(neighbourhood, torch.cat(all_idx), torch.cat(all_fb))


def selected_description_similarity(
    image_emb: torch.Tensor, description_emb: torch.Tensor, selection: Selection
) -> torch.Tensor:
    """``(N, k, m)``: cosine of each image with each of its selected descriptions (0 at
    padding)."""
    sims = image_emb @ description_emb.T  # (N, P)
    idx = selection.indices.clamp(min=0)
    n, k, m = idx.shape
    picked = sims.gather(1, idx.view(n, k * m)).view(n, k, m)  # (N, k*m) -> (N, k, m)
    return picked.masked_fill(~selection.valid, 0.0)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis of the valid entries. ``(..., m)`` -> ``(...)``; an all-invalid
    row is an error (every candidate has at least one description)."""
    count = valid.sum(-1)
    if bool((count == 0).any()):
        raise ValueError("a candidate class has no selected description and no LLM description")
    return (values * valid).sum(-1) / count


@dataclass
class ScoreParts:
    """The two terms of the classname-free score, per image and candidate."""

    caption: torch.Tensor
    """``(N, k)``: cos(img, "A photo of a {c}.") of each candidate."""
    descriptions: torch.Tensor
    """``(N, k)``: mean cosine to the candidate's selected descriptions."""

    def scores(self, w_cls: float) -> torch.Tensor:
        """``(N, k)``: ``w_cls * caption + descriptions``."""
        return w_cls * self.caption + self.descriptions


def classname_free_parts(
    image_emb: torch.Tensor,
    caption_emb: torch.Tensor,
    description_emb: torch.Tensor,
    selection: Selection,
) -> ScoreParts:
    """Both score terms for every candidate of every image (see :class:`ScoreParts`)."""
    cap = (image_emb @ caption_emb.T).gather(1, selection.neighbourhood)  # (N, k)
    desc = masked_mean(
        selected_description_similarity(image_emb, description_emb, selection), selection.valid
    )
    return ScoreParts(cap, desc)


def local_prediction(scores: torch.Tensor, neighbourhood: torch.Tensor) -> torch.Tensor:
    """Class id of the best candidate: ``(N, k)`` scores -> ``(N,)``."""
    return neighbourhood.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Stateful front end


class DescriptionSelector:
    """Description selection over one pool with one CLIP backbone.

    Holds the caption and description embeddings (computed once, cached per backbone), the
    fallback table and, after :meth:`fit` or :meth:`load_lookup`, the lookup matrix ``S``.
    Tensors live on ``device`` (default: the model's device).
    """

    def __init__(
        self,
        backbone,
        pool: DescriptionPool,
        config: SelectionConfig | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.backbone = backbone
        self.pool = pool
        self.config = config or SelectionConfig()
        if self.config.k > pool.num_classes:
            raise ValueError(
                f"neighbourhood size k={self.config.k} exceeds the pool's {pool.num_classes} "
                "classes; lower SelectionConfig.k"
            )
        empty = pool.empty_classes()
        if empty:
            raise ValueError(
                f"classes without any description in pool {pool.source!r}: {empty}. Load the "
                "pool with load_pool(path, fallback=<DCLIP pool of the same dataset>) as DisCLIP "
                "does, or add descriptions."
            )
        self.device = torch.device(device) if device is not None else model_device(backbone.model)
        bs = self.config.batch_size
        self.captions = [self.config.caption_template.format(c=c) for c in pool.classnames]
        self.caption_emb = encode_texts(backbone, self.captions, bs).to(self.device)  # (C, D)
        self.description_emb = encode_texts(backbone, list(pool.descriptions), bs).to(
            self.device
        )  # (P, D)
        self.fallback = fallback_table(pool, self.config.m).to(self.device)  # (C, m)
        # LLM-assigned weights: row c averages class c's own descriptions. (C, P)
        weights = torch.zeros(pool.num_classes, len(pool.descriptions))
        for c, idx in enumerate(pool.class_indices):
            weights[c, list(idx)] = 1.0 / len(idx)
        self.llm_weights = weights.to(self.device)
        self.lookup: torch.Tensor | None = None
        self.n_reference_used: int | None = None

    # -- images
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> normalised ``(B, D)`` on ``self.device``."""
        return encode_images(self.backbone, images, self.config.batch_size).to(self.device)

    # -- lookup matrix
    def fit(self, ref_emb: torch.Tensor, ref_labels: torch.Tensor) -> DescriptionSelector:
        """Build ``S`` from reference image embeddings ``(R, D)`` and labels ``(R,)``
        (pool class ids)."""
        self.lookup, self.n_reference_used = lookup_matrix(
            ref_emb.to(self.device),
            ref_labels,
            self.description_emb,
            self.pool.num_classes,
            self.config.n_reference,
        )
        return self

    def _require_lookup(self) -> torch.Tensor:
        if self.lookup is None:
            raise RuntimeError(
                "no lookup matrix: call fit(reference_embeddings, labels) or "
                "load_lookup(path) first"
            )
        return self.lookup

    def save_lookup(self, path: str | os.PathLike) -> None:
        """Write ``S`` with the pool's classes and descriptions (safetensors, atomic)."""
        from safetensors.torch import save

        lookup = self._require_lookup()
        meta = {
            "classnames": json.dumps(list(self.pool.classnames)),
            "descriptions": json.dumps(list(self.pool.descriptions)),
            "n_reference_used": str(self.n_reference_used),
            "config": json.dumps(asdict(self.config)),
            "embed_dim": str(int(self.description_emb.shape[1])),
        }
        data = save({"lookup": lookup.detach().float().cpu().contiguous()}, meta)
        atomic_write_bytes(path, data)

    @staticmethod
    def lookup_classnames(path: str | os.PathLike) -> list[str]:
        """Class names (in order) of a lookup matrix written by :meth:`save_lookup`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "classnames" not in meta:
            raise ValueError(f"{str(path)!r} is not a lookup matrix written by save_lookup()")
        return json.loads(meta["classnames"])

    def load_lookup(self, path: str | os.PathLike) -> DescriptionSelector:
        """Read ``S`` written by :meth:`save_lookup`; the pool must be the same."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            lookup = f.get_tensor("lookup")
        if json.loads(meta.get("classnames", "null")) != list(self.pool.classnames) or json.loads(
            meta.get("descriptions", "null")
        ) != list(self.pool.descriptions):
            raise ValueError(
                f"lookup matrix {str(path)!r} was built for another pool (classes or "
                f"descriptions differ from {self.pool.source!r}); rebuild it with fit()"
            )
        self.lookup = lookup.to(self.device)
        self.n_reference_used = int(meta.get("n_reference_used", "0")) or None
        return self

    # -- selection and scores
    def neighbourhood(self, image_emb: torch.Tensor) -> torch.Tensor:
        """``(N, k)`` top-k classes per image by classname prompt."""
        return label_neighbourhood(image_emb.to(self.device), self.caption_emb, self.config.k)

    def select(
        self, image_emb: torch.Tensor, neighbourhood: torch.Tensor | None = None
    ) -> Selection:
        """Selection for every image (its own neighbourhood unless one is given)."""
        if neighbourhood is None:
            neighbourhood = self.neighbourhood(image_emb)
        return select_descriptions(
            self._require_lookup(),
            neighbourhood,
            self.config.m,
            self.fallback,
            chunk=self.config.batch_size,
        )

    def score_parts(self, image_emb: torch.Tensor, selection: Selection) -> ScoreParts:
        """Classname-free score terms (combine with :meth:`ScoreParts.scores`)."""
        return classname_free_parts(
            image_emb.to(self.device),
            self.caption_emb,
            self.description_emb,
            selection.to(self.device),
        )

    def classname_scores(self, image_emb: torch.Tensor) -> torch.Tensor:
        """``(N, C)`` cosine to every classname prompt (the CLIP baseline)."""
        return image_emb.to(self.device) @ self.caption_emb.T

    def llm_assigned_scores(self, image_emb: torch.Tensor, w_cls: float) -> torch.Tensor:
        """``(N, C)``: ``w_cls * caption + mean over the class's own LLM descriptions``."""
        image_emb = image_emb.to(self.device)
        desc = (image_emb @ self.description_emb.T) @ self.llm_weights.T  # (N, P) @ (P, C)
        return w_cls * (image_emb @ self.caption_emb.T) + desc

    def classname_containing_scores(
        self, image_emb: torch.Tensor, selection: Selection
    ) -> torch.Tensor:
        """``(N, k)``: mean cosine to ``"A photo of a {c}, {d}."`` over the selected ``d``."""
        image_emb = image_emb.to(self.device)
        hood = selection.neighbourhood.cpu()
        idx = selection.indices.cpu()
        n, k, m = idx.shape
        pairs = torch.stack([hood.unsqueeze(-1).expand(n, k, m), idx], dim=-1)  # (N, k, m, 2)
        flat = pairs.view(-1, 2)  # (N*k*m, 2)
        valid = flat[:, 1] >= 0
        uniq, inverse = torch.unique(flat[valid], dim=0, return_inverse=True)
        texts = [
            self.config.combined_template.format(
                c=self.pool.classnames[c], d=self.pool.descriptions[d]
            )
            for c, d in uniq.tolist()
        ]
        emb = encode_texts(self.backbone, texts, self.config.batch_size).to(self.device)  # (U, D)
        rows = torch.zeros(flat.shape[0], dtype=torch.long)
        rows[valid] = inverse
        img_rows = torch.arange(n).repeat_interleave(k * m)  # (N*k*m,)
        sims = (image_emb[img_rows.to(self.device)] * emb[rows.to(self.device)]).sum(-1)
        sims = sims.view(n, k, m)  # (N*k*m,) -> (N, k, m)
        return masked_mean(sims, selection.valid.to(self.device))

    def selected_texts(self, selection: Selection, i: int) -> dict[str, list[str]]:
        """Image ``i``'s selected descriptions, ``{candidate classname: [texts]}``."""
        out = {}
        for c, row in zip(selection.neighbourhood[i].tolist(), selection.indices[i].tolist()):
            out[self.pool.classnames[c]] = [self.pool.descriptions[d] for d in row if d >= 0]
        return out
