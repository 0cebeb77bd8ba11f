"""The reward-function contract of reward.build_reward / HyperAlignReward / WeightedReward."""

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hyperalign.cli import main as cli_main
from reward import HyperAlign, HyperAlignReward, NonFiniteRewardError, WeightedReward, build_reward
from reward import reward_fn as reward_fn_module
from reward.contract import RewardError

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
        (torch.rand(4, 5, 16, 16), PROMPTS, ValueError, r"\(B, 3, H, W\)"),
        (torch.rand(4, 4, 16, 3), PROMPTS, ValueError, "ambiguous"),
        (torch.rand(3, 3, 16, 16), PROMPTS, ValueError, "3 images but 4 texts"),
        (torch.rand(0, 3, 16, 16), (), ValueError, "empty batch"),
        ([], (), ValueError, "empty batch"),
        (torch.rand(4, 3, 16, 16), "a prompt", TypeError, "sequence of strings"),
        ([np.zeros((8, 8), np.uint8)], ("a",), ValueError, r"image 0: .*\(H, W, C\)"),
        ([np.full((8, 8, 3), 2.0, np.float32)], ("a",), ValueError, r"in \[0, 1\]"),
        ([np.zeros((8, 8, 3), np.int64)], ("a",), TypeError, "float or uint8"),
        ([object()], ("a",), TypeError, "image 0 is a object"),
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
    with pytest.raises(RewardError, match="'nan'.*non-finite"):
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


class _Shaped:
    """A critic returning ``n`` rewards whatever the batch."""

    def __init__(self, n):
        self.n = n

    def __call__(self, images, prompts, metadata=None):
        return torch.zeros(self.n), {}


def test_weighted_reward_checks_every_critic_with_the_contract(reward_fn, monkeypatch):
    images = _images()
    seen = []
    real = reward_fn_module.check_reward_output

    def spy(out, batch_size, device, name, where):
        seen.append(name)
        return real(out, batch_size, device, name, where)

    monkeypatch.setattr(reward_fn_module, "check_reward_output", spy)
    combo = WeightedReward({"hyperalign": (reward_fn, 1.0), "const": (_Const(2.0), 0.5)})
    combo(images, PROMPTS)
    assert len(seen) == 2 and "'hyperalign'" in seen[0] and "'const'" in seen[1]
    with pytest.raises(RewardError, match=r"'five'.*shape"):
        WeightedReward({"five": (_Shaped(5), 1.0)})(images, PROMPTS)


def test_weighted_reward_standardize_batch_of_one_is_zero_not_nan(reward_fn):
    combo = WeightedReward({"h": (reward_fn, 1.0), "c": (_Const(3.0), 2.0)}, standardize=True)
    image = _images(b=1).requires_grad_(True)
    with pytest.warns(UserWarning, match="batch of one"):
        total, info = combo(image.detach(), PROMPTS[:1])
    assert total.shape == (1,) and float(total[0]) == 0.0
    assert info["c"] == [3.0] and np.isfinite(info["h"]).all()  # the raw rewards are kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        combo(image.detach(), PROMPTS[:1])
        scores = WeightedReward({"h": (reward_fn, 1.0)}, standardize=True)
    with pytest.warns(UserWarning, match="batch of one"):
        s = scores.score(image, PROMPTS[:1])
    s.sum().backward()
    assert float(s[0]) == 0.0 and torch.isfinite(image.grad).all()
    # B >= 2 is unchanged: z-scores.
    z = WeightedReward({"h": (reward_fn, 1.0)}, standardize=True)(_images(), PROMPTS)[0]
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1) < 1e-4


def _nan_model():
    torch.manual_seed(0)
    model = HyperAlign(tiny_config())
    with torch.no_grad():
        model.image_scale_logit.fill_(float("nan"))
    return model


