"""Lorentz model of hyperbolic space, as small pure functions over tensors.

Convention (as MERU, facebookresearch/meru ``meru/lorentz.py``): the hyperboloid of curvature
``-c`` (``c > 0``) is ``{x in R^{d+1} : <x, x>_L = -1/c, x_0 > 0}`` with
``<x, y>_L = -x_0 y_0 + <x_s, y_s>``. Points are stored by their *space* components
``x_s`` of shape ``(..., d)``; the time component is ``x_0 = sqrt(1/c + |x_s|^2)``.
Tangent vectors at the origin ``o = (1/sqrt(c), 0)`` are stored by their space part too.

Every function computes in at least fp32: half-precision inputs are upcast and autocast is
disabled inside, so callers may invoke them from an autocast region (results are fp32).
``curv`` is a Python float or a 0-d tensor holding ``c``.

Clamps use ``eps`` chosen per dtype (see ``_eps``): ``1e-6`` in fp32 (the spacing of fp32 near
1 is 1.2e-7, so a smaller margin would round away) and ``1e-12`` in fp64. A clamp costs at
most ~``sqrt(2 eps)`` of accuracy in an angle next to 0 or pi (1.4e-3 rad in fp32).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "exp_map0",
    "log_map0",
    "time_component",
    "inner",
    "distance",
    "half_aperture",
    "exterior_angle",
]

# sinh(x) overflows fp32 near x = 89; MERU caps the argument so that the space norm stays at
# most 2^15 / sqrt(c), which keeps |x_s|^2 (~1e9) representable and products finite.
_SINH_MAX = math.asinh(2.0**15)


def _eps(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-6


def _fp32_math(fn):
    """Run ``fn`` with tensor arguments upcast to >= fp32 and autocast disabled."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        args = [_upcast(a) for a in args]
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def _upcast(x):
    if (
        isinstance(x, Tensor)
        and x.is_floating_point()
        and x.dtype
        not in (
            torch.float32,
            torch.float64,
        )
    ):
        return x.float()
    return x


def _curv(curv, like: Tensor) -> Tensor:
    """``c`` as a tensor of ``like``'s dtype and device (0-d)."""
    c = torch.as_tensor(curv, dtype=like.dtype, device=like.device)
    return c


@_fp32_math
def time_component(x: Tensor, curv) -> Tensor:
    """Time component ``x_0 = sqrt(1/c + |x_s|^2)``.

    Args:
        x: space components, ``(..., d)``.
    Returns:
        ``(...,)``.
    """
    c = _curv(curv, x)
    return torch.sqrt(1.0 / c + (x * x).sum(dim=-1))


@_fp32_math
def inner(x: Tensor, y: Tensor, curv) -> Tensor:
    """Lorentz inner product ``<x, y>_L = -x_0 y_0 + <x_s, y_s>``, elementwise over the batch.

    Args:
        x, y: space components, broadcastable ``(..., d)``.
    Returns:
        ``(...,)``.
    """
    return -time_component(x, curv) * time_component(y, curv) + (x * y).sum(dim=-1)


@_fp32_math
def exp_map0(v: Tensor, curv) -> Tensor:
    """Exponential map at the origin: ``sinh(sqrt(c)|v|) v / (sqrt(c)|v|)``.

    Args:
        v: space part of a tangent vector at the origin, ``(..., d)``.
    Returns:
        space components of the point on the hyperboloid, ``(..., d)``.
    """
    c = _curv(curv, v)
    eps = _eps(v.dtype)
    rc_norm = torch.sqrt(c) * torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    # Lower clamp: sinh(r)/r -> 1 as r -> 0, so replacing r by eps there changes the result by
    # O(eps^2) and avoids 0/0 (value and gradient) at v = 0. Upper clamp: see _SINH_MAX.
    r = rc_norm.clamp(min=eps, max=_SINH_MAX)
    return torch.sinh(r) * v / rc_norm.clamp(min=eps)


@_fp32_math
def log_map0(x: Tensor, curv) -> Tensor:
    """Logarithmic map at the origin, inverse of :func:`exp_map0`.

    ``v = asinh(sqrt(c)|x_s|) x_s / (sqrt(c)|x_s|)`` (``asinh`` of the space norm is
    exact near the origin, unlike ``acosh`` of the time component).

    Args:
        x: space components, ``(..., d)``.
    Returns:
        tangent vector at the origin (space part), ``(..., d)``.
    """
    c = _curv(curv, x)
    eps = _eps(x.dtype)
    # asinh(r)/r -> 1 as r -> 0: the clamp avoids 0/0 at the origin.
    rc_norm = (torch.sqrt(c) * torch.linalg.vector_norm(x, dim=-1, keepdim=True)).clamp(min=eps)
    return torch.asinh(rc_norm) * x / rc_norm


