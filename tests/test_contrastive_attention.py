"""Contrastive-attention LLaVA critic: math properties and plumbing on a tiny random LLaVA."""

from __future__ import annotations

import csv
import pickle

import pytest
import torch

from hyperalign.cli import main as cli
from vlm_tools import contrastive_attention as ca
from vlm_tools.llava_critic import (
    LlavaCritic,
    LlavaCriticConfig,
    LlavaWeightsNotFoundError,
    load_llava,
)
from vlm_tools.tiny import build_tiny_llava

N_IMG = 16  # tiny vision tower: (8 px / patch 2)^2
N_LAYERS = 4
PROMPTS = ["a red circle", "two small blue squares on the left of a yellow star", "cat"]


@pytest.fixture(scope="module")
def tiny():
    """(model, processor), sdpa attention. Do not mutate the model."""
    return build_tiny_llava(seed=0, num_layers=N_LAYERS)


def _encode(processor, prompts, model):
    """Left-padded inputs with one expanded image per prompt, plus the image mask."""
    tok = processor.tokenizer
    texts = [f"USER: {'<image>' * N_IMG}\nDoes this figure show {p} ? ASSISTANT:" for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True)
    mask = ca.image_token_mask(enc.input_ids, model.config.image_token_id, N_IMG)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(prompts), 3, 8, 8, generator=g)
    return enc.input_ids, enc.attention_mask, pixels, mask


def _forward(model, ids, am, pix, **kw):
    return model(
        input_ids=ids,
        attention_mask=am,
        pixel_values=pix,
        position_ids=ca.position_ids_from_mask(am),
        use_cache=False,
        **kw,
    )


def _count_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _cfg(**kw) -> ca.ContrastiveAttentionConfig:
    return ca.ContrastiveAttentionConfig(**{"post_layer": 2, "candidate_layers": (0, 1), **kw})


# ------------------------------------------------------------------ pure math


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hellinger_properties(seed, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(5, 20, generator=g, dtype=dtype).softmax(-1)
    q = torch.rand(5, 20, generator=g, dtype=dtype).pow(3)
    q = q / q.sum(-1, keepdim=True)
    assert ca.hellinger(p, p).abs().max() <= tol  # 0 for equal
    assert torch.allclose(ca.hellinger(p, q), ca.hellinger(q, p), atol=tol)  # symmetric
    h = ca.hellinger(p, q)
    assert h.dtype == dtype and bool(((h > 0) & (h < 1)).all())
    # disjoint supports: first half vs second half of the support -> exactly 1
    a = torch.zeros(3, 20, dtype=dtype)
    b = torch.zeros(3, 20, dtype=dtype)
    a[:, :10] = torch.rand(3, 10, generator=g, dtype=dtype)
    b[:, 10:] = torch.rand(3, 10, generator=g, dtype=dtype)
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    assert torch.allclose(ca.hellinger(a, b), torch.ones(3, dtype=dtype), atol=tol)
    # the definition, written out
    ref = ((p.sqrt() - q.sqrt()) ** 2).sum(-1).sqrt() / 2**0.5
    assert torch.allclose(h, ref, atol=tol)


def test_hellinger_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="equal shapes"):
        ca.hellinger(torch.ones(2, 3) / 3, torch.ones(2, 4) / 4)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_i_star_equals_brute_force_argmax(seed):
    g = torch.Generator().manual_seed(seed)
    cands = (5, 0, 3, 1, 7)  # unsorted on purpose
    maps = {i: torch.rand(6, 12, generator=g).pow(4).softmax(-1) for i in (*cands, 9)}
    i_star, dist = ca.select_pre_integration_layer(maps, 9, cands)
    for b in range(6):
        best, best_h = None, -1.0
        for i in cands:
            h = (0.5 * ((maps[i][b].sqrt() - maps[9][b].sqrt()) ** 2).sum()).sqrt().item()
            if h > best_h:
                best, best_h = i, h
        assert int(i_star[b]) == best
        assert dist[b].max().item() == pytest.approx(best_h, abs=1e-6)
    ia = ca.contrastive_map(maps[9], torch.stack([maps[int(i)][b] for b, i in enumerate(i_star)]))
    assert torch.equal(
        ia, (maps[9] - torch.stack([maps[int(i)][b] for b, i in enumerate(i_star)])).abs()
    )