def test_non_finite_model_output_raises_naming_the_checkpoint():
    fn = HyperAlignReward(_nan_model(), name="runs/broken-ckpt")
    images = _images()
    with pytest.raises(NonFiniteRewardError, match=r"'runs/broken-ckpt'.*image_scale_logit"):
        fn(images, PROMPTS)
    with pytest.raises(NonFiniteRewardError, match="runs/broken-ckpt"):
        fn.score(images.requires_grad_(True), PROMPTS)
    assert issubclass(NonFiniteRewardError, RewardError)


def _spy_texts(monkeypatch, model):
    """Record every batch of prompts the text tower encodes."""
    calls = []
    real = model.encode_texts

    def spy(texts):
        calls.append(list(texts))
        return real(texts)

    monkeypatch.setattr(model, "encode_texts", spy)
    return calls


def test_text_features_once_per_distinct_prompt(reward_fn, monkeypatch):
    model = reward_fn.model
    on = HyperAlignReward(model, max_batch_size=5)
    off = HyperAlignReward(model, max_batch_size=5, dedupe_prompts=False)
    rng = np.random.default_rng(0)
    distinct = ["a red circle", "two blue squares", "a green triangle", "a big yellow square"]
    prompts = [distinct[i] for i in rng.permutation(np.repeat(np.arange(4), 6))]  # B = 24
    images = _images(b=24, size=32)
    calls = _spy_texts(monkeypatch, model)
    got, info = on(images, prompts)
    assert sum(calls, []) == list(dict.fromkeys(prompts))  # each distinct prompt once
    calls.clear()
    ref, ref_info = off(images, prompts)
    assert sum(calls, []) == prompts and max(len(c) for c in calls) == 5
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for key in info:
        assert np.allclose(info[key], ref_info[key], rtol=1e-5, atol=1e-6), key
    # Differentiable path: same scores and gradients.
    a = images.clone().requires_grad_(True)
    b = images.clone().requires_grad_(True)
    on.score(a, prompts).sum().backward()
    off.score(b, prompts).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    # Distinct prompts: the very same computation.
    assert torch.equal(on(images[:4], distinct)[0], off(images[:4], distinct)[0])


def _png(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
    return str(path)


def _strict_loads(text):
    def refuse(name):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_cli_score_json_is_strict_and_a_nan_checkpoint_is_an_error(tmp_path, capsys):
    files = [_png(tmp_path / "a.png", 0), _png(tmp_path / "b.png", 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ["score", "--model", "tiny-random", "--json", "--prompt", "a red circle"]
        assert cli_main([*args, *files]) == 0
    rows = _strict_loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == files and all(np.isfinite(r["score"]) for r in rows)
    _nan_model().save_pretrained(tmp_path / "nan-ckpt")
    args = ["score", "--model", str(tmp_path / "nan-ckpt"), "--json", "--prompt", "a", *files]
    assert cli_main(args) == 2
    out, err = capsys.readouterr()
    assert "NaN" not in out and "hyperalign score: error:" in err
    assert "nan-ckpt" in err and ("non-finite" in err or "NaN" in err)


def test_cli_score_prompt_count_mismatch_is_a_user_error(tmp_path, capsys):
    files = [_png(tmp_path / "a.png"), _png(tmp_path / "b.png")]
    args = ["score", "--model", "tiny-random", "--prompt", "a", "--prompt", "b", "--prompt", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli_main([*args, *files]) == 2
    assert "2 images but 3 --prompt values" in capsys.readouterr().err


def test_bench_dedupe_mode_prints_its_table():
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_reward.py"
    cmd = [sys.executable, str(script), "--reward", "tiny-random", "--batch-sizes", "8"]
    cmd += ["--repeats", "1", "--images-per-prompt", "4", "8"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    rows = [r for r in out.stdout.splitlines() if r.startswith("| 8 |")]
    assert [r.split("|")[2:4] for r in rows] == [[" 4 ", " 2 "], [" 8 ", " 1 "]]
    assert all(float(r.split("|")[-2]) < 1e-5 for r in rows)  # the same rewards either way
