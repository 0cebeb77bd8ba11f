"""Scoring of ``hyperalign eval-checkpoints``: HyperAlign and critics on image files.

:func:`build_scorers` makes ``{name: reward_fn}``; :func:`score_records` adds ``score_<name>``
to every record (a dict with ``image``, ``prompt`` and ``category``), reading each image with
:func:`hyperalign.common.load_image` and checking every reward's output with
:func:`reward.contract.check_reward_output`.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence

import torch

from hyperalign.common import load_image
from reward.contract import check_reward_output

__all__ = ["build_scorers", "score_records"]


def build_scorers(reward: str, critics: Sequence[str], device, dtype) -> dict[str, object]:
    """``{name: reward_fn}``: HyperAlign (``reward``: preset, directory or hub id) and critics
    (specs of ``rlhf.rewards.get_reward``, plus ``oracle`` for the shapes world)."""
    from reward import build_reward
    from rlhf.rewards import get_reward

    scorers = {"hyperalign": build_reward(reward, device=device, dtype=dtype)}
    for spec in critics:
        if spec == "oracle":
            from shapes.oracle import ShapesOracleReward

            scorers["oracle"] = ShapesOracleReward()
        else:
            # "import:pkg.mod:fn" is named "fn"; other specs by their kind ("brightness").
            name = spec.rsplit(":", 1)[-1] if spec.startswith("import:") else spec.split(":")[0]
            scorers[name] = get_reward(spec, device=device, dtype=dtype)
    return scorers


def _load_chunk(records: list[dict], skip_bad: bool) -> tuple[list[dict], list[torch.Tensor]]:
    """The readable records of ``records`` and their images (3, H, W)."""
    kept, tensors = [], []
    for rec in records:
        try:
            tensors.append(load_image(rec["image"]))
            kept.append(rec)
        except (ValueError, OSError) as err:
            if not skip_bad:
                raise ValueError(
                    f"cannot read image {rec['image']}: {err} (pass --skip-bad to skip it)"
                ) from err
            print(f"skipping unreadable image {rec['image']}: {err}", file=sys.stderr)
    return kept, tensors


def _score_same_size(chunk, tensors, idx, scorers, device) -> None:
    """Score the images ``idx`` of ``chunk`` (all of one size) with every scorer."""
    images = torch.stack([tensors[i] for i in idx]).to(device)  # (b, 3, H, W)
    prompts = [chunk[i]["prompt"] for i in idx]
    metadata = [{"category": chunk[i]["category"]} for i in idx]
    for name, fn in scorers.items():
        where = f"images {chunk[idx[0]]['image']} ..."
        rewards, _ = check_reward_output(
            fn(images, prompts, metadata), len(idx), "cpu", name, where
        )
        for i, r in zip(idx, rewards.tolist()):
            chunk[i][f"score_{name}"] = r


@torch.no_grad()
def score_records(
    records: list[dict],
    scorers: dict[str, object],
    batch_size: int,
    device: torch.device,
    skip_bad: bool = False,
    show_progress: bool = True,
) -> list[dict]:
    """Add ``score_<name>`` to every record; images are read from their files.

    An unreadable image raises ``ValueError`` naming the file, unless ``skip_bad`` (then the
    record is dropped with a message on stderr). Returns the scored records."""
    from tqdm.auto import tqdm

    kept = []
    for start in tqdm(range(0, len(records), batch_size), disable=not show_progress, desc="score"):
        chunk, tensors = _load_chunk(records[start : start + batch_size], skip_bad)
        by_size = defaultdict(list)  # images of different sizes are scored in separate batches
        for i, t in enumerate(tensors):
            by_size[tuple(t.shape)].append(i)
        for idx in by_size.values():
            _score_same_size(chunk, tensors, idx, scorers, device)
        kept.extend(chunk)
    return kept
