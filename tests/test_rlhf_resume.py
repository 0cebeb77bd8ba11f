"""Checkpoints of the DDPO trainer: resuming never unpickles, refuses checkpoints it cannot
continue exactly (other settings, a missing RNG state, non-finite or damaged files), and
recovers from a save that was killed half-way."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from hyperalign.cli import main as cli
from rlhf.checkpointing import (
    CheckpointError,
    capture_rng_state,
    list_checkpoints,
    optimizer_from_tensors,
    optimizer_to_tensors,
    restore_rng_state,
)
from rlhf.config import apply_overrides, tiny_cpu
from rlhf.trainer import LORA_CHECKPOINT_FILE, DDPOTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(logdir, *overrides, name="run"):
    cfg = tiny_cpu()
    cfg.logdir = str(logdir)
    cfg.run_name = name
    cfg.save_freq = 1
    cfg.sample_num_steps = 3
    cfg.sample_batch_size = 4
    cfg.sample_num_batches_per_epoch = 1
    cfg.num_epochs = 2
    return apply_overrides(cfg, list(overrides))


def _lora(trainer):
    return {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-epoch run with checkpoints after epochs 1 and 2 (copy before changing)."""
    logdir = tmp_path_factory.mktemp("resume")
    torch.set_num_threads(1)
    trainer = DDPOTrainer(_cfg(logdir, name="base"))
    trainer.train()
    return logdir / "base", _lora(trainer)


