"""Device check: every GPU figure BENCHMARKS.md lacks, in one run of at most 8 minutes.

Usage (from the repository root; ``scripts/device_check.sh`` sets the offline environment and
installs the project first when ``import reward`` fails)::

    bash scripts/device_check.sh                  # one CUDA GPU, real sizes, <= 8 minutes
    bash scripts/device_check.sh --tiny           # CPU, tiny sizes (about a minute)
    DEVICE_CHECK_TINY=1 bash scripts/device_check.sh
    bash scripts/device_check.sh --only llava     # rerun one step (names below)

Steps, each one bench script in its own process with its own timeout (a step that runs over
is killed, what it printed so far is kept, and the next step runs); the whole run stops
starting steps when ``--budget-s`` (default 470 s) is spent:

- ``machine``: GPU, memory, torch / CUDA versions.
- ``reward-b16``, ``reward-l14``: ``scripts/bench_reward.py`` in bf16, batch 1-256, ViT-B/16
  and ViT-L/14 with random weights (``pretrained=None``): img/s of plain CLIP cosine,
  HyperAlign on tensors and on PIL images, the ratios HyperAlign / CLIP (b/a) and tensor / PIL
  (b/c), and the peak memory.
- ``llava``: ``scripts/bench_llava_attention.py`` on the LLaVA-1.5-7B architecture (7.06 B
  parameters, random weights, fp16): ms per prefill forward of plain / capture /
  capture+refine / eager+attentions and each mode's peak memory. If the full model fails or
  runs over its time, it is rerun with 8 of its 32 decoder layers and the report says so.
- ``ddpo``: ``scripts/bench_ddpo.py`` on the Stable Diffusion 1.5 architecture (random
  weights, fp16, 512 px, batch 8, 50 DDIM steps, CFG 5): sampler samples/s vs diffusers with
  peak memory, and one DDPO epoch (16 samples, LoRA, all timesteps) with samples/s and peak
  memory.

``--tiny`` runs the same steps on the CPU with tiny random models (``hyperalign-tiny`` for
both CLIP sizes, the tiny LLaVA, the tiny pipeline): the figures mean nothing, the run proves
the script works. The report (Markdown) goes to stdout and, when ``$OUT`` is set (or with
``--out FILE``), to ``$OUT/device_check.md``, with every step's stderr in
``device_check.log`` beside it. Nothing is downloaded (``HF_HUB_OFFLINE=1``). Exit status: 0
when every step finished, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470.0
"""Seconds of steps in one full run (8 minutes less the start of the Python processes)."""
MIN_FALLBACK_S = 45.0
"""A fallback step starts only with at least this much of the budget left."""
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",  # a killed step keeps what it printed
    "TOKENIZERS_PARALLELISM": "false",
}
REWARD_BATCHES = ["1", "2", "4", "8", "16", "32", "64", "128", "256"]


@dataclass
class Step:
    """One bench script run: ``python <argv>`` with a time limit."""

    name: str
    title: str
    argv: list[str]
    timeout_s: float
    note: str = ""
    """Printed under the title (what the figures are, what differs from the real size)."""
    fallback: Step | None = None
    """Run instead when this step fails or runs over (smaller size, its own note)."""


@dataclass
class StepResult:
    step: Step
    status: str
    """``ok``, ``failed (exit N)``, ``timed out after N s`` or ``skipped (...)``."""
    seconds: float
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# ----------------------------------------------------------------------------- the steps


TITLES = {
    "machine": "Machine",
    "reward-b16": "Reward throughput, ViT-B/16, bf16, GPU",
    "reward-l14": "Reward throughput, ViT-L/14, bf16, GPU",
    "llava": "Contrastive-attention critic overhead, LLaVA-1.5-7B size, fp16, GPU",
    "ddpo": "DDPO at Stable Diffusion 1.5 size, fp16, GPU",
}
"""Section titles, the same in both modes (the tiny report has the full one's layout)."""

NOTES = {
    "reward-b16": "Random weights (pretrained=None), 224 px, median of 5 repeats with the three "
    "paths interleaved; b/a = HyperAlign / plain CLIP, b/c = tensors / PIL.",
    "reward-l14": "As above, for ViT-L/14 (scale).",
    "llava": "Full architecture (CLIP ViT-L/14-336 + Llama-7B, 32 decoder layers, 7.06 B "
    "parameters), random weights, batch 4, 576 image tokens per row; wall time.",
    "llava-reduced": "REDUCED: the full 32-layer model failed or ran over its time, so this is 8 "
    "of its 32 decoder layers (the real per-layer cost, k and C scaled); a forward of the "
    "full model costs about 4x the ms shown, the overhead percentages carry over.",
    "ddpo": "Random-weight SD 1.5 architecture (UNet 860 M), 512 px, batch 8, 50 DDIM steps, "
    "CFG 5, eta 1. The epoch: 2 batches of 8, brightness reward, LoRA r 4, every timestep "
    "trained.",
}


def _script(name: str) -> str:
    return str(ROOT / "scripts" / name)


def full_steps(logdir: str) -> list[Step]:
    """The steps at real size on one CUDA GPU."""

    def reward(backbone: str) -> list[str]:
        return [_script("bench_reward.py"), "--backbone", backbone, "--device", "cuda",
                "--dtype", "bf16", "--repeats", "5", "--batch-sizes", *REWARD_BATCHES]  # fmt: skip

    llava = [_script("bench_llava_attention.py"), "--arch", "llava-1.5-7b", "--device", "cuda",
             "--dtype", "fp16", "--batch", "4", "--warmup", "2", "--repeats", "10"]  # fmt: skip
    ddpo = [_script("bench_ddpo.py"), "--model", "random-sd15", "--device", "cuda", "--dtype",
            "fp16", "--resolution", "512", "--batch", "8", "--num-batches", "2", "--steps",
            "50", "--cfg", "5", "--repeats", "3", "--warmup", "1", "--skip-overlap",
            "--threads", "8", "--logdir", logdir]  # fmt: skip
    reduced_title = TITLES["llava"].replace("size", "layers, 8 of 32")
    reduced = Step("llava", reduced_title, [*llava, "--layers", "8"], 80, NOTES["llava-reduced"])
    return [
        machine_step(full=True),
        Step("reward-b16", TITLES["reward-b16"], reward("ViT-B-16"), 80, NOTES["reward-b16"]),
        Step("reward-l14", TITLES["reward-l14"], reward("ViT-L-14"), 110, NOTES["reward-l14"]),
        Step("llava", TITLES["llava"], llava, 110, NOTES["llava"], fallback=reduced),
        Step("ddpo", TITLES["ddpo"], ddpo, 170, NOTES["ddpo"]),
    ]


def tiny_steps(logdir: str) -> list[Step]:
    """The same steps on the CPU with tiny random models (the plumbing, not the figures)."""
    reward = [_script("bench_reward.py"), "--backbone", "hyperalign-tiny", "--device", "cpu",
              "--dtype", "bf16", "--repeats", "1", "--batch-sizes", "1", "4"]  # fmt: skip
    llava = [_script("bench_llava_attention.py"), "--arch", "tiny", "--device", "cpu",
             "--dtype", "fp32", "--batch", "2", "--warmup", "1", "--repeats", "2"]  # fmt: skip
    ddpo = [_script("bench_ddpo.py"), "--model", "tiny", "--device", "cpu", "--dtype", "fp32",
            "--batch", "2", "--num-batches", "1", "--steps", "2", "--repeats", "1",
            "--warmup", "0", "--skip-overlap", "--logdir", logdir]  # fmt: skip
    stand_in = {
        "reward-b16": "hyperalign-tiny stands in for ViT-B/16",
        "reward-l14": "hyperalign-tiny stands in for ViT-L/14",
        "llava": "the tiny LLaVA stands in for LLaVA-1.5-7B",
        "ddpo": "the tiny pipeline stands in for SD 1.5",
    }
    argvs = {"reward-b16": reward, "reward-l14": reward, "llava": llava, "ddpo": ddpo}
    note = "TINY (CPU): the figures mean nothing; {}."
    return [machine_step(full=False)] + [
        Step(name, TITLES[name], argvs[name], 120, note.format(stand_in[name])) for name in argvs
    ]


def machine_step(full: bool) -> Step:
    argv = [str(Path(__file__).resolve()), "--machine-info"] + (["--need-cuda"] if full else [])
    return Step("machine", TITLES["machine"], argv, 60)


def machine_info(need_cuda: bool) -> int:
    """Print the machine table; exit 3 when ``need_cuda`` and there is no CUDA device."""
    import platform

    import torch

    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("CUDA (torch build)", torch.version.cuda or "-"),
        ("CPU cores", str(os.cpu_count())),
    ]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows += [
            ("GPU", f"{props.name} (of {torch.cuda.device_count()})"),
            ("GPU memory GiB", f"{props.total_memory / 2**30:.1f}"),
            ("bf16 supported", str(torch.cuda.is_bf16_supported())),
        ]
    else:
        rows.append(("GPU", "none"))
    print("| item | value |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    if need_cuda and not torch.cuda.is_available():
        print(
            "no CUDA device: the full check needs one GPU; run "
            "`bash scripts/device_check.sh --tiny` for the CPU check",
            file=sys.stderr,
        )
        return 3
    return 0


# ------------------------------------------------------------------------------ running


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the step's process group, SIGKILL what is left after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_step(step: Step, timeout_s: float, env: dict) -> StepResult:
    """Run ``step`` for at most ``timeout_s`` seconds (then kill its process group)."""
    print(f"device_check: {step.name} (limit {timeout_s:.0f} s) ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, *step.argv],
            stdout=out,
            stderr=err,
            env=env,
            cwd=ROOT,
            start_new_session=True,  # its own process group: a timeout kills its children too
        )
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            status = f"timed out after {round(timeout_s, 1):g} s"
        seconds = time.monotonic() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    return StepResult(step, status, seconds, stdout.strip(), stderr)


def render(result: StepResult) -> str:
    """Markdown section of one step: title, note, command, output, status."""
    step = result.step
    lines = [f"## {step.title}", ""]
    if step.note:
        lines += [step.note, ""]
    rel = [str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a for a in step.argv]
    lines += [f"Command: `python {' '.join(rel)}`", ""]
    if result.stdout:
        lines += [result.stdout, ""]
    lines.append(f"Status: {result.status} ({result.seconds:.1f} s)")
    if not result.ok and result.stderr.strip():
        lines += ["", "```", *result.stderr.strip().splitlines()[-15:], "```"]
    return "\n".join(lines) + "\n"


def summary(results: list[StepResult], elapsed: float) -> str:
    lines = ["## Summary", "", "| step | status | s |", "|---|---|---|"]
    lines += [f"| {r.step.name} | {r.status} | {r.seconds:.1f} |" for r in results]
    lines += ["", f"Total {elapsed:.1f} s."]
    return "\n".join(lines) + "\n"


def run_with_fallback(step: Step, args, env: dict, start: float) -> list[StepResult]:
    """Run ``step``, then its fallback if it failed, within what is left of the budget."""
    results: list[StepResult] = []
    attempt = step
    while attempt is not None:
        left = args.budget_s - (time.monotonic() - start)
        limit = min(args.step_timeout or attempt.timeout_s, left)
        if left < 1 or (attempt is not step and left < MIN_FALLBACK_S):
            res = StepResult(attempt, f"skipped (budget: {max(left, 0):.0f} s left)", 0.0)
        else:
            res = run_step(attempt, limit, env)
        results.append(res)
        attempt = None if res.ok or res.status.startswith("skipped") else attempt.fallback
    return results


def run_all(steps: list[Step], args, env: dict, emit, log) -> list[StepResult]:
    """Run the steps within the budget, ``args.jobs`` at a time after the machine step;
    ``emit`` receives each rendered section, in step order, as soon as it is known."""
    start = time.monotonic()
    results: list[StepResult] = []

    def report(batch: list[StepResult]) -> None:
        for res in batch:
            results.append(res)
            log.write(f"===== {res.step.name}: {res.status} in {res.seconds:.1f} s\n")
            log.write(res.stderr + "\n")
            log.flush()
            emit(render(res))

    if steps and steps[0].name == "machine":
        report(run_with_fallback(steps[0], args, env, start))
        if results[-1].status == "failed (exit 3)":
            return results  # no CUDA for the full check: its message says what to run
        steps = steps[1:]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run_with_fallback, s, args, env, start) for s in steps]
        for future in futures:
            report(future.result())
    return results


