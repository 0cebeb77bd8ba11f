"""Offline evaluation of generator checkpoints: ``hyperalign eval-checkpoints``.

Generate images for a prompt set with a diffusers pipeline and zero or more LoRA checkpoints
(fixed seeds, so every checkpoint sees the same noise), or take images generated elsewhere
(a folder or a CSV of ``image,prompt[,category][,checkpoint][,seed]``), score them with
HyperAlign and any critics, and write a report: per-checkpoint means with bootstrap 95 %
intervals (overall and per category), paired differences against the first checkpoint on
matching (prompt, seed) pairs, image grids, ``report.md`` and per-image ``scores.csv`` /
``scores.json``.

Every --lora file is checked (complete, finite, fits the UNet) before any image is generated.
Generated images are cached under ``OUT/images/<checkpoint>/``, keyed by the pipeline and
LoRA files, the sampler settings, dtype, device type, prompt and seed: re-scoring with
another reward reuses them, other prompts or settings regenerate. Images given with --images
are paired across checkpoints by their ``seed`` column; without one, only when each
checkpoint has a single image per prompt. Under ``accelerate launch`` the jobs are split
across processes and gathered into one report.

Examples::

    hyperalign eval-checkpoints --pipeline runwayml/stable-diffusion-v1-5 \\
        --lora runs/sd15/lora --prompts animals --images-per-prompt 4 --out runs/eval
    hyperalign eval-checkpoints --pipeline shapes/assets/sd --prompts shapes --steps 20 \\
        --guidance-scale 3 --lora runs/demo/lora --critic oracle --out runs/eval-shapes
    hyperalign eval-checkpoints --images generated.csv --reward shapes --out runs/eval-ext
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hyperalign.common import DTYPE_CHOICES, parse_dtype
from rlhf.pipeline import (
    SamplerSettings,
    check_lora_file,
    check_lora_fits,
    load_pipeline,
    lora_applied,
)

from .generation import (
    cache_source,
    checkpoint_names,
    generate_missing,
    plan_jobs,
    prepare_cache,
)
from .ingest import records_from_images
from .prompt_sets import PROMPT_SETS, load_prompt_set
from .report import render_summary_table, summarize, unique_file_stems, write_outputs
from .scoring import build_scorers, score_records

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``hyperalign eval-checkpoints``."""
    src = parser.add_argument_group("what to evaluate (--pipeline or --images)")
    src.add_argument("--pipeline", help="diffusers pipeline: hub id or local directory")
    src.add_argument(
        "--lora",
        action="append",
        default=[],
        help="LoRA checkpoint (directory or .safetensors) to compare; repeat for several",
    )
    src.add_argument(
        "--no-base", action="store_true", help="do not evaluate the pipeline without LoRA"
    )
    src.add_argument(
        "--images", help="score existing images: a CSV image,prompt[,checkpoint,seed] or a folder"
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument(
        "--prompts",
        default="animals",
        help=f"prompt set ({', '.join(PROMPT_SETS)}) or a .txt/.csv/.tsv file "
        "(default: %(default)s)",
    )
    gen.add_argument("--limit", type=int, help="keep a seeded random subset of this many prompts")
    gen.add_argument("--images-per-prompt", type=int, default=2)
    gen.add_argument("--seed", type=int, default=0, help="base seed of the image noise")
    gen.add_argument("--steps", type=int, default=50, help="sampling steps")
    gen.add_argument("--guidance-scale", type=float, default=5.0)
    gen.add_argument("--height", type=int)
    gen.add_argument("--width", type=int)
    gen.add_argument("--negative-prompt")
    gen.add_argument(
        "--batch-size", type=int, default=8, help="images per generation/scoring batch"
    )
    sc = parser.add_argument_group("scoring")
    sc.add_argument("--reward", default="shapes", help="HyperAlign preset, checkpoint or hub id")
    sc.add_argument(
        "--critic",
        action="append",
        default=[],
        help="extra scorer: 'oracle' (shapes world), 'brightness', or another rlhf reward spec",
    )
    sc.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable images instead of failing"
    )
    parser.add_argument("--out", default="runs/eval", help="output directory")
    parser.add_argument("--device", help="torch device (default: accelerate's)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")


