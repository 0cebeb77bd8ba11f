"""Two CPU processes (accelerate.debug_launcher, gloo): LoRA gradients are all-reduced because
the training forward goes through the prepared (DDP) module; every rank saves its RNG state and
a resumed run continues the uninterrupted one on both ranks; rewards and prompts are gathered.
The same run forwarding through the unwrapped UNet (the defect of earlier DDPO trainers)
leaves the ranks' weights apart, which shows the test can tell the difference."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf.config import tiny_cpu


def _lora(trainer) -> dict:
    return {
        n: p.detach().contiguous() for n, p in trainer.unet.named_parameters() if p.requires_grad
    }


def _worker(out_dir: str, defect: bool) -> None:
    from accelerate.state import AcceleratorState

    from rlhf.trainer import DDPOTrainer

    # Forked from the pytest process: drop any single-process accelerate state it holds.
    AcceleratorState._reset_state(reset_partial_state=True)
    # One thread per process (accelerate would pick 2 when OMP_NUM_THREADS is unset, which
    # oversubscribes the 2-core test machine).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    cfg = tiny_cpu()
    cfg.logdir, cfg.run_name = out_dir, "defect" if defect else "ddp"
    cfg.sample_num_steps, cfg.num_epochs, cfg.save_freq = 4, 2, 1
    cfg.train_learning_rate = 1e-2
    trainer = DDPOTrainer(cfg)
    if defect:
        trainer.unet_prepared = trainer.unet  # forward through the unwrapped module
    hist = trainer.train()
    rank = trainer.accelerator.process_index
    save_file(_lora(trainer), f"{out_dir}/{cfg.run_name}_rank{rank}.safetensors")
    with open(f"{out_dir}/{cfg.run_name}_rank{rank}.json", "w") as f:
        json.dump({"num_samples": hist[-1]["num_samples"], "steps": hist[-1]["optimizer_steps"]}, f)
    if not defect:  # resume epoch 2 from the epoch-1 checkpoint: each rank restores its RNG
        cfg.run_name = "ddp_resumed"
        cfg.resume_from = f"{out_dir}/ddp/checkpoints/checkpoint_00001"
        resumed = DDPOTrainer(cfg)
        resumed.train()
        save_file(_lora(resumed), f"{out_dir}/ddp_resumed_rank{rank}.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from accelerate import debug_launcher

    out = tmp_path_factory.mktemp("ddp")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        debug_launcher(_worker, args=(str(out), False), num_processes=2)
        debug_launcher(_worker, args=(str(out), True), num_processes=2)
    finally:
        torch.set_num_threads(n)
    return out


def test_lora_identical_on_both_ranks(runs):
    r0 = load_file(str(runs / "ddp_rank0.safetensors"))
    r1 = load_file(str(runs / "ddp_rank1.safetensors"))
    assert r0.keys() == r1.keys()
    for k in r0:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=1e-7)
    assert any(v.abs().max() > 0 for k, v in r0.items() if "lora_B" in k)  # it trained


def test_unsynced_gradients_would_differ(runs):
    d0 = load_file(str(runs / "defect_rank0.safetensors"))
    d1 = load_file(str(runs / "defect_rank1.safetensors"))
    r0 = load_file(str(runs / "ddp_rank0.safetensors"))
    assert max((d0[k] - d1[k]).abs().max().item() for k in d0) > 1e-4
    assert max((d0[k] - r0[k]).abs().max().item() for k in d0) > 1e-4


def test_rewards_gathered_and_checkpoints_written_by_all_ranks(runs):
    info = json.loads((runs / "ddp_rank0.json").read_text())
    assert info["num_samples"] == 2 * 8  # 2 processes x 8 samples
    assert info["steps"] == 4  # 2 optimizer steps per epoch x 2 epochs
    ckpt = runs / "ddp" / "checkpoints" / "checkpoint_00002"
    assert {p.name for p in ckpt.glob("rng_state_*")} == {
        "rng_state_0.safetensors",
        "rng_state_0.json",
        "rng_state_1.safetensors",
        "rng_state_1.json",
    }
    assert not [p for p in ckpt.rglob("*") if p.suffix in (".pkl", ".bin", ".pt")]  # no pickle
    assert (runs / "ddp" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_resume_continues_the_run_on_every_rank(runs):
    for rank in (0, 1):
        full = load_file(str(runs / f"ddp_rank{rank}.safetensors"))
        resumed = load_file(str(runs / f"ddp_resumed_rank{rank}.safetensors"))
        for k in full:
            assert torch.equal(full[k], resumed[k]), k
