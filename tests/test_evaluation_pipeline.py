"""rlhf.pipeline: the one loader, LoRA loading and the seeded generation loop."""

import warnings

import pytest
import torch

from rlhf.pipeline import (
    SamplerSettings,
    check_lora_fits,
    generate_batches,
    generate_images,
    load_pipeline,
    lora_applied,
)

FAST = SamplerSettings(steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny")


def test_each_image_depends_on_its_seed_not_on_the_batch(pipe):
    prompts = ["a photo of a cat", "a photo of a dog", "a photo of a cat"]
    together = generate_images(pipe, prompts, [5, 6, 7], FAST, batch_size=3)
    alone = generate_images(pipe, prompts[:1], [5], FAST, batch_size=1)
    assert together.shape[0] == 3 and together.dtype == torch.float32
    assert 0.0 <= together.min() and together.max() <= 1.0
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=0)
    assert (together[0] - together[2]).abs().max() > 1e-3  # same prompt, other seed
    starts = [start for start, _ in generate_batches(pipe, prompts, [5, 6, 7], FAST, 2)]
    assert starts == [0, 2]
    with pytest.raises(ValueError, match="3 prompts but 2 seeds"):
        generate_images(pipe, prompts, [1, 2], FAST, 2)


def test_load_pipeline_names_what_is_wrong(tmp_path):
    (tmp_path / "not_a_pipe").mkdir()
    with pytest.raises(FileNotFoundError, match=r"not_a_pipe is not a diffusers pipeline"):
        load_pipeline(tmp_path / "not_a_pipe")
    half = load_pipeline("tiny", dtype=torch.float16)
    assert half.unet.dtype == torch.float16


def test_lora_applied_changes_images_and_is_removed_after(tmp_path):
    from peft import LoraConfig

    from rlhf.tiny import build_tiny_pipeline
    from rlhf.trainer import save_lora_diffusers

    donor = build_tiny_pipeline(seed=0)
    donor.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in donor.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora_diffusers(donor.unet, tmp_path / "lora")
    pipe = load_pipeline("tiny")
    prompts, seeds = ["a photo of a cat"], [3]
    base = generate_images(pipe, prompts, seeds, FAST, 1)
    file = check_lora_fits(pipe, tmp_path / "lora")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with lora_applied(pipe, file):
            adapted = generate_images(pipe, prompts, seeds, FAST, 1)
    after = generate_images(pipe, prompts, seeds, FAST, 1)
    assert (adapted - base).abs().max() > 1e-4
    torch.testing.assert_close(after, base, atol=0, rtol=0)
