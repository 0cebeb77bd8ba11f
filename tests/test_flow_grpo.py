"""Flow-GRPO on Stable Diffusion 3 (`rlhf.flow`): the SDE step's math by its properties, the
tiny offline SD3 pipeline against diffusers' own sampler, and the trainer (first-epoch
ratios, KL to the reference, gradient sync over 2 processes, resume, learning, the LoRA
that `StableDiffusion3Pipeline.load_lora_weights` loads, the trainer dispatch)."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from hyperalign.cli import main as cli
from rlhf.config import apply_overrides, get_preset, sd35m_hyperalign, tiny_sd3_cpu
from rlhf.flow.sampling import encode_prompts, sample_with_logprob
from rlhf.flow.sde import schedule_sigma_cap, sde_mean_std, sde_step_with_logprob
from rlhf.flow.select import resolve_trainer, trainer_class
from rlhf.flow.tiny import build_tiny_sd3_pipeline
from rlhf.rewards import Brightness

pytestmark = pytest.mark.usefixtures("one_thread")


def _scheduler_sigmas(steps: int) -> torch.Tensor:
    from rlhf.flow.tiny import sd3_flow_scheduler

    scheduler = sd3_flow_scheduler()
    scheduler.set_timesteps(steps)
    return scheduler.sigmas  # (steps + 1,), 1 ... 0


# ------------------------------------------------------------------------- the SDE step ---
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_is_the_gaussian_density_of_the_step(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 5, 5, generator=g).to(dtype)
    v = torch.randn(3, 4, 5, 5, generator=g).to(dtype)
    sigmas = _scheduler_sigmas(10)
    cap = schedule_sigma_cap(sigmas)
    sigma, sigma_next = sigmas[[0, 4, 9]], sigmas[[1, 5, 10]]  # one step per sample, t=1 too
    out = sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, cap, generator=g)
    assert out.prev_sample.dtype == dtype and out.log_prob.dtype == torch.float32
    normal = torch.distributions.Normal(out.mean, out.std.expand_as(out.mean))
    expected = normal.log_prob(out.prev_sample.float()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    # Scoring a given next sample gives the same density; another sample a lower one.
    again = sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, cap, prev_sample=out.prev_sample)
    torch.testing.assert_close(again.log_prob, out.log_prob, rtol=0, atol=0)
    worse = sde_step_with_logprob(
        x, v, sigma, sigma_next, 0.7, cap, prev_sample=out.mean + 3 * out.std
    )
    assert (worse.log_prob < normal.log_prob(out.mean).mean(dim=(1, 2, 3))).all()
    # std = a * sqrt(t / (1 - t)) * sqrt(t - t'), with 1 - t at the cap for t = 1.
    t, tn = sigma.double(), sigma_next.double()
    std = 0.7 * torch.sqrt(t / (1 - torch.clamp(t, max=cap))) * torch.sqrt(t - tn)
    torch.testing.assert_close(out.std.reshape(-1).double(), std, rtol=1e-5, atol=0)


def test_zero_noise_is_the_schedulers_euler_step():
    from rlhf.flow.tiny import sd3_flow_scheduler

    scheduler = sd3_flow_scheduler()
    scheduler.set_timesteps(8)
    sigmas, cap = scheduler.sigmas, schedule_sigma_cap(scheduler.sigmas)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 6, 6, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 4, 6, 6, generator=g)
        euler = scheduler.step(v, t, x, return_dict=False)[0]
        mean, std = sde_mean_std(x, v, sigmas[i], sigmas[i + 1], 0.0, cap)
        torch.testing.assert_close(mean, euler, rtol=0, atol=1e-6)
        assert float(std.abs().max()) == 0
        noisy, _ = sde_mean_std(x, v, sigmas[i], sigmas[i + 1], 0.7, cap)
        assert (noisy - euler).abs().max() > 1e-3  # the noise level's drift correction
        x = euler


def test_sde_keeps_the_marginals_of_the_flow():
    """Data x_0 ~ N(0, s^2): the exact velocity is E[eps - x_0 | x_t] = (t - (1 - t) s^2) /
    V_t * x with V_t = (1 - t)^2 s^2 + t^2. The SDE started from noise ends at std s like the
    ODE; the same noise without the drift correction does not."""
    s, steps = 0.5, 200
    sigmas = _scheduler_sigmas(steps)
    cap = schedule_sigma_cap(sigmas)
    finals = {}
    for mode in ("sde", "ode", "uncorrected"):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 50_000, generator=g)
        for i in range(steps):
            t = float(sigmas[i])
            v = (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * x
            mean, std = sde_mean_std(
                x, v, sigmas[i], sigmas[i + 1], 0.0 if mode == "ode" else 0.7, cap
            )
            if mode == "uncorrected":
                mean = x + (sigmas[i + 1] - sigmas[i]) * v
            x = mean + std * torch.randn(x.shape, generator=g)
        finals[mode] = float(x.std())
    assert finals["sde"] == pytest.approx(s, abs=0.015), finals
    assert finals["ode"] == pytest.approx(s, abs=0.015), finals
    assert finals["uncorrected"] > 2 * s, finals


def test_step_rejects_impossible_times_and_noise():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="noise_level must be > 0"):
        sde_step_with_logprob(x, x, 0.5, 0.4, 0.0, 0.9)
    with pytest.raises(ValueError, match="smaller time"):
        sde_mean_std(x, x, 0.4, 0.5, 0.7, 0.9)
    with pytest.raises(ValueError, match="sigma_cap"):
        sde_mean_std(x, x, 0.5, 0.4, 0.7, 1.0)


# ----------------------------------------------------------------- the tiny SD3 pipeline ---
@pytest.mark.parametrize("with_t5", [True, False])
def test_tiny_sd3_pipeline_samples_like_diffusers(with_t5):
    """Built offline; our SDE sampler with (almost) no noise reproduces
    `StableDiffusion3Pipeline.__call__` (CFG, text encoders, schedule, VAE decoding)."""
    from diffusers import StableDiffusion3Pipeline

    pipe = build_tiny_sd3_pipeline(seed=0, with_t5=with_t5)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert (pipe.text_encoder_3 is None) != with_t5
    prompts = ["a red cube", "a blue ball"]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(
        prompts,
        num_inference_steps=4,
        guidance_scale=4.5,
        latents=noise.clone(),
        max_sequence_length=16,
        output_type="pt",
    ).images  # (2, 3, 16, 16)
    embeds, pooled = encode_prompts(pipe, prompts, "cpu", 16)
    neg, neg_pooled = encode_prompts(pipe, ["", ""], "cpu", 16)
    traj = sample_with_logprob(
        pipe, embeds, pooled, neg, neg_pooled, 4, 4.5, 1e-6, latents=noise.clone()
    )
    assert traj.images.shape == ref.shape == (2, 3, 16, 16)
    torch.testing.assert_close(traj.images, ref, rtol=0, atol=1e-4)
    assert traj.latents.shape == traj.next_latents.shape == (2, 4, 4, 8, 8)
    assert traj.log_probs.shape == traj.sigmas.shape == (2, 4)
    assert torch.equal(traj.latents[:, 1:], traj.next_latents[:, :-1])
    torch.testing.assert_close(traj.timesteps, traj.sigmas * 1000)
    other = pipe(
        prompts, num_inference_steps=4, latents=-noise, max_sequence_length=16, output_type="pt"
    )
    assert (other.images - ref).abs().max() > 1e-3  # the comparison can tell samples apart


# ------------------------------------------------------------------------------ trainer ---
def _cfg(logdir, *overrides, name="run"):
    cfg = tiny_sd3_cpu()
    cfg.logdir = str(logdir)
    cfg.run_name = name
    cfg.log_with = "none"
    cfg.save_freq = 1
    cfg.sample_num_steps = 3
    cfg.sample_batch_size = 4
    cfg.sample_num_batches_per_epoch = 1
    cfg.num_epochs = 2
    return apply_overrides(cfg, list(overrides))


def _lora(trainer) -> dict:
    return {
        n: p.detach().clone().contiguous()
        for n, p in trainer.transformer.named_parameters()
        if p.requires_grad
    }


def _trainer(cfg, **kwargs):
    from rlhf.flow.trainer import FlowGRPOTrainer

    return FlowGRPOTrainer(cfg, **kwargs)


def test_first_inner_epoch_recomputes_sampling_logprobs_and_kl_starts_at_zero(tmp_path):
    # One optimizer step per epoch, after all micro-batches: every ratio of epoch 0 compares
    # the training forward with the sampling one under the same weights.
    cfg = _cfg(
        tmp_path,
        "num_epochs=2",
        "sample_num_batches_per_epoch=2",
        "train_gradient_accumulation_steps=2",
        "train_kl_coef=0.1",
        "train_learning_rate=3e-2",
    )
    trainer = _trainer(cfg)
    before = _lora(trainer)
    first, second = trainer.train()
    assert first["optimizer_steps"] == 1
    assert abs(first["ratio_min"] - 1) < 1e-4 and abs(first["ratio_max"] - 1) < 1e-4
    assert 0 <= first["kl_ref"] < 1e-8  # LoRA B = 0: the policy is the reference model
    assert second["kl_ref"] > 1e-6  # one step later it is not
    after = _lora(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert "unet" not in trainer.pipe.__dict__  # the alias for DDPOTrainer.__init__ is gone


def _worker(out_dir: str, defect: bool) -> None:
    import os

    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    cfg = _cfg(out_dir, "sample_num_steps=4", "train_learning_rate=1e-2")
    cfg.run_name = "defect" if defect else "ddp"
    trainer = _trainer(cfg)
    if defect:
        trainer.unet_prepared = trainer.unet  # forward through the unwrapped transformer
    hist = trainer.train()
    rank = trainer.accelerator.process_index
    save_file(_lora(trainer), f"{out_dir}/{cfg.run_name}_rank{rank}.safetensors")
    with open(f"{out_dir}/{cfg.run_name}_rank{rank}.json", "w") as f:
        json.dump({"num_samples": hist[-1]["num_samples"]}, f)


def test_lora_gradients_are_synced_over_two_processes(tmp_path):
    """2 CPU processes (gloo): the LoRA stays identical on both ranks because the training
    forward goes through the prepared (DDP) transformer; forwarding through the unwrapped one
    leaves the ranks apart, which shows the test can tell the difference."""
    from accelerate import debug_launcher

    debug_launcher(_worker, args=(str(tmp_path), False), num_processes=2)
    debug_launcher(_worker, args=(str(tmp_path), True), num_processes=2)
    r0 = load_file(str(tmp_path / "ddp_rank0.safetensors"))
    r1 = load_file(str(tmp_path / "ddp_rank1.safetensors"))
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=1e-7)
    assert any(v.abs().max() > 0 for k, v in r0.items() if "lora_B" in k)  # it trained
    d0 = load_file(str(tmp_path / "defect_rank0.safetensors"))
    d1 = load_file(str(tmp_path / "defect_rank1.safetensors"))
    assert max((d0[k] - d1[k]).abs().max().item() for k in d0) > 1e-4
    assert json.loads((tmp_path / "ddp_rank0.json").read_text())["num_samples"] == 2 * 4
    ckpt = tmp_path / "ddp" / "checkpoints" / "checkpoint_00002"
    assert {p.name for p in ckpt.glob("rng_state_*.json")} == {
        "rng_state_0.json",
        "rng_state_1.json",
    }


def test_resume_matches_uninterrupted_run(tmp_path):
    full = _trainer(_cfg(tmp_path, "num_epochs=3", "train_learning_rate=1e-2", name="full"))
    hist_full = full.train()
    ckpt = tmp_path / "full" / "checkpoints" / "checkpoint_00002"
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()}
    assert "lora/pytorch_lora_weights.safetensors" in files and "trainer_state.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".bin", ".pt"))]  # no pickle
    resumed = _trainer(
        _cfg(
            tmp_path, "num_epochs=3", "train_learning_rate=1e-2", f"resume_from={ckpt}", name="res"
        )
    )
    assert resumed.progress.epoch == 2
    (m,) = resumed.train()
    assert m["epoch"] == 2
    assert m["reward_mean"] == pytest.approx(hist_full[2]["reward_mean"], abs=1e-7)
    a, b = _lora(full), _lora(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    # A resume with another noise level is refused: the checkpoint's log-probs belong to 0.7.
    with pytest.raises(ValueError, match="flow_noise_level"):
        _trainer(_cfg(tmp_path, "flow_noise_level=0.5", f"resume_from={ckpt}", name="other"))


def test_final_lora_loads_with_diffusers_and_reproduces_samples(tmp_path):
    trainer = _trainer(_cfg(tmp_path, "train_learning_rate=3e-2"))
    trainer.train()
    lora_dir = tmp_path / "run" / "lora"
    weights = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    assert weights and all(k.startswith("transformer.") for k in weights)
    ckpt_weights = load_file(
        str(
            tmp_path
            / "run"
            / "checkpoints"
            / "checkpoint_00002"
            / "lora"
            / "pytorch_lora_weights.safetensors"
        )
    )
    assert all(torch.equal(weights[k], ckpt_weights[k]) for k in weights)

    def sample(pipe):
        embeds, pooled = encode_prompts(pipe, ["a red cube", "a blue ball"], "cpu", 16)
        neg, neg_pooled = encode_prompts(pipe, ["", ""], "cpu", 16)
        g = torch.Generator().manual_seed(123)
        return sample_with_logprob(
            pipe, embeds, pooled, neg, neg_pooled, 4, 4.5, 0.7, generator=g
        ).images

    trained = sample(trainer.pipe)
    loaded = build_tiny_sd3_pipeline(seed=0)
    base = sample(loaded)
    loaded.load_lora_weights(str(lora_dir))
    torch.testing.assert_close(sample(loaded), trained, rtol=1e-5, atol=1e-5)
    assert (base - trained).abs().max() > 1e-4  # the LoRA changes the samples


def test_brightness_learning(tmp_path):
    """A few epochs of Flow-GRPO raise brightness; a run rewarded for darkness, with the same
    seed and hence the same first samples, gets darker: the gap is learned, not luck.
    Measured over seeds 0, 1, 2: gain 0.006 / 0.003 / 0.005, gap 0.012 / 0.018 / 0.009,
    while the standard error of an epoch's mean brightness is ~0.0006."""

    class Darkness:
        def __call__(self, images, prompts, metadata):
            b = images.mean(dim=(1, 2, 3))
            return 1 - b, {"brightness": b.tolist()}

    args = (
        "num_epochs=8",
        "train_learning_rate=3e-2",
        "sample_num_steps=6",
        "sample_batch_size=16",
        "sample_num_batches_per_epoch=2",
        "train_batch_size=8",
        "train_num_inner_epochs=2",
        "train_timestep_fraction=0.5",
        "save_freq=0",
    )
    runs = {}
    for name, reward in (("bright", Brightness()), ("dark", Darkness())):
        hist = _trainer(_cfg(tmp_path, *args, name=name), reward_fn=reward).train()
        runs[name] = [m["reward_info/brightness_mean"] for m in hist]
    bright, dark = runs["bright"], runs["dark"]
    assert bright[0] == pytest.approx(dark[0], abs=1e-7)  # same start, same noise
    gain = sum(bright[-3:]) / 3 - bright[0]
    gap = sum(b - d for b, d in zip(bright[-3:], dark[-3:])) / 3
    assert gain > 0.002, runs
    assert gap > 0.005, runs
    assert dark[-1] < dark[0], runs


