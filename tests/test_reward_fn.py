"""The reward-function contract of reward.build_reward / HyperAlignReward / WeightedReward."""

import json
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from hyperalign.cli import main as cli_main
from reward import HyperAlign, HyperAlignReward, WeightedReward, build_reward

from .conftest import tiny_config

PROMPTS = ("a red circle", "two blue squares", "a green triangle", "a big yellow square")


@pytest.fixture(scope="module")
def reward_fn():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_reward("tiny-random")


def _images(b=4, size=48, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_and_errors(tmp_path):
    with pytest.warns(UserWarning, match="RANDOM weights"):
        fn = build_reward("tiny-random", max_batch_size=3)
    assert isinstance(fn, HyperAlignReward) and fn.max_batch_size == 3
    with pytest.raises(ValueError, match=r"shapes.*tiny-random|tiny-random"):
        build_reward("no-such-preset")
    # A checkpoint directory.
    HyperAlign(tiny_config()).save_pretrained(tmp_path / "ckpt")
    assert isinstance(build_reward(tmp_path / "ckpt"), HyperAlignReward)


def test_contract_ddpo_and_trl_call_styles(reward_fn):
    images = _images()
    metadata = tuple({"i": i} for i in range(4))
    # ddpo-pytorch: reward_fn(images, prompts, metadata) with tuples.
    rewards, info = reward_fn(images, PROMPTS, metadata)
    # trl DDPOTrainer: the same positional call; metadata may be omitted.
    rewards2, _ = reward_fn(images, list(PROMPTS))
    assert rewards.dtype == torch.float32 and rewards.shape == (4,)
    assert rewards.device == images.device
    torch.testing.assert_close(rewards, rewards2)
    assert set(info) == {"s_base", "distance", "angle", "aperture", "alpha", "beta", "gamma"}
    for values in info.values():
        assert isinstance(values, list) and len(values) == 4
        assert all(isinstance(v, float) for v in values)
    json.dumps(info)  # ready to log
    with pytest.raises(ValueError, match="metadata"):
        reward_fn(images, PROMPTS, metadata[:2])


def test_reward_equals_model_score(reward_fn):
    images = _images()
    rewards, _ = reward_fn(images, PROMPTS)
    with torch.no_grad():
        ref = reward_fn.model(images, list(PROMPTS)).score
    torch.testing.assert_close(rewards, ref)


def test_input_forms_agree(reward_fn, tmp_path):
    size = reward_fn.model.image_size
    u8 = torch.randint(0, 256, (4, 3, *size), dtype=torch.uint8)
    float_in = u8.float() / 255
    ref, _ = reward_fn(float_in, PROMPTS)
    got_u8, _ = reward_fn(u8, PROMPTS)
    arrays = [u8[i].permute(1, 2, 0).numpy() for i in range(4)]
    pils = [Image.fromarray(a) for a in arrays]
    paths = []
    for i, im in enumerate(pils):
        paths.append(tmp_path / f"{i}.png")
        im.save(paths[-1])
    for got in (got_u8, reward_fn(arrays, PROMPTS)[0], reward_fn(pils, PROMPTS)[0]):
        torch.testing.assert_close(got, ref)
    torch.testing.assert_close(reward_fn([str(p) for p in paths], PROMPTS)[0], ref)


def test_any_size_is_resized_on_device(reward_fn):
    rewards, _ = reward_fn(_images(size=97), PROMPTS)
    assert rewards.shape == (4,) and torch.all(torch.isfinite(rewards))


@pytest.mark.parametrize(
    "images,prompts,exc,match",
    [
        (torch.rand(4, 3, 16, 16) + 0.5, PROMPTS, ValueError, r"\[0, 1\]"),
        (torch.full((4, 3, 16, 16), float("inf")), PROMPTS, ValueError, "NaN or Inf"),
        (torch.rand(4, 16, 16, 3), PROMPTS, ValueError, r"\(B, 3, H, W\)"),
        (torch.rand(3, 3, 16, 16), PROMPTS, ValueError, "3 images but 4 texts"),
        (torch.rand(0, 3, 16, 16), (), ValueError, "empty batch"),
        ([], (), ValueError, "empty batch"),
        (torch.rand(4, 3, 16, 16), "a prompt", TypeError, "sequence of strings"),
        ([np.zeros((8, 8), np.uint8)], ("a",), ValueError, "HWC"),
        ([np.zeros((8, 8, 3), np.float32)], ("a",), ValueError, "uint8"),
        (["/no/such/file.png"], ("a",), ValueError, "file.png"),
    ],
)
def test_bad_input(reward_fn, images, prompts, exc, match):
    with pytest.raises(exc, match=match):
        reward_fn(images, prompts)


def test_chunked_equals_unchunked():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = build_reward("tiny-random", max_batch_size=64)
        chunked = build_reward("tiny-random", max_batch_size=3)
    images = _images(b=7)
    prompts = [f"prompt number {i}" for i in range(7)]
    a, info_a = whole(images, prompts)
    b, info_b = chunked(images, prompts)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert np.allclose(info_a["angle"], info_b["angle"], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_no_nan_on_valid_input(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn = build_reward("tiny-random", dtype=dtype)
        ref = build_reward("tiny-random")
    extremes = torch.stack(
        [
            torch.zeros(3, 32, 32),
            torch.ones(3, 32, 32),
            torch.rand(3, 32, 32),
            torch.rand(3, 32, 32),
        ]
    )
    prompts = ["", "a " * 100, "x", "a red circle"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewards, info = fn(extremes, prompts)
        ref_rewards, _ = ref(extremes, prompts)
    assert rewards.dtype == torch.float32 and torch.all(torch.isfinite(rewards))
    assert all(np.isfinite(v).all() for v in info.values())
    # Geometry stays fp32; the backbone's half precision moves the score only a little.
    torch.testing.assert_close(rewards, ref_rewards, atol=0.05, rtol=0.05)


def test_differentiable_score_reaches_pixels(reward_fn):
    images = _images(b=2).requires_grad_(True)
    scores = reward_fn.score(images, PROMPTS[:2])
    assert scores.shape == (2,) and scores.requires_grad
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # The plain call builds no graph.
    rewards, _ = reward_fn(images, PROMPTS[:2])
    assert not rewards.requires_grad


def test_picklable(reward_fn):
    images = _images()
    clone = pickle.loads(pickle.dumps(reward_fn))
    torch.testing.assert_close(clone(images, PROMPTS)[0], reward_fn(images, PROMPTS)[0])


class _Const:
    def __init__(self, value):
        self.value = value

    def __call__(self, images, prompts, metadata=None):
        return torch.full((len(prompts),), self.value), {"note": [1.0] * len(prompts)}


class _Broken:
    def __call__(self, images, prompts, metadata=None):
        raise RuntimeError("model not loaded")


def test_weighted_reward(reward_fn):
    images = _images()
    combo = WeightedReward({"hyperalign": (reward_fn, 1.0), "const": (_Const(2.0), 0.5)})
    total, info = combo(images, PROMPTS)
    base, _ = reward_fn(images, PROMPTS)
    torch.testing.assert_close(total, base + 1.0)
    assert info["const"] == [2.0] * 4 and info["const/note"] == [1.0] * 4
    assert info["hyperalign"] == pytest.approx(base.tolist())
    assert "hyperalign/angle" in info
    z = WeightedReward({"h": (reward_fn, 1.0)}, standardize=True)(images, PROMPTS)[0]
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-4
    with pytest.raises(RuntimeError, match="critic 'broken' failed: model not loaded"):
        WeightedReward({"ok": (_Const(1.0), 1.0), "broken": (_Broken(), 1.0)})(images, PROMPTS)
    with pytest.raises(ValueError, match="critic 'nan'"):
        WeightedReward({"nan": (_Const(float("nan")), 1.0)})(images, PROMPTS)


def test_weighted_reward_differentiable_score(reward_fn):
    images = _images(b=2).requires_grad_(True)
    combo = WeightedReward({"h": (reward_fn, 2.0), "logged": (_Const(1.0), 0.0)})
    scores = combo.score(images, PROMPTS[:2])
    torch.testing.assert_close(scores, 2.0 * reward_fn.score(images, PROMPTS[:2]))
    scores.sum().backward()
    assert images.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="critic 'c' has no differentiable score"):
        WeightedReward({"c": (_Const(1.0), 1.0)}).score(images, PROMPTS[:2])


def test_cli_score_table_and_json(shared_data, capsys):
    files = sorted(str(p) for p in (shared_data / "samples" / "imagereward").glob("*.webp"))
    prompt = json.loads((shared_data / "samples" / "imagereward" / "samples.json").read_text())[
        "prompt"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main(["score", "--model", "tiny-random", "--prompt", prompt, *files]) == 0
        table = capsys.readouterr().out
        assert (
            cli_main(["score", "--model", "tiny-random", "--json", "--prompt", prompt, *files]) == 0
        )
        rows = json.loads(capsys.readouterr().out)
    assert len(table.strip().splitlines()) == 1 + len(files)
    assert len(rows) == len(files) and {"score", "angle", "image"} <= set(rows[0])
    assert cli_main(["nope"]) == 2
