"""DDIM step that also returns the log-probability of the transition x_t -> x_{t-1}.

Adapted from `diffusers.DDIMScheduler.step` (diffusers 0.42.1,
`schedulers/scheduling_ddim.py`), formulas (12) and (16) of the DDIM paper
(Song et al. 2020). What changed and why:

- `timestep` may be a tensor of shape (B,): during PPO training every sample in a batch is
  at its own (shuffled) timestep, so alphas are gathered per sample instead of indexed by a
  Python int.
- the Gaussian of the stochastic step (mean = deterministic DDIM update, std = eta * sigma_t)
  is exposed, and `prev_sample` may be given: training recomputes the log-probability of the
  transition recorded during sampling under the current policy (DDPO, Black et al. 2023).
- log-probabilities are computed in fp32 whatever the model dtype, and averaged over all
  non-batch dimensions (the DDPO convention, so the PPO ratio is per sample).
- `thresholding` (dynamic thresholding) is not supported: it makes the mean a non-smooth
  function of the whole batch and no SD 1.x config uses it.

Previous timestep: like diffusers, `prev_t = t - num_train_timesteps // num_inference_steps`,
and `final_alpha_cumprod` below t = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DDIMStepOutput", "ddim_step_with_logprob", "gaussian_logprob", "check_scheduler"]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class DDIMStepOutput:
    """Result of one stochastic DDIM step (all float32 except `prev_sample`, which keeps the
    dtype of the input sample).

    Attributes:
        prev_sample: x_{t-1}, (B, C, H, W).
        log_prob: log p(x_{t-1} | x_t), mean over non-batch dims, (B,).
        mean: mean of the Gaussian transition, (B, C, H, W), fp32.
        std: its standard deviation eta * sigma_t, broadcastable (B, 1, 1, 1), fp32.
        pred_original_sample: predicted x_0, (B, C, H, W), fp32.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pred_original_sample: torch.Tensor


def check_scheduler(scheduler) -> None:
    """Raise a clear `ValueError` when `scheduler` cannot be used for log-prob sampling."""
    cfg = scheduler.config
    if type(scheduler).__name__ != "DDIMScheduler":
        raise ValueError(
            f"log-prob sampling needs a DDIMScheduler, got {type(scheduler).__name__}; "
            "fix: pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)"
        )
    if cfg.thresholding:
        raise ValueError(
            "DDIMScheduler(thresholding=True) is not supported; set thresholding=False"
        )
    if cfg.set_alpha_to_one:
        raise ValueError(
            "DDIMScheduler(set_alpha_to_one=True) makes the last step deterministic (std 0), so "
            "its log-prob is undefined; fix: DDIMScheduler.from_config(cfg, set_alpha_to_one=False)"
        )
    if scheduler.num_inference_steps is None:
        raise ValueError("call scheduler.set_timesteps(num_steps) before sampling")


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2) averaged over all non-batch dims, in fp32. Shapes: x, mean
    (B, ...), std broadcastable to them; returns (B,)."""
    x, mean, std = x.float(), mean.float(), std.float()
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - _LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def _per_sample(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with `ndim` dims in total, for broadcasting over a sample."""
    return values.reshape(values.shape[0], *([1] * (ndim - 1)))


def ddim_step_with_logprob(
    scheduler,
    model_output: torch.Tensor,
    timestep: torch.Tensor | int,
    sample: torch.Tensor,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> DDIMStepOutput:
    """One DDIM step with the log-prob of the transition.

    Args:
        scheduler: a `diffusers.DDIMScheduler` on which `set_timesteps` was called.
        model_output: the (guided) model prediction at x_t, (B, C, H, W).
        timestep: t, an int or a tensor of shape (B,) (one timestep per sample).
        sample: x_t, (B, C, H, W).
        eta: DDIM eta; 1.0 is DDPM-like. Must be > 0 for a log-prob to exist.
        prev_sample: x_{t-1} to score; when None it is sampled (mean + std * noise).
        generator: torch RNG for the noise when sampling.
    """
    if eta <= 0:
        raise ValueError(f"eta must be > 0 for a stochastic step with a log-prob, got {eta}")
    batch = sample.shape[0]
    device = sample.device
    step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    t = torch.as_tensor(timestep, device=device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    prev_t = t - step

    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32, device=device)
    alpha_t = alphas_cumprod.gather(0, t)
    alpha_prev = torch.where(prev_t >= 0, alphas_cumprod.gather(0, prev_t.clamp(min=0)), final)
    alpha_t, alpha_prev = (_per_sample(a, sample.ndim) for a in (alpha_t, alpha_prev))
    beta_t = 1 - alpha_t

    x_t = sample.float()
    eps = model_output.float()
    ptype = scheduler.config.prediction_type
    if ptype == "epsilon":
        x0 = (x_t - beta_t.sqrt() * eps) / alpha_t.sqrt()
    elif ptype == "sample":
        x0 = eps
        eps = (x_t - alpha_t.sqrt() * x0) / beta_t.sqrt()
    elif ptype == "v_prediction":
        x0 = alpha_t.sqrt() * x_t - beta_t.sqrt() * eps
        eps = alpha_t.sqrt() * eps + beta_t.sqrt() * x_t
    else:
        raise ValueError(f"unknown prediction_type {ptype!r}")
    if scheduler.config.clip_sample:
        r = scheduler.config.clip_sample_range
        x0 = x0.clamp(-r, r)

    # sigma_t^2 = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)   (DDIM eq. 16)
    variance = (1 - alpha_prev) / beta_t * (1 - alpha_t / alpha_prev)
    std = eta * variance.sqrt()
    # (1 - a_prev - std^2) >= 0 analytically for eta <= 1; clamp guards rounding only.
    direction = (1 - alpha_prev - std**2).clamp(min=0).sqrt() * eps
    mean = alpha_prev.sqrt() * x0 + direction

    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, device=device, dtype=torch.float32)
        prev_sample = (mean + std * noise).to(sample.dtype)
    log_prob = gaussian_logprob(prev_sample, mean, std)
    return DDIMStepOutput(
        prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std, pred_original_sample=x0
    )
