"""The DDPO trainer on the tiny offline pipeline: correctness of the recorded log-probs,
checkpoints and resume, the diffusers-format LoRA, reward overlap, robustness, logging,
KL-to-reference and DRaFT-K modes."""

import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from hyperalign.cli import main as cli
from reward.contract import RewardInfoWarning
from rlhf.config import apply_overrides, tiny_cpu
from rlhf.rewards import Brightness, RewardError
from rlhf.sampling import encode_prompts, sample_with_logprob
from rlhf.tiny import build_tiny_pipeline
from rlhf.trainer import (
    LORA_CHECKPOINT_FILE,
    DDPOTrainer,
    NonFiniteSamplesError,
    NonFiniteTrainingError,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, *overrides, name="run"):
    cfg = tiny_cpu()
    cfg.logdir = str(tmp_path)
    cfg.run_name = name
    cfg.save_freq = 0
    cfg.sample_num_steps = 4
    cfg.num_epochs = 1
    return apply_overrides(cfg, list(overrides))


def _lora(trainer):
    return {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}


def test_first_inner_epoch_recomputes_sampling_logprobs(tmp_path):
    """Before the first optimizer step, log-probs recomputed from the stored latents through
    the prepared UNet (with CFG, shuffled timesteps) equal the sampling ones: ratio = 1."""
    # 8 samples, micro-batches of 4, 2 accumulation steps: one optimizer step, at the end.
    cfg = _cfg(tmp_path, "train_gradient_accumulation_steps=2", "sample_num_steps=6")
    trainer = DDPOTrainer(cfg)
    before = _lora(trainer)
    (m,) = trainer.train()
    assert m["optimizer_steps"] == 1
    assert abs(m["ratio_min"] - 1) < 1e-4 and abs(m["ratio_max"] - 1) < 1e-4
    after = _lora(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # and it did train


@pytest.mark.parametrize("selection", ["early", "random"])
def test_timestep_selection(tmp_path, monkeypatch, selection):
    """'early' trains exactly the first num_train_timesteps steps of every trajectory;
    'random' reaches the later ones too."""
    import rlhf.trainer as trainer_mod

    seen = []
    real = trainer_mod.predict_noise

    def spy(unet, latents, t, *args, **kwargs):
        seen.extend(t.flatten().tolist())
        return real(unet, latents, t, *args, **kwargs)

    cfg = _cfg(
        tmp_path,
        "sample_num_steps=8",
        "train_timestep_fraction=0.25",
        f"train_timestep_selection={selection}",
    )
    trainer = DDPOTrainer(cfg)
    monkeypatch.setattr(trainer_mod, "predict_noise", spy)
    samples, _ = trainer.sample_epoch(0)
    trainer.compute_advantages(samples)
    trainer.train_ppo(samples, 0)
    first_two = set(samples["timesteps"][:, :2].flatten().tolist())
    assert len(seen) == samples["timesteps"].shape[0] * 2  # 2 trained steps per sample
    if selection == "early":
        assert set(seen) == first_two
    else:
        assert not set(seen) <= first_two


def test_brightness_learning(tmp_path):
    """A few epochs of DDPO raise brightness; a run rewarded for darkness, with the same
    seed and hence the same sampling noise, gets darker: the gap is learned, not luck."""

    class Darkness:
        def __call__(self, images, prompts, metadata):
            b = images.mean(dim=(1, 2, 3))
            return 1 - b, {"brightness": b.tolist()}

    # 32 samples per epoch, half of 6 timesteps trained, 2 inner epochs: 8 optimizer steps
    # per epoch. Measured over seeds 0 and 1: gap 0.013 / 0.012, gain 0.011 / 0.008, while the
    # standard error of an epoch's mean brightness is ~0.002.
    args = (
        "num_epochs=6",
        "train_learning_rate=1e-2",
        "sample_batch_size=16",
        "train_batch_size=8",
        "train_num_inner_epochs=2",
        "train_timestep_fraction=0.5",
        "sample_num_steps=6",
    )
    runs = {}
    for name, reward in (("bright", Brightness()), ("dark", Darkness())):
        hist = DDPOTrainer(_cfg(tmp_path, *args, name=name), reward_fn=reward).train()
        runs[name] = [m["reward_info/brightness_mean"] for m in hist]
    bright, dark = runs["bright"], runs["dark"]
    assert bright[0] == pytest.approx(dark[0], abs=1e-6)  # same start, same noise
    gain = sum(bright[-3:]) / 3 - bright[0]
    gap = sum(b - d for b, d in zip(bright[-3:], dark[-3:])) / 3
    assert gain > 0.005, runs
    assert gap > 0.008, runs
    assert dark[-1] < dark[0], runs


def test_resume_matches_uninterrupted_run(tmp_path):
    full = DDPOTrainer(_cfg(tmp_path, "num_epochs=3", "save_freq=1", name="full"))
    hist_full = full.train()
    ckpt = tmp_path / "full" / "checkpoints" / "checkpoint_00002"
    assert (ckpt / LORA_CHECKPOINT_FILE).is_file() and (ckpt / "config.json").is_file()
    # Every checkpoint also holds the LoRA in the diffusers format (for hyperalign eval-checkpoints).
    assert (ckpt / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not list((tmp_path / "full" / "checkpoints").glob(".tmp*"))  # atomic: no leftovers

    resumed = DDPOTrainer(_cfg(tmp_path, "num_epochs=3", f"resume_from={ckpt}", name="resumed"))
    assert resumed.progress.epoch == 2
    hist_resumed = resumed.train()
    assert [m["epoch"] for m in hist_resumed] == [2]
    assert hist_resumed[0]["reward_mean"] == pytest.approx(hist_full[2]["reward_mean"], abs=1e-6)
    a, b = _lora(full), _lora(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert any(v.abs().max() > 0 for v in a.values())


def test_per_prompt_tracker_is_checkpointed(tmp_path):
    cfg = _cfg(tmp_path, "num_epochs=1", "advantage_mode=per_prompt", name="pp")
    t = DDPOTrainer(cfg)
    t.train()
    state = t.stat_tracker.state_dict()
    assert sum(len(v) for v in state["buffers"].values()) == 8
    t2 = DDPOTrainer(
        _cfg(tmp_path, "num_epochs=1", "advantage_mode=per_prompt", "resume_from=latest", name="pp")
    )
    assert t2.stat_tracker.state_dict() == state


def test_final_lora_loads_with_diffusers_and_reproduces_samples(tmp_path):
    trainer = DDPOTrainer(_cfg(tmp_path, "num_epochs=2", "train_learning_rate=3e-2"))
    trainer.train()
    lora_dir = tmp_path / "run" / "lora"
    weights = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("unet.") for k in weights)

    def sample(pipe, unet=None):
        embeds = encode_prompts(pipe, ["a red cube", "a blue ball"], "cpu")
        neg = encode_prompts(pipe, ["", ""], "cpu")
        g = torch.Generator().manual_seed(123)
        return sample_with_logprob(pipe, embeds, neg, 4, 5.0, 1.0, unet=unet, generator=g).images

    trained = sample(trainer.pipe)
    loaded = build_tiny_pipeline(seed=0)
    base = sample(loaded)
    loaded.load_lora_weights(str(lora_dir))
    reloaded = sample(loaded)
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    assert (base - trained).abs().max() > 1e-4  # the LoRA changes the samples


class _Recorder:
    """Reward that sleeps and records when it ran (picklable, module level)."""

    def __init__(self, delay):
        self.delay, self.calls = delay, []

    def __call__(self, images, prompts, metadata):
        start = time.perf_counter()
        time.sleep(self.delay)
        self.calls.append((start, time.perf_counter()))
        return images.mean(dim=(1, 2, 3)), {}


class _PromptClock:
    def __init__(self):
        self.times = []

    def __call__(self):
        self.times.append(time.perf_counter())
        return "a red cube", {}


@pytest.mark.parametrize("overlap", [True, False])
def test_rewards_overlap_next_sampling_batch(tmp_path, overlap):
    cfg = _cfg(
        tmp_path,
        "sample_num_batches_per_epoch=3",
        "train_batch_size=4",
        f"async_reward_computation={overlap}",
    )
    reward, prompts = _Recorder(0.3), _PromptClock()
    trainer = DDPOTrainer(cfg, reward_fn=reward, prompt_fn=prompts)
    prompts.times.clear()  # drop the start-up check calls
    trainer.sample_epoch(0)
    batch_starts = prompts.times[:: cfg.sample_batch_size]  # first prompt of each batch
    reward0_end = reward.calls[0][1]
    # Overlap: batch 1 started sampling while batch 0's reward was still running.
    assert (batch_starts[1] < reward0_end) == overlap


def test_reward_failures_name_reward_and_batch(tmp_path):
    class Broken:
        def __call__(self, images, prompts, metadata):
            raise KeyError("model missing")

    class NaNReward:
        def __call__(self, images, prompts, metadata):
            r = images.mean(dim=(1, 2, 3))
            r[1] = float("nan")
            return r, {}

    with pytest.raises(RewardError, match=r"Broken raised KeyError.*epoch 0, batch 0"):
        DDPOTrainer(_cfg(tmp_path, name="a"), reward_fn=Broken()).train()
    with pytest.raises(
        RewardError, match=r"NaNReward returned non-finite rewards at indices \[1\]"
    ):
        DDPOTrainer(_cfg(tmp_path, name="b"), reward_fn=NaNReward()).train()


def test_nan_lora_weights_are_reported_as_non_finite_images(tmp_path):
    """NaN LoRA weights make NaN images: the error says so, and does not blame the reward."""
    for mode in ("ppo", "draft"):
        trainer = DDPOTrainer(_cfg(tmp_path, f"train_mode={mode}", name=mode))
        with torch.no_grad():
            for p in trainer.trainable:
                p.fill_(float("nan"))
        with pytest.raises(NonFiniteSamplesError, match="non-finite images") as err:
            trainer.train()
        assert "LoRA tensors hold non-finite weights" in str(err.value)
        assert "reward function" not in str(err.value)


class _OtherToolsReward:
    """Outputs as other tools' rewards produce them: (B, 1) rewards, a scalar and a
    wrong-length info value next to a per-sample one; records the metadata it saw."""

    def __init__(self):
        self.metadata = []

    def __call__(self, images, prompts, metadata):
        self.metadata.extend(metadata)
        b = images.mean(dim=(1, 2, 3))
        info = {"brightness": b.tolist(), "model_version": 3, "batch_stats": [0.1, 0.2]}
        return b[:, None], info


def test_trainer_accepts_outputs_of_other_tools(tmp_path):
    reward = _OtherToolsReward()
    prompts = lambda: ("a red cube", None)  # noqa: E731 (metadata None, as some tools return)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hist = DDPOTrainer(
            _cfg(tmp_path, "num_epochs=2"), reward_fn=reward, prompt_fn=prompts
        ).train()
    dropped = [w for w in caught if issubclass(w.category, RewardInfoWarning)]
    # 4 reward calls, two bad keys: one warning for each, not one per call.
    assert sorted(str(w.message).split("info[")[1][:15] for w in dropped) == [
        "'batch_stats'] ",
        "'model_version'",
    ]
    assert reward.metadata and all(m == {} for m in reward.metadata)
    assert "reward_info/brightness_mean" in hist[-1] and len(hist) == 2


def test_bad_prompt_function_fails_at_start(tmp_path):
    with pytest.raises(TypeError, match="must return"):
        DDPOTrainer(_cfg(tmp_path), prompt_fn=lambda: ("a cat", "not a dict"))


def test_nonfinite_loss_skips_step_then_stops(tmp_path):
    trainer = DDPOTrainer(_cfg(tmp_path, "num_epochs=2", "max_consecutive_nonfinite=2", name="a"))
    real = trainer._ppo_loss
    calls = {"n": 0}

    def once_nan(*args):
        calls["n"] += 1
        loss, stats = real(*args)
        return (loss * float("nan"), stats) if calls["n"] == 1 else (loss, stats)

    trainer._ppo_loss = once_nan
    hist = trainer.train()
    assert hist[-1]["skipped_steps"] == 1 and hist[-1]["optimizer_steps"] == 3
    assert all(torch.isfinite(v).all() for v in _lora(trainer).values())

    trainer = DDPOTrainer(_cfg(tmp_path, "num_epochs=2", "max_consecutive_nonfinite=2", name="b"))
    trainer._ppo_loss = lambda *a: (real(*a)[0] * float("nan"), real(*a)[1])
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive optimizer steps"):
        trainer.train()


def test_tensorboard_logging(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, "log_with=tensorboard", "log_image_freq=1")
    DDPOTrainer(cfg).train()
    scalars, images = set(), set()
    for events in (tmp_path / "run" / "logs").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
        images |= set(acc.Tags()["images"])
    for tag in (
        "reward_mean",
        "reward_std",
        "approx_kl",
        "clipfrac",
        "ratio_mean",
        "reward_info/brightness_mean",
        "time_sampling",
    ):
        assert tag in scalars
    assert "samples" in images


def test_kl_to_reference_and_draft_modes(tmp_path):
    (m,) = DDPOTrainer(_cfg(tmp_path, "train_kl_coef=0.1", "num_epochs=1", name="kl")).train()
    assert m["kl_ref"] >= 0 and m["kl_ref"] < 1e-3  # adapter starts at the base model

    hist = DDPOTrainer(
        _cfg(
            tmp_path,
            "train_mode=draft",
            "draft_k=2",
            "num_epochs=4",
            "train_learning_rate=1e-2",
            name="draft",
        )
    ).train()
    rewards = [m["reward_mean"] for m in hist]
    assert rewards[-1] > rewards[0] + 0.005, rewards


def test_main_end_to_end(tmp_path):
    rc = cli(
        [
            "rl-train",
            "--preset",
            "tiny-cpu",
            "--set",
            f"logdir={tmp_path}",
            "--set",
            "num_epochs=1",
            "--set",
            "sample_num_steps=3",
            "--set",
            "run_name=cli",
        ]
    )
    assert rc == 0
    assert (tmp_path / "cli" / "config.json").is_file()
    assert (tmp_path / "cli" / "lora" / "pytorch_lora_weights.safetensors").is_file()
