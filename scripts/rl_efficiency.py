"""RL efficiency on the main job: held-out oracle gain per training mode, budget and seed.

Usage:
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python scripts/rl_efficiency.py \\
        --row ppo=ppo --row raft=raft,train_learning_rate=3e-3 \\
        [--budgets 24x32] [--seeds 0] [--reward oracle] [--out runs/rl_efficiency]
    python scripts/rl_efficiency.py --out runs/rl_efficiency --table   # print, run nothing
    # reward fidelity: the same row with each reward, then the table
    python scripts/rl_efficiency.py --row ppo=ppo --seeds 0 1 2 --reward oracle
    python scripts/rl_efficiency.py --row ppo=ppo --seeds 0 1 2 --reward shapes
    python scripts/rl_efficiency.py --row ppo=ppo --seeds 0 1 2 --reward shapes-cosine
    python scripts/rl_efficiency.py --out runs/rl_efficiency --table --fidelity

A row is ``NAME=MODE[,FIELD=VALUE,...]``: the demo preset of ``--train-mode MODE``
(``rlhf.config.DEMO_PRESETS``) with DDPOConfig overrides. A budget ``EPOCHSxSAMPLES`` sets
``num_epochs`` and the samples per epoch (``sample_num_batches_per_epoch`` = SAMPLES /
``sample_batch_size``). Each (row, budget, seed) is the demo's own run and judge
(``rlhf.demo``: fixed-seed images of held-out prompts before and after, paired bootstrap
interval), with ``--reward`` optimised ("oracle": the oracle itself; a HyperAlign name:
that reward, the oracle measured). The "before" judgement depends only on the base model,
the seed and the sampler, so it is computed once per seed and sampler and cached in
``--out``; every finished cell is written to ``--out/<row>_<budget>_<reward>_s<seed>.json`` and
skipped when the script runs again; ``--max-epochs N`` stops a cell after N epochs (its
checkpoint and times kept), and the next call resumes it, so a long grid fits processes of
a few minutes each. Wall time counts every process of a cell except the cached "before".
Prints the table: row, mode, budget, seed, oracle gain [95 % CI], reward gain, train and
wall seconds; then the summary: per row, budget and reward the seeds' gains, their mean and
the seed-paired difference to the "ppo" row.

``--curve`` judges instead every checkpoint a cell saved (add ``save_freq=N`` and
``num_checkpoint_limit=M`` to its row), with the same judge and the cached "before": one
long run gives the held-out gain after each N epochs, i.e. the gain as a function of the
sample budget at that learning rate. It writes ``--out/<cell>.curve.json`` and prints
epochs, samples, oracle gain [95 % CI], reward gain and drift per checkpoint::

    python scripts/rl_efficiency.py --row long=ppo,train_learning_rate=3e-4,save_freq=24,\
        num_checkpoint_limit=8 --budgets 192x32 --seeds 0 --out runs/rl_scale       # train
    python scripts/rl_efficiency.py --row long=ppo,... --budgets 192x32 --seeds 0 \
        --out runs/rl_scale --curve                                                  # judge
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from hyperalign.common import atomic_write_json
from rlhf import demo


def parse_row(text: str) -> tuple[str, str, list[str]]:
    """``NAME=MODE[,FIELD=VALUE,...]`` -> (name, mode, ["FIELD=VALUE", ...])."""
    name, sep, rest = text.partition("=")
    parts = rest.split(",")
    if not sep or not name or not parts[0]:
        raise ValueError(f"row {text!r} is not NAME=MODE[,FIELD=VALUE,...]")
    return name, parts[0], [p for p in parts[1:] if p]


def reward_tag(reward: str) -> str:
    """`reward` as it appears in a cell's file name: a checkpoint path's separators and other
    characters outside ``[A-Za-z0-9._-]`` become "-" ("runs/calib" -> "runs-calib")."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", reward)


def parse_budget(text: str) -> tuple[int, int]:
    """``EPOCHSxSAMPLES`` -> (epochs, samples per epoch)."""
    try:
        epochs, samples = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"budget {text!r} is not EPOCHSxSAMPLES, e.g. 24x32") from None
    return epochs, samples


