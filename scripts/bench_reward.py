"""Reward throughput: plain CLIP cosine vs the HyperAlign reward, side by side in one run.

Usage:
    python scripts/bench_reward.py [--backbone ViT-B-16] [--device cpu] [--dtype fp32|bf16|fp16]
                                   [--batch-sizes 1 8 32] [--repeats 3]

All three paths use the same backbone and weights (random: the cost does not depend on them):
  (a) CLIP cosine: tokenise + encode_image + encode_text + cosine, on device tensors;
  (b) HyperAlign reward on device tensors (validation, preprocessing, hyperbolic head);
  (c) HyperAlign reward from PIL images (conversion on the CPU included).
Prints images/second (median over repeats, the three paths interleaved) and b/a, b/c.
On CUDA it also prints the peak memory of (b).
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from reward import HyperAlign, HyperAlignConfig, HyperAlignReward

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = HyperAlign(HyperAlignConfig(backbone=args.backbone, pretrained=None), device=device)
    reward_fn = HyperAlignReward(model, dtype=dtype, max_batch_size=max(args.batch_sizes))
    clip, tokenizer = model.clip, model.tokenizer
    size = model.image_size
    mean, std = model.pixel_mean, model.pixel_std
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()
    )

    def clip_cosine(images, prompts):
        with torch.inference_mode(), autocast:
            tokens = tokenizer(prompts).to(device)
            f_i = clip.encode_image((images - mean) / std)
            f_t = clip.encode_text(tokens)
            return F.cosine_similarity(f_i.float(), f_t.float(), dim=-1)

    print(
        f"backbone {args.backbone} (random weights), device {device}, dtype {args.dtype}, "
        f"threads {torch.get_num_threads()}, image {size[0]}x{size[1]}"
    )
    header = "| batch | (a) CLIP cosine img/s | (b) HyperAlign tensors img/s | (c) HyperAlign PIL img/s | b/a | b/c |"
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
        paths = {
            "a": (clip_cosine, tensors),
            "b": (reward_fn, tensors),
            "c": (reward_fn, pils),
        }
        for fn, images in paths.values():  # warm-up
            fn(images, prompts)
        times: dict[str, list[float]] = {k: [] for k in paths}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.repeats):
            for key, (fn, images) in paths.items():
                _sync(device)
                t0 = time.perf_counter()
                fn(images, prompts)
                _sync(device)
                times[key].append(time.perf_counter() - t0)
        ips = {k: batch / statistics.median(v) for k, v in times.items()}
        row = (
            f"| {batch} | {ips['a']:.2f} | {ips['b']:.2f} | {ips['c']:.2f} | "
            f"{ips['b'] / ips['a']:.3f} | {ips['b'] / ips['c']:.3f} |"
        )
        if device.type == "cuda":
            row += f" {torch.cuda.max_memory_allocated(device) / 2**20:.0f} |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
