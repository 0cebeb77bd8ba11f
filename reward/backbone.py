"""Loading the open_clip backbone: one function, explicit device, fp32 on CPU by default.

Sources, as ``HyperAlignConfig.backbone`` / ``.pretrained`` name them:
- a built-in open_clip architecture with a pretrained tag (``ViT-B-16`` + ``openai``);
- a built-in or project-registered architecture with a local weights file;
- ``hf-hub:org/repo`` or ``local-dir:/path`` (open_clip's own schemas);
- ``pretrained=None``: random weights (tests, cost measurement).

This project registers its own small architectures from ``reward/model_configs/*.json``
(``hyperalign-tiny`` for tests). Any other architecture can be registered with
:func:`register_model_config`; an architecture a checkpoint names but open_clip does not know
is also looked up as ``<name>.json`` beside its weights file, so a checkpoint folder that
carries its CLIP's config loads with no registration (the shipped ``shapes`` reward does).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_CONFIG_DIR = Path(__file__).parent / "model_configs"
# open_clip's image statistics for CLIP (OpenAI) models, used when a model carries none.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BackboneUnavailableError(RuntimeError):
    """Pretrained backbone weights are not on this machine and cannot be downloaded."""


@dataclass
class Backbone:
    """A loaded CLIP model with what is needed to feed it."""

    model: torch.nn.Module
    tokenizer: object
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int
    embed_dim: int


@functools.cache
def register_project_configs() -> None:
    """Register this project's open_clip architectures (idempotent)."""
    import open_clip

    open_clip.add_model_config(_CONFIG_DIR)


def register_model_config(path: str | os.PathLike) -> str:
    """Register an open_clip architecture from a JSON file (``{"embed_dim", "vision_cfg",
    "text_cfg"}``) under its file stem; returns that name. Idempotent."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"open_clip model config {path} does not exist")
    if path.stem not in open_clip.list_models():
        open_clip.add_model_config(path)
    return path.stem


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_tag_weights(arch: str, tag: str) -> str | None:
    """Path of the weights of ``arch``/``tag`` in the local Hugging Face cache, if there."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    hub = cfg.get("hf_hub", "")
    if not hub:
        return None
    # open_clip writes "org/repo/" (default file name) or "org/repo/file.bin".
    repo, filename = (hub.rstrip("/"), "") if hub.endswith("/") else os.path.split(hub)
    names = [filename] if filename else []
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    for name in names:
        path = try_to_load_from_cache(repo_id=repo, filename=name)
        if isinstance(path, str):
            return path
    return None


def _offline_error(what: str) -> BackboneUnavailableError:
    return BackboneUnavailableError(
        f"cannot load {what}: its weights are not in the local cache and the Hugging Face hub "
        "is unreachable (no network, or HF_HUB_OFFLINE=1). Either run once with network "
        "access to fill the cache, or point to weights on disk: "
        "HyperAlignConfig(backbone='ViT-B-16', pretrained='/path/to/open_clip_model.safetensors')"
        ", or backbone='local-dir:/path/to/open_clip_dir' (a folder with "
        "open_clip_config.json and weights)."
    )


def _check_weights_file(path: str) -> None:
    """Read the header of a local ``.safetensors`` weights file: a truncated or corrupt file is
    a ``ValueError`` naming it and the fix (open_clip's own error names neither)."""
    if not path.endswith(".safetensors"):
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt"):
            pass
    except SafetensorError as err:
        raise ValueError(
            f"cannot read the backbone weights {path}: it is truncated or not a safetensors "
            f"file ({err}); copy or download it again"
        ) from err


