"""Prompt functions: picklable callables `() -> (prompt: str, metadata: dict)`.

They draw with Python's global `random` module, which the trainer seeds per process and saves
in its checkpoints, so runs and resumes are reproducible. Metadata `None` (as some prompt
functions of other tools return) is accepted and passed to the reward as `{}`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "SIMPLE_ANIMALS",
    "FixedPrompts",
    "get_prompt_fn",
    "check_prompt_fn",
    "read_prompt_file",
]

# DDPO's "simple animals" prompt set (Black et al. 2023; the 45 names of
# `prompts/simple_animals.txt` in the shared data and in ddpo-pytorch's assets).
SIMPLE_ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer",
    "cow", "goat", "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle",
    "ant", "butterfly", "fish", "shark", "whale", "dolphin", "squirrel", "mouse", "rat",
    "snake", "turtle", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly",
    "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
)  # fmt: skip


class FixedPrompts:
    """Draw uniformly from a fixed list of prompts; metadata is `{"index": i}`.

    Args:
        prompts: the prompts (non-empty strings).
        template: a `str.format` template applied to each entry, e.g. "a photo of a {}".
    """

    def __init__(self, prompts: Sequence[str], template: str = "{}"):
        prompts = [template.format(p) for p in prompts]
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("FixedPrompts needs a non-empty list of non-empty strings")
        self.prompts = prompts

    def __call__(self) -> tuple[str, dict]:
        i = random.randrange(len(self.prompts))
        return self.prompts[i], {"index": i}

    def __repr__(self) -> str:
        return f"FixedPrompts({len(self.prompts)} prompts, first={self.prompts[0]!r})"


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    prompts = [ln for ln in lines if ln and not ln.startswith("#")]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompts")
    return prompts


_SPECS = {
    "simple_animals": "DDPO's 45 animal names, e.g. 'cat'",
    "simple_animals_photo": "'a photo of a <animal>' over the same names",
    "fixed:<p1>|<p2>|...": "draw from the given '|'-separated prompts",
    "file:<path>": "draw from a text file, one prompt per line",
}


def get_prompt_fn(spec: str) -> Callable[[], tuple[str, dict]]:
    """Build a prompt function from a spec string (see `_SPECS`); unknown specs raise a
    `ValueError` listing the valid ones."""
    name, _, arg = spec.partition(":")
    if name == "simple_animals" and not arg:
        return FixedPrompts(SIMPLE_ANIMALS)
    if name == "simple_animals_photo" and not arg:
        return FixedPrompts(SIMPLE_ANIMALS, template="a photo of a {}")
    if name == "fixed" and arg:
        return FixedPrompts([p.strip() for p in arg.split("|") if p.strip()])
    if name == "file" and arg:
        return FixedPrompts(read_prompt_file(arg))
    valid = "\n  ".join(f"{k}: {v}" for k, v in _SPECS.items())
    raise ValueError(f"unknown prompt function spec {spec!r}; valid specs:\n  {valid}")


def check_prompt_fn(prompt_fn: Callable, n: int = 2) -> None:
    """Call `prompt_fn` `n` times and raise `TypeError` unless each returns `(str, dict)`
    (or `(str, None)`)."""
    name = getattr(prompt_fn, "__name__", None) or repr(prompt_fn)
    for _ in range(n):
        out = prompt_fn()
        if (
            not isinstance(out, tuple)
            or len(out) != 2
            or not isinstance(out[0], str)
            or not (out[1] is None or isinstance(out[1], dict))
        ):
            raise TypeError(
                f"prompt function {name} must return (prompt: str, metadata: dict), got "
                f"{type(out).__name__}: {out!r:.200}"
            )
