"""Pretraining of the tiny shapes CLIP (``shapes.clip_training``): negatives, a tiny run, saving."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from shapes.assets import CLIP_ARCH
from shapes.clip_training import (
    ClipTrainConfig,
    contrastive_loss,
    hard_negatives,
    is_heldout_prompt,
    sample_specs,
    scenes_and_negatives,
    train,
)
from shapes.prompts import parse_prompt


def test_image_side_hard_negatives():
    """Each caption gets perturbed versions of its own scene as negative images; they differ
    from the faithful render and none of them is faithful."""
    from shapes.oracle import oracle_alignment_batch

    rng = np.random.default_rng(3)
    specs = sample_specs(rng, 16, heldout=False)
    pos, neg, owner = scenes_and_negatives(specs, rng, 64, rate=1.0)
    assert pos.shape == (16, 3, 64, 64) and 12 <= neg.shape[0] <= 16  # ~1 per caption
    assert float(oracle_alignment_batch(pos, [s.text for s in specs]).min()) == 1.0
    # Every negative breaks at least one fact of its own caption.
    assert float(oracle_alignment_batch(neg, [specs[j].text for j in owner]).max()) < 1.0
    assert not any(torch.equal(neg[i], pos[j]) for i, j in enumerate(owner))
    _, none, _ = scenes_and_negatives(specs, rng, 64, rate=0.0)
    assert none.shape[0] == 0
    _, some, _ = scenes_and_negatives(specs * 4, rng, 64, rate=0.5)
    assert 16 <= some.shape[0] <= 48  # about half of 64


def test_caption_hard_negatives_change_one_word():
    rng = np.random.default_rng(0)
    spec = parse_prompt("a large red circle left of a blue square")
    negs = hard_negatives(spec, rng, n=50)
    assert negs and spec.text not in negs and len(set(negs)) == len(negs)
    words = spec.text.split()
    for text in negs:
        parse_prompt(text)  # a valid prompt of the grammar
        other = text.split()
        if len(other) == len(words):  # "left of" -> "above" changes the length
            assert sum(a != b for a, b in zip(words, other)) == 1, text


def test_heldout_bucket_is_disjoint_from_training_prompts():
    rng = np.random.default_rng(1)
    assert all(not is_heldout_prompt(s.text) for s in sample_specs(rng, 50, heldout=False))
    assert all(is_heldout_prompt(s.text) for s in sample_specs(rng, 20, heldout=True))


def test_contrastive_loss_treats_identical_captions_as_positives():
    f = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    scale = torch.tensor(np.log(10.0))
    empty = torch.zeros(0, 8)
    distinct = contrastive_loss(scale, f, empty, f, ["a", "b", "c"], [])
    # Items 0 and 1 share a caption: each may match either, so the loss changes.
    shared = contrastive_loss(scale, f, empty, f, ["a", "a", "c"], [])
    assert torch.isfinite(distinct) and torch.isfinite(shared) and shared != distinct
    # Negative images the captions should not match add to the text -> image term.
    with_negs = contrastive_loss(scale, f, f.flip(0), f, ["a", "b", "c"], [])
    assert with_negs > distinct


def test_tiny_training_run_saves_loadable_weights(tmp_path):
    from reward.backbone import load_backbone

    out = tmp_path / "clip.safetensors"
    cfg = ClipTrainConfig(
        steps=2, batch_size=8, eval_prompts=10, eval_every=0, hard_negative_images=0.5
    )
    result = train(cfg, out)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert info["config"]["steps"] == 2 and 0.0 <= info["metrics"]["i2t@1"] <= 1.0
    assert out.stat().st_mode & 0o777 == 0o644
    backbone = load_backbone(CLIP_ARCH, str(out))
    state = backbone.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in result["state"].items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json", "clip.safetensors"]


def test_styled_training_data_share_a_style_per_pair_and_repeat():
    """``style="train"``: renders differ from the plain ones, repeat from the seed, and a
    caption's hard negatives are drawn in its own scene's style (same background corner)."""
    from shapes.clip_training import render_batch

    specs = sample_specs(np.random.default_rng(5), 12, heldout=False)
    plain = render_batch(specs, np.random.default_rng(1), 64)
    styled = render_batch(specs, np.random.default_rng(1), 64, "train")
    again = render_batch(specs, np.random.default_rng(1), 64, "train")
    assert torch.equal(styled, again)
    assert not torch.equal(plain, styled)
    assert bool((plain[:, :, 0, 0] == 1.0).all())  # plain: white corners
    assert float((styled[:, :, 0, 0] < 1.0).float().mean()) > 0.5  # styled: light colours
    pos, neg, owner = scenes_and_negatives(specs, np.random.default_rng(2), 64, 1.0, (), "train")
    for i, j in enumerate(owner):
        # No shape touches the border (margin): corners show the pair's background.
        assert torch.allclose(neg[i, :, 0, 0], pos[j, :, 0, 0], atol=0.1)


def test_evaluation_reports_the_heldout_style(tmp_path):
    cfg = ClipTrainConfig(steps=1, batch_size=4, eval_prompts=6, eval_every=0, style="train")
    metrics = train(cfg, None)["metrics"]
    assert "heldout/img_pair_color_swap" in metrics and "img_pair_color_swap" in metrics
    assert 0.0 <= metrics["heldout/i2t@1"] <= 1.0
