"""The shapes entry points in ``scripts/``: thin wrappers whose options come from the configs."""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shapes.config_args import add_config_arguments, config_from_args

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = [
    "train_shapes_sd",
    "train_shapes_clip",
    "train_shapes_hyperalign",
    "bench_oracle",
    "eval_reward_on_sd",
]


@dataclass
class Example:
    """A config as the training libraries write them."""

    steps: int = 3
    """Optimiser steps (about 10 % of the run)."""
    widths: tuple[int, ...] = (8, 16)
    """Block widths."""
    lr: float = 1e-3
    """Peak learning rate."""
    init: str = ""
    """Weights to start from."""
    ema: bool = False
    """Keep an average of the weights."""


def test_config_options_round_trip_with_types_and_help():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example, skip=("init",))
    help_text = parser.format_help()
    assert "Optimiser steps (about 10 % of the run). (default: 3)" in " ".join(help_text.split())
    assert "--init" not in help_text
    args = parser.parse_args(["--steps", "5", "--widths", "4", "8", "12", "--ema", "false"])
    cfg = config_from_args(Example, args, lr=0.5)
    assert cfg == Example(steps=5, widths=(4, 8, 12), lr=0.5, ema=False)
    assert config_from_args(Example, parser.parse_args(["--ema", "yes"])).ema is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--ema", "maybe"])  # not silently true
    with pytest.raises(SystemExit):
        parser.parse_args(["--steps", "three"])


@dataclass
class ExampleChild(Example):
    """A config that shares its base's fields (as the SD and flow training configs do)."""

    lr: float = 2e-3
    """The child's own learning rate."""
    depth: int = 2
    """Layers."""


def test_config_options_include_the_bases_fields_and_their_help():
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, ExampleChild)
    help_text = " ".join(parser.format_help().split())
    assert "Optimiser steps (about 10 % of the run). (default: 3)" in help_text  # the base's
    assert "The child's own learning rate. (default: 0.002)" in help_text  # the child's wins
    assert "Peak learning rate" not in help_text and "Layers. (default: 2)" in help_text
    cfg = config_from_args(ExampleChild, parser.parse_args(["--steps", "7", "--depth", "3"]))
    assert cfg == ExampleChild(steps=7, depth=3)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help_is_its_usage(name):
    """Each entry point runs as a plain script and its --help starts with its docstring."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout or "usage" in proc.stdout
    assert f"scripts/{name}.py" in proc.stdout


def test_eval_reward_on_sd_prints_a_row_per_reward():
    """The tiny SD's images are generated, read by the oracle and scored by each reward."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "eval_reward_on_sd.py"),
            "--seeds",
            "0",
            "--eval-prompts",
            "6",
            "--eval-images",
            "1",
            "--rewards",
            "shapes",
            "shapes-cosine",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 images of the base model (1 seeds)" in proc.stdout
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.startswith("| shapes")]
    assert [r[1].strip() for r in rows] == ["shapes", "shapes-cosine"], proc.stdout
    for r in rows:
        assert -1.0 <= float(r[2]) <= 1.0 and -1.0 <= float(r[3]) <= 1.0, r


@functools.cache
def _diagnose_script():
    """``scripts/diagnose_demo_signal.py`` as a module."""
    import importlib.util

    path = REPO / "scripts" / "diagnose_demo_signal.py"
    spec = importlib.util.spec_from_file_location("diagnose_demo_signal", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_branched_latents_share_exactly_the_first_steps():
    """`diagnose_demo_signal --branch`: images share the trajectory up to S and only then
    differ; image 0 is the same trajectory for every S."""
    import torch

    from rlhf.pipeline import load_pipeline

    d = _diagnose_script()

    pipe = load_pipeline(d.DEFAULT_PIPELINE)
    steps = d.DEMO_SAMPLER.steps
    out = {
        s: d.branched_latents(pipe, "a red circle", 3, s, torch.Generator().manual_seed(5))
        for s in (0, 10, steps)
    }
    assert torch.equal(out[steps][0], out[steps][1]) and torch.equal(out[steps][0], out[steps][2])
    for s in (0, 10):
        assert (out[s][0] - out[s][1]).abs().max() > 1e-3  # diverged after S
        assert torch.equal(out[s][0], out[steps][0])  # image 0: one trajectory
    # sharing more steps leaves the group closer together
    spread = {s: (out[s] - out[s].mean(0)).pow(2).mean().item() for s in (0, 10)}
    assert spread[10] < spread[0]


def test_step_gradient_shares_sum_to_one_and_the_last_steps_dominate():
    """The measurement behind the demo preset's trained steps: on the shipped model the two
    smallest-std steps supply most of the log-prob gradient (BENCHMARKS.md, "Efficiency")."""
    from rlhf.pipeline import load_pipeline

    d = _diagnose_script()

    pipe = load_pipeline(d.DEFAULT_PIPELINE)
    std, share = d.step_gradient_shares(pipe, ["a red circle", "two blue squares"], seed=0)
    assert len(share) == d.DEMO_SAMPLER.steps and abs(share.sum() - 1) < 1e-9
    assert std[-1] < std[0]
    assert share[-2:].sum() > 0.5 > share[:-2].sum()


def test_judged_training_prompts_are_the_demo_runs():
    """`diagnose_demo_signal --loras ... --on training --run-seed S` judges on the prompts the
    demo run with `--seed S` trained on."""
    import argparse

    from rlhf import demo

    d = _diagnose_script()
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    for seed in (0, 2):
        trained = demo.demo_prompts(parser.parse_args(["--seed", str(seed)])).training
        assert d.judged_prompts(64, "training", seed) == trained
    assert d.judged_prompts(5, "held-out", 0) == demo.held_out_prompts(demo.DEFAULT_PIPELINE)[:5]
    assert not set(d.judged_prompts(64, "training", 0)) & set(d.judged_prompts(128, "held-out", 0))


def test_gradient_agreement_is_one_for_equal_gradients_and_near_zero_for_noise():
    import torch

    d = _diagnose_script()
    g = torch.randn(20, 500, generator=torch.Generator().manual_seed(0))
    assert d.gradient_agreement([g, g.clone(), 2 * g], slice(0, 20))[0] == pytest.approx(1.0)
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(20, 20_000, generator=gen) for _ in range(6)]
    mean, se = d.gradient_agreement(noise, slice(0, 20))
    assert abs(mean) < 0.02 and se < 0.01
    # a shared direction of the same norm as the noise: cosine about 1/2
    shared = torch.randn(20, 20_000, generator=gen)
    mean, _ = d.gradient_agreement([shared + n for n in noise], slice(0, 20))
    assert mean == pytest.approx(0.5, abs=0.03)