def demo_args(args, mode: str, overrides: list[str], budget: tuple[int, int], seed: int, out):
    """The ``hyperalign demo`` arguments of one cell (the demo's defaults otherwise)."""
    from rlhf.config import DEMO_PRESETS

    epochs, samples = budget
    batch = DEMO_PRESETS[mode]().sample_batch_size
    for item in overrides:
        if item.startswith("sample_batch_size="):
            batch = int(item.split("=", 1)[1])
    if samples % batch:
        raise ValueError(f"budget of {samples} samples per epoch is not a multiple of {batch}")
    sets = [
        f"num_epochs={epochs}",
        f"sample_num_batches_per_epoch={samples // batch}",
        "save_freq=0",
        "log_with=none",
        *overrides,
    ]
    ns = argparse.Namespace(
        pipeline=str(demo.DEFAULT_PIPELINE),
        reward=args.reward,
        out=str(out),
        seed=seed,
        eval_prompts=args.eval_prompts,
        eval_images=args.eval_images,
        train_prompts=args.train_prompts,
        train_mode=mode,
        set=sets,
    )
    return ns


def _before_key(cfg, prompts, ns) -> dict:
    """What the "before" judgement depends on."""
    return {
        "pipeline": ns.pipeline,
        "hyperalign": "shapes" if ns.reward == demo.ORACLE_REWARD else ns.reward,
        "prompts": prompts.eval_prompts,
        "seeds": prompts.eval_seeds,
        "sampler": asdict(demo.eval_settings(cfg)),
    }


def cached_before(judge, cfg, prompts, ns, cache_dir: Path):
    """The base model's judgement, from `cache_dir` when made with the same settings, else
    ``judge()`` (a :class:`demo.Judgement` of the base model), stored there."""
    from safetensors.torch import load_file, save_file

    key = _before_key(cfg, prompts, ns)
    for path in sorted(cache_dir.glob("before_*.json")):
        saved = json.loads(path.read_text())
        images = path.with_suffix(".safetensors")
        if saved["key"] == key and images.is_file():
            return demo.Judgement(
                load_file(str(images))["images"].float(),
                np.array(saved["reward"]),
                np.array(saved["oracle"]),
            )
    judged = judge()
    n = len(list(cache_dir.glob("before_*.json")))
    path = cache_dir / f"before_{n}.json"
    # The images too (fp16: 1e-3 of quantisation), for the per-kind facts and the drift.
    tmp = path.with_suffix(".safetensors.tmp")
    save_file({"images": judged.images.half().contiguous()}, str(tmp))
    tmp.replace(path.with_suffix(".safetensors"))
    atomic_write_json(
        path, {"key": key, "reward": judged.reward.tolist(), "oracle": judged.oracle.tolist()}
    )
    return judged