# ---------------------------------------------------------------- dispatch and settings ---
def test_trainer_follows_the_pipeline_class(tmp_path):
    from rlhf.flow.trainer import FlowGRPOTrainer
    from rlhf.trainer import DDPOTrainer

    assert trainer_class(tiny_sd3_cpu()) is FlowGRPOTrainer
    assert trainer_class(get_preset("tiny-cpu")) is DDPOTrainer
    for cls, expected in (
        ("StableDiffusion3Pipeline", "flow_grpo"),
        ("StableDiffusionPipeline", "ddpo"),
    ):
        folder = tmp_path / cls
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": cls}))
        cfg = apply_overrides(get_preset("tiny-cpu"), [f"pretrained_model={folder}"])
        assert resolve_trainer(cfg) == expected
    cfg = apply_overrides(get_preset("tiny-cpu"), [f"pretrained_model={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="set trainer=flow_grpo"):
        resolve_trainer(cfg)
    assert resolve_trainer(apply_overrides(cfg, ["trainer=flow_grpo"])) == "flow_grpo"
    assert resolve_trainer(apply_overrides(tiny_sd3_cpu(), ["trainer=ddpo"])) == "ddpo"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer=flow"], "trainer must be one of"),
        (["flow_noise_level=0"], "flow_noise_level must be > 0"),
        (["flow_max_sequence_length=600"], "flow_max_sequence_length"),
        (["train_mode=draft"], "PPO-clip only"),
    ],
)
def test_impossible_flow_settings_are_rejected(overrides, message):
    cfg = apply_overrides(tiny_sd3_cpu(), overrides)
    with pytest.raises(ValueError, match=message):
        resolve_trainer(cfg)
    with pytest.raises(ValueError, match=message):
        _trainer(cfg)


def test_sd35m_preset_sizes():
    cfg = sd35m_hyperalign()
    cfg.validate()
    assert resolve_trainer(cfg) == "flow_grpo"  # explicit: no hub access needed
    d = cfg.derived(num_processes=8)
    assert d["samples_per_epoch"] == 48 * 24  # Flow-GRPO: 48 groups of 24 per epoch
    assert d["optimizer_steps_per_epoch"] == 2
    assert d["trained_timesteps_per_sample"] == 9
    assert math.isclose(cfg.flow_noise_level, 0.7) and cfg.sample_num_steps == 10


def test_command_line_runs_flow_grpo(tmp_path, capsys):
    rc = cli(
        [
            "rl-train",
            "--preset",
            "tiny-sd3-cpu",
            "--set",
            f"logdir={tmp_path}",
            "--set",
            "run_name=cli",
            "--set",
            "num_epochs=1",
            "--set",
            "sample_num_steps=2",
            "--set",
            "log_with=none",
        ]
    )
    assert rc == 0
    assert "done: 1 epochs" in capsys.readouterr().out
    weights = load_file(str(tmp_path / "cli" / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("transformer.") for k in weights)