def test_refinement_scale_quantile():
    ia = torch.tensor([[0.1, 0.4, 0.2, 0.3], [4.0, 1.0, 3.0, 2.0]])
    s = ca.refinement_scale(ia, rho=0.5, lam=0.1)
    want = torch.tensor([[0.1, 1.0, 0.1, 1.0], [1.0, 0.1, 1.0, 0.1]])
    assert torch.allclose(s, want)


def test_config_defaults_and_validation():
    cfg = ca.ContrastiveAttentionConfig()  # LLaVA-1.5-7B defaults
    assert cfg.resolved_candidates() == tuple(range(14))
    assert cfg.resolved_refine_layer() == 28
    cfg.validate(32)
    with pytest.raises(ValueError, match="post_layer=28 is outside"):
        cfg.validate(4)
    with pytest.raises(ValueError, match="candidate_layers"):
        _cfg(candidate_layers=(0, 2)).validate(N_LAYERS)
    with pytest.raises(ValueError, match="refine_layer=1"):
        _cfg(refine_layer=1).validate(N_LAYERS)
    with pytest.raises(ValueError, match="rho"):
        _cfg(rho=1.5).validate(N_LAYERS)


# ------------------------------------------------------------------ capture


def test_capture_matches_eager_attention_weights():
    """The recomputed last-token row equals transformers' eager attention weights."""
    model, proc = build_tiny_llava(seed=3, num_layers=N_LAYERS, attn_implementation="eager")
    ids, am, pix, img = _encode(proc, PROMPTS, model)
    with torch.no_grad(), ca.AttentionCapture(model, range(N_LAYERS), img, am) as cap:
        out = _forward(model, ids, am, pix, output_attentions=True)
    with torch.no_grad(), ca.AttentionCapture(model, [1], img, am, renormalize=False) as raw:
        _forward(model, ids, am, pix)
    for layer in range(N_LAYERS):
        row = out.attentions[layer][:, :, -1, :].mean(1)  # (B, T), head average
        ref = row[img].view(len(PROMPTS), N_IMG)  # (B, N)
        if layer == 1:  # raw attention mass on the image, below 1 (text tokens take the rest)
            assert torch.allclose(raw.maps[1], ref, atol=1e-6)
            assert bool((raw.maps[1].sum(-1) < 1).all())
        ref = ref / ref.sum(-1, keepdim=True)
        assert torch.allclose(cap.maps[layer], ref, atol=1e-6), layer
        assert torch.allclose(cap.maps[layer].sum(-1), torch.ones(len(PROMPTS)))


def test_capture_left_padded_batch_matches_single_samples(tiny):
    model, proc = tiny
    ids, am, pix, img = _encode(proc, PROMPTS, model)
    assert not bool(am.all()), "prompts of different length must produce padding"
    layers = (0, 2, 3)
    with torch.no_grad(), ca.AttentionCapture(model, layers, img, am) as cap:
        _forward(model, ids, am, pix)
    assert set(cap.maps) == set(layers)  # only the requested layers
    for b, prompt in enumerate(PROMPTS):
        ids1, am1, _, img1 = _encode(proc, [prompt], model)
        with torch.no_grad(), ca.AttentionCapture(model, layers, img1, am1) as one:
            _forward(model, ids1, am1, pix[b : b + 1])
        for layer in layers:
            assert torch.allclose(cap.maps[layer][b], one.maps[layer][0], atol=1e-5)


