"""Description-selection CLIP critic for text-to-image prompts that name a class.

For a prompt such as ``"a photo of a cat"`` the critic finds the named class (from
``metadata["class"]``, else matched in the prompt), forms the image's local label
neighbourhood *around that class* — the named class plus the ``k - 1`` other classes the image
most resembles by classname prompt — selects descriptions for every candidate with DisCLIP's
dominance rule (:mod:`vlm_tools.description_selection`) and scores each candidate
classname-free (``w_cls * cos(img, "A photo of a {c}.") + mean cos(img, selected d)``,
``w_cls = 0`` by default). The reward is the **margin** of the named class:
``score(named) - max_{other candidates} score``; positive when the image is, by the
descriptions, more the named class than any look-alike. ``info`` holds the named class's
selected descriptions and their similarities: the human-readable explanation.

Reward contract (:mod:`reward.contract`): ``rewards, info = critic(images, prompts,
metadata)``; images ``(B, 3, H, W)`` in [0, 1] on the sampling device; rewards float32 ``(B,)``
on the images' device; ``info`` a dict of per-sample lists.

A prompt naming no known class is a ``ValueError`` (``on_unknown_class="error"``, default), or,
with ``on_unknown_class="neutral"``, gets the reward ``neutral_value`` (default 0.0: "no
preference", the margin of a tie) and ``info["class"] = None``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vlm_tools.description_selection import (
    DescriptionSelector,
    SelectionConfig,
    neighbourhood_with,
    selected_description_similarity,
)
from vlm_tools.descriptions import load_pool, normalize_classname

ON_UNKNOWN = ("error", "neutral")


@dataclass
class DescriptionCriticConfig:
    """Everything :meth:`DescriptionCritic.from_config` needs to build a critic."""

    pool: str
    """Path of the description pool (DCLIP or DisCLIP JSON)."""
    lookup: str | None = None
    """Path of a lookup matrix ``S`` written by ``hyperalign disclip`` (``lookup.safetensors``
    in its output folder) for this pool and backbone. Give this or ``reference_root``."""
    reference_root: str | None = None
    """Image folder ``root/class_name/*.jpg`` of reference images to build ``S`` from."""
    fallback_pool: str | None = None
    """Pool whose descriptions fill classes that have none in ``pool`` (DisCLIP: the DCLIP
    pool of the same dataset)."""
    backbone: str = "ViT-B-32"
    """open_clip architecture (the paper's CLIP ViT-B/32)."""
    pretrained: str | None = "openai"
    """open_clip pretrained tag or weights file; None = random weights (tests only)."""
    device: str = "cpu"
    """Device of the CLIP model and of the selection math."""
    k: int = 3
    """Neighbourhood size (named class + k-1 look-alikes)."""
    m: int = 5
    """Descriptions selected per candidate."""
    n_reference: int = 1000
    """Reference images per class for ``S`` (lowered to the smallest class)."""
    w_cls: float = 0.0
    """Weight of the classname prompt in the score; 0 = fully classname-free."""
    on_unknown_class: str = "error"
    """What a prompt naming no known class gets: "error" (ValueError) or "neutral"."""
    neutral_value: float = 0.0
    """Reward of such a prompt when ``on_unknown_class="neutral"``."""
    batch_size: int = 64
    """Images per CLIP forward pass."""


class ClassMatcher:
    """Finds the pool class a prompt names.

    A class matches when its normalised name (:func:`normalize_classname`) occurs in the
    normalised prompt as whole words, optionally followed by a plural "s"/"es". Among
    matches, the longest name wins ("sea lion" over "lion"), then the earliest in the prompt.
    """

    def __init__(self, classnames: Sequence[str]) -> None:
        self.classnames = list(classnames)
        self._patterns = [
            re.compile(r"(?<!\w)" + re.escape(normalize_classname(n)) + r"(?:e?s)?(?!\w)")
            for n in self.classnames
        ]

    def __call__(self, prompt: str) -> int | None:
        text = " ".join(prompt.lower().replace("_", " ").replace("-", " ").split())
        best: tuple[int, int, int] | None = None  # (-length, position, class id)
        for c, pat in enumerate(self._patterns):
            hit = pat.search(text)
            if hit is not None:
                key = (-len(normalize_classname(self.classnames[c])), hit.start(), c)
                best = key if best is None or key < best else best
        return None if best is None else best[2]


class DescriptionCritic:
    """Reward: margin of the prompt's named class under selected classname-free
    descriptions (see module doc). Picklable; state in ``__init__``, work in ``__call__``."""

    def __init__(
        self,
        selector: DescriptionSelector,
        w_cls: float = 0.0,
        on_unknown_class: str = "error",
        neutral_value: float = 0.0,
    ) -> None:
        if on_unknown_class not in ON_UNKNOWN:
            raise ValueError(
                f"on_unknown_class must be one of {ON_UNKNOWN}, got {on_unknown_class!r}"
            )
        if selector.config.k < 2:
            raise ValueError("the critic needs a neighbourhood of k >= 2 classes to form a margin")
        selector._require_lookup()
        self.selector = selector
        self.w_cls = float(w_cls)
        self.on_unknown_class = on_unknown_class
        self.neutral_value = float(neutral_value)
        self.matcher = ClassMatcher(selector.pool.classnames)

    @classmethod
    def from_config(cls, config: DescriptionCriticConfig) -> DescriptionCritic:
        """Load the backbone and pool, and the lookup matrix (or build it from references)."""
        from reward.backbone import load_backbone

        if (config.lookup is None) == (config.reference_root is None):
            raise ValueError(
                "DescriptionCriticConfig: give exactly one of lookup (a saved "
                "lookup matrix) or reference_root (an image folder)"
            )
        backbone = load_backbone(config.backbone, config.pretrained, device=config.device)
        pool = load_pool(config.pool, fallback=config.fallback_pool)
        sel_cfg = SelectionConfig(
            k=config.k, m=config.m, n_reference=config.n_reference, batch_size=config.batch_size
        )
        if config.lookup is not None:
            # The matrix covers the classes it was built for (e.g. an evaluated folder's).
            pool = pool.for_classes(DescriptionSelector.lookup_classnames(config.lookup))
            selector = DescriptionSelector(backbone, pool, sel_cfg).load_lookup(config.lookup)
        else:
            from vlm_tools.description_cli import encode_folder, scan_image_folder

            folder = scan_image_folder(config.reference_root)
            pool = pool.for_classes(folder.classnames)
            selector = DescriptionSelector(backbone, pool, sel_cfg)
            emb, labels = encode_folder(selector, folder.paths, folder.labels)
            selector.fit(emb, labels)
        return cls(selector, config.w_cls, config.on_unknown_class, config.neutral_value)

    def class_of(self, prompt: str, meta: dict | None) -> int | None:
        """Pool class id named by ``meta["class"]`` (if present) or by the prompt."""
        if meta and meta.get("class") is not None:
            try:
                return self.selector.pool.index_of(str(meta["class"]))
            except KeyError:
                raise ValueError(
                    f"metadata class {meta['class']!r} is not a class of the pool "
                    f"{self.selector.pool.source!r}; known classes (first 20): "
                    f"{list(self.selector.pool.classnames[:20])}"
                ) from None
        return self.matcher(prompt)

    @torch.no_grad()
    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[dict] | None = None,
    ) -> tuple[torch.Tensor, dict[str, list]]:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        b = images.shape[0]
        if len(prompts) != b:
            raise ValueError(f"{b} images but {len(prompts)} prompts")
        metadata = list(metadata) if metadata is not None else [{}] * b
        if len(metadata) != b:
            raise ValueError(f"{b} images but {len(metadata)} metadata dicts")
        classes = [self.class_of(p, md) for p, md in zip(prompts, metadata)]
        unknown = [i for i, c in enumerate(classes) if c is None]
        if unknown and self.on_unknown_class == "error":
            raise ValueError(
                f"prompts naming no class of the pool {self.selector.pool.source!r}: "
                f"{[prompts[i] for i in unknown][:5]}. Put the class in metadata['class'], use "
                "a pool with this class, or build the critic with on_unknown_class='neutral' "
                f"(reward {self.neutral_value})."
            )
        rewards = torch.full((b,), self.neutral_value, dtype=torch.float32)
        info: dict[str, list] = {
            "class": [None] * b,
            "neighbourhood": [[] for _ in range(b)],
            "selected_descriptions": [[] for _ in range(b)],
            "description_similarities": [[] for _ in range(b)],
            "fallback": [False] * b,
            "candidate_scores": [{} for _ in range(b)],
        }
        known = [i for i in range(b) if classes[i] is not None]
        if known:
            sel = self.selector
            emb = sel.encode_images(images[known])  # (K, D)
            named = torch.tensor([classes[i] for i in known], device=sel.device)
            hood = neighbourhood_with(emb, sel.caption_emb, named, sel.config.k)  # (K, k)
            selection = sel.select(emb, hood)
            scores = sel.score_parts(emb, selection).scores(self.w_cls)  # (K, k)
            margin = scores[:, 0] - scores[:, 1:].max(dim=1).values  # named class is column 0
            sims = selected_description_similarity(emb, sel.description_emb, selection)
            rewards[known] = margin.float().cpu()
            for row, i in enumerate(known):
                cand = selection.neighbourhood[row].tolist()
                idx = selection.indices[row, 0].tolist()
                info["class"][i] = sel.pool.classnames[cand[0]]
                info["neighbourhood"][i] = [sel.pool.classnames[c] for c in cand]
                info["selected_descriptions"][i] = [sel.pool.descriptions[d] for d in idx if d >= 0]
                info["description_similarities"][i] = [
                    float(s) for s, d in zip(sims[row, 0].tolist(), idx) if d >= 0
                ]
                info["fallback"][i] = bool(selection.fallback[row, 0])
                info["candidate_scores"][i] = {
                    sel.pool.classnames[c]: float(s) for c, s in zip(cand, scores[row].tolist())
                }
        return rewards.to(images.device), info
