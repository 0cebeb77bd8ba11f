"""The resumable training state of ``hyperalign train-reward``: one split's ``state/last/``.

Plain data, read back without unpickling anything (a state folder cannot run code):

- ``model.safetensors``: the trainable weights;
- ``optimizer.safetensors`` (``"<param>.<key>"`` tensors) + ``optimizer.json`` (format
  marker, AdamW hyper-parameters per group, and per parameter its tensor keys and values);
- ``progress.json``: format marker, number of processes, epoch / step / best score / history
  (``reward.train.TrainState``) and the gradient scaler's state;
- ``rng_<rank>.safetensors`` (``"torch"``, ``"cuda.<i>"``) + ``rng_<rank>.json``
  (``"python"``, ``"numpy"``): every process's random states.

The file handling, RNG capture and optimizer split are :mod:`hyperalign.state`'s; this
module binds them to these names. A state is written into a temporary sibling folder and
swapped in with :func:`hyperalign.common.replace_dir`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hyperalign import state as _state
from hyperalign.common import atomic_write_json, make_tmp_dir, replace_dir

if TYPE_CHECKING:
    from .train import _Run

STATE_FORMAT = "hyperalign-train-state/1"
MODEL_STATE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
PROGRESS = "progress.json"
RESTART_FIX = "pass --restart to start this split over"

RNG_LAYOUT = _state.RngLayout(
    stem="rng",
    torch_key="torch",
    cuda_prefix="cuda.",
    python_key="python",
    numpy_key="numpy",
    numpy_name_key="name",
    count_key=None,
    cuda_once_initialized=True,
)
OPTIMIZER_LAYOUT = _state.OptimizerLayout(
    tensor_name="{param}.{key}", entries=_state.SPLIT, header={"format": STATE_FORMAT}
)


def read_json(path: Path) -> Any:
    """A JSON file of a run folder; a missing or damaged file is an error naming it and
    saying how to start over."""
    return _state.read_json(path, fix=RESTART_FIX)


def save_train_state(run: _Run) -> None:
    """Write the training state into a temporary folder beside ``state/last`` (every process
    its random states, the main process the rest), then swap it in."""
    acc = run.accelerator
    tmp = make_tmp_dir(run.state_dir) if run.main else None
    if acc.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        tmp = Path(broadcast_object_list([str(tmp) if tmp else None])[0])
    try:
        _state.write_rng_state(RNG_LAYOUT, tmp, acc.process_index)
        if run.main:
            _write_main_state(run, tmp)
        acc.wait_for_everyone()
        if run.main:
            replace_dir(tmp, run.state_dir)
    except BaseException:
        if run.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc.wait_for_everyone()


def _write_main_state(run: _Run, directory: Path) -> None:
    """Weights, optimizer and progress (the same on every process) into ``directory``."""
    marker = {"format": STATE_FORMAT}
    _state.write_tensors(directory / MODEL_STATE, run.net.trainable_state_dict(), marker)
    tensors, meta = _state.optimizer_to_tensors(OPTIMIZER_LAYOUT, run.optimizer.state_dict())
    _state.write_tensors(directory / OPTIMIZER_TENSORS, tensors, marker)
    atomic_write_json(directory / OPTIMIZER_META, meta)
    scaler = run.accelerator.scaler
    progress = {
        "format": STATE_FORMAT,
        "num_processes": run.accelerator.num_processes,
        "progress": run.state.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
    }
    atomic_write_json(directory / PROGRESS, progress)


def load_train_state(run: _Run) -> None:
    """Resume ``run`` from ``state/last`` (every process): weights, optimizer, progress and
    this process's random states. Only safetensors and JSON files are read."""
    directory, acc = run.state_dir, run.accelerator
    progress = _read_progress(directory, acc.num_processes)
    weights = _state.read_tensors(directory / MODEL_STATE, acc.device, finite=True, fix=RESTART_FIX)
    run.net.load_checkpoint_state(weights, source=directory / MODEL_STATE)
    _state.load_optimizer_state(
        OPTIMIZER_LAYOUT,
        run.optimizer,
        _state.read_tensors(directory / OPTIMIZER_TENSORS, fix=RESTART_FIX),
        read_json(directory / OPTIMIZER_META),
        str(directory / OPTIMIZER_META),
        RESTART_FIX,
    )
    run.state.load_state_dict(progress.get("progress"), source=directory / PROGRESS)
    if acc.scaler is not None and progress.get("grad_scaler") is not None:
        acc.scaler.load_state_dict(progress["grad_scaler"])
    _state.read_rng_state(RNG_LAYOUT, directory, acc.process_index, RESTART_FIX)


def _read_progress(directory: Path, num_processes: int) -> dict:
    """``progress.json``, checked to be this format's and of a run with ``num_processes``."""
    progress = read_json(directory / PROGRESS)
    if not isinstance(progress, dict) or progress.get("format") != STATE_FORMAT:
        raise _state.StateError(
            f"{directory} was not written by this version of hyperalign train-reward "
            f"(no {STATE_FORMAT!r} {PROGRESS}); {RESTART_FIX}"
        )
    if progress.get("num_processes") != num_processes:
        raise _state.StateError(
            f"{directory} was saved by {progress.get('num_processes')} process(es), this run has "
            f"{num_processes}; resume with the same number of processes, or {RESTART_FIX}"
        )
    return progress


__all__ = [
    "MODEL_STATE",
    "OPTIMIZER_LAYOUT",
    "PROGRESS",
    "RESTART_FIX",
    "RNG_LAYOUT",
    "STATE_FORMAT",
    "load_train_state",
    "read_json",
    "save_train_state",
]
