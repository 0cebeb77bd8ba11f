"""Images as other tools produce them: half / double precision, autocast, channels-last
batches (diffusers ``output_type="np"``), uint8, RGBA with transparency."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from reward import build_reward
from reward.reward_fn import channel_layout

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


@pytest.fixture(scope="module")
def reward_fn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_reward("tiny-random")


def _images(reward_fn, b=3, seed=0):
    """Float (B, 3, H, W) in [0, 1] at the model's input size (no resize anywhere)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, *reward_fn.model.image_size, generator=g)


# ----------------------------------------------------------------------------- dtypes

DTYPES = [torch.float16, torch.bfloat16, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_call_accepts_any_float_dtype(reward_fn, dtype):
    x = _images(reward_fn).to(dtype)
    rewards, info = reward_fn(x, PROMPTS)
    # The same pixels as fp32 give the same rewards: only the representation differs.
    ref, ref_info = reward_fn(x.float(), PROMPTS)
    assert rewards.dtype == torch.float32 and rewards.shape == (3,)
    assert torch.equal(rewards, ref) and info == ref_info


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_keeps_gradients_in_the_input_dtype(reward_fn, dtype):
    x = _images(reward_fn).to(dtype).requires_grad_(True)
    scores = reward_fn.score(x, PROMPTS)
    assert scores.dtype == torch.float32 and scores.shape == (3,) and scores.requires_grad
    scores.sum().backward()
    assert x.grad is not None and x.grad.dtype == dtype
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    ref = x.detach().float().requires_grad_(True)
    torch.testing.assert_close(scores.detach(), reward_fn.score(ref, PROMPTS).detach())


@pytest.mark.parametrize("dtype", [torch.float32, *DTYPES], ids=str)
def test_callers_autocast_does_not_change_the_reward(reward_fn, dtype):
    x = _images(reward_fn).to(dtype)
    outside, _ = reward_fn(x, PROMPTS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = reward_fn(x, PROMPTS)
        xg = x.clone().requires_grad_(True)
        scores = reward_fn.score(xg, PROMPTS)
    # The fp32 reward computes in fp32 inside a caller's autocast region.
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)
    torch.testing.assert_close(scores.detach(), outside)
    scores.sum().backward()
    assert xg.grad.dtype == dtype and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_half_precision_reward_on_any_input_dtype_and_autocast(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = build_reward("tiny-random", dtype=torch.bfloat16)
    x = _images(fn).to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rewards, _ = fn(x.detach(), PROMPTS)
        scores = fn.score(x, PROMPTS)
    scores.sum().backward()
    assert rewards.dtype == torch.float32 and torch.isfinite(rewards).all()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------ layouts


def test_diffusers_numpy_output_is_accepted(reward_fn):
    """diffusers ``output_type="np"``: float32 numpy (B, H, W, 3) in [0, 1]."""
    x = _images(reward_fn)
    ref, ref_info = reward_fn(x, PROMPTS)
    nhwc = x.permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    rewards, info = reward_fn(nhwc, PROMPTS)
    assert rewards.device == reward_fn.device
    torch.testing.assert_close(rewards, ref)
    assert np.allclose(info["angle"], ref_info["angle"], atol=1e-6)
    # Its images one by one, and a float64 copy, also work.
    torch.testing.assert_close(reward_fn(list(nhwc), PROMPTS)[0], ref)
    torch.testing.assert_close(reward_fn(nhwc.astype(np.float64), PROMPTS)[0], ref)


def test_uint8_channels_last_tensor_and_array(reward_fn):
    size = reward_fn.model.image_size
    u8 = torch.randint(0, 256, (3, 3, *size), dtype=torch.uint8)  # (B, 3, H, W)
    ref, _ = reward_fn(u8.float() / 255, PROMPTS)
    nhwc = u8.permute(0, 2, 3, 1)  # (B, H, W, 3)
    for images in (nhwc, nhwc.contiguous(), nhwc.numpy(), np.ascontiguousarray(nhwc.numpy())):
        torch.testing.assert_close(reward_fn(images, PROMPTS)[0], ref)


def test_channels_last_score_is_differentiable(reward_fn):
    x = _images(reward_fn)
    nhwc = x.permute(0, 2, 3, 1).contiguous().requires_grad_(True)
    scores = reward_fn.score(nhwc, PROMPTS)
    scores.sum().backward()
    torch.testing.assert_close(scores.detach(), reward_fn(x, PROMPTS)[0])
    assert nhwc.grad.shape == nhwc.shape and nhwc.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "shape,expected",
    [
        ((2, 3, 64, 64), ("first", 3)),
        ((2, 3, 64, 3), ("first", 3)),  # dimension 1 of 3 always reads channels first
        ((2, 64, 64, 3), ("last", 3)),
        ((2, 64, 48, 4), ("last", 4)),
        ((2, 4, 64, 64), ("first", 4)),
        ((1, 5, 7, 3), ("last", 3)),
    ],
)
def test_channel_layout_rule(shape, expected):
    assert channel_layout(shape) == expected


@pytest.mark.parametrize(
    "shape,match",
    [
        ((2, 4, 64, 3), "ambiguous"),
        ((2, 4, 64, 4), "ambiguous"),
        ((2, 5, 64, 64), r"not an image batch.*\(B, H, W, 3\)"),
        ((3, 64, 64), "4-D batch.*add a batch dimension"),
        ((2, 1, 64, 64), r"accepted: .*\(B, 3, H, W\)"),
    ],
)
def test_unreadable_layouts_say_what_is_accepted(reward_fn, shape, match):
    with pytest.raises(ValueError, match=match):
        channel_layout(shape)
    with pytest.raises(ValueError, match=match):
        reward_fn(torch.rand(*shape), ["a"] * shape[0])


def test_integer_images_other_than_uint8_are_refused(reward_fn):
    with pytest.raises(TypeError, match="uint8"):
        reward_fn(torch.zeros(3, 3, 8, 8, dtype=torch.int64), PROMPTS)
    with pytest.raises(TypeError, match="float or uint8 numpy"):
        reward_fn(np.zeros((3, 8, 8, 3), np.int32), PROMPTS)


def test_out_of_range_float_list_images_are_refused_before_resizing(reward_fn):
    # 0-255 floats would otherwise be clamped to 1 by the resize and scored silently.
    image = np.full((13, 17, 3), 200.0, np.float32)
    with pytest.raises(ValueError, match=r"image 0: float images must be finite and in \[0, 1\]"):
        reward_fn([image], ["a"])


# --------------------------------------------------------------------------- alpha


def _rgba(reward_fn, alpha: float, seed=1) -> torch.Tensor:
    rgb = _images(reward_fn, b=3, seed=seed)
    a = torch.full((3, 1, *rgb.shape[-2:]), alpha)
    return torch.cat([rgb, a], dim=1)  # (B, 4, H, W)


def test_transparent_rgba_tensor_is_composited_on_white(reward_fn):
    clear, opaque = _rgba(reward_fn, 0.0), _rgba(reward_fn, 1.0)
    white, _ = reward_fn(torch.ones(3, 3, *reward_fn.model.image_size), PROMPTS)
    rgb, _ = reward_fn(opaque[:, :3], PROMPTS)
    got_clear, _ = reward_fn(clear, PROMPTS)
    assert torch.equal(got_clear, white)
    assert not torch.allclose(got_clear, rgb, atol=1e-4)
    assert torch.equal(reward_fn(opaque, PROMPTS)[0], rgb)
    # Channels last and uint8 too.
    u8 = (clear * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 4)
    assert torch.equal(reward_fn(u8, PROMPTS)[0], white)


def test_transparent_pil_and_png_do_not_score_like_the_opaque_image(reward_fn, tmp_path):
    opaque = (_rgba(reward_fn, 1.0) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    clear = opaque.copy()
    clear[..., 3] = 0
    as_pil = [Image.fromarray(a, "RGBA") for a in clear]
    paths = []
    for i, im in enumerate(as_pil):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    white, _ = reward_fn(torch.ones(3, 3, *reward_fn.model.image_size), PROMPTS)
    rgb, _ = reward_fn(np.ascontiguousarray(opaque[..., :3]), PROMPTS)
    for images in (as_pil, paths, list(clear)):
        got, _ = reward_fn(images, PROMPTS)
        torch.testing.assert_close(got, white)
        assert not torch.allclose(got, rgb, atol=1e-4)


def test_half_transparent_tensor_matches_the_pil_compositing(reward_fn):
    rgba = (_rgba(reward_fn, 0.5) * 255).round().to(torch.uint8)  # (B, 4, H, W)
    pils = [Image.fromarray(a.permute(1, 2, 0).numpy(), "RGBA") for a in rgba]
    # PIL composites in 8-bit integers; the tensor path in float: at most 1/255 apart.
    torch.testing.assert_close(
        reward_fn(rgba, PROMPTS)[0], reward_fn(pils, PROMPTS)[0], atol=2e-3, rtol=0
    )


def test_alpha_out_of_range_is_refused(reward_fn):
    with pytest.raises(ValueError, match=r"alpha channel .* \[0, 1\]"):
        reward_fn(_rgba(reward_fn, 1.5), PROMPTS)
