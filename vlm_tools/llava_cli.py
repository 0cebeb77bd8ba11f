"""``hyperalign llava``: score images with the LLaVA critic, or run the masking analysis.

Usage::

    hyperalign llava score   --images gen/*.png --prompt "a red circle" [--no-refine]
                             [--heatmaps runs/heat] [--out scores.csv]
    hyperalign llava score   --pairs pairs.csv            # columns: image,prompt
    hyperalign llava masking --pairs pairs.csv --answer Yes --out-dir runs/masking

Model: ``--model`` hub id (default llava-hf/llava-1.5-7b-hf) or local directory, with
``--device`` and ``--dtype``. ``--tiny`` uses a random tiny LLaVA (smoke tests only:
its scores mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from hyperalign.common import DTYPE_CHOICES, atomic_write_text, list_images, load_image, parse_dtype
from vlm_tools.contrastive_attention import (
    LLAVA15_POST_LAYER,
    MASKING_MODES,
    ContrastiveAttentionConfig,
    MaskingConfig,
)
from vlm_tools.llava_critic import (
    DEFAULT_LLAVA,
    LlavaCritic,
    LlavaCriticConfig,
    resize_center_crop,
)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def _dtype_name(text: str) -> str:
    """A dtype name :func:`~hyperalign.common.parse_dtype` reads (fp16, float16, bf16, ...)."""
    try:
        parse_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``score`` and ``masking`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="llava_command", required=True)
    score = sub.add_parser("score", help="P('Yes') of LLaVA for image-prompt pairs")
    masking = sub.add_parser("masking", help="layer-wise image-masking analysis (CSV + PNG)")
    for p in (score, masking):
        src = p.add_argument_group("inputs (--pairs, or --images with --prompt)")
        src.add_argument("--pairs", type=Path, help="CSV with columns image,prompt")
        src.add_argument("--images", nargs="+", type=Path, help="image files or directories")
        src.add_argument("--prompt", help="one prompt for every --images file")
        m = p.add_argument_group("model")
        m.add_argument("--model", default=DEFAULT_LLAVA, help="hub id or local directory")
        m.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
        m.add_argument("--dtype", default=None, type=_dtype_name,
                       help=f"{', '.join(DTYPE_CHOICES)} (or float32, float16, bfloat16); "
                       "default fp32 on CPU, fp16 elsewhere")  # fmt: skip
        m.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
        m.add_argument("--tiny", action="store_true", help="random tiny LLaVA (smoke test)")
        c = p.add_argument_group("contrastive attention")
        c.add_argument("--post-layer", type=int, default=LLAVA15_POST_LAYER, help="layer k")
        c.add_argument("--candidate-layers", type=_int_list, default=None,
                       help="comma-separated C (default: shallow half before k)")  # fmt: skip
        c.add_argument("--refine-layer", type=int, default=None, help="default: k")
        c.add_argument("--rho", type=float, default=0.5, help="quantile of IA below which...")
        c.add_argument("--lam", type=float, default=0.1, help="...image tokens are scaled by λ")
    score.add_argument("--no-refine", action="store_true", help="plain VQAScore")
    score.add_argument("--heatmaps", type=Path, help="save IA overlays (PNG) in this directory")
    score.add_argument("--out", type=Path, help="write image,prompt,p_yes[,i_star] CSV here")
    masking.add_argument("--answer", default="Yes", help="answer whose likelihood is measured")
    masking.add_argument("--mode", default="layer", choices=MASKING_MODES, help="see MaskingConfig")
    masking.add_argument("--layers", type=_int_list, default=None, help="default: all layers")
    masking.add_argument("--out-dir", type=Path, required=True, help="for masking_curve.csv/.png")


def read_pairs(args: argparse.Namespace) -> tuple[list[Path], list[str]]:
    """Image paths and prompts from ``--pairs`` or ``--images`` + ``--prompt``."""
    if args.pairs is not None:
        if args.images or args.prompt:
            raise ValueError("give either --pairs or --images/--prompt, not both")
        with open(args.pairs, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            rows = list(csv.DictReader(f))
        if not rows or not {"image", "prompt"} <= set(rows[0]):
            raise ValueError(f"{args.pairs} needs a header with columns 'image' and 'prompt'")
        base = args.pairs.parent
        paths = [Path(r["image"]) if Path(r["image"]).is_absolute() else base / r["image"]
                 for r in rows]  # fmt: skip
        return paths, [r["prompt"] for r in rows]
    if not args.images or args.prompt is None:
        raise ValueError("give --pairs CSV, or --images with --prompt")
    files = list_images(args.images)
    return files, [args.prompt] * len(files)


def load_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Decode images (:func:`hyperalign.common.load_image`: RGB, alpha on white), resize +
    centre-crop each to ``size``² -> (B, 3, S, S) in [0, 1]."""
    out = [resize_center_crop(load_image(p).unsqueeze(0), size) for p in paths]  # (1, 3, S, S)
    return torch.cat(out)  # (B, 3, S, S)