def _copy_run(run, tmp_path):
    run_dir, _ = run
    dst = tmp_path / "base"
    shutil.copytree(run_dir, dst)
    return dst


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class _PlantedPayload:
    """Unpickling this object creates the directory `marker` (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


# The pickle files accelerate's save_state writes (and load_state unpickles).
_ACCELERATE_PICKLES = (
    "custom_checkpoint_0.pkl",
    "custom_checkpoint_1.pkl",
    "random_states_0.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "sampler.bin",
    "scaler.pt",
    "pytorch_model.bin",
)


def test_resume_never_unpickles(run, tmp_path):
    run_dir = _copy_run(run, tmp_path)
    ckpt = run_dir / "checkpoints" / "checkpoint_00001"
    marker = tmp_path / "code-ran"
    for name in _ACCELERATE_PICKLES:
        torch.save(_PlantedPayload(marker), ckpt / name)
    # The planted files are armed: loading one the way accelerate's custom-state loader does
    # runs the payload.
    control = tmp_path / "control"
    torch.save(_PlantedPayload(control), tmp_path / "probe.pkl")
    torch.load(tmp_path / "probe.pkl", weights_only=False)
    assert control.is_dir()

    resumed = DDPOTrainer(_cfg(tmp_path, f"resume_from={ckpt}", name="resumed"))
    assert resumed.progress.epoch == 1 and not marker.exists()
    resumed.train()
    for k, v in run[1].items():  # and it still continues the run exactly
        assert torch.equal(v, _lora(resumed)[k])
    assert not marker.exists()

    # The command line, resuming with the checkpoint's own config as the refusal message says.
    rc = cli(
        [
            "rl-train",
            "--config",
            str(ckpt / "config.json"),
            "--set",
            f"resume_from={ckpt}",
            "--set",
            f"logdir={tmp_path}",
            "--set",
            "run_name=cli",
        ]
    )
    assert rc == 0 and not marker.exists()


def test_accelerate_pickle_checkpoint_is_refused_without_loading(tmp_path):
    ckpt = tmp_path / "old"
    ckpt.mkdir()
    marker = tmp_path / "code-ran"
    for name in _ACCELERATE_PICKLES:
        torch.save(_PlantedPayload(marker), ckpt / name)
    (ckpt / LORA_CHECKPOINT_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle files .* never loaded"):
        DDPOTrainer(_cfg(tmp_path, f"resume_from={ckpt}"))
    assert not marker.exists()


def test_resume_with_changed_settings_is_refused(run, tmp_path):
    run_dir = _copy_run(run, tmp_path)
    ckpt = run_dir / "checkpoints" / "checkpoint_00001"
    config_before = (run_dir / "config.json").read_text()
    with pytest.raises(ValueError) as err:
        DDPOTrainer(
            _cfg(
                tmp_path,
                f"resume_from={ckpt}",
                "train_learning_rate=0.01",
                "seed=3",
                name="base",
            )
        )
    message = str(err.value)
    assert "train_learning_rate: 0.003 in the checkpoint, 0.01 now" in message
    assert "seed: 0 in the checkpoint, 3 now" in message
    assert "--config" in message and "num_epochs" in message  # how to proceed, what may change
    assert (run_dir / "config.json").read_text() == config_before  # nothing recorded

    # Run length, logging and bookkeeping may change, and are recorded truthfully.
    t = DDPOTrainer(
        _cfg(tmp_path, f"resume_from={ckpt}", "num_epochs=3", "log_with=none", name="longer")
    )
    assert t.progress.epoch == 1
    assert '"num_epochs": 3' in (tmp_path / "longer" / "config.json").read_text()


def test_checkpoint_without_rng_state_is_refused(run, tmp_path):
    run_dir = _copy_run(run, tmp_path)
    ckpt = run_dir / "checkpoints" / "checkpoint_00001"
    (ckpt / "rng_state_0.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no RNG state for process 0"):
        DDPOTrainer(_cfg(tmp_path, f"resume_from={ckpt}", name="r"))


def test_damaged_or_nonfinite_checkpoints_are_named(run, tmp_path):
    from safetensors.torch import load_file, save_file

    run_dir = _copy_run(run, tmp_path)
    ckpt = run_dir / "checkpoints" / "checkpoint_00001"
    opt = ckpt / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match=f"cannot read {opt}"):
        DDPOTrainer(_cfg(tmp_path, f"resume_from={ckpt}", name="r"))

    ckpt2 = run_dir / "checkpoints" / "checkpoint_00002"
    lora = load_file(str(ckpt2 / LORA_CHECKPOINT_FILE))
    save_file({k: v * float("nan") for k, v in lora.items()}, str(ckpt2 / LORA_CHECKPOINT_FILE))
    with pytest.raises(CheckpointError, match="non-finite LoRA weights"):
        DDPOTrainer(_cfg(tmp_path, f"resume_from={ckpt2}", name="r"))


def test_resume_recovers_a_swap_killed_between_its_renames(run, tmp_path):
    run_dir = _copy_run(run, tmp_path)
    root = run_dir / "checkpoints"
    pid = _dead_pid()
    # Killed inside replace_dir: checkpoint_00002 set aside, the new copy not yet moved in.
    (root / "checkpoint_00002").rename(root / f".checkpoint_00002.old-{pid}")
    shutil.copytree(root / "checkpoint_00001", root / f".checkpoint_00002.partial.tmp-{pid}-x")
    # And 20 earlier kills left their temporary folders behind.
    for i in range(20):
        stale = root / f".checkpoint_{i + 3:05d}.partial.tmp-{pid}-{i}"
        stale.mkdir()
        (stale / "unet_lora.safetensors").write_bytes(b"\0" * 100_000)
    t = DDPOTrainer(_cfg(run_dir.parent, "resume_from=latest", name="base"))
    assert t.progress.epoch == 2  # the set-aside copy was found and restored
    assert [p.name for p in list_checkpoints(root)] == ["checkpoint_00001", "checkpoint_00002"]
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00001", "checkpoint_00002"]


def test_checkpoint_limit_keeps_the_newest(tmp_path):
    DDPOTrainer(_cfg(tmp_path, "num_epochs=3", "num_checkpoint_limit=1")).train()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_00003"]


def test_rng_state_round_trip_is_exact():
    import random

    import numpy as np

    tensors, meta = capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3), random.gauss(0, 1))
    restore_rng_state(tensors, meta, "test")
    second = (random.random(), np.random.rand(), torch.rand(3), random.gauss(0, 1))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2]) and first[3] == second[3]
    with pytest.raises(CheckpointError, match="RNG state in src is not valid"):
        restore_rng_state(tensors, {"python_random": {}}, "src")


def test_optimizer_state_round_trip_and_mismatch():
    p = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    opt = torch.optim.AdamW(p, lr=1e-3, betas=(0.8, 0.9))
    sum(x.sum() for x in p).backward()
    opt.step()
    tensors, meta = optimizer_to_tensors(opt.state_dict())
    import json

    meta = json.loads(json.dumps(meta))  # as read back from optimizer.json
    restored = optimizer_from_tensors(tensors, meta, opt.state_dict(), "src")
    assert restored["param_groups"][0]["betas"] == (0.8, 0.9)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(x.detach().clone()) for x in p], lr=1e-3)
    opt2.load_state_dict(restored)
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    other = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]).state_dict()
    with pytest.raises(CheckpointError, match="other trainable parameters"):
        optimizer_from_tensors(tensors, meta, other, "src")