def run_cell(args, name: str, mode: str, overrides, budget, seed: int, partial: Path):
    """Train one cell with the demo's functions and judge it; returns its summary, or None
    when `--max-epochs` stopped it early (its progress is in `partial`; the next call
    resumes from the checkpoint, which reproduces the uninterrupted run)."""
    out_dir = Path(args.out)
    t_start = time.perf_counter()
    # The cell's own run folder: cells of other rewards or budgets may run beside it.
    ns = demo_args(
        args,
        mode,
        overrides,
        budget,
        seed,
        out_dir / "runs" / partial.name.removesuffix(".partial.json"),
    )
    cfg = demo.demo_config(ns)
    state = json.loads(partial.read_text()) if partial.is_file() else {"epochs": 0, "s": {}}
    run_dir = Path(ns.out)
    if not state["epochs"] and run_dir.exists():
        shutil.rmtree(run_dir)  # a stale run of this cell: resuming from it would skip training
    total = cfg.num_epochs
    if state["epochs"]:
        cfg.resume_from = "latest"
    if args.max_epochs:
        cfg.num_epochs = min(total, state["epochs"] + args.max_epochs)
    prompts = demo.demo_prompts(ns)
    trainer = demo.build_trainer(cfg, ns, prompts)
    before = cached_before(lambda: demo.judge(trainer, prompts, cfg), cfg, prompts, ns, out_dir)
    t0 = time.perf_counter()
    history = trainer.train()
    times = state["s"]
    times["train"] = times.get("train", 0.0) + time.perf_counter() - t0
    state["history"] = state.get("history", []) + history
    if cfg.num_epochs < total:
        times["wall"] = times.get("wall", 0.0) + time.perf_counter() - t_start
        atomic_write_json(partial, {**state, "epochs": cfg.num_epochs, "s": times})
        return None
    t0 = time.perf_counter()
    after = demo.judge(trainer, prompts, cfg)
    times["judge_after"] = time.perf_counter() - t0
    metrics = demo.demo_metrics(ns, prompts, before, after)
    history = state["history"]
    times["wall"] = times.get("wall", 0.0) + time.perf_counter() - t_start
    return {
        "row": name,
        "mode": mode,
        "overrides": overrides,
        "budget": f"{budget[0]}x{budget[1]}",
        "seed": seed,
        "reward": args.reward,
        "oracle_gain": metrics["improvement"]["oracle"],
        "reward_gain": metrics["improvement"]["reward"],
        "oracle_before": metrics["before"]["oracle"]["mean"],
        "facts": metrics["facts"],
        "drift": metrics["drift"],
        "train_s": times["train"],
        "wall_s": times["wall"],
        "times_s": times,
        "history": history,
        "config": cfg.to_dict(),
    }


def cell_name(name: str, budget: tuple[int, int], reward: str, seed: int) -> str:
    """The file stem of one (row, budget, reward, seed) cell in ``--out``."""
    return f"{name}_{budget[0]}x{budget[1]}_{reward_tag(reward)}_s{seed}"


def cells(args):
    """``(cell name, (row name, mode, overrides, budget, seed))`` for every cell of ``--row`` x
    ``--budgets`` x ``--seeds``, in that order."""
    budgets = [parse_budget(b) for b in args.budgets]
    for name, mode, overrides in [parse_row(r) for r in args.row]:
        for budget in budgets:
            for seed in args.seeds:
                yield (
                    cell_name(name, budget, args.reward, seed),
                    (name, mode, overrides, budget, seed),
                )


def checkpoint_curve(args, name: str, mode: str, overrides, budget, seed: int) -> list[dict]:
    """Judge every checkpoint the cell saved, like the cell's own "after" (the same held-out
    prompts, seeds, sampler and scorers, paired against the cached "before"); one dict per
    checkpoint: epochs, samples, oracle and reward gain, per-kind facts, drift."""
    from accelerate import PartialState

    from rlhf.checkpointing import CHECKPOINT_PATTERN, list_checkpoints
    from rlhf.pipeline import check_lora_file, check_lora_fits, load_pipeline, lora_applied

    out_dir = Path(args.out)
    cell = cell_name(name, budget, args.reward, seed)
    ns = demo_args(args, mode, overrides, budget, seed, out_dir / "runs" / cell)
    cfg = demo.demo_config(ns)
    prompts = demo.demo_prompts(ns)
    ckpts = list_checkpoints(Path(ns.out) / "checkpoints")
    if not ckpts:
        raise FileNotFoundError(
            f"no checkpoints in {Path(ns.out) / 'checkpoints'}: train the cell first, with "
            "save_freq=N in its row (the script's cells save only at the end otherwise)"
        )
    pipe = load_pipeline(cfg.pretrained_model, resolution=cfg.resolution)
    reward_fn = demo.build_reward_fn(args.reward, PartialState().device)
    settings = demo.eval_settings(cfg)

    def judge() -> demo.Judgement:
        return demo.generate_and_score(
            pipe,
            prompts.eval_prompts,
            prompts.eval_seeds,
            settings,
            reward_fn,
            cfg.sample_batch_size,
        )

    before = cached_before(judge, cfg, prompts, ns, out_dir)
    curve = []
    for ckpt in ckpts:
        lora = check_lora_fits(pipe, check_lora_file(ckpt / "lora"))
        with lora_applied(pipe, lora):
            after = judge()
        m = demo.demo_metrics(ns, prompts, before, after)
        epochs = int(CHECKPOINT_PATTERN.match(ckpt.name)[1])
        curve.append(
            {
                "checkpoint": ckpt.name,
                "epochs": epochs,
                "samples": epochs * budget[1],
                "oracle_gain": m["improvement"]["oracle"],
                "reward_gain": m["improvement"]["reward"],
                "facts": m["facts"],
                "drift": m["drift"],
            }
        )
    return curve


