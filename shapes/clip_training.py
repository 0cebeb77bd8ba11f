"""Contrastive pretraining of the tiny shapes CLIP (``shapes.assets.CLIP_ARCH``) on scene-caption pairs.

Every step of :func:`train` draws ``batch_size`` prompts from the shapes grammar, renders one
faithful scene per prompt (on the fly, 64 x 64, deterministic from the seed) and takes a
symmetric InfoNCE step (CLIP's loss, :func:`contrastive_loss`; identical captions in a batch
count as positives of each other). Optional negatives: one-word caption edits
(:func:`hard_negatives`, NegCLIP-style) and perturbed scenes as negative images
(:func:`scenes_and_negatives`). Prompts of the *held-out* bucket (:func:`is_heldout_prompt`, a
hash of the text, about 20 % of all prompts) are never trained on; :func:`evaluate` reports
zero-shot retrieval on them:

- ``i2t@1``: an image retrieves its own caption among ``eval_prompts`` held-out captions;
- ``t2i@1``: a caption retrieves its image among as many images;
- ``hard@1``: an image picks its caption against one-edit variants of it (a colour, shape,
  size, count or relation word changed; see :func:`hard_negatives`);
- ``img_pair``: a caption prefers its faithful scene to each one-perturbation variant of it
  (``img_pair_<kind>`` per kind of :data:`shapes.perturb.KINDS`).

:func:`save_clip` writes the open_clip weights as safetensors (atomically) and, next to them,
``<out>.json`` with the resolved config and the metrics. Loading:
``reward.backbone.load_backbone(CLIP_ARCH, "<out>")``. The shipped weights are
``shapes/assets/reward/clip.safetensors`` (``scripts/train_shapes_clip.py`` rebuilds them).

Reproducibility: same seed, torch version, CPU kind and ``threads`` give bit-identical
weights; other thread counts or CPUs change the float summation order, hence the weights in
the last bits and the metrics slightly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hyperalign.common import atomic_write_bytes, atomic_write_json
from shapes.assets import register_clip_config
from shapes.perturb import KINDS, faithful_scene, perturb
from shapes.prompts import Entity, PromptSampler, PromptSpec, Relation, sample_prompt
from shapes.styles import sample_style, sample_world_style
from shapes.world import (
    COLORS,
    RELATION_AXES,
    RELATIONS,
    SHAPES,
    SIZES,
    RenderConfig,
    WorldConfig,
    render,
    to_tensor,
)

__all__ = [
    "HELDOUT_BUCKETS",
    "ClipTrainConfig",
    "Encoder",
    "contrastive_loss",
    "evaluate",
    "hard_negatives",
    "is_heldout_prompt",
    "relation_loss",
    "relation_quads",
    "render_batch",
    "sample_specs",
    "save_clip",
    "scenes_and_negatives",
    "train",
]

STYLED_SUPERSAMPLE = 2
"""Supersampling of the styled renders of CLIP training and evaluation."""

HELDOUT_BUCKETS = 5
"""A prompt is held out when ``sha1(text) mod HELDOUT_BUCKETS == 0`` (about 20 %)."""


@dataclass
class ClipTrainConfig:
    """Pretraining of the tiny shapes CLIP; every run saves this resolved config."""

    seed: int = 0
    """Master seed: model init, prompt/scene stream and the evaluation set derive from it."""
    steps: int = 600
    """Optimiser steps."""
    batch_size: int = 128
    """Scene-caption pairs per step (also the number of in-batch negatives + 1)."""
    lr: float = 2e-3
    """Peak AdamW learning rate (after linear warm-up, then cosine decay to 10 %)."""
    hard_negatives: int = 0
    """One-word-edit negative captions per pair (NegCLIP-style; 0 = plain CLIP loss). Measured
    at 600 steps: 1 or 3 did not make the towers shape- or relation-aware (held-out hard@1
    0.475 / 0.485 vs 0.545 without), so the shipped CLIP uses 0."""
    hard_negative_images: float = 0.0
    """Image-side hard negatives per pair: that many (in expectation; 1.0 = one each) scenes
    made from the pair's faithful scene by one perturbation of ``shapes.perturb`` (shape
    swap, relation flip, extra object, ...), added as negative *images* for the captions. They
    force the image tower to see what the captions say beyond colour."""
    arch: str = ""
    """open_clip architecture as a JSON file (``{"embed_dim", "vision_cfg", "text_cfg"}``,
    registered under its file stem); empty: the shipped ``shapes.assets.CLIP_CONFIG``."""
    negative_kinds: tuple[str, ...] = ()
    """Perturbation kinds the image-side hard negatives are drawn from (empty: all of
    ``shapes.perturb.KINDS``)."""
    style: str = "default"
    """Style family of the training renders (``shapes.styles.STYLE_FAMILIES``): a layout world
    per prompt and a rendering style per image; a pair's hard negatives share its style."""
    relation_pairs: int = 0
    """Relation quadruples per step (0 = off): that many extra relation prompts, each with
    its mirrored caption (the opposite relation word), its faithful scene and that scene
    mirrored along the relation's axis (:func:`relation_quads`); :func:`relation_loss` asks
    each caption to pick its scene from the two and each scene its caption. Alone it leaves
    the held-out relation flip at chance (from CLIP v3: 0.49 after 100 steps; BENCHMARKS.md,
    "The relation loss"); with ``relation_probe_weight`` it teaches relations (CLIP v4:
    32 quadruples per step, probe weight 5; not shipped, see below)."""
    relation_weight: float = 1.0
    """Weight of :func:`relation_loss` beside the contrastive loss."""
    relation_probe_weight: float = 0.0
    """Weight of :func:`position_probe_loss` on the relation quadruples (0 = off; needs
    ``relation_pairs``): one linear head, shared by both towers, reads from a unit feature
    where the subject and the object of its relation lie along the relation's axis, per colour
    and per shape (:func:`relation_targets`), so both towers must encode the same position
    directions. The head is discarded after training. Why it works where the relation loss
    alone did not: v3's ResNet trunk holds the layout (a linear probe reads it from the last
    feature map at 0.99) but its attention pool and the caption tower drop it (0.54, 0.49:
    chance), so the quadruples' feature differences share no direction and their loss has no
    mean gradient; one random head, trained with the towers, gives both of them the same
    directions to write to (a zero-initialised head stays at zero: no change in 75 steps).
    150 steps from v3 at weight 5: relation flip 0.47 -> 1.00 on held-out prompts (0.50 ->
    0.94 in the held-out style), probes 0.97 and 0.89; at weight 1, still 0.46 after 100
    steps. 100 more steps without the probe (CLIP v4) keep the relations (1.00 / 0.89) and
    restore the ranking across prompts; the shipped CLIP is still v3 (BENCHMARKS.md, "The
    position probe")."""
    relation_max_cos: float = 1.0
    """Hinge on the cosine of each relation caption and its mirror, ``mean relu(cos(c, c') -
    relation_max_cos)``, added to :func:`relation_loss` (1.0 = off). Tried at 0.9 against
    the towers' blindness to the mirror (caption cosines 0.999 on CLIP v3): no effect, as
    the gradient of a cosine vanishes near 1."""
    eval_styles: tuple[str, ...] = ("heldout",)
    """Style families evaluated besides the plain ``default`` one (metrics ``<style>/...``)."""
    init: str = ""
    """Start from these weights (same architecture) (a .safetensors file) instead of a random init."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices (not on biases, norms, embeddings, logit scale)."""
    image_size: int = 64
    """Render size in pixels (the shipped architecture takes 64 x 64 input)."""
    eval_prompts: int = 200
    """Held-out prompts in the retrieval evaluation."""
    eval_every: int = 200
    """Evaluate every this many steps (0: only at the end)."""
    log_every: int = 25
    """Print the training loss every this many steps."""
    threads: int = 1
    """torch CPU threads (at most 2: the machine is shared; on an oversubscribed CPU one thread
    is faster than two). Bit-identical results need the same value."""

    def __post_init__(self) -> None:
        if self.relation_pairs < 0:
            raise ValueError(f"relation_pairs must be >= 0 (0 = off), got {self.relation_pairs}")
        if self.relation_probe_weight < 0:
            raise ValueError(
                f"relation_probe_weight must be >= 0 (0 = off), got {self.relation_probe_weight}"
            )
        if self.relation_probe_weight > 0 and not self.relation_pairs:
            raise ValueError("relation_probe_weight needs relation_pairs > 0 (its quadruples)")
        if not -1.0 <= self.relation_max_cos <= 1.0:
            raise ValueError(
                f"relation_max_cos is a cosine in [-1, 1] (1 = off), got {self.relation_max_cos}"
            )


