"""Measure the shapes-world oracle: fact accuracy on clean renders and under blur and noise.

Usage::

    python scripts/bench_oracle.py [--n-prompts 300] [--seed 0] [--image-size 64] [--denoise 3]

For each of ``--n-prompts`` random prompts it renders the faithful scene and every perturbed
scene (see ``shapes.perturb``), degrades the image (Gaussian blur of sigma px, or
additive Gaussian noise of sigma on [0, 1] pixels, clipped), reads it with the oracle and
compares with the ground truth. Prints a Markdown table:

- fact acc.: fraction of the prompts' facts whose truth value the oracle gets right;
- scene exact: fraction of images whose detected (shape, colour, size) multiset is exact;
- mean |d align|: mean absolute error of the oracle alignment vs the true alignment;
- ms/img: oracle time per image on this machine.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import ndimage

from shapes.oracle import OracleConfig, read_objects
from shapes.perturb import faithful_scene, perturbed_scenes
from shapes.prompts import evaluate_facts, sample_prompt
from shapes.world import RenderConfig, render

CONDITIONS: tuple[tuple[str, float], ...] = (
    ("clean", 0.0),
    ("blur", 0.5),
    ("blur", 1.0),
    ("blur", 1.5),
    ("noise", 0.05),
    ("noise", 0.1),
    ("noise", 0.15),
    ("noise", 0.2),
)
"""(degradation, sigma): blur sigma in pixels, noise sigma in [0, 1] intensity units."""


def degrade(image: np.ndarray, kind: str, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """uint8 (H, W, 3) -> float (H, W, 3) in [0, 1], blurred or noised."""
    img = image.astype(np.float64) / 255.0
    if kind == "blur" and sigma > 0:
        img = ndimage.gaussian_filter(img, sigma=(sigma, sigma, 0), mode="nearest")
    elif kind == "noise" and sigma > 0:
        img = np.clip(img + rng.normal(0.0, sigma, img.shape), 0.0, 1.0)
    return img


def measure(n_prompts: int, seed: int, image_size: int, config: OracleConfig) -> list[dict]:
    """One result dict per condition of :data:`CONDITIONS`."""
    render_cfg = RenderConfig(image_size=image_size)
    cases = []  # (spec, scene, image)
    for i in range(n_prompts):
        rng = np.random.default_rng([seed, i])
        spec = sample_prompt(rng)
        scene = faithful_scene(spec, rng)
        for s in [scene, *(p.scene for p in perturbed_scenes(spec, scene, rng))]:
            cases.append((spec, s, render(s, render_cfg)))
    results = []
    for kind, sigma in CONDITIONS:
        rng = np.random.default_rng([seed, 10_000])
        n_facts = n_right = n_exact = 0
        abs_err = 0.0
        t_oracle = 0.0
        for spec, scene, image in cases:
            img = degrade(image, kind, sigma, rng)
            t0 = time.perf_counter()
            objs = read_objects(img, config)
            t_oracle += time.perf_counter() - t0
            truth = evaluate_facts(spec, scene.objects)
            read = evaluate_facts(spec, objs)
            n_facts += len(truth)
            n_right += sum(a == b for a, b in zip(truth, read))
            abs_err += abs(sum(truth) - sum(read)) / len(truth)
            want = sorted((o.shape, o.color, o.size) for o in scene.objects)
            n_exact += want == sorted((o.shape, o.color, o.size) for o in objs)
        results.append(
            {
                "condition": "clean" if kind == "clean" else f"{kind} sigma={sigma:g}",
                "images": len(cases),
                "facts": n_facts,
                "fact_acc": n_right / n_facts,
                "scene_exact": n_exact / len(cases),
                "mae": abs_err / len(cases),
                "ms": 1000.0 * t_oracle / len(cases),
            }
        )
    return results


def to_markdown(results: list[dict]) -> str:
    lines = [
        "| condition | images | facts | fact acc. | scene exact | mean abs. align err. | ms/img |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['condition']} | {r['images']} | {r['facts']} | {100 * r['fact_acc']:.2f} % "
            f"| {100 * r['scene_exact']:.2f} % | {r['mae']:.4f} | {r['ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-prompts", type=int, default=300, help="prompts (x ~8 images each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, scenes and noise")
    parser.add_argument("--image-size", type=int, default=64, help="render size in pixels")
    parser.add_argument(
        "--denoise", type=int, default=OracleConfig().denoise, help="oracle box-filter width"
    )
    args = parser.parse_args(argv)
    config = OracleConfig(denoise=args.denoise)
    results = measure(args.n_prompts, args.seed, args.image_size, config)
    print(
        f"Oracle on {args.image_size}px renders, {args.n_prompts} prompts, seed {args.seed}, "
        f"denoise={args.denoise}\n"
    )
    print(to_markdown(results))
    clean = results[0]["fact_acc"]
    if clean < 0.99:
        print(f"\nFAIL: clean fact accuracy {100 * clean:.2f} % < 99 %")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