def curve_table(curve: list[dict]) -> str:
    """The Markdown table of :func:`checkpoint_curve`'s output."""
    lines = [
        "| epochs | samples | oracle gain [95 % CI] | reward gain | drift (mean \\|Δpixel\\|) |",
        "|---|---|---|---|---|",
    ]
    for c in curve:
        o = c["oracle_gain"]
        lines.append(
            f"| {c['epochs']} | {c['samples']} | {o['mean']:+.3f} [{o['ci95'][0]:+.3f}, "
            f"{o['ci95'][1]:+.3f}] | {c['reward_gain']['mean']:+.3f} | "
            f"{c['drift']['mean_abs_pixel']:.3f} |"
        )
    return "\n".join(lines)


def table(out: Path) -> str:
    """The Markdown table of every finished cell in `out`."""
    lines = [
        "| row | mode | settings | budget | seed | reward | oracle gain [95 % CI] | "
        "HyperAlign gain | train s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in _finished_cells(out):
        o, r = c["oracle_gain"], c["reward_gain"]
        lines.append(
            f"| {c['row']} | {c['mode']} | {' '.join(c['overrides']) or 'preset'} | "
            f"{c['budget']} | {c['seed']} | {c['reward']} | {o['mean']:+.3f} "
            f"[{o['ci95'][0]:+.3f}, {o['ci95'][1]:+.3f}] | {r['mean']:+.3f} | "
            f"{c['train_s']:.0f} | {c['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def _finished_cells(out: Path) -> list[dict]:
    """Every finished cell in `out`, in file-name order."""
    return [
        json.loads(p.read_text())
        for p in sorted(out.glob("*_s[0-9]*.json"))
        if not p.name.endswith((".partial.json", ".curve.json"))
    ]


def summary_table(out: Path, baseline: str = "ppo") -> str:
    """Per (row, budget, reward): the seeds' held-out oracle gains, their mean, the mean
    seed-paired difference to the `baseline` row of the same budget and reward (over the
    seeds both have; "—" without any), and the mean wall seconds."""
    groups: dict[tuple, dict[int, dict]] = {}
    for c in _finished_cells(out):
        groups.setdefault((c["row"], c["budget"], c["reward"]), {})[c["seed"]] = c
    lines = [
        f"| row | budget | reward | seeds | oracle gain per seed | mean | − {baseline} (paired) | "
        "wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (row, budget, reward), by_seed in sorted(groups.items()):
        seeds = sorted(by_seed)
        gains = [by_seed[s]["oracle_gain"]["mean"] for s in seeds]
        base = groups.get((baseline, budget, reward), {})
        common = [s for s in seeds if s in base]
        if row == baseline or not common:
            diff = "—"
        else:
            d = [by_seed[s]["oracle_gain"]["mean"] - base[s]["oracle_gain"]["mean"] for s in common]
            diff = f"{np.mean(d):+.3f} (n {len(d)})"
        lines.append(
            f"| {row} | {budget} | {reward} | {' '.join(map(str, seeds))} | "
            f"{' / '.join(f'{g:+.3f}' for g in gains)} | {np.mean(gains):+.3f} | {diff} | "
            f"{np.mean([by_seed[s]['wall_s'] for s in seeds]):.0f} |"
        )
    return "\n".join(lines)


FACT_COLUMNS = ("color", "shape", "size", "count", "relation", "objects_excess")


def optimised_gain(cell: dict) -> dict:
    """The gain of the reward the cell optimised: the oracle's with ``--reward oracle`` (its
    ``reward_gain`` is then HyperAlign's, measured beside it), else ``reward_gain``."""
    return cell["oracle_gain"] if cell["reward"] == demo.ORACLE_REWARD else cell["reward_gain"]


def hacking(cell: dict) -> bool:
    """The optimised reward rose (its interval above zero) and the oracle did not (its
    interval reaches zero or below); never for the oracle itself."""
    return optimised_gain(cell)["ci95"][0] > 0 and cell["oracle_gain"]["ci95"][0] <= 0


def fidelity_table(out: Path) -> str:
    """Per (row, budget, reward, seed): reward gain, oracle gain, fidelity = oracle gain /
    the oracle-as-reward gain of the same row, budget and seed, the per-kind changes of the
    facts read as true, and the reward-hacking flag."""
    cells = _finished_cells(out)
    ceiling = {
        (c["row"], c["budget"], c["seed"]): c["oracle_gain"]["mean"]
        for c in cells
        if c["reward"] == demo.ORACLE_REWARD
    }
    head = "| row | budget | reward | seed | reward gain | oracle gain [95 % CI] | fidelity | "
    head += " | ".join(f"Δ {k}" for k in FACT_COLUMNS) + " | hacking |"
    lines = [head, "|---" * (8 + len(FACT_COLUMNS)) + "|"]
    for c in cells:
        if "facts" not in c:
            continue
        o, r = c["oracle_gain"], optimised_gain(c)
        top = ceiling.get((c["row"], c["budget"], c["seed"]))
        fid = f"{o['mean'] / top:.2f}" if top else "—"
        facts = " | ".join(
            f"{c['facts'][k]['change']:+.3f}" if k in c["facts"] else "—" for k in FACT_COLUMNS
        )
        lines.append(
            f"| {c['row']} | {c['budget']} | {c['reward']} | {c['seed']} | {r['mean']:+.3f} | "
            f"{o['mean']:+.3f} [{o['ci95'][0]:+.3f}, {o['ci95'][1]:+.3f}] | {fid} | {facts} | "
            f"{'**yes**' if hacking(c) else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--row", action="append", default=[], help="NAME=MODE[,FIELD=VALUE,...]")
    ap.add_argument("--budgets", nargs="+", default=["24x32"], help="EPOCHSxSAMPLES")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--reward", default=demo.ORACLE_REWARD, help="'oracle' or a HyperAlign")
    ap.add_argument("--out", default="runs/rl_efficiency")
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--eval-images", type=int, default=2)
    ap.add_argument("--train-prompts", type=int, default=64)
    ap.add_argument(
        "--max-epochs",
        type=int,
        default=0,
        help="train at most this many epochs in this process, then stop (0: no limit)",
    )
    ap.add_argument("--table", action="store_true", help="only print the table of --out")
    ap.add_argument(
        "--curve",
        action="store_true",
        help="judge every saved checkpoint of the given cells (their learning curves)",
    )
    ap.add_argument(
        "--fidelity",
        action="store_true",
        help="also print the reward-fidelity table (cells of every --reward in --out)",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.curve or not args.table:
        import torch

        torch.set_num_threads(1)
    if args.curve:
        if not args.row:
            ap.error("--curve judges the checkpoints of the cells given by --row; give one")
        for cell, (name, mode, overrides, budget, seed) in cells(args):
            curve = checkpoint_curve(args, name, mode, overrides, budget, seed)
            atomic_write_json(out / f"{cell}.curve.json", curve)
            print(f"{cell}\n\n{curve_table(curve)}\n")
        return 0
    if not args.table:
        for cell, (name, mode, overrides, budget, seed) in cells(args):
            path = out / f"{cell}.json"
            if path.is_file():
                continue
            partial = out / f"{cell}.partial.json"
            result = run_cell(args, name, mode, overrides, budget, seed, partial)
            if result is None:
                print(f"{cell}: stopped after --max-epochs; run again to continue")
                return 0
            atomic_write_json(path, result)
            partial.unlink(missing_ok=True)
    print(table(out))
    print("\n" + summary_table(out))
    if args.fidelity:
        print("\n" + fidelity_table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