# ------------------------------------------------------------------------------------ data


def is_heldout_prompt(text: str) -> bool:
    """Whether ``text`` is in the held-out bucket (never used for CLIP pretraining)."""
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % HELDOUT_BUCKETS == 0


def sample_specs(
    rng: np.random.Generator, n: int, heldout: bool, sampler: PromptSampler | None = None
) -> list[PromptSpec]:
    """``n`` prompts from the grammar, all inside (``heldout=True``) or outside the bucket."""
    out = []
    while len(out) < n:
        spec = sample_prompt(rng, sampler)
        if is_heldout_prompt(spec.text) == heldout:
            out.append(spec)
    return out


def draw_style(
    rng: np.random.Generator, style: str, image_size: int
) -> tuple[WorldConfig | None, RenderConfig]:
    """A layout world and a rendering of style family ``style`` (``default``: the plain
    rendering, drawing nothing from ``rng``)."""
    if style == "default":
        return None, RenderConfig(image_size=image_size)
    world = sample_world_style(rng, style)
    cfg = sample_style(rng, style)
    # Styled renders are composited in float: 2x supersampling halves the cost of 4x and
    # looks the same at 64 px (the plain renderer keeps its 4x).
    return world, dataclasses.replace(
        cfg, image_size=image_size, supersample=min(cfg.supersample, STYLED_SUPERSAMPLE)
    )


