"""HyperAlign model, losses, checkpoints and input validation on the tiny backbone."""

import json
import warnings

import pytest
import torch

from reward import HyperAlign, HyperAlignConfig
from reward import lorentz as L
from reward.backbone import BackboneUnavailableError, load_backbone
from reward.losses import entailment_loss, hyperalign_loss

from .conftest import tiny_config

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a red square"]


def _images(b=3, size=40, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_forward_outputs_every_intermediate(tiny_model):
    out = tiny_model(_images(), PROMPTS)
    for name, t in out.per_sample().items():
        assert t.shape == (3,), name
        assert t.dtype == torch.float32 and torch.all(torch.isfinite(t)), name
    # Untrained regressor starts at alpha=1, beta=0, gamma=1: score == cosine.
    torch.testing.assert_close(out.score, out.s_base)
    assert torch.all(out.alpha > 0) and torch.all((out.gamma > 0) & (out.gamma < 2))
    # The geometry is the lorentz module's on the returned points.
    c = tiny_model.curv
    torch.testing.assert_close(out.distance, L.distance(out.text_point, out.image_point, c))
    torch.testing.assert_close(out.aperture, L.half_aperture(out.text_point, c, 0.1))


def test_token_ids_and_strings_agree(tiny_model):
    ids = tiny_model.tokenize(PROMPTS)
    a = tiny_model(_images(), PROMPTS).score
    b = tiny_model(_images(), ids).score
    torch.testing.assert_close(a, b)


def test_image_size_does_not_matter_beyond_resize(tiny_model):
    img = _images(size=32)
    big = torch.nn.functional.interpolate(img, scale_factor=2, mode="nearest")
    assert tiny_model(big, PROMPTS).score.shape == (3,)


@pytest.mark.parametrize("tuning", ["adapter", "lora", "full", "frozen"])
def test_tuning_modes_train_the_right_parameters(tuning):
    torch.manual_seed(0)
    model = HyperAlign(tiny_config(tuning=tuning))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    clip_trainable = {n for n in trainable if n.startswith("clip.")}
    head = {n for n in trainable if not n.startswith("clip.")}
    assert {"image_scale_logit", "text_scale_logit", "log_curv"} <= head
    assert any(n.startswith("regressor.") for n in head)
    if tuning == "adapter":
        assert not clip_trainable and any("adapter" in n for n in head)
    elif tuning == "lora":
        assert clip_trainable and all("lora_" in n for n in clip_trainable)
    elif tuning == "full":
        assert len(clip_trainable) == len(list(model.clip.parameters()))
    else:
        assert not clip_trainable
    out = model(_images(), PROMPTS)
    loss, _ = hyperalign_loss(out, torch.tensor([1.0, 0.2, 0.6]), model.config)
    loss.backward()
    # logit_scale belongs to CLIP's contrastive loss, which HyperAlign does not use.
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads = {n: g for n, g in grads.items() if "logit_scale" not in n}
    assert all(g is not None and torch.all(torch.isfinite(g)) for g in grads.values())


def test_fixed_curvature_is_a_buffer():
    model = HyperAlign(tiny_config(learn_curv=False, curv_init=2.0))
    assert "log_curv" not in dict(model.named_parameters())
    assert float(model.curv) == pytest.approx(2.0)


def test_curvature_is_clamped():
    model = HyperAlign(tiny_config())
    with torch.no_grad():
        model.log_curv.fill_(10.0)
    assert float(model.curv.detach()) == pytest.approx(10.0)


def test_no_regressor_ablation_is_calibrated_cosine():
    model = HyperAlign(tiny_config(regressor=False))
    with torch.no_grad():
        model.calib_alpha.fill_(0.0)
        model.calib_beta.fill_(0.25)
    out = model(_images(), PROMPTS)
    alpha = torch.nn.functional.softplus(torch.tensor(0.0))
    torch.testing.assert_close(out.score, alpha * out.s_base + 0.25)


# ------------------------------------------------------------------------------- losses
def test_entailment_loss_zero_on_axis_and_grows_with_angle():
    u = torch.zeros(1, 8)
    u[0, 0] = 1.0
    v = torch.zeros(1, 8)
    v[0, 1] = 1.0
    text = L.exp_map0(0.8 * u, 1.0)
    aperture = L.half_aperture(text, 1.0)
    losses = []
    for theta in (0.0, 0.3, 0.8, 1.5, 2.5):
        img = L.exp_map0(
            1.6 * (torch.cos(torch.tensor(theta)) * u + torch.sin(torch.tensor(theta)) * v), 1.0
        )
        angle = L.exterior_angle(text, img, 1.0)
        losses.append(float(entailment_loss(angle, aperture, torch.tensor([1.0]), 0.8)))
    assert losses[0] == 0.0
    assert all(a <= b for a, b in zip(losses, losses[1:])) and losses[-1] > losses[1]


def test_higher_target_tightens_the_cone():
    angle = torch.tensor([0.5])
    aperture = torch.tensor([0.6])
    low = entailment_loss(angle, aperture, torch.tensor([0.0]), 0.8)
    high = entailment_loss(angle, aperture, torch.tensor([1.0]), 0.8)
    assert float(low) == 0.0  # inside the full cone
    assert float(high) == pytest.approx(0.5 - 0.6 * 0.2)  # outside the 20% cone
    # Static cone (a_shrink = 0): the target no longer matters.
    assert float(entailment_loss(angle, aperture, torch.tensor([1.0]), 0.0)) == 0.0


def test_loss_weights_from_config(tiny_model):
    out = tiny_model(_images(), PROMPTS)
    target = torch.tensor([1.0, 0.0, 0.5])
    with_ent, parts = hyperalign_loss(out, target, tiny_config(ent_weight=0.2))
    without, parts0 = hyperalign_loss(out, target, tiny_config(ent_weight=0.0))
    assert "loss_ent" in parts and "loss_ent" not in parts0
    assert float(with_ent.detach()) == pytest.approx(
        parts["loss_reg"] + 0.2 * parts["loss_ent"], rel=1e-5
    )
    assert float(without) == pytest.approx(parts0["loss_reg"], rel=1e-6)


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("tuning", ["adapter", "lora", "full"])
def test_save_load_round_trip(tmp_path, tuning):
    torch.manual_seed(1)
    model = HyperAlign(tiny_config(tuning=tuning, target_range=(0.5, 4.5))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    loaded = HyperAlign.from_pretrained(tmp_path / "ckpt").eval()
    if tuning != "full":
        # A fresh random backbone would differ: use the same one for the comparison.
        loaded.clip.load_state_dict(model.clip.state_dict())
    a, b = model(_images(), PROMPTS), loaded(_images(), PROMPTS)
    torch.testing.assert_close(a.score, b.score)
    assert loaded.config.target_range == (0.5, 4.5)
    torch.testing.assert_close(
        loaded.to_target_scale(torch.tensor([0.0, 1.0])), torch.tensor([0.5, 4.5])
    )


def test_frozen_backbone_checkpoint_is_small(tmp_path):
    model = HyperAlign(tiny_config(tuning="adapter"))
    model.save_pretrained(tmp_path / "a")
    full = HyperAlign(tiny_config(tuning="full"))
    full.save_pretrained(tmp_path / "f")
    small = (tmp_path / "a" / "model.safetensors").stat().st_size
    big = (tmp_path / "f" / "model.safetensors").stat().st_size
    assert small * 20 < big


def test_mismatched_checkpoint_names_the_keys(tmp_path):
    HyperAlign(tiny_config(regressor_width=16)).save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    cfg["regressor_width"] = 32
    cfg["adapter_width"] = 64
    (tmp_path / "c" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"regressor\.net\.0\.weight.*|image_adapter"):
        HyperAlign.from_pretrained(tmp_path / "c")


def test_save_over_existing_is_atomic_on_failure(tmp_path, monkeypatch):
    model = HyperAlign(tiny_config())
    model.save_pretrained(tmp_path / "c")
    before = (tmp_path / "c" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("reward.model.save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        HyperAlign.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="could not be fetched"):
        HyperAlign.from_pretrained("someone/missing-repo")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "images,texts,exc,match",
    [
        (torch.rand(2, 3, 8, 8), ["a"], ValueError, "2 images but 1 texts"),
        (torch.rand(0, 3, 8, 8), [], ValueError, "empty batch"),
        (torch.full((1, 3, 8, 8), float("nan")), ["a"], ValueError, "NaN or Inf"),
        (torch.rand(3, 8, 8), ["a"], ValueError, r"\(B, 3, H, W\)"),
        (torch.rand(1, 1, 8, 8), ["a"], ValueError, r"\(B, 3, H, W\)"),
        (torch.rand(1, 3, 8, 8) * 2, ["a"], ValueError, r"\[0, 1\]"),
        (torch.rand(1, 3, 8, 8), [3], TypeError, "str"),
        (torch.rand(1, 3, 8, 8), "a", TypeError, "sequence"),
        ((torch.rand(1, 3, 8, 8) * 255).byte(), ["a"], TypeError, "float"),
        ([[0.5]], ["a"], TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_named(tiny_model, images, texts, exc, match):
    with pytest.raises(exc, match=match):
        tiny_model(images, texts)


def test_long_prompts_truncated_with_one_warning():
    model = HyperAlign(tiny_config())
    long = " ".join(["red"] * 200)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = model.tokenize([long, "short"])
        model.tokenize([long])
    msgs = [w for w in caught if "truncated" in str(w.message)]
    assert len(msgs) == 1
    assert ids.shape == (2, model.context_length)
    eot = model.tokenizer.eot_token_id
    assert ids[0, -1] == eot and ids[1, -1] == 0


def test_offline_pretrained_fails_fast_with_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneUnavailableError, match="pretrained='/path/to"):
        load_backbone("ViT-B-16", "openai")
    with pytest.raises(ValueError, match="known open_clip tag"):
        load_backbone("ViT-B-16", "no-such-tag")
    with pytest.raises(ValueError, match="hyperalign-tiny"):
        load_backbone("No-Such-Arch", None)


def test_config_validation():
    with pytest.raises(ValueError, match="tuning"):
        HyperAlignConfig(tuning="bogus")
    with pytest.raises(ValueError, match="curv"):
        HyperAlignConfig(curv_init=20.0)
    with pytest.raises(ValueError, match="unknown HyperAlignConfig fields"):
        HyperAlignConfig.from_dict({"nope": 1})


# ------------------------------------------------------------------- damaged checkpoints
def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("k", None, "a number"),
        ("learn_curv", "false", "true or false"),
        ("adapter_width", "256", "an integer"),
        ("lora_targets", "c_fc", "a list of strings"),
        ("target_range", [1, "5"], "a list of 2 numbers or None"),
    ],
)
def test_config_values_are_type_checked_when_loaded(tmp_path, field, value, expected):
    HyperAlign(tiny_config()).save_pretrained(tmp_path / "c")
    _edit_config(tmp_path / "c", **{field: value})
    match = rf"config.json: HyperAlignConfig.{field} must be {expected}, got {value!r}"
    with pytest.raises(ValueError, match=match.replace("[", r"\[").replace("]", r"\]")):
        HyperAlign.from_pretrained(tmp_path / "c")
    with pytest.raises(ValueError, match=f"HyperAlignConfig.{field} must be"):
        HyperAlignConfig.from_dict({field: value})
    # Numbers of the other kind are fine where they are unambiguous.
    assert HyperAlignConfig(k=1, target_range=[1, 5]).k == 1.0


def test_damaged_config_json_names_the_file(tmp_path):
    HyperAlign(tiny_config()).save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / "config.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"c/config.json is not valid UTF-8 JSON"):
        HyperAlign.from_pretrained(tmp_path / "c")
    path.write_bytes(text.replace("hyperalign-tiny", "hyperalign-tiny\xe9").encode("latin-1"))
    with pytest.raises(ValueError, match=r"c/config.json is not valid UTF-8 JSON"):
        HyperAlign.from_pretrained(tmp_path / "c")


def test_truncated_or_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    HyperAlign(tiny_config()).save_pretrained(tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"c/model.safetensors: it is truncated.*copy the"):
        HyperAlign.from_pretrained(tmp_path / "c")
    weights.write_bytes(good)
    state = load_file(str(weights))
    state["regressor.net.0.weight"][0, 0] = float("nan")
    state["text_adapter.gate"] = torch.tensor(float("inf"))
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '[a-z_.0-9]+' holds 1 NaN"):
        HyperAlign.from_pretrained(tmp_path / "c")


def test_damaged_backbone_weights_file_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    clip = HyperAlign(tiny_config()).clip
    base = tmp_path / "base"
    base.mkdir()
    save_file(
        {k: v.contiguous() for k, v in clip.state_dict().items()}, str(base / "clip.safetensors")
    )
    model = HyperAlign(tiny_config().replace(pretrained="clip.safetensors"), base_dir=base)
    model.save_pretrained(tmp_path / "c")
    copied = tmp_path / "c" / "clip.safetensors"
    assert HyperAlign.from_pretrained(tmp_path / "c")  # intact: loads
    good = copied.read_bytes()
    copied.write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match=r"backbone weights .*c/clip.safetensors: it is trunc"):
        HyperAlign.from_pretrained(tmp_path / "c")
    state = load_file(str(base / "clip.safetensors"))
    name = sorted(state)[0]
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(copied))
    with pytest.raises(ValueError, match=rf"clip.safetensors: tensor '{name}' holds"):
        HyperAlign.from_pretrained(tmp_path / "c")


def test_loading_restores_a_checkpoint_left_mid_swap(tmp_path):
    """A save killed between replace_dir's two renames leaves the previous checkpoint only
    under ``.c.old-<pid>``: from_pretrained puts it back before reading."""
    HyperAlign(tiny_config()).save_pretrained(tmp_path / "c")
    before = (tmp_path / "c" / "model.safetensors").read_bytes()
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / "c").rename(tmp_path / f".c.old-{dead_pid}")
    (tmp_path / f".c.tmp-{dead_pid}-x").mkdir()  # a killed save's temporary folder
    assert HyperAlign.from_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == before
    HyperAlign(tiny_config()).save_pretrained(tmp_path / "c")  # a new save cleans up
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_frozen_batchnorm_tower_scores_an_image_the_same_in_any_batch(tmp_path):
    """A ResNet image tower (batch norm) under a frozen-tower tuning: train mode must not use
    batch statistics or update the running ones."""
    import json

    from reward.backbone import register_model_config

    arch = tmp_path / "hyperalign-test-rn.json"
    text = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    vision = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8}
    arch.write_text(json.dumps({"embed_dim": 16, "vision_cfg": vision, "text_cfg": text}))
    name = register_model_config(arch)
    torch.manual_seed(0)
    model = HyperAlign(HyperAlignConfig(backbone=name, pretrained=None)).train()
    before = {k: v.clone() for k, v in model.clip.state_dict().items()}
    x = torch.rand(4, 3, 32, 32)
    alone = model.encode_images(x[:1])
    mixed = model.encode_images(torch.cat([x[:1], torch.rand(7, 3, 32, 32)]))[:1]
    assert torch.allclose(alone, mixed, atol=1e-6)
    after = model.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched
    assert model.training and model.image_adapter.training