def test_capture_rejects_right_padding(tiny):
    model, proc = tiny
    ids, am, _, img = _encode(proc, PROMPTS, model)
    with pytest.raises(ValueError, match="padding_side='left'"):
        ca.AttentionCapture(model, [0], img, am.flip(-1))


# ------------------------------------------------------------------ refinement


def test_refinement_changes_only_layers_from_look_back(tiny):
    model, proc = tiny
    ids, am, pix, img = _encode(proc, PROMPTS, model)
    with torch.no_grad():
        plain = _forward(model, ids, am, pix, output_hidden_states=True).hidden_states
        with ca.ContrastiveRefinement(model, _cfg(), img, am, refine=True) as ref:
            refined = _forward(model, ids, am, pix, output_hidden_states=True).hidden_states
    assert len(plain) == N_LAYERS + 1  # embeddings + one per layer
    r = 2  # refine_layer defaults to post_layer
    for i in range(r + 1):  # embeddings and the outputs of layers 0 .. r-1
        assert torch.equal(plain[i], refined[i]), i
    for i in range(r + 1, N_LAYERS + 1):  # outputs of layers r .. L-1
        real = am.bool()
        assert (plain[i] - refined[i])[real].abs().max() > 1e-4, i
    res = ref.result
    assert res.applied and res.ia.shape == (len(PROMPTS), N_IMG)
    n_low = (res.scale == 0.1).sum(-1)
    assert bool((n_low == N_IMG // 2).all())  # ρ = 0.5: half the image tokens suppressed


@pytest.mark.parametrize("refine_layer", [2, 3])
def test_single_pass_ia_equals_two_pass(tiny, refine_layer):
    """IA from the refined pass equals IA from an unrefined capture of the same layers."""
    model, proc = tiny
    ids, am, pix, img = _encode(proc, PROMPTS, model)
    cfg = _cfg(refine_layer=refine_layer)
    with torch.no_grad():
        with ca.AttentionCapture(model, (0, 1, 2), img, am) as cap:
            _forward(model, ids, am, pix)
        with ca.ContrastiveRefinement(model, cfg, img, am, refine=True) as ref:
            _forward(model, ids, am, pix)
    i_star, _ = ca.select_pre_integration_layer(cap.maps, 2, (0, 1))
    pre = torch.stack([cap.maps[int(i)][b] for b, i in enumerate(i_star)])
    assert torch.equal(ref.result.i_star, i_star)
    assert torch.allclose(ref.result.ia, ca.contrastive_map(cap.maps[2], pre), atol=1e-6)


def test_refinement_is_prefill_only_during_generate(tiny):
    model, proc = tiny
    ids, am, pix, img = _encode(proc, PROMPTS[:2], model)
    calls = []
    with torch.no_grad(), ca.ContrastiveRefinement(model, _cfg(), img, am) as ref:
        layer = ca.decoder_layers(model)[2]
        h = layer.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
        try:
            out = model.generate(
                input_ids=ids,
                attention_mask=am,
                pixel_values=pix,
                max_new_tokens=3,
                do_sample=False,
            )
        finally:
            h.remove()
    assert out.shape[1] == ids.shape[1] + 3
    assert calls[0] == ids.shape[1] and calls[1:] == [1, 1]  # prefill, then two decode steps
    assert ref.result.applied


def test_no_hook_survives_context_managers(tiny):
    model, proc = tiny
    ids, am, pix, img = _encode(proc, PROMPTS, model)
    before = _count_hooks(model)
    with ca.ContrastiveRefinement(model, _cfg(), img, am) as ref:
        assert _count_hooks(model) == before + 3  # C = {0, 1} capture + look-back pre-hook
        assert ref.active_hooks == 3
    assert _count_hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with ca.ContrastiveRefinement(model, _cfg(refine_layer=3), img, am):
            assert _count_hooks(model) > before
            raise RuntimeError("boom")
    assert _count_hooks(model) == before
    with pytest.raises(ValueError):  # an error inside the model's forward
        with ca.AttentionCapture(model, [1, 3], img, am):
            _forward(model, ids[:, :-1], am[:, :-1], pix)  # drops the last token: length mismatch
            raise ValueError("forward ran")
    assert _count_hooks(model) == before
    for mode in ca.MASKING_MODES:
        with pytest.raises(RuntimeError, match="boom"):
            with ca._ImageMaskingHook(model, 1, img, mode):
                assert _count_hooks(model) == before + 1
                raise RuntimeError("boom")
        assert _count_hooks(model) == before


def test_image_token_mismatch_is_a_clear_error(tiny):
    model, proc = tiny
    tok = proc.tokenizer
    enc = tok(["USER: " + "<image>" * (N_IMG - 1) + " a", "USER: " + "<image>" * N_IMG + " a"],
              return_tensors="pt", padding=True)  # fmt: skip
    with pytest.raises(ValueError, match=r"samples \[0\] have \[15\] image tokens .* needs 16"):
        ca.image_token_mask(enc.input_ids, model.config.image_token_id, N_IMG)
    critic = LlavaCritic(LlavaCriticConfig(contrastive=_cfg()), model, proc)
    images = torch.rand(3, 3, 8, 8)
    with pytest.raises(ValueError, match="got 3 images, 2 prompts"):
        critic(images, PROMPTS[:2], [{}] * 3)
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        LlavaCritic(
            LlavaCriticConfig(contrastive=_cfg(), prompt_template="<image><image> {question}"),
            model,
            proc,
        )
    with pytest.raises(ValueError, match="put exactly one '<image>'"):
        critic.build_inputs(images[:1], ["USER: no image placeholder here"])


# ------------------------------------------------------------------ masking analysis


def test_masking_from_layer_zero_equals_zeroed_image_embeddings(tiny):
    model, proc = tiny
    ids, am, pix, img = _encode(proc, PROMPTS, model)
    ans = torch.full((len(PROMPTS), 1), proc.tokenizer.convert_tokens_to_ids("Yes"))
    ids, am = torch.cat([ids, ans], 1), torch.cat([am, torch.ones_like(ans)], 1)
    img = torch.cat([img, torch.zeros_like(ans, dtype=torch.bool)], 1)
    cfg = ca.MaskingConfig(mode="from_layer", layers=(0,))
    layers, base, drop = ca.layerwise_masking_curve(model, ids, am, pix, img, 1, cfg)
    with torch.no_grad():
        # reference: image features replaced by zeros before the decoder
        embeds = model.get_input_embeddings()(ids).masked_fill(img.unsqueeze(-1), 0.0)
        logits = model(
            inputs_embeds=embeds,
            attention_mask=am,
            position_ids=ca.position_ids_from_mask(am),
            use_cache=False,
        ).logits
    ref = ca.answer_log_likelihood(logits, ids, 1)
    assert layers == [0] and drop.shape == (1, len(PROMPTS))
    assert torch.allclose(base - drop[0], ref, atol=1e-5)


def _layer_outputs(model, run):
    """Outputs of every decoder layer as the next layer receives them (hooks registered last,
    so they see what earlier hooks returned)."""
    outs, handles = {}, []
    for i, layer in enumerate(ca.decoder_layers(model)):
        hook = lambda m, a, o, i=i: outs.__setitem__(i, o)
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return [outs[i] for i in range(len(outs))]


def test_masking_layer_mode_touches_only_text_rows_from_layer(tiny):
    model, proc = tiny
    ids, am, pix, img = _encode(proc, PROMPTS, model)
    plain = _layer_outputs(model, lambda: _forward(model, ids, am, pix))
    with ca._ImageMaskingHook(model, 1, img, "layer"):
        masked = _layer_outputs(model, lambda: _forward(model, ids, am, pix))
    assert torch.equal(plain[0], masked[0])
    text = am.bool() & ~img
    for i in range(1, N_LAYERS):
        assert torch.allclose(plain[i][img], masked[i][img], atol=1e-6)  # image rows kept
        assert (plain[i][text] - masked[i][text]).abs().max() > 1e-4, i  # text rows changed


def test_masking_curve_over_all_layers_via_critic(tiny):
    model, proc = tiny
    critic = LlavaCritic(LlavaCriticConfig(contrastive=_cfg(), batch_size=2), model, proc)
    layers, base, drop = critic.masking_analysis(torch.rand(3, 3, 12, 10), PROMPTS, "Yes")
    assert layers == list(range(N_LAYERS)) and base.shape == (3,)
    assert drop.shape == (N_LAYERS, 3) and torch.isfinite(drop).all()
    assert drop.abs().max() > 0  # masking the image changes the answer likelihood
    with pytest.raises(ValueError, match="unknown masking mode"):
        critic.masking_analysis(torch.rand(1, 3, 8, 8), PROMPTS[:1], "Yes", ca.MaskingConfig("x"))


# ------------------------------------------------------------------ critic


def test_critic_contract_probabilities(tiny, tmp_path):
    model, proc = tiny
    cfg = LlavaCriticConfig(contrastive=_cfg(), batch_size=2, heatmap_dir=str(tmp_path / "heat"))
    critic = LlavaCritic(cfg, model, proc)
    images = torch.rand(3, 3, 20, 16)
    rewards, info = critic(images, PROMPTS, [{}] * 3)
    assert rewards.shape == (3,) and rewards.dtype == torch.float32
    assert rewards.device == images.device
    assert bool(((rewards >= 0) & (rewards <= 1)).all())
    assert info["llava_p_yes"] == pytest.approx(rewards.tolist())
    assert len(info["llava_i_star"]) == 3 and set(info["llava_i_star"]) <= {0, 1}
    from PIL import Image

    for path in info["llava_heatmap"]:
        with Image.open(path) as im:
            assert im.size == (8, 8) and im.mode == "RGB"  # drawn on the model's 8 px crop
    # batching does not change the scores; refinement does
    critic.config.batch_size, critic.config.heatmap_dir = 8, None
    again, _ = critic(images, PROMPTS, [{}] * 3)
    assert torch.allclose(again, rewards, atol=1e-6)
    plain = critic.score_batch(images, PROMPTS, refine=False)
    assert "ia" not in plain and plain["p_yes"].shape == (3,)
    assert not torch.allclose(plain["p_yes"], rewards, atol=1e-7)


def test_weighted_reward_score_refuses_the_non_differentiable_critic(tiny):
    from reward import WeightedReward
    from rlhf.rewards import Brightness

    model, proc = tiny
    critic = LlavaCritic(LlavaCriticConfig(contrastive=_cfg()), model, proc)
    mix = WeightedReward({"bright": (Brightness(), 1.0), "llava": (critic, 0.5)})
    images = torch.rand(2, 3, 20, 16)
    rewards, _ = mix(images, PROMPTS[:2], [{}] * 2)  # the non-differentiable call works
    assert rewards.shape == (2,)
    with pytest.raises(TypeError, match="llava.*no differentiable score"):
        mix.score(images, PROMPTS[:2])


def test_critic_pickle_and_local_directory_loading(tiny, tmp_path):
    model, proc = tiny
    cfg = LlavaCriticConfig(contrastive=_cfg())
    critic = LlavaCritic(cfg, model, proc)
    images = torch.rand(2, 3, 8, 8)
    ref, _ = critic(images, PROMPTS[:2], [{}] * 2)
    clone = pickle.loads(pickle.dumps(critic))
    assert torch.allclose(clone(images, PROMPTS[:2], [{}] * 2)[0], ref, atol=1e-6)
    model.save_pretrained(tmp_path / "ckpt")
    proc.save_pretrained(tmp_path / "ckpt")
    loaded = LlavaCritic(
        LlavaCriticConfig(model=str(tmp_path / "ckpt"), contrastive=_cfg(), device="cpu")
    )
    assert torch.allclose(loaded(images, PROMPTS[:2], [{}] * 2)[0], ref, atol=1e-6)


def test_missing_weights_offline_gives_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(LlavaWeightsNotFoundError, match="hf download llava-hf/llava-1.5-7b-hf"):
        load_llava("llava-hf/llava-1.5-7b-hf", device="cpu")
    (tmp_path / "half").mkdir()
    with pytest.raises(LlavaWeightsNotFoundError, match="not a complete LLaVA checkpoint"):
        load_llava(str(tmp_path / "half"))


# ------------------------------------------------------------------ CLI


def test_cli_score_and_masking(tmp_path):
    import numpy as np
    from PIL import Image

    def main(argv):
        return cli(["llava", "--debug", *argv])

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((12, 16, 3)) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,prompt\n0.png,a red circle\n1.png,two blue squares\n2.png,a cat\n")
    common = ["--tiny", "--post-layer", "2", "--batch-size", "2"]
    out = tmp_path / "scores.csv"
    assert main(["score", "--pairs", str(pairs), "--out", str(out), *common]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["prompt"] for r in rows] == ["a red circle", "two blue squares", "a cat"]
    assert all(0.0 <= float(r["p_yes"]) <= 1.0 for r in rows) and "i_star" in rows[0]
    mdir = tmp_path / "masking"
    argv = [
        "masking",
        "--images",
        str(tmp_path),
        "--prompt",
        "a red circle",
        "--out-dir",
        str(mdir),
    ]
    assert main([*argv, *common]) == 0
    curve = list(csv.DictReader((mdir / "masking_curve.csv").open()))
    assert [int(r["layer"]) for r in curve] == list(range(N_LAYERS))
    assert all(int(r["n"]) == 3 for r in curve)
    assert (mdir / "masking_curve.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="--pairs CSV, or --images with --prompt"):
        main(["score", "--images", str(tmp_path), *common])


def test_cli_images_decode_through_common(tmp_path):
    """--images decodes with hyperalign.common.load_image: a transparent pixel is white, an
    opaque image keeps its exact values, and every common image suffix is listed."""
    import numpy as np
    from PIL import Image

    from vlm_tools.llava_cli import load_images

    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 2] = 255  # blue under alpha 0: invisible
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    rgb = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.tif")
    images = load_images([tmp_path / "clear.png", tmp_path / "rgb.tif"], 8)  # (2, 3, 8, 8)
    assert torch.equal(images[0], torch.ones(3, 8, 8))
    expected = torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1)
    assert torch.equal(images[1], expected)
    out = tmp_path / "scores.csv"
    argv = ["llava", "--debug", "score", "--images", str(tmp_path), "--prompt", "a cat"]
    assert cli([*argv, "--tiny", "--post-layer", "2", "--out", str(out)]) == 0
    assert [r["image"].rsplit("/", 1)[-1] for r in csv.DictReader(out.open())] == [
        "clear.png",
        "rgb.tif",
    ]


def test_cli_dtype_names_and_bom_pairs(tmp_path, capsys):
    """--dtype takes every name of hyperalign.common.parse_dtype (and refuses others with the
    list); a pairs CSV saved with a UTF-8 BOM (Excel) is read."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 128, dtype=np.uint8)).save(tmp_path / "a.png")
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes("image,prompt\na.png,a red circle\n".encode("utf-8-sig"))
    common = ["llava", "score", "--pairs", str(pairs), "--tiny", "--post-layer", "2"]
    for name in ("fp32", "float32"):
        out = tmp_path / f"{name}.csv"
        assert cli([*common, "--dtype", name, "--out", str(out)]) == 0
        assert [r["prompt"] for r in csv.DictReader(out.open())] == ["a red circle"]
    with pytest.raises(SystemExit):
        cli([*common, "--dtype", "int8"])
    assert "unknown dtype 'int8'" in capsys.readouterr().err
