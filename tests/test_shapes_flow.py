"""The tiny shapes-world Stable Diffusion 3 (`shapes/assets/flow`, `shapes.flow_training`)."""

import json

import numpy as np
import pytest
import torch

from shapes.assets import FLOW_DIR, SD_DIR
from shapes.flow_training import FlowTrainConfig, flow_losses, train

needs_pipeline = pytest.mark.skipif(
    not (FLOW_DIR / "model_index.json").is_file(), reason="shapes/assets/flow not built"
)


@pytest.fixture(scope="module")
def pipe():
    from rlhf.flow.pipeline import load_flow_pipeline

    return load_flow_pipeline(FLOW_DIR)


def test_flow_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    """The target is the straight-line velocity noise - x0 at x_t = (1 - t) x0 + t noise."""
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])

    class Oracle(torch.nn.Module):  # knows x0: v = (x_t - x0) / t = noise - x0
        def forward(self, hidden_states, timestep, **_):
            tt = (timestep / 1000.0).view(-1, 1, 1, 1)
            return ((hidden_states - x0) / tt,)

    class Zero(torch.nn.Module):
        def forward(self, hidden_states, **_):
            return (torch.zeros_like(hidden_states),)

    assert torch.allclose(
        flow_losses(Oracle(), x0, noise, t, None, None), torch.zeros(3), atol=1e-5
    )
    wrong = flow_losses(Zero(), x0, noise, t, None, None)
    assert torch.allclose(wrong, ((noise - x0) ** 2).mean(dim=(1, 2, 3)))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_sequence_length"):
        FlowTrainConfig(max_sequence_length=0)
    with pytest.raises(ValueError, match="threads"):
        FlowTrainConfig(threads=4)


@pytest.mark.skipif(not (SD_DIR / "model_index.json").is_file(), reason="shapes SD not built")
def test_training_end_to_end_tiny(tmp_path):
    """A short run writes a folder diffusers loads without T5, its loss falls, and the
    conditioning the transformer trained on is the pipeline's own `encode_prompt`."""
    from diffusers import StableDiffusion3Pipeline

    from rlhf.flow.pipeline import load_flow_pipeline

    cfg = FlowTrainConfig(
        n_train=64, steps=40, batch=8, layers=1, heads=2, head_dim=16, warmup_steps=5
    )
    report = train(cfg, tmp_path / "flow")
    out = tmp_path / "flow"
    assert json.loads((out / "training.json").read_text())["config"]["steps"] == 40
    assert report["v_mse_last"] < 0.8 * report["v_mse_first"]  # over 10 steps each
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow"]  # nothing half-written
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.vae.config.shift_factor == pytest.approx(report["latent_shift"])
    assert pipe.vae.config.scaling_factor == pytest.approx(report["latent_scale"])
    held = set(json.loads((out / "heldout_prompts.json").read_text()))
    assert not held & set((out / "train_prompts.txt").read_text().splitlines())
    loaded = load_flow_pipeline(out)  # passes the absent T5 itself
    assert loaded.text_encoder_3 is None
    images = loaded(
        ["a red circle"], num_inference_steps=2, max_sequence_length=1, output_type="pt"
    ).images
    assert images.shape == (1, 3, 64, 64)


@needs_pipeline
def test_shipped_flow_pipeline_components(pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.text_encoder_3 is None
    size = sum(f.stat().st_size for f in FLOW_DIR.rglob("*") if f.is_file()) / 2**20
    assert size <= 20.0
    assert all(f.suffix != ".bin" for f in FLOW_DIR.rglob("*"))  # safetensors only
    held = json.loads((FLOW_DIR / "heldout_prompts.json").read_text())
    assert held == json.loads((SD_DIR / "heldout_prompts.json").read_text())


@needs_pipeline
def test_shipped_flow_pipeline_follows_heldout_prompts_better_than_random_scenes(pipe):
    """A learning check that can fail: generated images of held-out prompts score clearly
    above random scenes with the oracle (figures in BENCHMARKS.md, "The shapes flow model")."""
    from shapes.oracle import oracle_alignment_batch
    from shapes.perturb import faithful_scene
    from shapes.prompts import sample_prompt
    from shapes.world import render, to_tensor

    prompts = json.loads((FLOW_DIR / "heldout_prompts.json").read_text())[:16]
    gens = [torch.Generator().manual_seed(k) for k in range(len(prompts))]
    images = pipe(
        prompts,
        num_inference_steps=10,
        guidance_scale=3.0,
        max_sequence_length=1,
        generator=gens,
        output_type="pt",
    ).images  # (16, 3, 64, 64)
    generated = float(oracle_alignment_batch(images, prompts).mean())
    rng = np.random.default_rng(0)
    scenes = np.stack([render(faithful_scene(sample_prompt(rng), rng)) for _ in prompts])
    floor = float(oracle_alignment_batch(to_tensor(scenes), prompts).mean())
    print(f"generated {generated:.3f} random scenes {floor:.3f}")
    assert generated > floor + 0.1, (generated, floor)
    assert generated < 0.95  # imperfect: RL has room to improve it
