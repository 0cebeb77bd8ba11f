"""Reward throughput, side by side in one run.

Usage:
    python scripts/bench_reward.py [--backbone ViT-B-16 | --reward shapes] [--device cpu]
                                   [--dtype fp32|bf16|fp16] [--batch-sizes 1 8 32] [--repeats 3]
                                   [--images-per-prompt K [K ...]]

Default mode: plain CLIP cosine vs the HyperAlign reward. All three paths use the same
backbone and weights (random with --backbone: the cost does not depend on them):
  (a) CLIP cosine: tokenise + encode_image + encode_text + cosine, on device tensors;
  (b) HyperAlign reward on device tensors (validation, preprocessing, hyperbolic head);
  (c) HyperAlign reward from PIL images (conversion on the CPU included).
Prints images/second (median over repeats, the three paths interleaved) and b/a, b/c.
On CUDA it also prints the peak memory of (b).

With --images-per-prompt K: a batch of B images holds B/K distinct prompts, each K times in a
row (as RL samplers repeat them); the reward with text features computed once per distinct
prompt (dedupe on, the default) vs once per image (off), interleaved, with the largest
difference between their rewards. E.g. on CPU with the shipped shapes reward:
    python scripts/bench_reward.py --reward shapes --batch-sizes 32 128 --images-per-prompt 4 16
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hyperalign.common import DTYPE_CHOICES, parse_dtype
from reward import HyperAlign, HyperAlignConfig, HyperAlignReward, build_reward


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ips(paths: dict, prompts: list[str], repeats: int, device) -> dict[str, float]:
    """Images/second of each ``name -> (fn, images)``: one warm-up, then interleaved repeats."""
    for fn, images in paths.values():  # warm-up
        fn(images, prompts)
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(repeats):
        for key, (fn, images) in paths.items():
            _sync(device)
            t0 = time.perf_counter()
            fn(images, prompts)
            _sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: len(prompts) / statistics.median(v) for k, v in times.items()}


def _build_model(args, device: torch.device) -> tuple[HyperAlign, str]:
    """The model to time and a one-line description of it."""
    if args.reward is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny-random's "random weights" warning
            model = build_reward(args.reward, device=device).model
        return model, f"reward {args.reward!r} (backbone {model.config.backbone})"
    torch.manual_seed(0)
    model = HyperAlign(HyperAlignConfig(backbone=args.backbone, pretrained=None), device=device)
    return model, f"backbone {args.backbone} (random weights)"


def bench_clip_vs_reward(model: HyperAlign, args, device, dtype) -> None:
    """The default table: (a) CLIP cosine, (b) HyperAlign on tensors, (c) HyperAlign on PIL."""
    reward_fn = HyperAlignReward(model, dtype=dtype, max_batch_size=max(args.batch_sizes))
    clip, tokenizer, size = model.clip, model.tokenizer, model.image_size
    mean, std = model.pixel_mean, model.pixel_std
    half = dtype not in (None, torch.float32)
    autocast = torch.autocast(device_type=device.type, dtype=dtype) if half else nullcontext()

    def clip_cosine(images, prompts):
        with torch.inference_mode(), autocast:
            tokens = tokenizer(prompts).to(device)
            f_i = clip.encode_image((images - mean) / std)
            f_t = clip.encode_text(tokens)
            return F.cosine_similarity(f_i.float(), f_t.float(), dim=-1)

    header = (
        "| batch | (a) CLIP cosine img/s | (b) HyperAlign tensors img/s | "
        "(c) HyperAlign PIL img/s | b/a | b/c |"
    )
    if device.type == "cuda":
        header += " peak mem (b) MiB |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for batch in args.batch_sizes:
        g = torch.Generator().manual_seed(batch)
        pixels = torch.rand(batch, 3, *size, generator=g)
        tensors = pixels.to(device)
        pils = [
            Image.fromarray((p.permute(1, 2, 0).numpy() * 255).astype(np.uint8)) for p in pixels
        ]
        prompts = [f"a photo of object number {i} on a table" for i in range(batch)]
        paths = {"a": (clip_cosine, tensors), "b": (reward_fn, tensors), "c": (reward_fn, pils)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ips = _median_ips(paths, prompts, args.repeats, device)
        row = (
            f"| {batch} | {ips['a']:.2f} | {ips['b']:.2f} | {ips['c']:.2f} | "
            f"{ips['b'] / ips['a']:.3f} | {ips['b'] / ips['c']:.3f} |"
        )
        if device.type == "cuda":
            row += f" {torch.cuda.max_memory_allocated(device) / 2**20:.0f} |"
        print(row, flush=True)


def bench_dedupe(model: HyperAlign, args, device, dtype) -> None:
    """Dedupe on vs off for batches of B images with B/K distinct prompts."""
    n = max(args.batch_sizes)
    on = HyperAlignReward(model, dtype=dtype, max_batch_size=n, dedupe_prompts=True)
    off = HyperAlignReward(model, dtype=dtype, max_batch_size=n, dedupe_prompts=False)
    print(
        "| batch B | images per prompt K | distinct prompts | dedupe off img/s | "
        "dedupe on img/s | on/off | max abs reward diff |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        for k in args.images_per_prompt:
            distinct = -(-batch // k)  # ceil(B / K)
            prompts = [f"a photo of object number {i // k} on a table" for i in range(batch)]
            g = torch.Generator().manual_seed(batch)
            images = torch.rand(batch, 3, *model.image_size, generator=g).to(device)
            ips = _median_ips(
                {"off": (off, images), "on": (on, images)}, prompts, args.repeats, device
            )
            diff = (on(images, prompts)[0] - off(images, prompts)[0]).abs().max().item()
            print(
                f"| {batch} | {k} | {distinct} | {ips['off']:.2f} | {ips['on']:.2f} | "
                f"{ips['on'] / ips['off']:.2f} | {diff:.1e} |",
                flush=True,
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="ViT-B-16", help="random-weight backbone to time")
    parser.add_argument("--reward", help="time this preset or checkpoint instead (e.g. shapes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--images-per-prompt",
        type=int,
        nargs="+",
        metavar="K",
        help="time text-feature dedupe on vs off, each prompt repeated K times in a batch",
    )
    args = parser.parse_args(argv)
    if any(v < 1 for v in [*args.batch_sizes, *(args.images_per_prompt or [])]):
        parser.error("batch sizes and --images-per-prompt must be >= 1")

    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype)
    model, what = _build_model(args, device)
    print(
        f"{what}, device {device}, dtype {args.dtype}, threads {torch.get_num_threads()}, "
        f"image {model.image_size[0]}x{model.image_size[1]}"
    )
    if args.images_per_prompt:
        bench_dedupe(model, args, device, dtype)
    else:
        bench_clip_vs_reward(model, args, device, dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
