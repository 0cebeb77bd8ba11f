"""Resumable DDPO checkpoints in files that cannot run code: safetensors and JSON, no pickle.

A checkpoint directory ``checkpoint_<epoch>/`` holds

- ``unet_lora.safetensors``: the UNet's LoRA weights (peft names), written by rank 0;
- ``optimizer.safetensors`` + ``optimizer.json``: the optimizer's tensors, and its param
  groups and non-tensor state, written by rank 0 (ranks hold the same state under DDP);
- ``trainer_state.json``: epoch and step counters, the per-prompt stat tracker, the fp16
  gradient scaler and accelerate's micro-step counter, written by rank 0;
- ``rng_state_<rank>.safetensors`` + ``rng_state_<rank>.json``: every rank's generators
  (torch CPU and CUDA states as uint8 tensors; Python's and numpy's as JSON);
- ``config.json`` and ``lora/`` (the diffusers-format LoRA), added by the trainer.

Checkpoints are assembled in a temporary folder and swapped in with
:func:`hyperalign.common.replace_dir`; :func:`recover_leftovers` (called before anything is
read) restores a copy an interrupted swap left aside and deletes dead processes' leftovers.
The file readers and writers, the RNG capture and the optimizer split are
:mod:`hyperalign.state`'s, bound here to this checkpoint's names (`RNG_LAYOUT`,
`OPTIMIZER_LAYOUT`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from hyperalign import state as _state
from hyperalign.common import atomic_write_json as write_json
from hyperalign.common import make_tmp_dir, recover_dir, replace_dir
from hyperalign.state import read_json, read_tensors, write_tensors

__all__ = [
    "CheckpointError",
    "LORA_FILE",
    "STATE_FILE",
    "CONFIG_FILE",
    "RNG_LAYOUT",
    "OPTIMIZER_LAYOUT",
    "rng_files",
    "capture_rng_state",
    "restore_rng_state",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "write_tensors",
    "read_tensors",
    "read_json",
    "write_json",
    "state_header",
    "check_state_header",
    "staging_dir",
    "publish_dir",
    "recover_leftovers",
    "list_checkpoints",
    "prune_checkpoints",
]

FORMAT = "hyperalign-ddpo-checkpoint"
VERSION = 1
LORA_FILE = "unet_lora.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d+)$")
# `.{name}.tmp-{pid}-...` and `.{name}.old-{pid}` folders of make_tmp_dir / replace_dir.
_LEFTOVER = re.compile(r"^\.(?P<name>.+?)\.(?:tmp|old)-\d+")

# A checkpoint that is missing, damaged, or does not fit the run; the message says which file.
CheckpointError = _state.StateError

# `rng_state_<rank>.safetensors`: "torch_cpu", "torch_cuda_<i>" (every CUDA device this
# process sees); `rng_state_<rank>.json`: "python_random", "numpy_random" (bit generator name
# under "kind"), "num_cuda_devices".
RNG_LAYOUT = _state.RngLayout(
    stem="rng_state",
    torch_key="torch_cpu",
    cuda_prefix="torch_cuda_",
    python_key="python_random",
    numpy_key="numpy_random",
    numpy_name_key="kind",
    count_key="num_cuda_devices",
    cuda_once_initialized=False,
)
# `optimizer.safetensors`: "state.<param>.<key>"; `optimizer.json`: "param_groups" and
# "state" ({param: {key: {"tensor": name} | {"value": value}}}).
OPTIMIZER_LAYOUT = _state.OptimizerLayout(tensor_name="state.{param}.{key}", entries=_state.PER_KEY)


# -------------------------------------------------------------------- RNG and optimizer


def rng_files(rank: int) -> tuple[str, str]:
    """Names of rank `rank`'s RNG files: (safetensors, JSON)."""
    return RNG_LAYOUT.files(rank)


def capture_rng_state():
    """This process's generator states, `(tensors, JSON-ready dict)` (see `RNG_LAYOUT`)."""
    return _state.capture_rng_state(RNG_LAYOUT)


def restore_rng_state(tensors, meta: dict, source: str) -> None:
    """Set this process's generators from `capture_rng_state`'s output (read from `source`)."""
    _state.restore_rng_state(RNG_LAYOUT, tensors, meta, source)


def optimizer_to_tensors(state_dict: dict):
    """A torch optimizer `state_dict` as `(tensors, JSON-ready dict)` (see `OPTIMIZER_LAYOUT`)."""
    return _state.optimizer_to_tensors(OPTIMIZER_LAYOUT, state_dict)


def optimizer_from_tensors(tensors, meta: dict, current, source: str) -> dict:
    """Rebuild an optimizer `state_dict` from `optimizer_to_tensors`' output, checked against
    `current`: the optimizer (groups and shapes checked) or its present `state_dict` (groups)."""
    return _state.optimizer_from_tensors(OPTIMIZER_LAYOUT, tensors, meta, current, source)


def state_header() -> dict:
    """The format marker every `trainer_state.json` starts with."""
    return {"format": FORMAT, "version": VERSION}


def check_state_header(state: dict, source: str) -> None:
    """Raise `CheckpointError` unless `state` was written in this format."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a DDPO trainer state (no format {FORMAT!r})")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"{source} has format version {state.get('version')!r}; this trainer reads {VERSION}"
        )


# ------------------------------------------------------------------------ directories


def staging_dir(target: str | Path) -> Path:
    """A fresh temporary folder to assemble `target` in (cleaned up by `recover_leftovers`
    if this process dies before `publish_dir`)."""
    return make_tmp_dir(target)


def publish_dir(tmp: Path, target: str | Path) -> None:
    """Swap the finished folder `tmp` in as `target` (recoverable, see `replace_dir`)."""
    replace_dir(tmp, target)


def recover_leftovers(parent: str | Path) -> None:
    """Run `recover_dir` for every folder of `parent` that an interrupted write or swap left
    leftovers for: a copy set aside by a killed swap is moved back, dead processes'
    temporary folders are deleted."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    names = {m["name"] for p in parent.iterdir() if (m := _LEFTOVER.match(p.name))}
    for name in sorted(names):
        recover_dir(parent / name)


def list_checkpoints(root: str | Path) -> list[Path]:
    """`checkpoint_<epoch>` folders of `root`, oldest epoch first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found) if p.is_dir()]


def prune_checkpoints(root: str | Path, keep: int, protect: Path) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (never `protect`); returns the deleted.

    Each is first renamed to a temporary name of this process, so a kill during deletion
    leaves a leftover that `recover_leftovers` removes, never a half-deleted checkpoint."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    ckpts = [p for p in list_checkpoints(root) if p != Path(protect)]
    doomed = ckpts[: max(0, len(ckpts) - (keep - 1))]
    for path in doomed:
        trash = make_tmp_dir(path)
        trash.rmdir()
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed
