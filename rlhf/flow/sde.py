"""The flow-matching ODE sampler turned into an SDE with the same marginals, one Gaussian step
at a time, with the log-probability of each transition (Flow-GRPO, Liu et al. 2025,
arXiv 2505.05470, section 4.2).

Conventions are those of diffusers' `FlowMatchEulerDiscreteScheduler` (Stable Diffusion 3):
time t = sigma runs from 1 (noise) down to 0 (data), x_t = (1 - t) x_0 + t eps, the model
predicts the velocity v = eps - x_0, and one Euler step of the ODE is
x_{t'} = x_t + (t' - t) v with dt = t' - t < 0.

The SDE. With x_0 = x - t v and eps = x + (1 - t) v, the score of the marginal p_t is
grad log p_t(x) = -eps / t = -(x + (1 - t) v) / t. The reverse-time SDE
dx = [v - (sigma_t^2 / 2) grad log p_t(x)] dt + sigma_t dw has the ODE's marginals for any
sigma_t; Flow-GRPO chooses sigma_t = a * sqrt(t / (1 - t)) with a noise level a. Its
Euler-Maruyama step is Gaussian:

    mean = x + [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] * dt
    std  = sigma_t * sqrt(-dt)

With a = 0 the mean is the Euler step of the ODE and the std is 0.

At t = 1 (the first step of SD3's schedules) sigma_t is infinite. The 1 - t under the root is
evaluated at `sigma_cap`, the largest time below 1 of the schedule (Flow-GRPO does the same);
every later step has 1 - t >= 1 - sigma_cap, so the cap changes the first step only.
All arithmetic is fp32 whatever the model dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rlhf.ddim_logprob import gaussian_logprob

__all__ = ["FlowStepOutput", "sde_mean_std", "sde_step_with_logprob", "schedule_sigma_cap"]


@dataclass
class FlowStepOutput:
    """One stochastic step; all fp32 except `prev_sample`, which keeps the input's dtype.

    Attributes:
        prev_sample: x_{t'}, (B, C, H, W).
        log_prob: log p(x_{t'} | x_t), mean over non-batch dims (the DDPO convention), (B,).
        mean: mean of the Gaussian transition, (B, C, H, W).
        std: its standard deviation, (B, 1, 1, 1).
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def schedule_sigma_cap(sigmas: torch.Tensor) -> float:
    """The largest sigma below 1 of a schedule `sigmas` (descending, ending at 0): the time at
    which `sde_mean_std` evaluates the 1 - t of sigma_t when t = 1."""
    below = sigmas[sigmas < 1]
    if below.numel() == 0 or float(below.max()) <= 0:
        raise ValueError("the schedule has no time strictly between 0 and 1")
    return float(below.max())


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) tensor as (B, 1, ..., 1) in fp32, for broadcasting over a sample."""
    values = torch.as_tensor(values, dtype=torch.float32, device=like.device).reshape(-1)
    values = values.expand(like.shape[0]) if values.numel() == 1 else values
    return values.reshape(like.shape[0], *([1] * (like.ndim - 1)))


def sde_mean_std(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    sigma_cap: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, C, H, W) and std (B, 1, 1, 1) of the SDE step from t = `sigma` to
    t' = `sigma_next` (module docstring), in fp32.

    Args:
        sample: x_t, (B, C, H, W).
        velocity: the (guided) model prediction v at x_t, same shape.
        sigma, sigma_next: t and t' < t, scalars or (B,) (one time per sample in training).
        noise_level: a >= 0; 0 gives the ODE's Euler step (std 0).
        sigma_cap: see `schedule_sigma_cap`; in (0, 1).
    """
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if not 0 < sigma_cap < 1:
        raise ValueError(f"sigma_cap must be in (0, 1), got {sigma_cap}")
    x, v = sample.float(), velocity.float()
    t, t_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    dt = t_next - t  # (B, 1, 1, 1), < 0
    if bool((dt >= 0).any()) or bool((t <= 0).any()):
        raise ValueError("each step must go from a time t > 0 to a smaller time t' >= 0")
    # 1 - t is 0 at t = 1: evaluated at the cap there (module docstring).
    sigma_t = noise_level * torch.sqrt(t / (1 - torch.clamp(t, max=sigma_cap)))
    drift = v + sigma_t**2 / (2 * t) * (x + (1 - t) * v)
    mean = x + drift * dt
    std = sigma_t * torch.sqrt(-dt)
    return mean, std


def sde_step_with_logprob(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    sigma_cap: float,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> FlowStepOutput:
    """One SDE step with the log-prob of the transition (arguments as `sde_mean_std`).

    `prev_sample`: x_{t'} to score (training recomputes the log-prob of the recorded
    transition under the current policy); None samples it as mean + std * noise, the noise
    drawn from `generator` (None: the global RNG). Needs `noise_level > 0`.
    """
    if noise_level <= 0:
        raise ValueError(
            f"noise_level must be > 0 for a stochastic step with a log-prob, got {noise_level}"
        )
    mean, std = sde_mean_std(sample, velocity, sigma, sigma_next, noise_level, sigma_cap)
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        prev_sample = (mean + std * noise).to(sample.dtype)
    log_prob = gaussian_logprob(prev_sample, mean, std)
    return FlowStepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)
