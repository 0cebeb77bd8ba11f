"""Advantages, reward contract checks, reward/prompt registries (rlhf.stat_tracking,
rlhf.rewards, rlhf.prompts)."""

import json
import pickle
import warnings

import numpy as np
import pytest
import torch

from reward.contract import RewardInfoWarning
from rlhf.prompts import SIMPLE_ANIMALS, FixedPrompts, check_prompt_fn, get_prompt_fn
from rlhf.rewards import Brightness, RewardError, SlowReward, check_reward_output, get_reward
from rlhf.stat_tracking import (
    PerPromptStatTracker,
    compute_advantages,
    global_advantages,
    group_advantages,
    group_centered_advantages,
)


def test_global_advantages_are_standardised():
    adv = global_advantages(np.array([1.0, 2.0, 3.0, 4.0]))
    assert abs(adv.mean()) < 1e-6 and abs(adv.std() - 1) < 1e-4


def test_group_advantages_normalise_inside_each_prompt():
    prompts = ["a", "a", "b", "b", "c"]
    adv = group_advantages(np.array([1.0, 3.0, 100.0, 102.0, 7.0]), prompts)
    np.testing.assert_allclose(adv[:4], [-1, 1, -1, 1], atol=1e-4)
    assert adv[4] == 0  # a group of one carries no relative information


def test_group_centered_advantages_keep_the_size_of_each_groups_spread():
    """Centred on the group mean, one scale for the whole batch: a group whose rewards barely
    differ (noise, near-ties) gets small advantages, where per-group std would inflate them."""
    prompts = ["a", "a", "b", "b", "c"]
    rewards = np.array([1.0, 3.0, 100.0, 100.02, 7.0])
    adv = group_centered_advantages(rewards, prompts)
    centred = np.array([-1.0, 1.0, -0.01, 0.01, 0.0])
    np.testing.assert_allclose(adv, centred / np.sqrt((centred**2).mean()), rtol=1e-5)
    assert abs(adv[2]) < 0.02 * abs(adv[0])
    assert abs(group_advantages(rewards, prompts)[2]) > 0.99  # the per-group-std contrast
    assert compute_advantages("group_centered", rewards, prompts, clip=5.0).tolist() == adv.tolist()


def test_per_prompt_tracker_uses_batch_stats_until_min_count():
    tr = PerPromptStatTracker(buffer_size=4, min_count=3)
    r1 = np.array([0.0, 10.0, 1.0, 11.0])
    adv1 = tr.update(["a", "b", "a", "b"], r1)  # 2 per prompt < 3: batch statistics
    np.testing.assert_allclose(adv1, (r1 - r1.mean()) / (r1.std() + 1e-6), rtol=1e-5)
    adv2 = tr.update(["a", "b"], np.array([2.0, 12.0]))  # 3 each: per-prompt statistics
    np.testing.assert_allclose(
        adv2, [(2 - 1) / np.std([0, 1, 2]), (12 - 11) / np.std([10, 11, 12])], rtol=1e-4
    )
    tr.update(["a"] * 3, np.array([5.0, 5.0, 5.0]))
    assert list(tr.buffers["a"]) == [2.0, 5.0, 5.0, 5.0]  # bounded buffer keeps the newest


def test_tracker_state_round_trips_through_json():
    tr = PerPromptStatTracker(2, 1)
    tr.update(["x", "y"], np.array([1.0, 2.0]))
    other = PerPromptStatTracker()
    other.load_state_dict(json.loads(json.dumps(tr.state_dict())))  # as checkpoints store it
    assert other.state_dict() == tr.state_dict()
    a = tr.update(["x"], np.array([3.0]))
    b = other.update(["x"], np.array([3.0]))
    np.testing.assert_array_equal(a, b)


def test_compute_advantages_clips_and_rejects_unknown_modes():
    adv = compute_advantages("global", np.array([0.0] * 99 + [1.0]), ["p"] * 100, clip=5.0)
    assert adv.max() == 5.0
    with pytest.raises(ValueError, match="per_prompt, group, group_centered, global"):
        compute_advantages("nope", np.zeros(2), ["a", "b"])


