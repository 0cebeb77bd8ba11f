"""Flow-GRPO (Liu et al. 2025) for flow-matching pipelines (Stable Diffusion 3): the SDE
sampler with per-step log-probs (`sde`, `sampling`), the trainer (`trainer`), loading and the
LoRA format (`pipeline`), the trainer dispatch (`select`) and a tiny offline pipeline
(`tiny`). See docs/rlhf.md, "Flow-matching models (Flow-GRPO)"."""
