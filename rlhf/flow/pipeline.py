"""Flow-matching pipelines (Stable Diffusion 3): one loader, and the LoRA format that
`StableDiffusion3Pipeline.load_lora_weights(dir)` reads.

- :func:`load_flow_pipeline`: a hub id or local diffusers folder of a
  `StableDiffusion3Pipeline`, or ``"tiny-sd3"`` (the offline tiny random pipeline of
  :mod:`rlhf.flow.tiny`); quiet.
- :func:`check_flow_pipeline`: raise unless a pipeline has what the Flow-GRPO trainer uses.
- :func:`write_transformer_lora`: the transformer's LoRA in the diffusers format
  (``pytorch_lora_weights.safetensors``, keys ``transformer.<module>``, with the adapter's
  config as metadata); the trainer publishes it atomically.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = [
    "BUILT_IN_FLOW_PIPELINES",
    "FLOW_PIPELINE_CLASSES",
    "check_flow_pipeline",
    "load_flow_pipeline",
    "write_transformer_lora",
]

BUILT_IN_FLOW_PIPELINES = ("tiny-sd3",)
"""Names :func:`load_flow_pipeline` builds offline instead of loading."""
FLOW_PIPELINE_CLASSES = ("StableDiffusion3Pipeline",)
"""diffusers pipeline classes (``_class_name`` of ``model_index.json``) the Flow-GRPO trainer
runs."""


def load_flow_pipeline(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
):
    """A `StableDiffusion3Pipeline` with its progress bar off, on the CPU.

    ``name_or_path``: a hub id or local diffusers folder (``revision`` applies to hub ids), or
    one of :data:`BUILT_IN_FLOW_PIPELINES`. ``dtype``: the dtype to load the weights in
    (None: as saved; built-in pipelines are fp32). Raises ``FileNotFoundError`` naming the
    pipeline when it cannot be loaded."""
    name = str(name_or_path)
    if name in BUILT_IN_FLOW_PIPELINES:
        from rlhf.flow.tiny import build_tiny_sd3_pipeline

        pipe = build_tiny_sd3_pipeline(seed=0)
        if dtype is not None:
            pipe.to(dtype=dtype)
    else:
        from diffusers import StableDiffusion3Pipeline

        path = Path(name)
        if path.is_dir() and not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); pass the "
                "folder written by StableDiffusion3Pipeline.save_pretrained, or a hub id"
            )
        kwargs = {"torch_dtype": dtype} if dtype is not None else {}
        kwargs.update(_absent_components(path))
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(name, revision=revision, **kwargs)
        except Exception as err:
            raise FileNotFoundError(
                f"could not load the StableDiffusion3Pipeline {name!r} ({type(err).__name__}: "
                f"{err}); pass a local pipeline directory, or run where the hub is reachable "
                "(stabilityai/stable-diffusion-3.5-medium needs its licence accepted)"
            ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _absent_components(path: Path) -> dict:
    """``{"text_encoder_3": None, "tokenizer_3": None}`` for a local folder saved without T5
    (``model_index.json`` lists them as ``[null, null]``): diffusers' ``from_pretrained``
    needs them passed explicitly, as its docs do for dropping T5; else ``{}``."""
    index = path / "model_index.json"
    if not index.is_file():
        return {}
    import json

    entries = json.loads(index.read_text())
    names = ("text_encoder_3", "tokenizer_3")
    return {n: None for n in names if entries.get(n, [None, None])[0] is None}


def check_flow_pipeline(pipe) -> None:
    """Raise `ValueError` unless `pipe` is a flow-matching pipeline the trainer can run: a
    `transformer` (SD3Transformer2DModel forward signature) and a
    `FlowMatchEulerDiscreteScheduler`."""
    from rlhf.flow.sampling import check_flow_scheduler

    name = type(pipe).__name__
    if name not in FLOW_PIPELINE_CLASSES or getattr(pipe, "transformer", None) is None:
        raise ValueError(
            f"the Flow-GRPO trainer runs {', '.join(FLOW_PIPELINE_CLASSES)}, got {name}; "
            "Stable Diffusion 1.x pipelines are trained by DDPO (trainer='ddpo')"
        )
    check_flow_scheduler(pipe.scheduler)


def write_transformer_lora(transformer, directory: str | Path) -> None:
    """Write the transformer's LoRA (adapter "default") in the diffusers format into
    `directory` (not atomic), as fp32 CPU tensors."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer)
    state = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    StableDiffusion3Pipeline.save_lora_weights(
        save_directory=str(directory),
        transformer_lora_layers=state,
        safe_serialization=True,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
