"""Cost of contrastive-attention capture + refinement over a plain LLaVA prefill forward.

Usage::

    python scripts/bench_llava_attention.py                       # tiny random LLaVA, CPU
    python scripts/bench_llava_attention.py --arch small          # 576 image tokens, CPU
    python scripts/bench_llava_attention.py --arch llava-1.5-7b --device cuda --dtype fp16
    python scripts/bench_llava_attention.py --arch llava-1.5-7b --layers 8 ...  # 8 of 32 layers

Random weights (no download): only the cost is real. ``--arch llava-1.5-7b`` builds the
real-size LLaVA-1.5-7B architecture (CLIP ViT-L/14-336 + Llama-7B, 576 image tokens) on the
given device; it needs a GPU (~15 GB in float16) and is not run on CPU-only machines.
``--layers N`` keeps N decoder layers of the chosen architecture (k and C scaled with them):
the per-layer cost is unchanged, so a machine too small for all 32 layers still measures the
overhead. On CUDA every mode's peak memory (``torch.cuda.max_memory_allocated``) is printed.
Timed modes, all one prefill forward of the same left-padded batch (``logits_to_keep=1``):

- plain:            sdpa attention, no hooks (the VQAScore baseline);
- capture:          + hooks recomputing the last-token attention row at C ∪ {k};
- capture+refine:   + the look-back pre-hook (i*, IA, quantile, scaling);
- eager+attentions: the alternative we avoid: eager attention with output_attentions=True
                    for all layers (every T×T map kept).

Prints a Markdown table (median of ``--repeats`` after ``--warmup``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from hyperalign.common import DTYPE_CHOICES, parse_dtype
from vlm_tools import contrastive_attention as ca

ARCHS = ("tiny", "small", "llava-1.5-7b")


def build_config(arch: str, layers: int | None = None):
    """LlavaConfig of the named architecture, with ``layers`` decoder layers if given."""
    config = _arch_config(arch)
    if layers is not None:
        if layers < 2:
            raise ValueError(f"--layers {layers}: the method needs at least 2 decoder layers")
        config.text_config.num_hidden_layers = layers
        if getattr(config.text_config, "layer_types", None) is not None:
            config.text_config.layer_types = config.text_config.layer_types[:1] * layers
    return config


def _arch_config(arch: str):
    """LlavaConfig of the named architecture (see ``ARCHS``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if arch == "tiny":
        from vlm_tools.tiny import build_tiny_llava

        return build_tiny_llava(num_layers=4)[0].config
    if arch == "small":  # real token count (336 px, patch 14 -> 576), narrow and shallow
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, projection_dim=64)  # fmt: skip
        text = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=8, vocab_size=32064,
                           max_position_embeddings=1024)  # fmt: skip
        return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)
    if arch == "llava-1.5-7b":
        # llava-hf/llava-1.5-7b-hf: LlavaConfig's vision defaults are CLIP ViT-L/14-336;
        # text is Llama-2-7B/Vicuna (hidden 4096, 32 layers, 32 heads, MLP 11008), vocab 32064.
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                           max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
        return LlavaConfig(text_config=text, image_token_index=32000, image_seq_length=576)
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")


def contrastive_config(num_layers: int) -> ca.ContrastiveAttentionConfig:
    """k scaled from LLaVA-1.5-7B's 28 of 32 layers; C = default shallow half before k."""
    k = min(num_layers - 1, max(1, round(28 * num_layers / 32)))
    return ca.ContrastiveAttentionConfig(post_layer=k)


def make_inputs(config, batch: int, text_len: int, device, dtype, seed: int = 0):
    """Left-padded batch: row b has ``text_len - 2b`` random text tokens after the image."""
    g = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2
    lengths = [max(2, text_len - 2 * b) for b in range(batch)]
    t = n_img + 1 + max(lengths)
    ids = torch.zeros(batch, t, dtype=torch.long)
    am = torch.zeros(batch, t, dtype=torch.long)
    for b, n in enumerate(lengths):
        text = torch.randint(5, config.text_config.vocab_size, (n,), generator=g)
        text[text == config.image_token_id] = 5  # text must not contain image placeholders
        row = torch.cat([torch.tensor([1]), torch.full((n_img,), config.image_token_id), text])
        ids[b, t - row.numel() :] = row
        am[b, t - row.numel() :] = 1
    pix = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
    img = ca.image_token_mask(ids, config.image_token_id, n_img)
    return ids.to(device), am.to(device), pix.to(device, dtype), img.to(device)


