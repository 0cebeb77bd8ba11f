"""Benchmark DDPO sampling and training; prints Markdown tables.

    python scripts/bench_ddpo.py                       # tiny pipeline on CPU (seconds)
    python scripts/bench_ddpo.py --model random-sd15 --device cuda --dtype fp16 \\
        --resolution 512 --batch 8 --steps 50          # SD 1.5 size, random weights
    python scripts/bench_ddpo.py --model tiny-sd3 --steps 10 --cfg 4.5   # Flow-GRPO path
    python scripts/bench_ddpo.py --model shapes-flow --steps 10 --cfg 3 --batch 16 \
        --num-batches 2                                  # the flow demo's model and preset

Tables:
1. our log-prob sampler (`rlhf.sampling.sample_with_logprob`) vs diffusers'
   `StableDiffusionPipeline.__call__` at the same steps, CFG and eta, from the same prompt
   embeddings (goal: <= 1.10x its time); samples/s and, on CUDA, each sampler's peak memory
   (`torch.cuda.max_memory_allocated`);
2. one DDPO epoch (brightness reward, LoRA training on all timesteps) broken down into
   sampling / reward / training, with samples/s and, on CUDA, the epoch's peak memory; the
   trainer runs on accelerate's device (the GPU when there is one);
3. epoch wall time (sampling + rewards) with and without reward overlap, using a reward that
   sleeps `--slow-reward-s` seconds per batch (a stand-in for a slow reward model);
   `--skip-overlap` leaves it out.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch

from hyperalign.common import DTYPE_CHOICES, parse_dtype
from shapes.assets import FLOW_DIR


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def _reset_peak() -> None:
    """Release cached blocks and restart the peak-memory counter (CUDA only)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float:
    """Peak allocated CUDA memory since the last reset, in GiB (0 without CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return 0.0


def _gib(value: float) -> str:
    return f"{value:.2f}" if value > 0 else "-"


FLOW_MODELS = ("tiny-sd3", "shapes-flow")
"""``--model`` values of the Flow-GRPO path (the tiny random SD3; the shipped shapes SD3)."""


def _time(fn, device: str, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_flow_sampler(args) -> None:
    """Table 1 for the flow path: the Flow-GRPO SDE sampler against
    ``StableDiffusion3Pipeline.__call__`` (its ODE) at the same steps and CFG."""
    from rlhf.flow.pipeline import load_flow_pipeline
    from rlhf.flow.sampling import encode_prompts, sample_with_logprob

    name = str(FLOW_DIR) if args.model == "shapes-flow" else "tiny-sd3"
    pipe = load_flow_pipeline(name).to(args.device, parse_dtype(args.dtype))
    length = 1 if args.model == "shapes-flow" else 32  # no T5 in the shapes model
    prompts = [f"a red circle left of {i} blue squares" for i in range(args.batch)]
    embeds, pooled = encode_prompts(pipe, prompts, args.device, length)
    neg, neg_pooled = encode_prompts(pipe, [""] * args.batch, args.device, length)

    def ours():
        sample_with_logprob(pipe, embeds, pooled, neg, neg_pooled, args.steps, args.cfg, 0.7)

    def diffusers_call():
        pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            negative_prompt_embeds=neg,
            negative_pooled_prompt_embeds=neg_pooled,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
            output_type="pt",
        )

    _compare(args, {"diffusers __call__": diffusers_call, "rlhf.flow sample_with_logprob": ours})


def bench_sampler(args) -> None:
    if args.model in FLOW_MODELS:
        return bench_flow_sampler(args)
    from rlhf.sampling import encode_prompts, sample_with_logprob
    from rlhf.tiny import build_random_sd15_pipeline, build_tiny_pipeline

    dtype = parse_dtype(args.dtype)
    if args.model == "tiny":
        pipe = build_tiny_pipeline(0)
    else:
        pipe = build_random_sd15_pipeline(0, sample_size=args.resolution // 8)
    pipe.to(args.device, dtype)
    size = args.resolution if args.model != "tiny" else None
    prompts = [f"a photo of animal {i}" for i in range(args.batch)]
    embeds = encode_prompts(pipe, prompts, args.device)
    neg = encode_prompts(pipe, [""] * args.batch, args.device)

    def ours():
        sample_with_logprob(pipe, embeds, neg, args.steps, args.cfg, 1.0, height=size, width=size)

    def diffusers_call():
        pipe(
            prompt_embeds=embeds,
            negative_prompt_embeds=neg,
            num_inference_steps=args.steps,
            guidance_scale=args.cfg,
            eta=1.0,
            height=size,
            width=size,
            output_type="pt",
        )

    _compare(args, {"diffusers __call__": diffusers_call, "rlhf sample_with_logprob": ours})


def _compare(args, fns: dict) -> None:
    """Time each sampler in ``fns`` (interleaved repeats) and print the table."""
    times = {name: [] for name in fns}
    peaks = {name: 0.0 for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            for _ in range(args.warmup):
                fn()
        # Interleaved repeats: both samplers see the same machine load (shared CPUs).
        for _ in range(args.repeats):
            for name, fn in fns.items():
                _reset_peak()
                times[name].append(_time(fn, args.device, 1, 0))
                peaks[name] = max(peaks[name], _peak_gib())
    results = {name: statistics.median(t) for name, t in times.items()}
    base = results["diffusers __call__"]
    print(
        f"\n### Sampler ({args.model}, {args.device}, {args.dtype}, batch {args.batch}, "
        f"{args.steps} steps, CFG {args.cfg}"
        + (", SDE noise level 0.7)\n" if args.model in FLOW_MODELS else ", eta 1)\n")
    )
    print("| sampler | s / batch | samples/s | vs diffusers | peak GiB |")
    print("|---|---|---|---|---|")
    for name, t in results.items():
        print(
            f"| {name} | {t:.4f} | {args.batch / t:.2f} | {t / base:.3f}x | {_gib(peaks[name])} |"
        )
    print(flush=True)


def _tiny_cfg(args, run_name):
    from rlhf.config import shapes_demo_flow, tiny_cpu, tiny_sd3_cpu

    presets = {"tiny-sd3": tiny_sd3_cpu, "shapes-flow": shapes_demo_flow}
    cfg = presets.get(args.model, tiny_cpu)()
    cfg.logdir = args.logdir
    cfg.run_name = run_name
    cfg.save_freq = 0
    cfg.num_epochs = 1
    cfg.sample_num_steps = args.steps
    cfg.sample_batch_size = args.batch
    cfg.train_batch_size = args.batch
    cfg.sample_num_batches_per_epoch = args.num_batches
    if args.model == "random-sd15":
        cfg.pretrained_model = "random-sd15"
        cfg.resolution = args.resolution
        cfg.mixed_precision = {torch.float32: "no", torch.float16: "fp16"}.get(
            parse_dtype(args.dtype), "bf16"
        )
    return cfg


def bench_epoch(args) -> None:
    from rlhf.flow.select import trainer_class

    _reset_peak()  # the sampler table's pipeline is gone: this table measures its own
    cfg = _tiny_cfg(args, "bench-epoch")
    trainer = trainer_class(cfg)(cfg)
    trainer.sample_epoch(0)  # warm-up
    samples, timings = trainer.sample_epoch(0)
    trainer.compute_advantages(samples)
    t0 = time.perf_counter()
    trainer.train_ppo(samples, 0)
    _sync(str(trainer.device))
    timings["time_training"] = time.perf_counter() - t0
    peak = _peak_gib()
    total = timings["time_sampling"] + timings["time_reward_wait"] + timings["time_training"]
    n = samples["rewards"].shape[0]
    print(
        f"\n### One {type(trainer).__name__} epoch ({args.model}, {trainer.device}, "
        f"{trainer.config.mixed_precision} mixed precision, {n} samples, {args.steps} steps, "
        f"{trainer.config.num_train_timesteps} of them trained, reward "
        f"{trainer.config.reward_fn})\n"
    )
    print("| phase | s | share |")
    print("|---|---|---|")
    for key, label in (
        ("time_sampling", "sampling (with log-probs)"),
        ("time_reward_wait", "reward (wait after sampling)"),
        ("time_training", "training (PPO-clip)"),
    ):
        print(f"| {label} | {timings[key]:.3f} | {timings[key] / total:.0%} |")
    print(f"| total | {total:.3f} | {n / total:.2f} samples/s |")
    if peak > 0:  # CUDA
        print(f"| peak GiB (sampling + training) | {peak:.2f} | |")
    print(flush=True)
    trainer.executor.shutdown()


def bench_overlap(args) -> None:
    from rlhf.rewards import Brightness, SlowReward
    from rlhf.trainer import DDPOTrainer

    rows = []
    for overlap in (False, True):
        cfg = _tiny_cfg(args, f"bench-overlap-{overlap}")
        cfg.async_reward_computation = overlap
        tr = DDPOTrainer(cfg, reward_fn=SlowReward(Brightness(), args.slow_reward_s))
        tr.sample_epoch(0)  # warm-up
        t0 = time.perf_counter()
        _, tm = tr.sample_epoch(0)
        rows.append((overlap, time.perf_counter() - t0, tm))
        tr.executor.shutdown()
    print(
        f"\n### Reward overlap ({args.num_batches} batches, reward sleeps "
        f"{args.slow_reward_s} s per batch)\n"
    )
    print("| rewards | sampling+reward wall s | sampling s | waiting for rewards s |")
    print("|---|---|---|---|")
    for overlap, wall, tm in rows:
        label = "overlapped (thread pool)" if overlap else "sequential"
        print(
            f"| {label} | {wall:.3f} | {tm['time_sampling']:.3f} | {tm['time_reward_wait']:.3f} |"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", choices=("tiny", "random-sd15", *FLOW_MODELS), default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32",
                   help=f"{', '.join(DTYPE_CHOICES)} (or float32, float16, bfloat16)")  # fmt: skip
    p.add_argument("--resolution", type=int, default=512, help="pixels (random-sd15 only)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--num-batches", type=int, default=4, help="sampling batches per epoch")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--slow-reward-s", type=float, default=0.2)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--logdir", default="/tmp/bench_ddpo")
    p.add_argument("--skip-epoch", action="store_true", help="only the sampler table")
    p.add_argument("--skip-overlap", action="store_true", help="leave out the overlap table")
    args = p.parse_args(argv)
    try:
        parse_dtype(args.dtype)
    except ValueError as e:
        p.error(str(e))
    if _is_cuda(args.device) and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here; use --device cpu")
    torch.set_num_threads(args.threads)
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "-"
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} CPU thread(s), GPU {gpu}"
    )
    bench_sampler(args)
    if not args.skip_epoch:
        bench_epoch(args)
    if not (args.skip_epoch or args.skip_overlap):
        bench_overlap(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
