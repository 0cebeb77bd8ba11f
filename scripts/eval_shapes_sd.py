"""Judge a shapes-world diffusion model with the oracle on held-out prompts.

Usage::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/eval_shapes_sd.py                 # shipped pipeline
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/eval_shapes_sd.py --guidance 1 3 5 --eta 1 \\
        --pipeline shapes/assets/sd --out runs/shapes-sd-eval --n-prompts 200
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/eval_shapes_sd.py --pipeline shapes/assets/flow \\
        --steps 10 --guidance 1 3 5 --out runs/shapes-flow-eval     # the flow model (Euler ODE)

The pipeline is a Stable Diffusion (DDIM with ``--eta``) or a Stable Diffusion 3 (its own
flow-matching Euler sampler; ``--eta`` unused), told apart by ``model_index.json``.

For each held-out prompt (``heldout_prompts.json`` in the pipeline directory, written by
``scripts/train_shapes_sd.py``: prompts never used in training) it generates one image with a
fixed per-prompt seed (``--seed + index``), reads it with the oracle
(:func:`shapes.oracle.oracle_alignment_batch`) and reports the mean alignment with a
bootstrap 95 % interval over prompts, for each guidance scale asked. Reference rows on the
same prompts: the faithful render (the oracle's ceiling), its VAE round trip (the ceiling
through this decoder) and a *random scene* (the faithful render of another random prompt: the
floor). Also reported: the fraction of each kind of fact (shape, colour, size, count, total,
relation) that holds in the generated images.

Writes ``<out>/metrics.json`` and ``<out>/grid_g<guidance>.png`` (images with their prompts and
oracle scores) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from hyperalign.common import atomic_write_json
from hyperalign.stats import ci_summary
from rlhf.demo import held_out_prompts
from rlhf.pipeline import SamplerSettings, generate_images, load_pipeline
from shapes.assets import SD_DIR
from shapes.oracle import fact_breakdown, oracle_alignment_batch
from shapes.perturb import faithful_scene
from shapes.prompts import parse_prompt, sample_prompt
from shapes.world import RenderConfig, render, to_tensor

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PIPELINE = SD_DIR


def summary(values, seed: int) -> dict:
    """Mean, bootstrap 95 % interval and count of per-prompt scores."""
    return ci_summary(values, seed=seed)


def generate(
    pipe,
    prompts: list[str],
    seed: int,
    steps: int,
    guidance: float,
    eta: float,
    batch: int = 25,
) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1]; image ``i`` uses seed ``seed + i``, so each image depends
    only on its prompt and seed, not on the batching."""
    flow = type(pipe).__name__ == "StableDiffusion3Pipeline"
    settings = SamplerSettings(
        steps=steps,
        guidance_scale=guidance,
        eta=None if flow else eta,
        max_sequence_length=1 if flow else None,  # the shapes SD3 has no T5
    )
    seeds = [seed + i for i in range(len(prompts))]
    return generate_images(pipe, prompts, seeds, settings, batch)


def random_scene_images(prompts: list[str], seed: int, image_size: int) -> torch.Tensor:
    """For each prompt, the faithful render of an independent random prompt (N, 3, H, W)."""
    rng = np.random.default_rng(seed)
    cfg = RenderConfig(image_size=image_size)
    return to_tensor(
        np.stack([render(faithful_scene(sample_prompt(rng), rng), cfg) for _ in prompts])
    )


def faithful_images(prompts: list[str], seed: int, image_size: int) -> torch.Tensor:
    """A faithful render of each prompt (N, 3, H, W) in [0, 1]."""
    rng = np.random.default_rng(seed)
    cfg = RenderConfig(image_size=image_size)
    return to_tensor(np.stack([render(faithful_scene(parse_prompt(p), rng), cfg) for p in prompts]))


@torch.no_grad()
def vae_roundtrip(vae, images: torch.Tensor) -> torch.Tensor:
    """Decode(encode(images)) with the posterior mean; (N, 3, H, W) in [0, 1]."""
    x = images * 2.0 - 1.0  # the VAE's [-1, 1] pixel range
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return (rec / 2.0 + 0.5).clamp(0.0, 1.0)