def all_done(results: list[StepResult]) -> bool:
    """Every step finished, itself or through its fallback."""
    done: dict[str, bool] = {}
    for r in results:
        done[r.step.name] = done.get(r.step.name, False) or r.ok
    return all(done.values())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tiny", action="store_true", help="CPU, tiny models (or DEVICE_CHECK_TINY=1)")
    p.add_argument("--only", default=None, help="comma-separated step names to run")
    p.add_argument(
        "--budget-s", type=float, default=None, help=f"default {BUDGET_S:.0f} (tiny: 600)"
    )
    p.add_argument("--step-timeout", type=float, default=None, help="override every step's limit")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="steps at once after the machine (default 1; tiny: 2)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="report file (default $OUT/device_check.md)"
    )
    p.add_argument("--machine-info", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--need-cuda", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tiny = args.tiny or os.environ.get("DEVICE_CHECK_TINY", "") not in ("", "0")
    if args.budget_s is None:
        args.budget_s = 600.0 if args.tiny else BUDGET_S
    if args.jobs is None:
        args.jobs = 2 if args.tiny else 1  # GPU figures: one step at a time, alone
    if args.out is None and os.environ.get("OUT"):
        args.out = Path(os.environ["OUT"]) / "device_check.md"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.machine_info:
        return machine_info(args.need_cuda)
    env = {**os.environ, **OFFLINE_ENV}
    # The steps import this checkout's packages, also where another version is installed.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if args.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the tiny check is the CPU check
    logdir = tempfile.mkdtemp(prefix="device_check_")
    steps = (tiny_steps if args.tiny else full_steps)(logdir)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in steps}
        if unknown:
            print(f"device_check: unknown steps {sorted(unknown)}; valid: "
                  f"{', '.join(s.name for s in steps)}", file=sys.stderr)  # fmt: skip
            return 2
        steps = [s for s in steps if s.name in wanted]
    report: list[str] = []
    head = (f"# Device check ({'tiny, CPU' if args.tiny else 'full size, GPU'})\n\n"
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}; budget {args.budget_s:.0f} s; "
            "offline, random weights.\n")  # fmt: skip

    def emit(text: str) -> None:
        report.append(text)
        print(text, flush=True)
        if args.out:  # rewritten after every step: a run killed from outside keeps its part
            args.out.write_text("\n".join(report))

    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    emit(head)
    log_path = args.out.with_suffix(".log") if args.out else Path(logdir) / "device_check.log"
    start = time.monotonic()
    with open(log_path, "w") as log:
        results = run_all(steps, args, env, emit, log)
    emit(summary(results, time.monotonic() - start))
    shutil.rmtree(logdir, ignore_errors=True)
    if args.out:
        print(f"device_check: report in {args.out}, stderr in {log_path}", file=sys.stderr)
    return 0 if all_done(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