@_fp32_math
def distance(x: Tensor, y: Tensor, curv) -> Tensor:
    """Geodesic distance ``d_L(x, y) = acosh(-c <x, y>_L) / sqrt(c)``.

    Computed in the equivalent, cancellation-free form
    ``d = (2/sqrt(c)) asinh( (sqrt(c)/2) sqrt(<x - y, x - y>_L) )``, where the Lorentz norm of
    the chord is ``|x_s - y_s|^2 - (x_0 - y_0)^2`` and
    ``x_0 - y_0 = ((x_s - y_s).(x_s + y_s)) / (x_0 + y_0)``. Unlike ``acosh`` near 1 it stays
    accurate for nearby points (``d(x, x) = 0`` exactly).

    Args:
        x, y: space components, broadcastable ``(..., d)``.
    Returns:
        ``(...,)``, non-negative.
    """
    c = _curv(curv, x)
    eps = _eps(x.dtype)
    diff = x - y
    dt = (diff * (x + y)).sum(dim=-1) / (time_component(x, c) + time_component(y, c))
    chord2 = (diff * diff).sum(dim=-1) - dt * dt
    # Clamp: the squared chord is >= 0 in exact arithmetic; rounding can make it slightly
    # negative, and sqrt has an infinite slope at 0 (x = y), so floor it at eps^2.
    chord = torch.sqrt(chord2.clamp(min=eps * eps))
    rc = torch.sqrt(c)
    return 2.0 / rc * torch.asinh(rc / 2.0 * chord)


@_fp32_math
def half_aperture(x: Tensor, curv, k: float = 0.1) -> Tensor:
    """Half-aperture of the entailment cone at ``x``: ``asin(2k / (sqrt(c) |x_s|))``.

    The aperture shrinks as ``x`` moves away from the origin (more specific concepts have
    narrower cones). ``k = 0.1`` is MERU's value.

    Args:
        x: space components, ``(..., d)``.
    Returns:
        ``(...,)`` in ``(0, pi/2)``.
    """
    c = _curv(curv, x)
    eps = _eps(x.dtype)
    # Clamp the norm away from 0 (no division by zero at the origin) ...
    norm = torch.linalg.vector_norm(x, dim=-1).clamp(min=eps)
    # ... and the asin argument into the open interval: near the origin the cone is the whole
    # half-space (pi/2), and asin has an infinite slope at 1.
    arg = (2.0 * k / (torch.sqrt(c) * norm)).clamp(min=-1.0 + eps, max=1.0 - eps)
    return torch.asin(arg)


@_fp32_math
def exterior_angle(x: Tensor, y: Tensor, curv) -> Tensor:
    """Exterior angle at ``x`` of the hyperbolic triangle ``O x y``.

    ``phi = acos( (y_0 + c<x,y>_L x_0) / (|x_s| sqrt((c<x,y>_L)^2 - 1)) )`` (law of cosines).
    ``phi = 0`` when ``y`` is on the geodesic ray from ``O`` through ``x``, beyond ``x``;
    ``phi = pi`` when ``y`` lies between ``O`` and ``x``. ``y`` is inside the entailment cone of
    ``x`` iff ``phi <= half_aperture(x)``.

    Args:
        x: cone apex (e.g. the text), space components ``(..., d)``.
        y: the other point (e.g. the image), ``(..., d)``.
    Returns:
        ``(...,)`` in ``[0, pi]``.
    """
    c = _curv(curv, x)
    eps = _eps(x.dtype)
    x_time = time_component(x, c)
    y_time = time_component(y, c)
    c_xyl = c * (-x_time * y_time + (x * y).sum(dim=-1))
    numer = y_time + c_xyl * x_time
    # Clamps: (c<x,y>)^2 - 1 = sinh^2(sqrt(c) d) is 0 at x = y, where sqrt has an infinite
    # slope; |x_s| is 0 at the origin. Both are floored at eps so the ratio stays finite.
    denom = torch.linalg.vector_norm(x, dim=-1).clamp(min=eps) * torch.sqrt(
        (c_xyl * c_xyl - 1.0).clamp(min=eps)
    )
    # acos is defined on [-1, 1] and has infinite slope at the ends: keep inside by eps.
    cos_phi = (numer / denom).clamp(min=-1.0 + eps, max=1.0 - eps)
    return torch.acos(cos_phi)
