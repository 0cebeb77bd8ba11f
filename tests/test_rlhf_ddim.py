"""Properties of the DDIM step with log-prob (rlhf.ddim_logprob) and of the sampler."""

import pytest
import torch
from diffusers import DDIMScheduler

from rlhf.ddim_logprob import check_scheduler, ddim_step_with_logprob, gaussian_logprob

pytestmark = pytest.mark.usefixtures("one_thread")


def _scheduler(steps=10, **kw):
    kw = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        **kw,
    }
    s = DDIMScheduler(**kw)
    s.set_timesteps(steps)
    return s


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_sample_matches_diffusers_step(prediction_type, eta):
    """With the same noise, our step returns diffusers' DDIMScheduler.step sample."""
    s = _scheduler(prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    for t in s.timesteps:
        ours = ddim_step_with_logprob(s, eps, t, x, eta, generator=torch.Generator().manual_seed(1))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        ref = s.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
        torch.testing.assert_close(ours.prev_sample, ref, rtol=1e-5, atol=1e-5)
        zero = s.step(eps, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        torch.testing.assert_close(ours.mean, zero, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1])
def test_logprob_is_gaussian_density(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=dtype)
    mean = torch.randn(2, 3, 4, 4, generator=g, dtype=dtype)
    std = torch.tensor([0.3, 1.7], dtype=dtype).view(2, 1, 1, 1)
    ref = torch.distributions.Normal(mean.double(), std.double()).log_prob(x.double())
    ref = ref.mean(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_logprob(x, mean, std).double(), ref, rtol=1e-5, atol=1e-5)


def test_per_sample_timesteps_equal_scalar_steps():
    """A (B,) timestep tensor gives, row by row, the result of scalar timesteps."""
    s = _scheduler()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)
    eps = torch.randn(4, 4, 8, 8, generator=g)
    prev = torch.randn(4, 4, 8, 8, generator=g)
    ts = s.timesteps[torch.tensor([0, 3, 9, 5])]  # includes the last step (prev_t < 0)
    batched = ddim_step_with_logprob(s, eps, ts, x, 1.0, prev_sample=prev)
    for i, t in enumerate(ts):
        single = ddim_step_with_logprob(
            s, eps[i : i + 1], int(t), x[i : i + 1], 1.0, prev[i : i + 1]
        )
        torch.testing.assert_close(batched.log_prob[i : i + 1], single.log_prob)
        torch.testing.assert_close(batched.mean[i : i + 1], single.mean)


def test_logprob_of_own_sample_is_recomputed_exactly():
    s = _scheduler()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(2, 4, 8, 8, generator=g)
    out = ddim_step_with_logprob(s, eps, s.timesteps[2], x, 1.0, generator=g)
    again = ddim_step_with_logprob(s, eps, s.timesteps[2], x, 1.0, prev_sample=out.prev_sample)
    torch.testing.assert_close(out.log_prob, again.log_prob, rtol=0, atol=0)
    # A sample far from the mean is less likely.
    far = ddim_step_with_logprob(s, eps, s.timesteps[2], x, 1.0, prev_sample=out.mean + 5)
    assert (far.log_prob < out.log_prob).all()


def test_scheduler_checks_name_the_fix():
    with pytest.raises(ValueError, match="set_alpha_to_one=False"):
        check_scheduler(_scheduler(set_alpha_to_one=True))
    with pytest.raises(ValueError, match="eta must be > 0"):
        s = _scheduler()
        ddim_step_with_logprob(
            s, torch.zeros(1, 4, 2, 2), s.timesteps[0], torch.zeros(1, 4, 2, 2), 0.0
        )


def test_sampler_reproduces_diffusers_pipeline_and_records_trajectory():
    """Same generator -> the same images as StableDiffusionPipeline.__call__ (CFG, eta=1)."""
    from rlhf.sampling import encode_prompts, sample_with_logprob
    from rlhf.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    embeds = encode_prompts(pipe, ["a red cube", "a blue ball"], "cpu")
    neg = encode_prompts(pipe, ["blurry", "blurry"], "cpu")
    traj = sample_with_logprob(
        pipe, embeds, neg, 5, 5.0, 1.0, generator=torch.Generator().manual_seed(0)
    )
    ref = pipe(
        prompt_embeds=embeds,
        negative_prompt_embeds=neg,
        num_inference_steps=5,
        guidance_scale=5.0,
        eta=1.0,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    torch.testing.assert_close(traj.images, ref, rtol=1e-5, atol=1e-5)
    assert traj.latents.shape == (2, 5, 4, 8, 8) == traj.next_latents.shape
    assert traj.log_probs.shape == (2, 5) and torch.isfinite(traj.log_probs).all()
    torch.testing.assert_close(traj.latents[:, 1:], traj.next_latents[:, :-1])  # a chain
    assert (traj.timesteps[:, :-1] > traj.timesteps[:, 1:]).all()
    # The negative prompt is used: another one changes the samples.
    other = sample_with_logprob(
        pipe,
        embeds,
        encode_prompts(pipe, ["", ""], "cpu"),
        5,
        5.0,
        1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert (other.images - traj.images).abs().max() > 1e-4