def test_brightness_contract_and_differentiable_score():
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    rewards, info = Brightness()(images, ["a"] * 3, [{}] * 3)
    assert rewards.dtype == torch.float32 and rewards.shape == (3,)
    assert info["brightness"] == pytest.approx(rewards.tolist())
    Brightness().score(images).sum().backward()
    assert images.grad is not None
    assert pickle.loads(pickle.dumps(SlowReward(Brightness(), 0.01)))(images, ["a"] * 3, [{}] * 3)


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ((torch.zeros(2), {}), r"shape \(2,\)"),
        ((torch.tensor([0.0, float("nan"), 1.0]), {}), "non-finite rewards at indices \\[1\\]"),
        (torch.zeros(3), "must return \\(rewards, info\\)"),
        ((torch.zeros(3), ["a", "b", "c"]), "info of type list"),
        ((torch.zeros(3, 2), {}), r"shape \(3, 2\)"),
    ],
)
def test_reward_output_errors_name_reward_and_batch(out, message):
    with pytest.raises(RewardError, match=message) as e:
        check_reward_output(out, 3, "cpu", "MyReward", "epoch 2, batch 1")
    assert "MyReward" in str(e.value) and "epoch 2, batch 1" in str(e.value)


def test_reward_output_accepts_numpy_and_lists():
    r, info = check_reward_output((np.array([1, 2, 3]), {"x": np.ones(3)}), 3, "cpu", "R", "")
    assert r.dtype == torch.float32 and info["x"] == [1.0, 1.0, 1.0]


def test_reward_output_accepts_what_other_tools_return():
    """(B, 1) rewards are squeezed, info None is {}, and info values that are not per-sample
    lists are dropped with one warning per key when the caller passes its `dropped` set."""
    r, info = check_reward_output((torch.ones(3, 1), None), 3, "cpu", "R", "")
    assert r.shape == (3,) and info == {}
    seen: set[str] = set()
    out = (torch.zeros(3), {"ok": [1, 2, 3], "scalar": 0.5, "short": [1], "t": torch.tensor(2.0)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            r, info = check_reward_output(out, 3, "cpu", "R", "epoch 0", dropped=seen)
    assert info == {"ok": [1, 2, 3]}
    assert len([w for w in caught if issubclass(w.category, RewardInfoWarning)]) == 3
    assert seen == {"scalar", "short", "t"}


def test_tracker_rejects_malformed_state():
    with pytest.raises(ValueError, match="not a PerPromptStatTracker state"):
        PerPromptStatTracker().load_state_dict({"buffer_size": 4, "min_count": 2, "buffers": 3})


def test_reward_registry():
    assert isinstance(get_reward("brightness"), Brightness)
    with pytest.raises(ValueError, match="hyperalign:<name_or_path>"):
        get_reward("aesthetic")


def test_prompt_functions():
    fn = get_prompt_fn("fixed:a red cube| a blue ball ")
    assert fn.prompts == ["a red cube", "a blue ball"]
    check_prompt_fn(fn)
    prompt, meta = get_prompt_fn("simple_animals_photo")()
    assert prompt.startswith("a photo of a ") and "index" in meta
    pickle.dumps(fn)
    with pytest.raises(ValueError, match="file:<path>"):
        get_prompt_fn("animals")
    with pytest.raises(FileNotFoundError):
        get_prompt_fn("file:/does/not/exist.txt")
    with pytest.raises(TypeError, match=r"must return \(prompt: str, metadata: dict\)"):
        check_prompt_fn(lambda: "just a string")
    check_prompt_fn(lambda: ("a cat", None))  # metadata None is accepted (becomes {})
    with pytest.raises(ValueError):
        FixedPrompts([])


def test_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\na cat\na dog\n")
    assert sorted(get_prompt_fn(f"file:{f}").prompts) == ["a cat", "a dog"]


def test_simple_animals_match_shared_file(shared_data):
    path = shared_data / "prompts" / "simple_animals.txt"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    names = path.read_text().split()
    assert tuple(names) == SIMPLE_ANIMALS


@pytest.mark.parametrize("mode", ["group", "group_centered", "global"])
def test_advantages_ignore_an_increasing_affine_map_of_the_reward(mode):
    """Why a calibration ``a * cos + b`` of the raw cosine is the zero-shot cosine as an RL
    reward: a * r + b (a > 0) gives the same normalised advantages (up to the std's epsilon),
    so only rewards that re-rank images (trained adapters, a head) can train differently."""
    from rlhf.stat_tracking import global_advantages, group_advantages, group_centered_advantages

    rng = np.random.default_rng(0)
    rewards = rng.normal(size=32)
    prompts = [f"p{i // 4}" for i in range(32)]
    fn = {
        "group": lambda r: group_advantages(r, prompts),
        "group_centered": lambda r: group_centered_advantages(r, prompts),
        "global": global_advantages,
    }[mode]
    np.testing.assert_allclose(fn(3.7 * rewards - 1.2), fn(rewards), atol=1e-3)
    assert not np.allclose(fn(rewards**3), fn(rewards), atol=1e-3)  # a re-ranking map differs