def load_backbone(
    backbone: str,
    pretrained: str | None,
    *,
    device: torch.device | str = "cpu",
    base_dir: str | os.PathLike | None = None,
) -> Backbone:
    """Build the open_clip model and tokenizer (fp32, on ``device``).

    ``base_dir``: directory against which a relative ``pretrained`` file path is resolved
    (the checkpoint directory when loading a saved HyperAlign).
    Raises ``BackboneUnavailableError`` at once, with what to do, when pretrained weights
    would have to be downloaded but the hub cannot be reached; a local weights file that is
    truncated, damaged or holds NaN / infinities is a ``ValueError`` naming it.
    """
    import open_clip

    register_project_configs()
    model_pretrained, kwargs = _resolve_pretrained(backbone, pretrained, base_dir)
    _check_architecture(backbone, model_pretrained)
    model = _create_model(backbone, model_pretrained, device, kwargs)
    tokenizer = open_clip.get_tokenizer(backbone)
    visual = model.visual
    pcfg = getattr(visual, "preprocess_cfg", None) or {}
    size = getattr(visual, "image_size", None) or pcfg.get("size", 224)
    if isinstance(size, int):
        size = (size, size)
    mean = tuple(pcfg.get("mean", _CLIP_MEAN))
    std = tuple(pcfg.get("std", _CLIP_STD))
    context_length = int(getattr(tokenizer, "context_length", None) or model.context_length)
    embed_dim = int(model.text_projection.shape[-1]) if hasattr(model, "text_projection") else None
    if embed_dim is None:  # pragma: no cover - CustomTextCLIP variants
        with torch.no_grad():
            embed_dim = int(model.encode_text(tokenizer(["a"]).to(device)).shape[-1])
    return Backbone(model, tokenizer, tuple(size), mean, std, context_length, embed_dim)


def _resolve_pretrained(
    backbone: str, pretrained: str | None, base_dir: str | os.PathLike | None
) -> tuple[str | None, dict]:
    """What to pass open_clip as ``pretrained`` (a file, a tag, a cached file or ``None``) and
    the extra ``create_model`` arguments of that tag."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if backbone.startswith(("hf-hub:", "local-dir:")):
        if backbone.startswith("hf-hub:") and not _hub_reachable():
            # open_clip would retry the download for about a minute before failing.
            raise _offline_error(backbone)
        return None, {}
    if pretrained is None:
        return None, {}
    if base_dir is not None and not os.path.isabs(pretrained):
        candidate = Path(base_dir) / pretrained
        if candidate.is_file():
            pretrained = str(candidate)
    if os.path.isfile(pretrained):
        return pretrained, {}
    tag_cfg = get_pretrained_cfg(backbone, pretrained)
    if not tag_cfg:
        raise ValueError(
            f"pretrained={pretrained!r} is neither a file nor a known open_clip tag for "
            f"{backbone!r}; known tags: {open_clip.list_pretrained_tags_by_model(backbone)}"
        )
    kwargs = {"force_quick_gelu": bool(tag_cfg.get("quick_gelu", False))}
    if not _hub_reachable():
        cached = _cached_tag_weights(backbone, pretrained)
        if cached is None:
            raise _offline_error(f"open_clip {backbone!r} pretrained={pretrained!r}")
        return cached, kwargs
    return pretrained, kwargs


def _check_architecture(backbone: str, model_pretrained: str | None) -> None:
    """Register an architecture carried beside its weights file (``<name>.json``); an
    architecture open_clip still does not know is an error saying how to register it."""
    import open_clip

    if backbone.startswith(("hf-hub:", "local-dir:")) or backbone in open_clip.list_models():
        return
    if model_pretrained is not None and os.path.isfile(model_pretrained):
        sibling = Path(model_pretrained).with_name(f"{backbone}.json")
        if sibling.is_file():  # the checkpoint carries its own architecture
            register_model_config(sibling)
    if backbone not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {backbone!r}; use one of open_clip.list_models() "
            "(e.g. 'ViT-B-16', or this project's 'hyperalign-tiny'), an 'hf-hub:' / "
            "'local-dir:' id, or register yours with reward.backbone.register_model_config(path)"
        )


def _create_model(backbone: str, model_pretrained: str | None, device, kwargs: dict):
    """``open_clip.create_model``; a local weights file that cannot be loaded, or that holds
    NaN / infinities, is a ``ValueError`` naming the file and the fix."""
    import open_clip

    local = model_pretrained is not None and os.path.isfile(model_pretrained)
    if local:
        _check_weights_file(model_pretrained)
    try:
        model = open_clip.create_model(
            backbone, pretrained=model_pretrained, device=device, **kwargs
        )
    except Exception as err:
        if not local:
            raise
        raise ValueError(
            f"cannot load the backbone weights {model_pretrained} into {backbone!r}: "
            f"{type(err).__name__}: {err}. The file is damaged or holds another architecture; "
            "copy or download it again (or point HyperAlignConfig.pretrained at the right file)."
        ) from err
    if local:
        from .model import check_finite

        check_finite(model.state_dict(), f"backbone weights {model_pretrained}")
    return model