def fact_accuracy(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """Fraction of the facts of each kind that the oracle finds true in ``images``."""
    kinds = fact_breakdown(images, prompts)
    return {k: v for k, v in sorted(kinds.items()) if k != "objects_excess"}


def save_grid(images: torch.Tensor, prompts: list[str], scores, path: Path, cols: int = 6) -> None:
    """A PNG grid of images with their prompts and oracle alignments."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(images[k].permute(1, 2, 0).numpy())  # (3, H, W) -> (H, W, 3)
        title = "\n".join(textwrap.wrap(prompts[k], 26)) + f"\noracle {float(scores[k]):.2f}"
        ax.set_title(title, fontsize=6.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pipeline", type=Path, default=DEFAULT_PIPELINE, help="pipeline directory")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "shapes-sd-eval")
    p.add_argument("--n-prompts", type=int, default=200, help="held-out prompts to use (first n)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, nargs="+", default=[5.0], help="CFG scale(s)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (the RL sampler uses 1.0)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--grid", type=int, default=24, help="images in each grid PNG")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return p.parse_args(argv)


def reference_rows(pipe, prompts: list[str], seed: int, size: int) -> dict[str, dict]:
    """Oracle alignment of the faithful renders, their VAE round trip and random scenes."""
    faithful = faithful_images(prompts, seed, size)
    rt = vae_roundtrip(pipe.vae, faithful)
    rand = random_scene_images(prompts, seed + 10_000, size)
    return {
        "faithful render (ceiling)": summary(oracle_alignment_batch(faithful, prompts), 1),
        "faithful render through the VAE": summary(oracle_alignment_batch(rt, prompts), 2),
        "random scene (floor)": summary(oracle_alignment_batch(rand, prompts), 3),
    }


def generated_rows(pipe, prompts: list[str], args) -> tuple[dict, dict, dict]:
    """For each guidance scale: the oracle alignment row, the fact accuracy per kind and the
    seconds per image; writes one grid PNG per scale."""
    rows, facts, timing = {}, {}, {}
    for g in args.guidance:
        t0 = time.time()
        images = generate(pipe, prompts, args.seed, args.steps, g, args.eta)
        timing[f"{g:g}"] = (time.time() - t0) / len(prompts)
        scores = oracle_alignment_batch(images, prompts)
        sampler = (
            "Euler (flow)"
            if type(pipe).__name__ == "StableDiffusion3Pipeline"
            else f"DDIM, eta {args.eta:g}"
        )
        name = f"generated, CFG {g:g}, {args.steps} steps {sampler}"
        rows[name] = summary(scores, 4)
        facts[f"{g:g}"] = fact_accuracy(images, prompts)
        save_grid(images[: args.grid], prompts[: args.grid], scores, args.out / f"grid_g{g:g}.png")
    return rows, facts, timing


def print_tables(rows: dict, facts: dict, timing: dict, n_prompts: int, size: int) -> None:
    """The Markdown tables of oracle alignment and of fact accuracy per guidance scale."""
    print(f"Oracle alignment on {n_prompts} held-out prompts ({size} px), mean [95% CI]:\n")
    print("| images | oracle alignment | 95% CI |")
    print("|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['mean']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] |")
    kinds = sorted({k for f in facts.values() for k in f})
    print("\nFraction of facts of each kind that hold in the generated images:\n")
    print("| CFG | " + " | ".join(kinds) + " | s/image |")
    print("|---" * (len(kinds) + 2) + "|")
    for g, f in facts.items():
        cells = " | ".join(f"{f.get(k, float('nan')):.2f}" for k in kinds)
        print(f"| {g} | {cells} | {timing[g]:.2f} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from rlhf.flow.select import pipeline_class_name

    if pipeline_class_name(str(args.pipeline)) == "StableDiffusion3Pipeline":
        from rlhf.flow.pipeline import load_flow_pipeline

        pipe = load_flow_pipeline(args.pipeline)
        denoiser = pipe.transformer
    else:
        pipe = load_pipeline(args.pipeline)
        denoiser = pipe.unet
    prompts = held_out_prompts(args.pipeline)[: args.n_prompts]
    size = denoiser.config.sample_size * pipe.vae_scale_factor
    args.out.mkdir(parents=True, exist_ok=True)

    rows = reference_rows(pipe, prompts, args.seed, size)
    generated, facts, timing = generated_rows(pipe, prompts, args)
    rows.update(generated)
    metrics = {
        "pipeline": str(args.pipeline),
        "n_prompts": len(prompts),
        "image_size": size,
        "steps": args.steps,
        "eta": args.eta,
        "seed": args.seed,
        "oracle_alignment": rows,
        "fact_accuracy_by_guidance": facts,
        "seconds_per_image_by_guidance": timing,
        "threads": args.threads,
    }
    atomic_write_json(args.out / "metrics.json", metrics)
    print_tables(rows, facts, timing, len(prompts), size)
    print(f"\nwrote {args.out / 'metrics.json'} and grid PNGs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