def _check_args(args: argparse.Namespace) -> None:
    """Refuse contradictory or out-of-range options (``ValueError`` naming the option)."""
    if (args.pipeline is None) == (args.images is None):
        raise ValueError("give exactly one of --pipeline or --images")
    if args.pipeline is not None and args.no_base and not args.lora:
        raise ValueError("--no-base needs at least one --lora")
    for opt in ("limit", "images_per_prompt", "batch_size", "steps"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be >= 1, got {value}")


def _sampler_settings(args: argparse.Namespace) -> SamplerSettings:
    return SamplerSettings(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
    )


def _checked_loras(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """``[(checkpoint name, LoRA weights file or None)]``, every LoRA file read in full."""
    specs = checkpoint_names(args.lora, with_base=not args.no_base)
    return [(name, check_lora_file(lora) if lora else None) for name, lora in specs]


@dataclass
class _Context:
    """Where and how one run computes."""

    state: object  # accelerate.PartialState
    device: torch.device
    dtype: torch.dtype
    show: bool  # progress bars and messages (the local main process)
    settings: SamplerSettings


def _generate_checkpoint(pipe, name, lora_file, folder, items, args, ctx: _Context) -> list[dict]:
    """Generate (or reuse) the images of one checkpoint in ``folder``; returns its records."""
    state, settings = ctx.state, ctx.settings
    source = cache_source(args.pipeline, lora_file, settings, ctx.dtype, ctx.device)
    jobs = plan_jobs(name, items, folder, args.seed, args.images_per_prompt, source)
    if state.is_main_process:
        prepare_cache(folder, jobs, source)
    state.wait_for_everyone()
    with lora_applied(pipe, lora_file), state.split_between_processes(jobs) as mine:
        made = generate_missing(pipe, mine, settings, args.batch_size, ctx.show)
    if ctx.show:
        print(f"{name}: generated {made} images, reused {len(mine) - made} cached", file=sys.stderr)
    return jobs


def _generate(args: argparse.Namespace, ctx: _Context) -> tuple[list[dict], list[str]]:
    """Records of every checkpoint's images; all inputs are checked before generating."""
    items = load_prompt_set(args.prompts, args.limit, args.seed)
    loras = _checked_loras(args)
    pipe = load_pipeline(args.pipeline, dtype=ctx.dtype, device=ctx.device)
    for _, lora_file in loras:
        if lora_file is not None:
            check_lora_fits(pipe, lora_file)
    folders = unique_file_stems([name for name, _ in loras])
    records = []
    for name, lora_file in loras:
        folder = Path(args.out) / "images" / folders[name]
        records += _generate_checkpoint(pipe, name, lora_file, folder, items, args, ctx)
    del pipe
    return records, [name for name, _ in loras]


def _score(records: list[dict], args: argparse.Namespace, ctx: _Context):
    """``(scored records of all processes, scorer names)`` on the main process; ``(None,
    names)`` on the others."""
    from accelerate.utils import gather_object

    dtype = None if ctx.dtype == torch.float32 else ctx.dtype  # None: the rewards' default
    scorers = build_scorers(args.reward, args.critic, ctx.device, dtype)
    with ctx.state.split_between_processes(records) as mine:
        scored = score_records(mine, scorers, args.batch_size, ctx.device, args.skip_bad, ctx.show)
    scored = gather_object(scored) if ctx.state.num_processes > 1 else scored
    return (scored if ctx.state.is_main_process else None), list(scorers)


def _sort_key(checkpoints: list[str]):
    return lambda r: (
        checkpoints.index(r["checkpoint"]),
        r["prompt_index"],
        r["seed"] is None,
        r["seed"] or 0,
    )


def run(args: argparse.Namespace) -> int:
    """Generate or ingest, score, summarise and write the report."""
    from accelerate import PartialState

    _check_args(args)
    state = PartialState()
    device = torch.device(args.device) if args.device else state.device
    ctx = _Context(
        state=state,
        device=device,
        dtype=parse_dtype(args.dtype),
        show=state.is_local_main_process,
        settings=_sampler_settings(args),
    )
    settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    if args.images:
        records = records_from_images(args.images)
        checkpoints = list(dict.fromkeys(r["checkpoint"] for r in records))
    else:
        records, checkpoints = _generate(args, ctx)
    state.wait_for_everyone()
    scored, scorer_names = _score(records, args, ctx)
    if scored is None:
        return 0
    scored.sort(key=_sort_key(checkpoints))
    summary = summarize(scored, checkpoints, scorer_names)
    out = Path(args.out)
    write_outputs(scored, summary, settings, out)
    print(render_summary_table(summary))
    print(f"report: {out / 'report.md'}")
    return 0