def timed_round_robin(fns: dict, device, warmup: int, repeats: int) -> dict:
    """Median time (ms) per named function, run in turn each repeat in a rotating order
    (so load drift on a shared machine hits every mode alike), and peak accelerator memory (GiB, nan on CPU).

    On CPU the clock is the process CPU time (robust to other processes on a shared machine;
    with one intra-op thread it equals the compute time); on accelerators it is wall time.
    """
    is_cuda = torch.device(device).type == "cuda"
    clock = time.perf_counter if torch.device(device).type != "cpu" else time.process_time
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    times = {name: [] for name in fns}
    peaks = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync()
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
            fn()
            sync()
        peaks[name] = torch.cuda.max_memory_allocated(device) / 2**30 if is_cuda else math.nan
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order
            fn = fns[name]
            t0 = clock()
            fn()
            sync()
            times[name].append((clock() - t0) * 1e3)
    return {name: (statistics.median(t), peaks[name]) for name, t in times.items()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="tiny", choices=ARCHS)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", type=parse_dtype,
                        help=f"{', '.join(DTYPE_CHOICES)} (or float32, float16, bfloat16)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=4, help="image-prompt pairs per forward")
    parser.add_argument("--text-len", type=int, default=40, help="text tokens of the longest row")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-eager", action="store_true", help="skip the eager baseline")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    return args


def build_model(config, device, dtype):
    """Random-weight ``LlavaForConditionalGeneration`` built directly on ``device`` (sdpa)."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def time_modes(model, cfg, inputs, args) -> dict:
    """``{mode: (median ms, peak GiB)}`` for plain, capture, capture+refine (and eager)."""
    ids, am, pix, img = inputs
    kw = dict(input_ids=ids, attention_mask=am, pixel_values=pix, use_cache=False,
              position_ids=ca.position_ids_from_mask(am), logits_to_keep=1)  # fmt: skip

    def plain():
        return model(**kw)

    def capture():
        with ca.ContrastiveRefinement(model, cfg, img, am, refine=False):
            return model(**kw)

    def refine():
        with ca.ContrastiveRefinement(model, cfg, img, am, refine=True):
            return model(**kw)

    def eager():
        return model(**kw, output_attentions=True)

    modes = {"plain": plain, "capture": capture, "capture+refine": refine}
    results = timed_round_robin(modes, args.device, args.warmup, args.repeats)
    if not args.skip_eager:
        model.set_attn_implementation("eager")
        results.update(timed_round_robin({"eager+attentions": eager}, args.device, args.warmup,
                                         args.repeats))  # fmt: skip
        model.set_attn_implementation("sdpa")
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    dtype_name = str(args.dtype).removeprefix("torch.")
    config = build_config(args.arch, args.layers)
    model = build_model(config, args.device, args.dtype)
    n_layers = config.text_config.num_hidden_layers
    full = _arch_config(args.arch).text_config.num_hidden_layers
    n_params = sum(p.numel() for p in model.parameters())
    cfg = contrastive_config(n_layers)
    inputs = make_inputs(config, args.batch, args.text_len, args.device, args.dtype)
    ids, am, _, img = inputs
    results = time_modes(model, cfg, inputs, args)
    base = results["plain"][0]
    with ca.ContrastiveRefinement(model, cfg, img, am) as probe:
        n_hooks = probe.active_hooks
    print(f"\narch {args.arch}: {n_layers} of {full} decoder layers, {n_params / 1e6:.1f} M "
          f"params, k={cfg.post_layer}, |C|={len(cfg.resolved_candidates())}, {n_hooks} hooks, "
          f"batch {args.batch}, sequence {ids.shape[1]} tokens ({int(img[0].sum())} image), "
          f"{args.device} {dtype_name}, {args.threads} CPU thread(s), median of {args.repeats} "
          f"({'CPU' if args.device == 'cpu' else 'wall'} time)\n")  # fmt: skip
    print("| mode | ms / forward | overhead vs plain | peak GiB |")
    print("|---|---:|---:|---:|")
    for name, (ms, peak) in results.items():
        peak_s = "-" if math.isnan(peak) else f"{peak:.2f}"
        print(f"| {name} | {ms:.2f} | {100 * (ms / base - 1):+.1f} % | {peak_s} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