def test_epoch_gradients_vanish_when_every_group_ties():
    """Group-centred advantages: a reward equal within each prompt's group gives no gradient;
    one that ranks the images does."""
    import torch

    from rlhf.pipeline import load_pipeline

    d = _diagnose_script()
    pipe = load_pipeline(d.DEFAULT_PIPELINE)

    def tied(images, prompts, metadata):
        return torch.tensor([float(len(p)) for p in prompts]), {}

    def ranked(images, prompts, metadata):
        return images.mean(dim=(1, 2, 3)), {}

    prompts = ["a red circle", "two blue squares"]
    g0 = d.epoch_gradients(pipe, tied, prompts, 2, seed=0)
    g1 = d.epoch_gradients(pipe, ranked, prompts, 2, seed=0)
    assert g0.shape == g1.shape and g0.shape[0] == d.DEMO_SAMPLER.steps
    assert g0.abs().max() == 0
    assert g1.abs().max() > 0


def test_one_step_epochs_differ_only_by_the_one_stochastic_step():
    """`--gradient-agreement N --one-step FIRST LAST`: a prompt's images share the initial
    noise and all steps but one, so they differ, and less when that step is a late one; a
    reward tied within each group gives no gradient, one that ranks the images does."""
    import torch

    from rlhf.pipeline import load_pipeline

    d = _diagnose_script()
    pipe = load_pipeline(d.DEFAULT_PIPELINE)
    seen = []

    def ranked(images, prompts, metadata):
        seen.append(images)
        return images.mean(dim=(1, 2, 3)), {}

    def tied(images, prompts, metadata):
        return torch.tensor([float(len(p)) for p in prompts]), {}

    prompts, steps = ["a red circle"], d.DEMO_SAMPLER.steps
    spread = {}
    for step in (1, steps):
        g, within = d.one_step_epoch_gradient(pipe, ranked, prompts, 3, 0, (step, step))
        assert g.shape[0] == 1 and g.abs().max() > 0 and within > 0
        images = seen[-1]
        spread[step] = (images - images.mean(0)).abs().mean().item()
    assert spread[1] > spread[steps] > 0
    g, within = d.one_step_epoch_gradient(pipe, tied, prompts, 3, 0, (1, steps))
    assert g.abs().max() == 0 and within == 0


def test_draft_batch_gradient_flows_through_the_last_k_steps_only():
    """`--gradient-agreement N --draft K`: the reward's pathwise gradient reaches the UNet
    through the last K steps; with K = 1 it is the last step's alone, so it differs from K = 20
    and is smaller."""
    from rlhf.pipeline import load_pipeline

    d = _diagnose_script()
    pipe = load_pipeline(d.DEFAULT_PIPELINE)

    class Mean:
        def score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    g1 = d.draft_batch_gradient(pipe, Mean(), ["a red circle"], 1, seed=0)
    g20 = d.draft_batch_gradient(pipe, Mean(), ["a red circle"], d.DEMO_SAMPLER.steps, seed=0)
    assert g1.shape == g20.shape and g1.shape[0] == 1
    assert g1.norm() > 0 and g20.norm() > g1.norm()
    assert (g20 - g1).norm() > 0.1 * g20.norm()
