"""Stable Diffusion pipelines: one loader, LoRA checks, and one seeded generation loop.

Everything that generates images outside RL training goes through here: the demo
(``hyperalign demo``), checkpoint evaluation (``hyperalign eval-checkpoints``),
``scripts/eval_shapes_sd.py`` and ``scripts/diagnose_demo_signal.py``; the trainer loads its
pipeline with :func:`load_pipeline` too.

- :func:`load_pipeline`: a hub id, a local diffusers folder (e.g. ``shapes.assets.SD_DIR``),
  ``"tiny"`` (offline tiny random pipeline) or ``"random-sd15"`` (SD 1.5 architecture with
  random weights, for cost measurements); quiet, without safety checker.
- :func:`check_lora_file` (the file is a complete safetensors file with finite weights) and
  :func:`check_lora_fits` (every UNet key matches a Linear layer of this pipeline's UNet):
  run them before generating anything; their errors name the file.
- :func:`lora_applied`: a LoRA loaded for the duration of a ``with`` block.
- :func:`generate_batches` / :func:`generate_images`: image ``i`` is drawn with
  ``torch.Generator("cpu").manual_seed(seeds[i])``, so it depends on its prompt, its seed and
  the settings, not on the other images of the batch; two models given the same seeds see the
  same initial noise.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "BUILT_IN_PIPELINES",
    "SamplerSettings",
    "check_lora_file",
    "check_lora_fits",
    "generate_batches",
    "generate_images",
    "load_pipeline",
    "lora_applied",
    "lora_weights_file",
]

BUILT_IN_PIPELINES = ("tiny", "random-sd15")
"""Names :func:`load_pipeline` builds offline instead of loading."""


# ------------------------------------------------------------------------------ loading
def _build_in_code(name: str, resolution: int | None):
    from rlhf.tiny import build_random_sd15_pipeline, build_tiny_pipeline

    if name == "tiny":
        return build_tiny_pipeline(seed=0)
    return build_random_sd15_pipeline(seed=0, sample_size=(resolution or 512) // 8)


def _from_pretrained(name_or_path: str, revision: str | None, dtype: torch.dtype | None):
    from diffusers import StableDiffusionPipeline

    path = Path(name_or_path)
    if path.is_dir() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a diffusers pipeline folder (no model_index.json); pass the folder "
            "written by StableDiffusionPipeline.save_pretrained, or a hub id"
        )
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        return StableDiffusionPipeline.from_pretrained(
            name_or_path,
            revision=revision,
            safety_checker=None,
            requires_safety_checker=False,
            **kwargs,
        )
    except Exception as err:
        raise FileNotFoundError(
            f"could not load the diffusers pipeline {name_or_path!r} ({type(err).__name__}: "
            f"{err}); pass a local pipeline directory, or run where the hub is reachable"
        ) from err


def load_pipeline(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    resolution: int | None = None,
):
    """A ``StableDiffusionPipeline`` with its progress bar off and no safety checker.

    ``name_or_path``: a hub id or local diffusers folder (``revision`` applies to hub ids), or
    one of :data:`BUILT_IN_PIPELINES` (``resolution`` sets the size of ``"random-sd15"``).
    The weights keep the dtype they were saved in unless ``dtype`` is given; the pipeline
    stays on the CPU unless ``device`` is given. Raises ``FileNotFoundError`` naming the
    pipeline when it cannot be loaded."""
    name = str(name_or_path)
    if name in BUILT_IN_PIPELINES:
        pipe = _build_in_code(name, resolution)
        if dtype is not None:
            pipe.to(dtype=dtype)
    else:
        pipe = _from_pretrained(name, revision, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


# --------------------------------------------------------------------------------- LoRA
# "unet.<module path>.<lora_A|lora_B|lora.down|lora.up>[.default].weight" (PEFT or diffusers).
_LORA_KEY = re.compile(r"^unet\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up)(?:\.[\w-]+)?\.weight$")


def lora_weights_file(lora_path: str | Path) -> Path:
    """The ``.safetensors`` file of a LoRA: ``lora_path`` itself, or the first one (sorted)
    in the folder ``lora_path``. Raises ``FileNotFoundError`` when there is none."""
    path = Path(lora_path)
    if path.is_file():
        return path
    file = next(iter(sorted(path.glob("*.safetensors"))), None) if path.is_dir() else None
    if file is None:
        raise FileNotFoundError(f"no LoRA .safetensors file at {path}")
    return file


def check_lora_file(lora_path: str | Path) -> Path:
    """The LoRA weights file of ``lora_path``, after reading every tensor of it.

    Raises ``ValueError`` naming the file when it is not a complete safetensors file (e.g.
    truncated by an interrupted copy) or holds non-finite weights. Needs no pipeline, so it can
    run before anything is loaded or generated."""
    from safetensors import SafetensorError, safe_open

    file = lora_weights_file(lora_path)
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if not torch.isfinite(f.get_tensor(key)).all():
                    raise ValueError(
                        f"LoRA {file} holds non-finite weights ({key}); it comes from a "
                        "diverged run: use an earlier checkpoint"
                    )
    except SafetensorError as err:
        raise ValueError(
            f"LoRA {file} is not a readable safetensors file ({err}); it may be truncated or "
            "corrupt: copy or save it again"
        ) from err
    return file


def _lora_mismatches(f, modules: dict) -> list[str]:
    """The UNet keys of the open safetensors file ``f`` that do not fit ``modules``."""
    bad = []
    for key in f.keys():
        m = _LORA_KEY.match(key)
        if m is None:
            continue  # text-encoder LoRA and alphas are left to diffusers
        stem, kind = m.group(1), m.group(2)
        module = modules.get(stem)
        base = getattr(module, "base_layer", module)
        if not isinstance(base, torch.nn.Linear):
            bad.append(f"{key} (no Linear {stem!r} in the UNet)")
            continue
        shape = tuple(f.get_slice(key).get_shape())
        if kind in ("lora_A", "lora.down") and shape[1] != base.in_features:
            bad.append(f"{key} {shape} vs in_features {base.in_features}")
        if kind in ("lora_B", "lora.up") and shape[0] != base.out_features:
            bad.append(f"{key} {shape} vs out_features {base.out_features}")
    return bad


def check_lora_fits(pipe, lora_path: str | Path) -> Path:
    """The LoRA weights file of ``lora_path``, after checking every key against the UNet.

    Raises ``ValueError`` naming the file and the keys whose module is missing or whose shape
    does not match (diffusers would otherwise skip them with a warning)."""
    from safetensors import SafetensorError, safe_open

    file = lora_weights_file(lora_path)
    try:
        with safe_open(str(file), framework="pt") as f:
            bad = _lora_mismatches(f, dict(pipe.unet.named_modules()))
    except SafetensorError as err:
        raise ValueError(f"LoRA {file} is not a readable safetensors file ({err})") from err
    if bad:
        raise ValueError(
            f"LoRA {file} does not fit this pipeline's UNet; mismatched keys: {bad[:8]}"
            f"{' ...' if len(bad) > 8 else ''}"
        )
    return file


@contextmanager
def lora_applied(pipe, lora_file: str | Path | None):
    """Load the LoRA weights file ``lora_file`` into ``pipe`` for the ``with`` block, then
    unload it; ``None`` leaves the pipeline as it is."""
    if lora_file is None:
        yield pipe
        return
    file = Path(lora_file)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    try:
        yield pipe
    finally:
        pipe.unload_lora_weights()


# --------------------------------------------------------------------------- generation
@dataclass(frozen=True)
class SamplerSettings:
    """How the pipeline samples (``None``: the pipeline's default size, no negative prompt).
    ``eta`` is used by schedulers that take it (DDIM; 0.0 is diffusers' default; ``None``: not
    passed, for pipelines without it such as Stable Diffusion 3's).
    ``max_sequence_length``: T5 tokens for Stable Diffusion 3 (``None``: not passed)."""

    steps: int = 50
    guidance_scale: float = 5.0
    eta: float | None = 0.0
    height: int | None = None
    width: int | None = None
    negative_prompt: str | None = None
    max_sequence_length: int | None = None


@torch.no_grad()
def generate_batches(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings,
    batch_size: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, images)`` for consecutive batches of ``prompts``: ``images`` (b, 3, H, W)
    in [0, 1] on the pipeline's device and dtype are those of ``prompts[start : start + b]``;
    image ``i`` is drawn with ``torch.Generator("cpu").manual_seed(seeds[i])``."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        generators = [
            torch.Generator(device="cpu").manual_seed(int(s))
            for s in seeds[start : start + batch_size]
        ]
        negative = [settings.negative_prompt] * len(chunk) if settings.negative_prompt else None
        optional = {"eta": settings.eta, "max_sequence_length": settings.max_sequence_length}
        images = pipe(
            prompt=chunk,
            negative_prompt=negative,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            height=settings.height,
            width=settings.width,
            generator=generators,
            output_type="pt",
            **{k: v for k, v in optional.items() if v is not None},
        ).images  # (b, 3, H, W) in [0, 1]
        yield start, images


def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    settings: SamplerSettings,
    batch_size: int,
) -> torch.Tensor:
    """All images of :func:`generate_batches`, as one float32 CPU tensor (N, 3, H, W)."""
    if not prompts:
        raise ValueError("no prompts to generate images for")
    batches = generate_batches(pipe, prompts, seeds, settings, batch_size)
    return torch.cat([x.float().cpu() for _, x in batches])
