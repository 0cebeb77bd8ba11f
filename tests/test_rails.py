"""Rails against cone collapse (``HyperAlignConfig`` fields ``text_min_radius``,
``adapter_norm_cap``, ``regressor_init_std``, ``ent_warmup_epochs``): each changes what it
promises, and nothing when off."""

import math

import torch

from reward.config import HyperAlignConfig
from reward.losses import entailment_weight, hyperalign_loss, regression_loss
from reward.model import GatedAdapter, HyperAlign

CLAMP = math.asin(1 - 1e-6) - 2e-4  # half-apertures above this are at the clamp


def _model(**overrides) -> HyperAlign:
    torch.manual_seed(0)
    return HyperAlign(HyperAlignConfig(backbone="hyperalign-tiny", pretrained=None, **overrides))


def _features(n: int = 16, dim: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g)


def _collapse_text(model: HyperAlign) -> None:
    """Put the text points at the origin's doorstep (text scale 1e-3): every cone clamped."""
    with torch.no_grad():
        model.text_scale_logit.fill_(math.log(1e-3 / (1 - 1e-3)))


def test_min_text_radius_keeps_every_cone_open():
    f_i, f_t = _features(dim=_model().embed_dim)
    plain, railed = _model(), _model(text_min_radius=1.2)
    for m in (plain, railed):
        _collapse_text(m)
    assert bool((plain.head(f_i, f_t).aperture > CLAMP).all())  # collapsed without the rail
    ap = railed.head(f_i, f_t).aperture
    assert bool((ap < CLAMP).all()), ap
    # r = 1.2: sqrt(c)|x_s| >= sinh(1.2 asinh(2k)) exactly when the tangent norm -> 0.
    c = float(railed.curv)
    bound = math.asin(2 * 0.1 / math.sinh(1.2 * math.asinh(2 * 0.1)))
    assert float(ap.max()) <= bound + 1e-5
    assert math.isclose(c, 1.0)


def test_min_text_radius_barely_moves_far_points():
    f_i, f_t = _features(dim=_model().embed_dim)
    plain, railed = _model(scale_init=0.9), _model(scale_init=0.9, text_min_radius=1.2)
    d0, d1 = plain.head(f_i, f_t).distance, railed.head(f_i, f_t).distance
    # Tangent norms ~ 0.9 * |f| ~ 5 against a floor of 0.24: a relative change below 0.3 %.
    assert torch.allclose(d0, d1, rtol=3e-3)
    assert not torch.equal(d0, d1)


def test_adapter_norm_cap_bounds_the_gain():
    torch.manual_seed(0)
    f = torch.randn(8, 32)
    for cap, bounded in ((0.0, False), (1.5, True)):
        ad = GatedAdapter(32, 64, norm_cap=cap)
        with torch.no_grad():
            ad.gate.fill_(3.0)
            for p in ad.mlp.parameters():
                p.mul_(20.0)
        gain = ad(f).detach().norm(dim=-1) / f.norm(dim=-1)
        if bounded:
            assert float(gain.max()) <= 1.5 + 1e-5
        else:
            assert float(gain.max()) > 3.0  # what the rail prevents


def test_regressor_init_std_lets_regression_reach_the_geometry_at_step_0():
    dim = _model().embed_dim
    f_i, f_t = _features(dim=dim)
    target = torch.rand(16)
    grads = {}
    for std in (0.0, 0.05):
        m = _model(regressor_init_std=std)
        loss = regression_loss(m.head(f_i, f_t).score, target)
        loss.backward()
        grads[std] = float(m.text_scale_logit.grad.abs() + m.log_curv.grad.abs())
    assert grads[0.0] == 0.0  # the collapse mechanism: no regression gradient on the geometry
    assert grads[0.05] > 1e-6


def test_entailment_warmup_ramps_lambda():
    cfg = HyperAlignConfig(backbone="hyperalign-tiny", pretrained=None, ent_warmup_epochs=2.0)
    assert entailment_weight(cfg, 0.0) == 0.0
    assert math.isclose(entailment_weight(cfg, 1.0), 0.1)
    assert entailment_weight(cfg, 5.0) == cfg.ent_weight
    assert entailment_weight(cfg, None) == cfg.ent_weight
    off = cfg.replace(ent_warmup_epochs=0.0)
    assert entailment_weight(off, 0.0) == off.ent_weight
    m = _model(ent_warmup_epochs=2.0)
    f_i, f_t = _features(dim=m.embed_dim)
    out = m.head(f_i, f_t)
    target = torch.rand(16)
    at0, _ = hyperalign_loss(out, target, m.config, 0.0)
    full, parts = hyperalign_loss(out, target, m.config, 10.0)
    assert math.isclose(float(at0), parts["loss_reg"], rel_tol=1e-6)
    assert float(full) > float(at0)


def test_rails_are_validated():
    import pytest

    for name in ("text_min_radius", "adapter_norm_cap", "regressor_init_std", "ent_warmup_epochs"):
        with pytest.raises(ValueError, match=name):
            HyperAlignConfig(backbone="hyperalign-tiny", pretrained=None, **{name: -1.0})
