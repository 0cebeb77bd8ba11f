"""HyperAlign training losses (docs/hyperalign.md, "Losses").

``L = L_reg(score, s) + lambda * L_ent``, with the *dynamic supervised entailment* loss
``L_ent = mean(max(0, phi - delta * (1 - a_shrink * s)))``: a pair with target ``s`` must put
the image inside the text's entailment cone shrunk to ``(1 - a_shrink * s)`` of its
half-aperture, so a well aligned pair (s -> 1) must sit near the text's axis and a poorly
aligned one (s -> 0) only inside the full cone [ours: reading of the paper].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import HyperAlignConfig
from .model import HyperAlignOutput


def entailment_loss(
    angle: Tensor,
    aperture: Tensor,
    target: Tensor,
    a_shrink: float,
    kind: str = "one-sided",
    margin: float = 0.1,
    tau: float = 0.1,
) -> Tensor:
    """Dynamic entailment loss; all inputs ``(B,)``, ``delta_s = aperture * (1 - a_shrink * s)``.

    - ``one-sided``: ``mean(relu(phi - delta_s))``. Every pair only has to lie *inside* its
      cone, so texts at the origin (``delta`` clamped at pi/2, ``phi`` = the Euclidean angle
      < pi/2) satisfy it for all pairs: the loss drives the cones to collapse there.
    - ``two-sided``: ``mean(s relu(phi - delta_s) + (1 - s) relu(delta_s + margin - phi))``:
      well aligned pairs inside the shrunk cone, poorly aligned ones beyond its boundary.
    - ``membership``: ``BCE(sigmoid((delta_s - phi) / tau), s)``: soft cone membership whose
      probability is the alignment score.
    The last two are violated at the origin by every poorly aligned pair, so they cannot be
    minimised by collapsing the cones.
    """
    shrunk = aperture * (1.0 - a_shrink * target)
    if kind == "one-sided":
        return F.relu(angle - shrunk).mean()
    if kind == "two-sided":
        inside = F.relu(angle - shrunk)
        outside = F.relu(shrunk + margin - angle)
        return (target * inside + (1.0 - target) * outside).mean()
    if kind == "membership":
        return F.binary_cross_entropy_with_logits((shrunk - angle) / tau, target)
    raise ValueError(
        f"unknown entailment loss {kind!r}; use 'one-sided', 'two-sided' or 'membership'"
    )


def plcc_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``(1 - Pearson(pred, target)) / 2`` over the batch (0 when perfectly correlated)."""
    p = pred - pred.mean()
    t = target - target.mean()
    corr = (p * t).sum() / (p.norm() * t.norm()).clamp(min=1e-8)
    return (1.0 - corr) / 2.0


def regression_loss(pred: Tensor, target: Tensor, kind: str = "mse") -> Tensor:
    """``mse``, ``l1`` or ``mse+plcc`` between ``(B,)`` predictions and targets."""
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "mse+plcc":
        return F.mse_loss(pred, target) + plcc_loss(pred, target)
    raise ValueError(f"unknown regression loss {kind!r}; use 'mse', 'l1' or 'mse+plcc'")


def entailment_weight(config: HyperAlignConfig, epochs_done: float | None) -> float:
    """``lambda`` after ``epochs_done`` (fractional) epochs: ``ent_weight``, ramped up linearly
    over ``ent_warmup_epochs`` when that is set (``None``: the full weight)."""
    if config.ent_warmup_epochs <= 0 or epochs_done is None:
        return config.ent_weight
    return config.ent_weight * min(1.0, max(0.0, epochs_done) / config.ent_warmup_epochs)


def hyperalign_loss(
    out: HyperAlignOutput,
    target: Tensor,
    config: HyperAlignConfig,
    epochs_done: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Total loss and its parts (floats, for logging). ``target``: ``(B,)`` in [0, 1];
    ``epochs_done``: training progress, for the entailment warm-up (``ent_warmup_epochs``)."""
    target = target.to(out.score.device, torch.float32)
    reg = regression_loss(out.score.float(), target, config.reg_loss)
    total = reg
    parts = {"loss_reg": float(reg.detach())}
    if config.ent_weight > 0:
        ent = entailment_loss(
            out.angle,
            out.aperture,
            target,
            config.a_shrink,
            config.ent_loss,
            config.ent_margin,
            config.ent_tau,
        )
        total = total + entailment_weight(config, epochs_done) * ent
        parts["loss_ent"] = float(ent.detach())
    parts["loss"] = float(total.detach())
    return total, parts
