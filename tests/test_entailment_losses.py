"""Entailment losses: the one-sided form collapses cones to the origin, the others cannot.

The sweep moves every text point along its ray (its scale ``a_t``) with the images fixed, as
gradient descent on the text scale would, and asks where each loss is smallest.
"""

import math

import pytest
import torch

from reward import lorentz
from reward.config import HyperAlignConfig
from reward.losses import entailment_loss
from reward.model import HyperAlign


def _pairs(seed: int, n: int = 64, dim: int = 16):
    """Text and image features with the CLIP-like property that every angle is < pi/2, and
    targets that fall as the angle grows (aligned pairs are close)."""
    g = torch.Generator().manual_seed(seed)
    f_t = torch.randn(n, dim, generator=g)
    noise = torch.randn(n, dim, generator=g)
    mix = torch.rand(n, generator=g)
    f_i = f_t + mix[:, None] * 1.2 * noise  # angle grows with mix
    target = (1.0 - mix).clamp(0, 1)
    cos = torch.nn.functional.cosine_similarity(f_t, f_i, dim=-1)
    assert bool((cos > 0).all())  # theta < pi/2 for every pair
    return f_t / f_t.norm(dim=-1, keepdim=True), f_i / f_i.norm(dim=-1, keepdim=True), target


def _loss_along_text_scale(kind: str, seed: int, scales, c: float = 1.0, a_i: float = 2.0):
    f_t, f_i, target = _pairs(seed)
    x_i = lorentz.exp_map0(a_i * f_i, torch.tensor(c))
    out = []
    for a_t in scales:
        x_t = lorentz.exp_map0(a_t * f_t, torch.tensor(c))
        angle = lorentz.exterior_angle(x_t, x_i, torch.tensor(c))
        aperture = lorentz.half_aperture(x_t, torch.tensor(c), 0.1)
        out.append(float(entailment_loss(angle, aperture, target, 0.8, kind, 0.1, 0.1)))
    return out


SCALES = [1e-3, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.2, 2.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_sided_loss_is_minimised_at_the_origin(seed):
    losses = _loss_along_text_scale("one-sided", seed, SCALES)
    assert losses[0] == pytest.approx(0.0, abs=1e-6)  # all pairs inside the clamped cone
    assert min(losses) == losses[0]


@pytest.mark.parametrize("kind", ["two-sided", "membership"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_new_losses_are_not_minimised_at_the_origin(kind, seed):
    losses = _loss_along_text_scale(kind, seed, SCALES)
    best = min(range(len(SCALES)), key=losses.__getitem__)
    assert best != 0, losses
    assert losses[0] > losses[best] + 0.01, losses


@pytest.mark.parametrize("kind", ["two-sided", "membership"])
def test_gradient_at_the_origin_pushes_texts_outwards(kind):
    f_t, f_i, target = _pairs(0)
    c = torch.tensor(1.0)
    x_i = lorentz.exp_map0(2.0 * f_i, c)
    log_a = torch.tensor(math.log(0.05), requires_grad=True)
    x_t = lorentz.exp_map0(log_a.exp() * f_t, c)
    angle = lorentz.exterior_angle(x_t, x_i, c)
    aperture = lorentz.half_aperture(x_t, c, 0.1)
    entailment_loss(angle, aperture, target, 0.8, kind, 0.1, 0.1).backward()
    assert float(log_a.grad) < 0  # descent grows the text scale


def test_unknown_loss_and_bad_settings_are_refused():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="two-sided"):
        entailment_loss(z, z, z, 0.8, "hinge")
    with pytest.raises(ValueError, match="ent_loss"):
        HyperAlignConfig(backbone="hyperalign-tiny", pretrained=None, ent_loss="hinge")
    with pytest.raises(ValueError, match="ent_tau"):
        HyperAlignConfig(backbone="hyperalign-tiny", pretrained=None, ent_tau=0.0)


def test_euclidean_control_reads_theta_and_tangent_norms():
    torch.manual_seed(0)
    cfg = HyperAlignConfig(backbone="hyperalign-tiny", pretrained=None, regressor_input="euclidean")
    model = HyperAlign(cfg)
    seen = {}
    model.regressor.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0]))
    f_i, f_t = torch.randn(5, model.embed_dim), torch.randn(5, model.embed_dim)
    out = model.head(f_i, f_t)
    a_t = torch.sigmoid(model.text_scale_logit) * cfg.a_max
    a_i = torch.sigmoid(model.image_scale_logit) * cfg.a_max
    theta = torch.arccos(torch.nn.functional.cosine_similarity(f_i, f_t, dim=-1))
    expected = torch.stack([theta, a_t * f_t.norm(dim=-1), a_i * f_i.norm(dim=-1)], dim=-1)
    torch.testing.assert_close(seen["z"], expected, rtol=1e-5, atol=1e-5)
    assert out.score.shape == (5,)
    cone = HyperAlign(cfg.replace(regressor_input="cone"))
    seen.clear()
    cone.regressor.register_forward_pre_hook(lambda m, args: seen.setdefault("z", args[0]))
    o = cone.head(f_i, f_t)
    torch.testing.assert_close(seen["z"], torch.stack([o.distance, o.angle, o.aperture], -1))
