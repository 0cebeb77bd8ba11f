"""Pretraining of the tiny shapes CLIP (``shapes.clip_training``): negatives, a tiny run, saving."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np
import pytest
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


def test_relation_quads_pair_each_caption_with_its_mirrored_scene():
    """Caption k is true of scene k, its mirrored caption of the mirrored scene, and neither
    of the other scene; no held-out prompt is drawn."""
    from shapes.clip_training import relation_quads
    from shapes.oracle import oracle_alignment_batch

    texts, images, targets = relation_quads(np.random.default_rng(4), 8, 64, "train")
    assert len(texts) == 16 and images.shape == (16, 3, 64, 64)
    # The mirrored half has the opposite position targets; every quadruple has some.
    assert torch.equal(targets[8:], -targets[:8]) and bool((targets[:8] != 0).any(1).all())
    own = oracle_alignment_batch(images, texts)
    crossed = oracle_alignment_batch(torch.cat([images[8:], images[:8]]), texts)
    assert float(own.min()) == 1.0 and float(crossed.max()) < 1.0
    for a, b in zip(texts[:8], texts[8:]):
        pa, pb = parse_prompt(a), parse_prompt(b)
        assert pa.entities == pb.entities and pa.relation.relation != pb.relation.relation
    assert not any(is_heldout_prompt(t) for t in texts)


def test_relation_loss_rewards_telling_mirrored_pairs_apart():
    """log 2 when the towers cannot tell a caption from its mirror; lower when each caption
    matches its own scene; higher when they match the mirrored ones; the hinge adds
    ``cos - max_cos`` for captions closer than ``max_cos``."""
    from shapes.clip_training import relation_loss

    scale = torch.tensor(np.log(10.0), dtype=torch.float32)
    a, b = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    same = torch.cat([a, a])
    assert abs(float(relation_loss(scale, same, same)) - np.log(2.0)) < 1e-6
    right = relation_loss(scale, torch.cat([a, b]), torch.cat([a, b]))
    wrong = relation_loss(scale, torch.cat([b, a]), torch.cat([a, b]))
    assert right < np.log(2.0) < wrong
    # The caption hinge: identical captions (cosine 1) cost 1 - max_cos more.
    hinged = relation_loss(scale, same, same, max_cos=0.5)
    assert abs(float(hinged) - np.log(2.0) - 0.5) < 1e-5


def test_relation_pairs_add_the_relation_loss_and_leave_the_default_path_alone():
    """With ``relation_pairs`` the step loss grows by the relation term; without it the step
    draws the same batch as before (so the shipped weights rebuild bit for bit)."""
    from reward.backbone import load_backbone
    from shapes.clip_training import Encoder, _step_loss, clip_arch, training_batch

    torch.manual_seed(0)
    cfg = ClipTrainConfig(batch_size=6, hard_negative_images=0.5)
    backbone = load_backbone(clip_arch(cfg), None)
    enc = Encoder(backbone)
    base = _step_loss(enc, backbone.model, np.random.default_rng(7), cfg)
    # The default path: the loss of the batch training_batch draws, and nothing else.
    texts, images, neg, negs = training_batch(np.random.default_rng(7), cfg)
    f = enc.images(torch.cat([images, neg]))
    f_t = enc.texts(texts + negs)
    ref = contrastive_loss(backbone.model.logit_scale, f[:6], f[6:], f_t, texts, negs)
    assert torch.allclose(base, ref, atol=1e-6)
    with_rel = _step_loss(
        enc, backbone.model, np.random.default_rng(7), dataclasses.replace(cfg, relation_pairs=3)
    )
    assert with_rel > base + 0.3  # about log 2 more for towers that cannot tell mirrors apart


def test_relation_options_refuse_bad_values():
    import pytest

    with pytest.raises(ValueError, match="relation_pairs must be >= 0"):
        ClipTrainConfig(relation_pairs=-1)
    with pytest.raises(ValueError, match=r"relation_max_cos is a cosine in \[-1, 1\]"):
        ClipTrainConfig(relation_max_cos=1.5)


def test_relation_targets_place_subject_and_object_along_the_axis():
    """-1 / +1 at the subject's / object's colour and shape along the relation's axis (in
    image coordinates); no target for a colour two entities share."""
    from shapes.clip_training import PROBE_SLOTS, relation_targets

    def slots(text):
        t = relation_targets(parse_prompt(text))
        return {PROBE_SLOTS[i]: float(t[i]) for i in t.nonzero().flatten().tolist()}

    assert slots("a red circle left of a blue square") == {
        ("red", "x"): -1.0,
        ("circle", "x"): -1.0,
        ("blue", "x"): 1.0,
        ("square", "x"): 1.0,
    }
    assert slots("a red circle below a red square") == {("circle", "y"): 1.0, ("square", "y"): -1.0}
    with pytest.raises(ValueError, match="has no relation"):
        relation_targets(parse_prompt("a red circle"))


def test_position_probe_loss_counts_only_the_targets_and_falls_as_the_probe_agrees():
    from shapes.clip_training import position_probe_loss

    head = torch.nn.Linear(2, 3, bias=False)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    with torch.no_grad():
        head.weight.zero_()
    assert abs(position_probe_loss(head, f, targets).item() - np.log(2.0)) < 1e-6
    with torch.no_grad():  # agrees with both targets; the third output has none
        head.weight.copy_(torch.tensor([[5.0, 0.0], [0.0, -5.0], [-9.0, 9.0]]))
    assert position_probe_loss(head, f, targets).item() < 0.01
    with pytest.raises(ValueError, match="needs relation_pairs"):
        ClipTrainConfig(relation_probe_weight=1.0)
    with pytest.raises(ValueError, match="relation_probe_weight must be >= 0"):
        ClipTrainConfig(relation_pairs=2, relation_probe_weight=-1.0)


def test_position_probe_finds_the_layout_in_the_resnet_trunk_and_not_in_shuffled_targets():
    """The probe is a working instrument: the shipped CLIP's trunk (before the attention
    pool) holds where each colour and shape lies, the shuffled control is near chance, and
    probing leaves the model's weights, batch-norm statistics and mode alone."""
    from reward.backbone import load_backbone
    from shapes.assets import CLIP_CONFIG, CLIP_WEIGHTS
    from shapes.clip_training import Encoder, clip_arch, position_probe_accuracy

    backbone = load_backbone(clip_arch(ClipTrainConfig(arch=str(CLIP_CONFIG))), str(CLIP_WEIGHTS))
    model = backbone.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    enc = Encoder(backbone)
    real = position_probe_accuracy(enc, np.random.default_rng(3), 128, steps=300)
    control = position_probe_accuracy(enc, np.random.default_rng(3), 128, steps=300, shuffle=True)
    assert set(real) == {"image", "text", "trunk"}
    assert real["trunk"] > 0.9 and control["trunk"] < 0.65
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
