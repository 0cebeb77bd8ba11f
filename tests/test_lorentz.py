"""Property tests of reward.lorentz (docs/hyperalign.md, "Geometry"), float32 and float64."""

import math
import warnings

import pytest
import torch

from reward import lorentz as L

DTYPES = [torch.float32, torch.float64]
SEEDS = [0, 1, 2]
CURVS = [0.1, 1.0, 3.7]
# Per-dtype tolerance on values of order 1.
TOL = {torch.float32: 2e-4, torch.float64: 1e-9}
# Angles near 0 / pi are limited by the acos clamp: sqrt(2 eps).
ANGLE_TOL = {torch.float32: 3e-3, torch.float64: 3e-6}


def _rand(seed, dtype, n=64, d=16, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype) * scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("c", CURVS)
def test_distance_from_origin_is_tangent_norm(dtype, seed, c):
    v = _rand(seed, dtype, scale=0.7)
    x = L.exp_map0(v, c)
    o = torch.zeros_like(x)
    torch.testing.assert_close(
        L.distance(o, x, c), v.norm(dim=-1), rtol=TOL[dtype], atol=TOL[dtype]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("c", CURVS)
def test_points_on_manifold_and_log_exp_round_trip(dtype, seed, c):
    v = _rand(seed, dtype, scale=0.5)
    x = L.exp_map0(v, c)
    torch.testing.assert_close(
        L.inner(x, x, c), torch.full_like(x[:, 0], -1.0 / c), rtol=TOL[dtype], atol=TOL[dtype]
    )
    torch.testing.assert_close(L.log_map0(x, c), v, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_distance_symmetric_and_zero_on_diagonal(dtype, seed):
    x = L.exp_map0(_rand(seed, dtype, scale=0.5), 1.0)
    y = L.exp_map0(_rand(seed + 10, dtype, scale=0.5), 1.0)
    torch.testing.assert_close(L.distance(x, y, 1.0), L.distance(y, x, 1.0))
    assert torch.all(L.distance(x, x, 1.0) < 10 * TOL[dtype])
    assert torch.all(L.distance(x, y, 1.0) > 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("c", CURVS)
def test_exterior_angle_on_the_ray(dtype, seed, c):
    u = _rand(seed, dtype)
    u = u / u.norm(dim=-1, keepdim=True)
    x = L.exp_map0(0.8 * u, c)
    beyond = L.exp_map0(1.6 * u, c)
    between = L.exp_map0(0.3 * u, c)
    assert torch.all(L.exterior_angle(x, beyond, c) < ANGLE_TOL[dtype])
    assert torch.all((L.exterior_angle(x, between, c) - math.pi).abs() < ANGLE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_exterior_angle_grows_as_the_image_turns_away(dtype):
    e0 = torch.zeros(16, dtype=dtype)
    e0[0] = 1
    e1 = torch.zeros(16, dtype=dtype)
    e1[1] = 1
    x = L.exp_map0(e0, 1.0)
    angles = [
        L.exterior_angle(x, L.exp_map0(1.5 * (math.cos(t) * e0 + math.sin(t) * e1), 1.0), 1.0)
        for t in (0.05, 0.2, 0.5, 1.0, 2.0)
    ]
    assert all(a < b for a, b in zip(angles, angles[1:]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CURVS)
def test_half_aperture_decreases_with_norm(dtype, c):
    u = torch.zeros(8, dtype=dtype)
    u[0] = 1
    norms = torch.tensor([0.1, 0.5, 1.0, 2.0, 4.0], dtype=dtype)
    ap = L.half_aperture(L.exp_map0(norms[:, None] * u, c), c)
    assert torch.all(ap[1:] <= ap[:-1])
    assert torch.all(ap > 0) and torch.all(ap <= math.pi / 2)
    # Far from the origin the cone is strictly narrower than a half-space.
    assert ap[-1] < ap[0]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("c", CURVS)
def test_agrees_with_geoopt(seed, c):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import geoopt
    manifold = geoopt.Lorentz(k=1.0 / c)
    v = _rand(seed, torch.float64, scale=0.6)
    w = _rand(seed + 100, torch.float64, scale=0.6)
    # geoopt works with full (d+1) coordinates; the tangent vector at its origin is [0, v].
    full_v = torch.cat([torch.zeros_like(v[:, :1]), v], dim=-1)
    full_w = torch.cat([torch.zeros_like(w[:, :1]), w], dim=-1)
    gx, gy = manifold.expmap0(full_v), manifold.expmap0(full_w)
    x, y = L.exp_map0(v, c), L.exp_map0(w, c)
    torch.testing.assert_close(x, gx[:, 1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(L.time_component(x, c), gx[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(L.distance(x, y, c), manifold.dist(gx, gy), rtol=1e-6, atol=1e-6)


def _finite_grad(fn, *inputs):
    inputs = [t.clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    assert torch.all(torch.isfinite(out)), out
    out.sum().backward()
    for t in inputs:
        assert t.grad is not None and torch.all(torch.isfinite(t.grad)), t.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_values_and_gradients_at_edge_cases(dtype):
    zero = torch.zeros(3, 8, dtype=dtype)
    some = _rand(0, dtype, n=3, d=8)
    for scale in (1.0, 1e2, 1e4):
        big = some * scale
        _finite_grad(lambda v: L.exp_map0(v, 1.0), big)
        _finite_grad(lambda v: L.log_map0(L.exp_map0(v, 1.0), 1.0), big)
        _finite_grad(
            lambda a, b: L.distance(L.exp_map0(a, 1.0), L.exp_map0(b, 1.0), 1.0), big, some
        )
        _finite_grad(lambda v: L.half_aperture(L.exp_map0(v, 1.0), 1.0), big)
        _finite_grad(
            lambda a, b: L.exterior_angle(L.exp_map0(a, 1.0), L.exp_map0(b, 1.0), 1.0), big, some
        )
    # v = 0 and x = y.
    _finite_grad(lambda v: L.exp_map0(v, 1.0), zero)
    _finite_grad(lambda v: L.log_map0(v, 1.0), zero)
    _finite_grad(lambda v: L.half_aperture(v, 1.0), zero)
    _finite_grad(lambda a: L.distance(a, a.detach(), 1.0), some)
    _finite_grad(lambda a, b: L.distance(a, b, 1.0), some, some.clone())
    _finite_grad(lambda a, b: L.exterior_angle(a, b, 1.0), some, some.clone())
    _finite_grad(lambda a, b: L.exterior_angle(a, b, 1.0), zero, some)


def test_curvature_is_differentiable():
    log_c = torch.tensor(0.3, requires_grad=True)
    x = L.exp_map0(_rand(0, torch.float32, n=4, d=8, scale=0.5), log_c.exp())
    y = L.exp_map0(_rand(1, torch.float32, n=4, d=8, scale=0.5), log_c.exp())
    (L.distance(x, y, log_c.exp()) + L.exterior_angle(x, y, log_c.exp())).sum().backward()
    assert torch.isfinite(log_c.grad) and log_c.grad != 0


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_under_autocast_are_fp32_accurate(half):
    v = _rand(3, torch.float32, n=32, d=16, scale=0.5).to(half)
    w = _rand(4, torch.float32, n=32, d=16, scale=0.5).to(half)
    ref_x, ref_y = L.exp_map0(v.float(), 1.0), L.exp_map0(w.float(), 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, y = L.exp_map0(v, 1.0), L.exp_map0(w, 1.0)
        d = L.distance(x, y, 1.0)
        a = L.exterior_angle(x, y, 1.0)
        ap = L.half_aperture(x, 1.0)
    for out in (x, d, a, ap):
        assert out.dtype == torch.float32
    torch.testing.assert_close(x, ref_x, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(d, L.distance(ref_x, ref_y, 1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a, L.exterior_angle(ref_x, ref_y, 1.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ap, L.half_aperture(ref_x, 1.0), rtol=1e-5, atol=1e-5)
