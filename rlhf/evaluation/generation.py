"""Generated images of ``hyperalign eval-checkpoints``: checkpoint names, seeds and the cache.

Every checkpoint (the base pipeline and each LoRA) generates the same prompts with the same
seeds (:func:`image_seed`), so its images can be compared pair by pair. Images are cached
under ``OUT/images/<checkpoint>/``; each file name ends in a key (:func:`image_key`) over
everything that determines the image: the pipeline and LoRA files, the sampler settings,
dtype and device type, the prompt and the seed. A run with other prompts, seeds, settings
or weights therefore regenerates, and re-scoring with another reward reuses the images.
(The batch size is not part of the key: each image has its own noise generator, and the
batching changes at most the floating-point rounding.)
A checkpoint's folder holds only the images of the last run (others are deleted); its
``manifest.json`` lists them with their prompts and seeds.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hyperalign.common import atomic_write_json, save_png
from rlhf.pipeline import SamplerSettings, generate_batches

from .prompt_sets import PromptItem

__all__ = [
    "cache_source",
    "checkpoint_names",
    "file_fingerprint",
    "generate_missing",
    "image_key",
    "image_seed",
    "plan_jobs",
    "prepare_cache",
    "to_uint8",
]

_CACHED_PNG = re.compile(r"^p\d{5}_s\d+(_[0-9a-f]{12})?\.png$")  # names this module writes


def image_seed(base_seed: int, prompt_index: int, k: int) -> int:
    """The noise seed of image ``k`` of prompt ``prompt_index``: the same for every checkpoint."""
    return (base_seed * 1_000_003 + prompt_index * 1_009 + k) % (2**63 - 1)


def checkpoint_names(loras: Sequence[str], with_base: bool) -> list[tuple[str, str | None]]:
    """``[(name, lora path or None)]``: ``"base"`` first (unless not ``with_base``), then each
    LoRA named after its folder or file (a run's ``lora/`` or ``checkpoint_N/lora/`` after the
    run or checkpoint), made unique with the parent folder's name."""
    names = [("base", None)] if with_base else []
    used = {"base"}
    for lora in loras:
        p = Path(lora).resolve()
        name = p.name if p.is_dir() else p.stem
        if name in ("lora", "pytorch_lora_weights"):  # a run's lora/ or checkpoint_N/lora/
            name = (p if p.is_dir() else p.parent).parent.name
        if name in used:
            name = f"{p.parent.name}-{name}"
        used.add(name)
        names.append((name, lora))
    return names


def file_fingerprint(path: Path | None) -> str:
    """A cheap identity of a file or folder of weights: resolved path, sizes and modification
    times of its files (a retrained or replaced checkpoint gets another one); ``"none"``
    for ``None`` and the name itself for what is not a local path (a hub id)."""
    if path is None:
        return "none"
    path = Path(path)
    if not path.exists():
        return str(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    parts = [str(path.resolve())]
    for f in files:
        st = f.stat()
        parts.append(
            f"{f.relative_to(path) if path.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}"
        )
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def image_key(source: dict, prompt: str, seed: int) -> str:
    """A hex key of one image: ``source`` (pipeline, LoRA, settings, dtype, device type: what
    every image of a checkpoint shares), its prompt and its seed."""
    blob = json.dumps({"source": source, "prompt": prompt, "seed": seed}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_jobs(
    name: str,
    items: Sequence[PromptItem],
    folder: Path,
    base_seed: int,
    images_per_prompt: int,
    source: dict,
) -> list[dict]:
    """The records of checkpoint ``name``: for each prompt ``images_per_prompt`` seeds, and the
    cache file of each (prompt index, seed, key)."""
    jobs = []
    for pi, it in enumerate(items):
        for k in range(images_per_prompt):
            seed = image_seed(base_seed, pi, k)
            key = image_key(source, it.prompt, seed)[:12]
            jobs.append(
                {
                    "checkpoint": name,
                    "prompt_index": pi,
                    "prompt": it.prompt,
                    "category": it.category,
                    "seed": seed,
                    "image": str(folder / f"p{pi:05d}_s{seed}_{key}.png"),
                }
            )
    return jobs


def prepare_cache(folder: Path, jobs: list[dict], source: dict) -> None:
    """Delete the cached images of ``folder`` that ``jobs`` do not use (other prompts, seeds
    or settings) and write its ``manifest.json``. Run on one process only."""
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {Path(j["image"]).name for j in jobs}
    for p in folder.iterdir():
        if _CACHED_PNG.match(p.name) and p.name not in wanted:
            p.unlink(missing_ok=True)
    images = {Path(j["image"]).name: {"prompt": j["prompt"], "seed": j["seed"]} for j in jobs}
    atomic_write_json(folder / "manifest.json", {"source": source, "images": images}, indent=1)


def cache_source(pipeline: str, lora_file: Path | None, settings: SamplerSettings, dtype, device):
    """What every image of one checkpoint shares, for :func:`image_key`."""
    return {
        "pipeline": str(pipeline),
        "pipeline_files": file_fingerprint(Path(pipeline)),
        "lora": file_fingerprint(lora_file),
        "settings": asdict(settings),
        "dtype": str(dtype),
        "device_type": getattr(device, "type", str(device)),
    }


def to_uint8(images) -> np.ndarray:
    """(b, 3, H, W) float images in [0, 1] -> (b, H, W, 3) uint8 (rounded)."""
    x = images.float().cpu().permute(0, 2, 3, 1).numpy()  # (b, H, W, 3)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def generate_missing(
    pipe, jobs: list[dict], settings: SamplerSettings, batch_size: int, show_progress=True
) -> int:
    """Generate the images of ``jobs`` whose file is missing and save them as PNG; returns how
    many were generated."""
    from tqdm.auto import tqdm

    todo = [j for j in jobs if not Path(j["image"]).is_file()]
    batches = generate_batches(
        pipe, [j["prompt"] for j in todo], [j["seed"] for j in todo], settings, batch_size
    )
    total = -(-len(todo) // batch_size)
    bar = tqdm(batches, total=total, disable=not show_progress or not todo, desc="generate")
    for start, images in bar:
        for job, array in zip(todo[start:], to_uint8(images)):
            save_png(array, job["image"])
    return len(todo)