def build_critic(args: argparse.Namespace, refine: bool = True) -> LlavaCritic:
    """The critic the command line describes (``--tiny``: a random tiny LLaVA)."""
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    contrastive = ContrastiveAttentionConfig(
        post_layer=args.post_layer,
        candidate_layers=args.candidate_layers,
        refine_layer=args.refine_layer,
        rho=args.rho,
        lam=args.lam,
    )
    cfg = LlavaCriticConfig(
        model=args.model,
        device=args.device,
        dtype=dtype,
        batch_size=args.batch_size,
        refine=refine,
        contrastive=contrastive,
        heatmap_dir=str(args.heatmaps) if getattr(args, "heatmaps", None) else None,
    )
    if args.tiny:
        from vlm_tools.tiny import build_tiny_llava

        model, processor = build_tiny_llava(dtype=parse_dtype(dtype))
        return LlavaCritic(cfg, model.to(args.device), processor)
    return LlavaCritic(cfg)


def _run_score(args: argparse.Namespace) -> int:
    paths, prompts = read_pairs(args)
    critic = build_critic(args, refine=not args.no_refine)
    images = load_images(paths, critic.image_size)
    rewards, info = critic(images, prompts, [{"image": str(p)} for p in paths])
    cols = ["image", "prompt", "p_yes"] + (["i_star"] if "llava_i_star" in info else [])
    cols += ["heatmap"] if "llava_heatmap" in info else []
    rows = []
    for j, (p, t) in enumerate(zip(paths, prompts)):
        row = {"image": str(p), "prompt": t, "p_yes": f"{rewards[j].item():.6f}"}
        if "llava_i_star" in info:
            row["i_star"] = info["llava_i_star"][j]
        if "llava_heatmap" in info:
            row["heatmap"] = info["llava_heatmap"][j]
        rows.append(row)
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    if args.out is not None:
        atomic_write_text(args.out, text.getvalue())
    else:
        sys.stdout.write(text.getvalue())
    print(
        f"scored {len(rows)} pairs, refine={'off' if args.no_refine else 'on'}: "
        f"mean P(Yes) = {rewards.mean().item():.4f}",
        file=sys.stderr,
    )
    return 0


def write_masking_outputs(
    out_dir: Path, layers: list[int], base: torch.Tensor, drop: torch.Tensor, post_layer: int
) -> tuple[Path, Path]:
    """Write masking_curve.csv (per layer: mean/std/min/max drop) and masking_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out_dir.mkdir(parents=True, exist_ok=True)
    d = drop.float().cpu()  # (L, B)
    mean, std = d.mean(1), d.std(1, unbiased=False)
    csv_path, png_path = out_dir / "masking_curve.csv", out_dir / "masking_curve.png"
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["layer", "mean_logp_drop", "std_logp_drop", "min_drop", "max_drop", "n",
                "mean_base_logp"])  # fmt: skip
    for i, layer in enumerate(layers):
        w.writerow([layer, f"{mean[i]:.6g}", f"{std[i]:.6g}", f"{d[i].min():.6g}",
                    f"{d[i].max():.6g}", d.shape[1], f"{base.mean():.6g}"])  # fmt: skip
    atomic_write_text(csv_path, text.getvalue())
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, mean.numpy(), marker="o", label="mean drop")
    ax.fill_between(layers, (mean - std).numpy(), (mean + std).numpy(), alpha=0.25, label="±1 std")
    ax.axvline(post_layer, color="grey", ls="--", label=f"k = {post_layer}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("decoder layer with image tokens zeroed")
    ax.set_ylabel("drop of answer log-likelihood")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path


def _run_masking(args: argparse.Namespace) -> int:
    paths, prompts = read_pairs(args)
    critic = build_critic(args, refine=False)
    images = load_images(paths, critic.image_size)
    cfg = MaskingConfig(mode=args.mode, layers=args.layers)
    layers, base, drop = critic.masking_analysis(images, prompts, args.answer, cfg)
    csv_path, png_path = write_masking_outputs(args.out_dir, layers, base, drop, args.post_layer)
    top = int(drop.mean(1).argmax())
    print(
        f"masking ({args.mode}) over {len(paths)} pairs, {len(layers)} layers: largest mean "
        f"drop {drop.mean(1)[top].item():.4f} at layer {layers[top]}; wrote {csv_path}, "
        f"{png_path}",
        file=sys.stderr,
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.llava_command == "score":
        return _run_score(args)
    if args.llava_command == "masking":
        return _run_masking(args)
    raise ValueError(f"unknown llava command {args.llava_command!r}; valid: score, masking")
