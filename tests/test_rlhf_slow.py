"""Real-size architecture: Stable Diffusion 1.5 (random weights) runs one DDPO step."""

import pytest
import torch

from rlhf.config import tiny_cpu
from rlhf.trainer import DDPOTrainer


@pytest.mark.slow
def test_sd15_architecture_one_training_step(tmp_path):
    cfg = tiny_cpu()
    cfg.logdir, cfg.run_name, cfg.save_freq = str(tmp_path), "sd15", 0
    cfg.pretrained_model = "random-sd15"
    cfg.resolution = 64  # 8x8 latents: the real UNet at a reduced resolution
    cfg.sample_num_steps = 2
    cfg.sample_batch_size = cfg.train_batch_size = 2
    cfg.sample_num_batches_per_epoch = 1
    cfg.num_epochs = 1
    trainer = DDPOTrainer(cfg)
    lora = {n: p.detach().clone() for n, p in trainer.unet.named_parameters() if p.requires_grad}
    # r=4 on to_q/to_k/to_v/to_out.0 of the SD 1.5 UNet: 797,184 parameters (3.2 MB in fp32).
    assert sum(p.numel() for p in lora.values()) == 797_184
    assert all(p.dtype == torch.float32 for p in lora.values())
    (m,) = trainer.train()
    assert m["optimizer_steps"] == 1 and abs(m["ratio_mean"] - 1) < 1e-4
    after = dict(trainer.unet.named_parameters())
    assert any(not torch.equal(lora[k], after[k].detach()) for k in lora)
    assert (tmp_path / "sd15" / "lora" / "pytorch_lora_weights.safetensors").is_file()