def render_batch(
    specs: list[PromptSpec], rng: np.random.Generator, image_size: int, style: str = "default"
) -> torch.Tensor:
    """One faithful scene per prompt -> float tensor ``(B, 3, S, S)`` in [0, 1]."""
    out = []
    for s in specs:
        world, cfg = draw_style(rng, style, image_size)
        out.append(render(faithful_scene(s, rng, world), cfg))
    return to_tensor(np.stack(out))


def scenes_and_negatives(
    specs: list[PromptSpec],
    rng: np.random.Generator,
    image_size: int,
    rate: float,
    kinds: tuple[str, ...] = (),
    style: str = "default",
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """One faithful scene per prompt ``(B, 3, S, S)``, image-side hard negatives
    ``(M, 3, S, S)``: for each prompt, ``n`` = ``rate`` rounded at random (``floor(rate)``
    plus one with probability ``frac(rate)``) versions of its faithful scene, each changed by
    one perturbation kind (of ``kinds``; empty: all of ``KINDS``). The first ``2 n`` kinds of a random order are tried and those that
    do not apply are skipped, so a prompt may get fewer than ``n`` (M ~ 0.9 B at rate 1);
    and, for each negative, the index of the prompt it was made from."""
    pos, neg, owner = [], [], []
    for j, spec in enumerate(specs):
        world, cfg = draw_style(rng, style, image_size)
        scene = faithful_scene(spec, rng, world)
        pos.append(render(scene, cfg))
        n = int(rate) + int(rng.random() < rate - int(rate))
        for kind in rng.permutation(kinds or KINDS)[: 2 * n]:
            if n == 0:
                break
            p = perturb(spec, scene, str(kind), rng, world)
            if p is not None:
                neg.append(render(p.scene, cfg))
                owner.append(j)
                n -= 1
    empty = torch.zeros(0, 3, image_size, image_size)
    return to_tensor(np.stack(pos)), (to_tensor(np.stack(neg)) if neg else empty), owner


def _with(spec: PromptSpec, i: int, entity: Entity) -> str:
    """The text of ``spec`` with entity ``i`` replaced by ``entity``."""
    ents = list(spec.entities)
    ents[i] = entity
    return PromptSpec(tuple(ents), spec.relation).text


def _entity_edits(spec: PromptSpec, i: int, used: set[tuple[str, str]]) -> list[str]:
    """Captions with one word of entity ``i`` changed: colour, shape, size or count."""
    e = spec.entities[i]
    out = []
    for c in COLORS:
        if c != e.color and (c, e.shape) not in used:
            out.append(_with(spec, i, dataclasses.replace(e, color=c)))
    for s in SHAPES:
        if s != e.shape and (e.color, s) not in used:
            out.append(_with(spec, i, dataclasses.replace(e, shape=s)))
    if e.size is not None:
        flip = SIZES[1 - SIZES.index(e.size)]
        out.append(_with(spec, i, dataclasses.replace(e, size=flip)))
    if spec.relation is None and e.count > 1:
        for k in (2, 3):
            if k != e.count and spec.n_objects - e.count + k <= 3:
                out.append(_with(spec, i, dataclasses.replace(e, count=k)))
    return out


def hard_negatives(spec: PromptSpec, rng: np.random.Generator, n: int = 4) -> list[str]:
    """Up to ``n`` captions that differ from ``spec`` by one word (colour, shape, size, count
    or relation), each a valid prompt of the grammar and different from ``spec.text``."""
    used = {(e.color, e.shape) for e in spec.entities}
    cands: list[str] = []
    for i in range(len(spec.entities)):
        cands += _entity_edits(spec, i, used)
    if spec.relation is not None:
        for r in RELATIONS:
            if r != spec.relation.relation:
                cands.append(PromptSpec(spec.entities, Relation(0, r, 1)).text)
    cands = sorted(set(cands) - {spec.text})
    pick = rng.permutation(len(cands))[:n]
    return [cands[int(k)] for k in pick]


# ------------------------------------------------------------------------------ the model


class Encoder:
    """Normalised CLIP features of images in [0, 1] and of captions."""

    def __init__(self, backbone) -> None:
        self.b = backbone
        self.mean = torch.tensor(backbone.mean).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.std).view(1, 3, 1, 1)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` in [0, 1] -> unit features ``(B, D)``."""
        return self.b.model.encode_image((x - self.mean) / self.std, normalize=True)

    def texts(self, texts: list[str]) -> torch.Tensor:
        """B captions -> unit features ``(B, D)``."""
        return self.b.model.encode_text(self.b.tokenizer(texts), normalize=True)


def _eval_specs(cfg: ClipTrainConfig, rng: np.random.Generator) -> list[PromptSpec]:
    """``cfg.eval_prompts`` distinct held-out prompts."""
    specs, seen = [], set()
    while len(specs) < cfg.eval_prompts:
        (spec,) = sample_specs(rng, 1, heldout=True)
        if spec.text not in seen:
            seen.add(spec.text)
            specs.append(spec)
    return specs


def _retrieval(enc: Encoder, specs, images) -> tuple[torch.Tensor, float, float]:
    """Image features ``(N, D)`` and the i2t@1, t2i@1 accuracies of ``images`` vs captions."""
    f_i = torch.cat([enc.images(images[k : k + 100]) for k in range(0, len(specs), 100)])
    texts = [s.text for s in specs]
    f_t = torch.cat([enc.texts(texts[k : k + 100]) for k in range(0, len(texts), 100)])
    sim = f_i @ f_t.T  # (N images, N captions)
    target = torch.arange(len(specs))
    i2t = float((sim.argmax(1) == target).float().mean())
    t2i = float((sim.argmax(0) == target).float().mean())
    return f_i, i2t, t2i


def _image_pairs(enc: Encoder, specs, cfg: ClipTrainConfig, style: str) -> dict[str, list[bool]]:
    """Per kind: does the caption prefer its faithful scene to the perturbed one (both drawn
    in one style of family ``style``)?"""
    prng = np.random.default_rng([cfg.seed, 98])
    wins: dict[str, list[bool]] = {k: [] for k in KINDS}
    for spec in specs[:100]:
        world, rcfg = draw_style(prng, style, cfg.image_size)
        scene = faithful_scene(spec, prng, world)
        variants = [(k, perturb(spec, scene, k, prng, world)) for k in KINDS]
        variants = [(k, v) for k, v in variants if v is not None]
        imgs = [render(scene, rcfg)] + [render(v.scene, rcfg) for _, v in variants]
        sims = enc.images(to_tensor(np.stack(imgs))) @ enc.texts([spec.text])[0]
        for j, (k, _) in enumerate(variants):
            wins[k].append(bool(sims[0] > sims[j + 1]))
    return wins


@torch.no_grad()
def evaluate(enc: Encoder, cfg: ClipTrainConfig) -> dict[str, float]:
    """Zero-shot retrieval on held-out prompts (see the module docstring), in the plain style
    and in each of ``cfg.eval_styles`` (keys ``<style>/<metric>``; the same prompts)."""
    out = _evaluate_style(enc, cfg, "default")
    for style in cfg.eval_styles:
        if style != "default":
            out.update({f"{style}/{k}": v for k, v in _evaluate_style(enc, cfg, style).items()})
    return out


def _evaluate_style(enc: Encoder, cfg: ClipTrainConfig, style: str) -> dict[str, float]:
    enc.b.model.eval()
    rng = np.random.default_rng([cfg.seed, 99])
    specs = _eval_specs(cfg, rng)
    images = render_batch(specs, rng, cfg.image_size, style)
    f_i, i2t, t2i = _retrieval(enc, specs, images)
    hard_ok = []
    for k, spec in enumerate(specs):
        negs = hard_negatives(spec, rng)
        if not negs:
            continue
        f_c = enc.texts([spec.text, *negs])  # (1 + n, D)
        hard_ok.append(int((f_c @ f_i[k]).argmax()) == 0)
    wins = _image_pairs(enc, specs, cfg, style)
    enc.b.model.train()
    return {
        "img_pair": float(np.mean([w for v in wins.values() for w in v])),
        **{f"img_pair_{k}": float(np.mean(v)) for k, v in wins.items() if v},
        "i2t@1": i2t,
        "t2i@1": t2i,
        "hard@1": float(np.mean(hard_ok)),
        "hard_chance": float(np.mean([1 / (1 + len(hard_negatives(s, rng))) for s in specs])),
        "chance": 1.0 / len(specs),
    }


# ------------------------------------------------------------------------------- training


def lr_at(step: int, cfg: ClipTrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to 10 % of it."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


_NO_DECAY = ("bias", "ln_", "norm", "embedding", "logit_scale", "class_embedding")


def make_optimizer(model: torch.nn.Module, cfg: ClipTrainConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not biases, norms, embeddings, scale)."""

    def decays(name: str, p: torch.Tensor) -> bool:
        return p.ndim >= 2 and not any(k in name for k in _NO_DECAY)

    decay = [p for n, p in model.named_parameters() if decays(n, p)]
    other = [p for n, p in model.named_parameters() if not decays(n, p)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )


def training_batch(rng: np.random.Generator, cfg: ClipTrainConfig):
    """One step's data: captions ``texts`` (B), scenes ``(B, 3, S, S)``, negative images
    ``(M, 3, S, S)`` or ``None``, and caption-side negatives (never held-out texts)."""
    specs = sample_specs(rng, cfg.batch_size, heldout=False)
    if cfg.hard_negative_images > 0:
        images, neg_images, _ = scenes_and_negatives(
            specs, rng, cfg.image_size, cfg.hard_negative_images, cfg.negative_kinds, cfg.style
        )
    else:
        images = render_batch(specs, rng, cfg.image_size, cfg.style)
        neg_images = None
    negs = [
        t
        for s in specs
        for t in (hard_negatives(s, rng, cfg.hard_negatives) if cfg.hard_negatives else [])
        if not is_heldout_prompt(t)
    ]
    return [s.text for s in specs], images, neg_images, negs


OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
"""Each relation and the one its mirrored scene satisfies."""


PROBE_SLOTS: tuple[tuple[str, str], ...] = tuple(
    (name, axis) for name in (*COLORS, *SHAPES) for axis in ("x", "y")
)
"""Outputs of the position probe: (colour or shape, axis)."""


def relation_targets(spec: PromptSpec) -> torch.Tensor:
    """Position-probe targets (len(PROBE_SLOTS),) of a relation prompt, in {-1, 0, +1}: along
    the relation's axis, -1 at the subject's colour and shape and +1 at the object's when the
    subject comes first (left of / above; y points down), the opposite for right of / below;
    0 (no target) elsewhere and for a colour or shape that another entity of the prompt
    shares (it would not say which object is meant)."""
    rel = spec.relation
    if rel is None:
        raise ValueError(f"{spec.text!r} has no relation")
    axis, direction = RELATION_AXES[rel.relation]
    sign = -float(direction)  # the subject lies before the object along `direction`
    out = torch.zeros(len(PROBE_SLOTS))
    for idx, value in ((rel.subject, sign), (rel.object, -sign)):
        for attr in ("color", "shape"):
            name = getattr(spec.entities[idx], attr)
            if sum(getattr(e, attr) == name for e in spec.entities) == 1:
                out[PROBE_SLOTS.index((name, axis))] = value
    return out


def position_probe_loss(head: torch.nn.Module, f: torch.Tensor, targets: torch.Tensor):
    """Logistic loss of the linear probe ``head`` on unit features ``f`` (M, D) against
    :func:`relation_targets` rows ``targets`` (M, P), over the non-zero targets."""
    z = head(f)  # (M, P)
    mask = targets != 0
    return F.softplus(-targets[mask] * z[mask]).mean()


def _probe_accuracy(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int) -> float:
    """Fit a linear logistic probe of the non-zero targets ``y`` (M, P) on the standardised
    features ``x`` (M, D) of the rows where ``train`` (M,) is true; its sign accuracy on the
    other rows."""
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mu) / sd
    head = torch.nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    xt, yt = x[train], y[train]
    for _ in range(steps):
        loss = position_probe_loss(head, xt, yt) + 1e-3 * head.weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z, t = head(x[~train]), y[~train]
        return float(((z * t)[t != 0] > 0).float().mean())


def position_probe_accuracy(
    enc: Encoder,
    rng: np.random.Generator,
    n_quads: int = 384,
    style: str = "train",
    steps: int = 2000,
    shuffle: bool = False,
) -> dict[str, float]:
    """Where does a CLIP keep (or lose) the layout a relation needs? Linear probes of the
    position targets of :func:`relation_targets` on ``n_quads`` relation quadruples (3/4 of
    the quadruples to fit, 1/4 to test; an item and its mirror, whose targets are opposite,
    always fall on the same side, else a probe that only recognises the prompt scores below
    chance): from the image embedding, the caption embedding and, for a ResNet tower, its last
    feature map before the attention pool (``trunk``). Accuracy 0.5 is chance. ``shuffle``
    permutes the targets over the examples (a control that must give chance)."""
    model, grabbed = enc.b.model, {}
    pool = getattr(model.visual, "attnpool", None)
    was_training = model.training
    model.eval()  # batch norm: running statistics, and leave them alone
    hook = None
    if pool is not None:
        hook = pool.register_forward_hook(
            lambda m, a, out: grabbed.setdefault("x", []).append(a[0])
        )
    feats: dict[str, list] = {"image": [], "text": []}
    ys, train = [], []
    try:
        with torch.no_grad():
            for start in range(0, n_quads, 64):
                n = min(64, n_quads - start)
                texts, images, y = relation_quads(rng, n, enc.b.image_size[0], style)
                feats["image"].append(enc.images(images))
                feats["text"].append(enc.texts(texts))
                ys.append(y)
                quad = torch.arange(n) < (3 * n) // 4  # (n,): the fitted quadruples
                train.append(torch.cat([quad, quad]))
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    y, train_rows = torch.cat(ys), torch.cat(train)
    if shuffle:
        y = y[torch.from_numpy(rng.permutation(len(y)))]
    out = {k: torch.cat(v) for k, v in feats.items()}
    if pool is not None:
        out["trunk"] = torch.cat(grabbed["x"]).flatten(1)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():  # the caller's RNG untouched
        torch.manual_seed(0)
        return {k: _probe_accuracy(x.float(), y, train_rows, steps) for k, x in out.items()}


def relation_quads(
    rng: np.random.Generator, n: int, image_size: int, style: str = "default"
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``n`` relation prompts outside the held-out bucket, with mirrored captions and scenes:
    captions ``[c_1..c_n, c'_1..c'_n]``, scenes ``(2n, 3, S, S)`` ``[I_1..I_n, I'_1..I'_n]``
    and their position-probe targets ``(2n, P)`` (:func:`relation_targets`; a scene shares
    its caption's), where ``c'_k`` has the opposite relation word of ``c_k`` and ``I'_k`` is
    ``I_k`` mirrored along the relation's axis (so ``I'_k`` shows ``c'_k``; one style per
    quadruple)."""
    texts, mirrored, pos, neg, targets = [], [], [], [], []
    while len(texts) < n:
        spec = sample_prompt(rng)
        if spec.relation is None:
            continue
        rel = spec.relation
        other = PromptSpec(spec.entities, Relation(rel.subject, OPPOSITE[rel.relation], rel.object))
        if is_heldout_prompt(spec.text) or is_heldout_prompt(other.text):
            continue
        world, cfg = draw_style(rng, style, image_size)
        scene = faithful_scene(spec, rng, world)
        flip = perturb(spec, scene, "relation_flip", rng, world)
        texts.append(spec.text)
        mirrored.append(other.text)
        pos.append(render(scene, cfg))
        neg.append(render(flip.scene, cfg))
        targets.append(relation_targets(spec))
    t = torch.stack(targets)
    return texts + mirrored, to_tensor(np.stack(pos + neg)), torch.cat([t, -t])


def relation_loss(
    logit_scale: torch.Tensor, f_i: torch.Tensor, f_t: torch.Tensor, max_cos: float = 1.0
) -> torch.Tensor:
    """Two-way InfoNCE inside each relation quadruple of :func:`relation_quads`: unit features
    ``f_i``, ``f_t`` (2n, D) in its order; caption ``c_k`` picks ``I_k`` over ``I'_k``,
    ``c'_k`` picks ``I'_k``, and each scene picks its caption of the two. Plus
    ``mean relu(cos(c_k, c'_k) - max_cos)`` when ``max_cos < 1``."""
    n = f_i.shape[0] // 2
    t = f_t.view(2, n, -1).transpose(0, 1)  # (n, 2 captions, D)
    i = f_i.view(2, n, -1).transpose(0, 1)  # (n, 2 scenes, D)
    logits = logit_scale.exp().clamp(max=100.0) * t @ i.transpose(1, 2)  # (n, caption, scene)
    target = torch.arange(2).repeat(n)
    t2i = F.cross_entropy(logits.reshape(2 * n, 2), target)
    i2t = F.cross_entropy(logits.transpose(1, 2).reshape(2 * n, 2), target)
    loss = 0.5 * (t2i + i2t)
    if max_cos < 1.0:
        loss = loss + F.relu((t[:, 0] * t[:, 1]).sum(-1) - max_cos).mean()
    return loss


def contrastive_loss(
    logit_scale: torch.Tensor,
    f_i: torch.Tensor,
    f_neg: torch.Tensor,
    f_t: torch.Tensor,
    texts: list[str],
    negs: list[str],
) -> torch.Tensor:
    """Symmetric InfoNCE of unit image features ``f_i`` (B, D) against caption features
    ``f_t`` (B + N, D: the batch captions, then N caption negatives); text -> image also
    against negative images ``f_neg`` (M, D). Identical captions are all positives (a caption
    negative may be another item's caption): soft targets over them."""

    # Evaluated per use (two graph nodes): the bit-for-bit rebuild of the shipped weights
    # depends on this order of summing the gradient.
    def scale() -> torch.Tensor:
        return logit_scale.exp().clamp(max=100.0)

    logits = scale() * f_i @ f_t.T  # (B, B + N)
    same = torch.tensor([[a == b for b in texts + negs] for a in texts], dtype=torch.float32)
    target = same / same.sum(1, keepdim=True)  # (B, B + N), rows sum to 1
    b = len(texts)
    t2i_target = same[:, :b].T / same[:, :b].T.sum(1, keepdim=True)  # (B, B)
    # Text -> image over the batch images, then the perturbed (never matching) ones.
    t2i_logits = torch.cat([logits[:, :b].T, scale() * f_t[:b] @ f_neg.T], 1)  # (B, B + M)
    t2i_target = F.pad(t2i_target, (0, f_neg.shape[0]))  # (B, B + M)
    return 0.5 * (
        F.cross_entropy(logits, target) + F.cross_entropy(t2i_logits.contiguous(), t2i_target)
    )


def _step_loss(enc: Encoder, model, rng: np.random.Generator, cfg: ClipTrainConfig, probe=None):
    """Draw one batch and return its loss (contrastive, plus the relation loss when on, plus
    the position probe's on both towers when ``probe``, a linear head, is given)."""
    texts, images, neg_images, negs = training_batch(rng, cfg)
    r_texts, r_images = [], images[:0]
    if cfg.relation_pairs:
        r_texts, r_images, r_targets = relation_quads(
            rng, cfg.relation_pairs, cfg.image_size, cfg.style
        )
    b, n_r = len(texts), len(r_texts)
    # One forward per tower (the ResNet's batch norm sees all images of the step together).
    parts = [images] + ([] if neg_images is None else [neg_images]) + ([r_images] if n_r else [])
    f_all = enc.images(parts[0] if len(parts) == 1 else torch.cat(parts))
    f_i, f_neg, f_ri = f_all[:b], f_all[b : len(f_all) - n_r], f_all[len(f_all) - n_r :]
    f_t = enc.texts(texts + negs + r_texts)  # batch captions, hard negatives, relation captions
    f_rt, f_t = f_t[len(f_t) - n_r :], f_t[: len(f_t) - n_r]
    loss = contrastive_loss(model.logit_scale, f_i, f_neg, f_t, texts, negs)
    if n_r:
        loss = loss + cfg.relation_weight * relation_loss(
            model.logit_scale, f_ri, f_rt, cfg.relation_max_cos
        )
        if probe is not None:
            both = torch.cat([f_ri, f_rt])
            loss = loss + cfg.relation_probe_weight * position_probe_loss(
                probe, both, torch.cat([r_targets, r_targets])
            )
    return loss


def format_metrics(m: dict[str, float]) -> str:
    """The retrieval metrics of :func:`evaluate`: one line per style."""
    lines = [_format_style(m)]
    for style in sorted({k.split("/", 1)[0] for k in m if "/" in k}):
        sub = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(style + "/")}
        lines.append(f"[{style} style] " + _format_style(sub))
    return "\n  ".join(lines)


def _format_style(m: dict[str, float]) -> str:
    return (
        f"i2t@1 {m['i2t@1']:.3f} t2i@1 {m['t2i@1']:.3f} (chance {m['chance']:.3f}), "
        f"hard@1 {m['hard@1']:.3f} (chance {m['hard_chance']:.3f}), image pairs "
        f"{m['img_pair']:.3f} ("
        + ", ".join(f"{k} {m[f'img_pair_{k}']:.2f}" for k in KINDS if f"img_pair_{k}" in m)
        + ")"
    )


def _log_step(step: int, loss: float, model, cfg: ClipTrainConfig, t0: float) -> None:
    el = time.time() - t0
    print(
        f"step {step + 1}/{cfg.steps} loss {loss:.4f} "
        f"scale {model.logit_scale.exp().item():.1f} lr {lr_at(step, cfg):.2e} "
        f"{el / 60:.1f} min (eta {el / (step + 1) * (cfg.steps - step - 1) / 60:.1f} min)",
        flush=True,
    )


def clip_arch(cfg: ClipTrainConfig) -> str:
    """Register ``cfg.arch`` (or the shipped architecture) with open_clip; returns its name."""
    if not cfg.arch:
        return register_clip_config()
    from reward.backbone import register_model_config

    return register_model_config(cfg.arch)


def train(cfg: ClipTrainConfig, out: str | Path | None) -> dict:
    """Train, evaluate, save (when ``out`` is given); returns the metrics, the evaluation
    history, the weights (``state``) and the minutes taken."""
    from reward.backbone import load_backbone

    arch = clip_arch(cfg)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(arch, cfg.init or None)
    model = backbone.model.train()
    enc = Encoder(backbone)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{arch}: {n_params / 1e6:.2f} M parameters, input {backbone.image_size}, context "
        f"{backbone.context_length}, embed {backbone.embed_dim}; {cfg.steps} steps x "
        f"{cfg.batch_size} pairs = {cfg.steps * cfg.batch_size} scenes",
        flush=True,
    )
    opt = make_optimizer(model, cfg)
    probe = None
    if cfg.relation_probe_weight > 0:
        # A random head, not zeros: at zero the towers get no gradient, and as long as their
        # features hold no layout the head gets none either.
        probe = torch.nn.Linear(backbone.embed_dim, len(PROBE_SLOTS), bias=False)
        torch.nn.init.normal_(probe.weight, std=1.0)
        opt.add_param_group({"params": list(probe.parameters()), "weight_decay": 0.0})
    rng = np.random.default_rng([cfg.seed, 1])
    history = []
    t0 = time.time()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = _step_loss(enc, model, rng, cfg, probe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step == 0:
            _log_step(step, loss.item(), model, cfg, t0)
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            m = evaluate(enc, cfg)
            history.append({"step": step + 1, **m})
            print(f"eval step {step + 1}: " + format_metrics(m), flush=True)
    metrics = evaluate(enc, cfg)
    history.append({"step": cfg.steps, **metrics})
    print("final held-out retrieval: " + format_metrics(metrics), flush=True)
    minutes = (time.time() - t0) / 60
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if out is not None:
        save_clip(out, state, cfg, metrics, history, minutes)
    return {"metrics": metrics, "history": history, "state": state, "minutes": minutes}


def save_clip(out: str | Path, state, cfg: ClipTrainConfig, metrics, history, minutes) -> None:
    """Write ``state`` to ``out`` (safetensors, atomically) and ``<out>.json`` beside it
    (architecture, config, metrics, history, minutes, torch version, SHA-256 of the weights)."""
    from safetensors.torch import save

    out = Path(out)
    # One metadata key: safetensors writes a map of several in no fixed order (bytes would vary).
    arch = clip_arch(cfg)
    data = save(state, metadata={"arch": arch})
    atomic_write_bytes(out, data)
    out.chmod(0o644)  # weights are shared data (temporary files are owner-only)
    info = {
        "arch": arch,
        "config": dataclasses.asdict(cfg),
        "metrics": metrics,
        "history": history,
        "minutes": round(minutes, 2),
        "torch": torch.__version__,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    side = out.with_suffix(".json")
    atomic_write_json(side, info)
    side.chmod(0o644)
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, sha256 {info['sha256'][:16]}) and {side}"
    )
