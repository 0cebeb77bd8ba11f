"""Reward functions for RL fine-tuning, and the registry that builds them from a spec.

Every reward follows the contract written down once in :mod:`reward.contract` (``RewardFn``);
``check_reward_output`` (from there) is what the trainer applies to whatever a user's reward
returns. ``import:<package.module>:<attribute>`` loads a user's reward by import path
(:func:`import_reward`), so ``--set reward_fn=import:my_rewards:aesthetic`` needs no code here.
"""

from __future__ import annotations

import importlib
import inspect
import time
from collections.abc import Sequence

import torch

from reward.contract import RewardError, check_reward_output, reward_name

__all__ = [
    "Brightness",
    "SlowReward",
    "get_reward",
    "import_reward",
    "check_reward_output",
    "reward_name",
    "RewardError",
]


class Brightness:
    """Mean pixel value of each image, in [0, 1]. Differentiable (`score`).

    A test reward: easy to raise, so it shows whether learning happens at all.
    """

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B,) float32, differentiable."""
        return images.float().mean(dim=(1, 2, 3))

    def __call__(self, images, prompts, metadata):
        with torch.no_grad():
            r = self.score(images, prompts)
        return r, {"brightness": r.tolist()}

    def __repr__(self) -> str:
        return "Brightness()"


class SlowReward:
    """Wrap a reward and sleep `delay_s` seconds per call: stands in for a slow reward model
    (benchmarks of the reward/sampling overlap). Sleeping releases the GIL like a GPU wait."""

    def __init__(self, inner, delay_s: float):
        self.inner = inner
        self.delay_s = float(delay_s)

    def __call__(self, images, prompts, metadata):
        time.sleep(self.delay_s)
        return self.inner(images, prompts, metadata)

    def score(self, images, prompts=None):
        return self.inner.score(images, prompts)

    def __repr__(self) -> str:
        return f"SlowReward({self.inner!r}, delay_s={self.delay_s})"


_SPECS = {
    "brightness": "mean pixel value (test reward)",
    "hyperalign:<name_or_path>": "HyperAlign alignment score via reward.build_reward",
    "import:<package.module>:<attribute>": "any reward by import path (see import_reward)",
}


def get_reward(spec: str, device=None, dtype=None):
    """Build a reward function from a spec; unknown specs raise `ValueError` listing the
    valid ones. `device`/`dtype` are passed to reward models that hold weights (not to
    `import:` rewards, which choose their own)."""
    name, _, arg = spec.partition(":")
    if name == "brightness" and not arg:
        return Brightness()
    if name == "hyperalign" and arg:
        try:
            from reward import build_reward  # lazy: heavy, and optional for custom rewards
        except ImportError as e:
            raise ImportError(
                f"reward spec {spec!r} needs `reward.build_reward` (the HyperAlign package of "
                f"this project), which failed to import: {e}"
            ) from e
        return build_reward(arg, device=device, dtype=dtype)
    if name == "import":
        return import_reward(spec)
    valid = "\n  ".join(f"{k}: {v}" for k, v in _SPECS.items())
    raise ValueError(f"unknown reward spec {spec!r}; valid specs:\n  {valid}")


_IMPORT_FORM = (
    "expected import:<package.module>:<attribute>, e.g. import:my_rewards:aesthetic (a module "
    "on the Python path and a function, class or factory defined in it)"
)


def import_reward(spec: str):
    """The reward named by ``import:<package.module>:<attribute>`` (``attribute`` may be
    dotted, ``Class.factory``).

    The rule: an attribute that can be called with no arguments (a class whose ``__init__``
    needs none, or a function whose parameters all have defaults) is a factory, called once
    with no arguments; its result is the reward. Anything else callable (a reward function
    ``fn(images, prompts, metadata)``, a reward instance) is the reward itself. The reward must
    accept ``(images, prompts, metadata)``. Every failure is a ``ValueError`` naming the fix.
    """
    target = spec.removeprefix("import:")
    module_name, sep, attr_path = target.partition(":")
    names = module_name.split(".") + attr_path.split(".")
    if not sep or not all(n.isidentifier() for n in names):
        raise ValueError(f"reward spec {spec!r} is malformed: {_IMPORT_FORM}")
    module = _import_module(spec, module_name)
    obj = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            defined = sorted(
                n
                for n, v in vars(module).items()
                if callable(v)
                and not n.startswith("_")
                and getattr(v, "__module__", "") == module_name
            )
            raise ValueError(
                f"reward spec {spec!r}: module {module_name!r} ({getattr(module, '__file__', '?')}) "
                f"has no attribute {attr_path!r}; callables defined there: "
                f"{', '.join(defined) or 'none'}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(
            f"reward spec {spec!r}: {attr_path!r} is a {type(obj).__name__}, not a reward "
            "function, a reward class or a factory; name a callable"
        )
    if isinstance(obj, type) and not _callable_without_arguments(obj):
        raise ValueError(
            f"reward spec {spec!r}: class {attr_path!r} needs constructor arguments "
            f"{_signature_text(obj)}; give them defaults or name a function with no required "
            "arguments that builds it"
        )
    reward = obj() if _callable_without_arguments(obj) else obj
    if not callable(reward):
        raise ValueError(
            f"reward spec {spec!r}: the factory {attr_path!r} returned a "
            f"{type(reward).__name__}, not a reward function; return a callable "
            "reward_fn(images, prompts, metadata) -> (rewards, info)"
        )
    _check_reward_signature(spec, reward)
    return reward


def _import_module(spec: str, module_name: str):
    """``importlib.import_module`` with errors that tell a missing module from a failing one."""
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        # The module itself (or a parent package) is absent, not something it imports.
        missing = (err.name or "") if isinstance(err, ModuleNotFoundError) else ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            top = module_name.split(".")[0]
            raise ValueError(
                f"reward spec {spec!r}: no module named {missing!r}; install the package that "
                f"provides it, or put the folder holding {top!r} on the Python path "
                f"(e.g. PYTHONPATH=/path/to/folder hyperalign rl-train ...)"
            ) from err
        raise ValueError(
            f"reward spec {spec!r}: module {module_name!r} was found but importing it failed "
            f"({err}); install what it needs"
        ) from err


def _signature_text(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(unknown signature)"


def _callable_without_arguments(obj) -> bool:
    """True when ``obj()`` binds: every parameter has a default (or is ``*args``/``**kw``)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):  # builtins without a signature: not a factory
        return False
    try:
        sig.bind()
    except TypeError:
        return False
    return True


def _check_reward_signature(spec: str, reward) -> None:
    """``ValueError`` unless ``reward(images, prompts, metadata)`` binds."""
    try:
        sig = inspect.signature(reward)
    except (TypeError, ValueError):
        return  # no signature to check (a builtin): the first call will tell
    try:
        sig.bind(None, None, None)
    except TypeError as err:
        raise ValueError(
            f"reward spec {spec!r}: {reward_name(reward)} cannot be called as "
            f"reward_fn(images, prompts, metadata) (signature {sig}: {err}); follow the reward "
            "contract of reward.contract"
        ) from err
