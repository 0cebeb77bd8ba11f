"""Saved training state in files that cannot run code: safetensors and JSON, never pickle.

The pieces every resumable trainer of the project uses (the ``rlhf`` DDPO checkpoints and the
``hyperalign train-reward`` state):

- :func:`write_tensors` / :func:`read_tensors`: safetensors files; a missing or damaged file,
  and on request a tensor holding NaN or an infinity, is an error naming the file;
- :func:`read_json`: a JSON file, errors naming it;
- :class:`RngLayout` with :func:`capture_rng_state` / :func:`restore_rng_state` and
  :func:`write_rng_state` / :func:`read_rng_state`: a process's generators (torch CPU and CUDA
  as uint8 tensors, numpy's and Python's as JSON), one file pair per rank;
- :class:`OptimizerLayout` with :func:`optimizer_to_tensors` / :func:`optimizer_from_tensors`
  / :func:`load_optimizer_state`: a torch optimizer's ``state_dict`` as tensors plus a JSON
  structure, checked against the live optimizer (parameter groups, tensor shapes) when read.

Each checkpoint kind keeps its own file and entry names (its layouts); the code is shared.
The readers open only ``.safetensors`` and ``.json`` files: a path with another suffix (a
pickle left in a checkpoint folder, say) is refused without being opened.

Errors are :class:`StateError` (a ``ValueError``); a missing file is :class:`MissingStateError`
(also a ``FileNotFoundError``). Every function taking ``fix`` appends it to its messages: the
step that gets the user going again (e.g. "pass --restart to start over").
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hyperalign.common import atomic_write_json

__all__ = [
    "StateError",
    "MissingStateError",
    "write_tensors",
    "read_tensors",
    "refuse_non_finite",
    "read_json",
    "RngLayout",
    "capture_rng_state",
    "restore_rng_state",
    "write_rng_state",
    "read_rng_state",
    "OptimizerLayout",
    "PER_KEY",
    "SPLIT",
    "optimizer_to_tensors",
    "optimizer_from_tensors",
    "load_optimizer_state",
]


class StateError(ValueError):
    """A saved state is missing, damaged, or does not fit the run; the message names the file."""


class MissingStateError(StateError, FileNotFoundError):
    """A file of a saved state does not exist."""


def _hint(fix: str) -> str:
    return f"; {fix}" if fix else ""


def _check_suffix(path: Path, suffix: str) -> None:
    """Refuse (without opening it) a path that is not a ``suffix`` file."""
    if path.suffix != suffix:
        raise StateError(
            f"refusing {path}: saved state is only read from {suffix} files here (a file of "
            "another kind, a pickle for instance, could run code when loaded)"
        )


# ---------------------------------------------------------------------------------- files


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata=None) -> None:
    """Save ``{name: tensor}`` as a safetensors file (CPU, contiguous copies; ``metadata``: the
    file's string header fields). Not atomic: write into a folder that is swapped in whole."""
    path = Path(path)
    _check_suffix(path, ".safetensors")
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(cpu, str(path), metadata=metadata)


def read_tensors(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    finite: bool = False,
    fix: str = "",
) -> dict[str, torch.Tensor]:
    """Load a safetensors file onto ``device``. A missing file raises `MissingStateError`, a
    truncated or foreign one `StateError`, both naming it; with ``finite`` a floating tensor
    holding NaN or an infinity is refused too (see :func:`refuse_non_finite`)."""
    path = Path(path)
    _check_suffix(path, ".safetensors")
    if not path.is_file():
        raise MissingStateError(f"{path} is missing{_hint(fix)}")
    device = torch.device(device)
    where = "cpu" if device.type == "cpu" else str(device)  # safetensors refuses "cpu:0"
    try:
        tensors = load_file(str(path), device=where)
    except (SafetensorError, OSError) as err:
        raise StateError(
            f"cannot read {path}: it is truncated or not a safetensors file ({err}){_hint(fix)}"
        ) from err
    if finite:
        refuse_non_finite(tensors, path, fix)
    return tensors


def refuse_non_finite(tensors: Mapping[str, torch.Tensor], source: object, fix: str = "") -> None:
    """`StateError` naming ``source`` and the first floating tensor holding NaN or an
    infinity."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            n_bad = int((~torch.isfinite(tensor)).sum())
            raise StateError(
                f"{source}: tensor {name!r} holds {n_bad} NaN/infinite value(s); the run that "
                f"wrote it diverged{_hint(fix)}"
            )


def read_json(path: str | Path, *, fix: str = "") -> Any:
    """Parse a JSON file. A missing file raises `MissingStateError`, an undecodable one
    `StateError`, both naming it."""
    path = Path(path)
    _check_suffix(path, ".json")
    if not path.is_file():
        raise MissingStateError(f"{path} is missing{_hint(fix)}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise StateError(
            f"cannot read {path}: it is not valid UTF-8 JSON ({err}){_hint(fix)}"
        ) from err


# ------------------------------------------------------------------------------------ RNG


@dataclass(frozen=True)
class RngLayout:
    """Where one checkpoint kind keeps a process's generator states.

    Rank ``r`` writes ``<stem>_<r>.safetensors`` (torch's CPU state under ``torch_key``, CUDA
    device ``i``'s under ``<cuda_prefix><i>``) and ``<stem>_<r>.json`` (Python's ``random``
    under ``python_key``; numpy's global generator under ``numpy_key``, its bit generator's
    name under ``numpy_name_key``; the number of CUDA states under ``count_key``, if set).
    ``cuda_once_initialized``: capture CUDA states only once this process has initialized
    CUDA (a process that never used it has no CUDA stream to continue); otherwise whenever
    CUDA is available (which initializes it).
    """

    stem: str
    torch_key: str
    cuda_prefix: str
    python_key: str
    numpy_key: str
    numpy_name_key: str
    count_key: str | None
    cuda_once_initialized: bool

    def files(self, rank: int) -> tuple[str, str]:
        """Names of rank ``rank``'s RNG files: (safetensors, JSON)."""
        return f"{self.stem}_{rank}.safetensors", f"{self.stem}_{rank}.json"


def capture_rng_state(layout: RngLayout) -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generator states as ``(tensors, JSON-ready dict)`` in ``layout``'s names:
    torch CPU and CUDA states as uint8 tensors, Python's and numpy's as JSON values. Draws
    nothing from any generator."""
    tensors = {layout.torch_key: torch.get_rng_state()}
    num_cuda = 0
    if torch.cuda.is_available() and (
        torch.cuda.is_initialized() or not layout.cuda_once_initialized
    ):
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"{layout.cuda_prefix}{i}"] = state
            num_cuda += 1
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    meta = {
        layout.python_key: {"version": version, "state": list(internal), "gauss_next": gauss_next},
        layout.numpy_key: {
            layout.numpy_name_key: name,
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }
    if layout.count_key is not None:
        meta[layout.count_key] = num_cuda
    return tensors, meta


def restore_rng_state(
    layout: RngLayout,
    tensors: Mapping[str, torch.Tensor],
    meta: dict,
    source: str,
    fix: str = "",
) -> None:
    """Set this process's generators from :func:`capture_rng_state`'s output (read from
    ``source``); an entry that is missing or of the wrong kind is a `StateError`."""
    try:
        py = meta[layout.python_key]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
        npr = meta[layout.numpy_key]
        np.random.set_state(
            (
                str(npr[layout.numpy_name_key]),
                np.asarray(npr["keys"], dtype=np.uint32),
                int(npr["pos"]),
                int(npr["has_gauss"]),
                float(npr["cached_gaussian"]),
            )
        )
        torch.set_rng_state(tensors[layout.torch_key].to(torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise StateError(f"the RNG state in {source} is not valid: {err!r}{_hint(fix)}") from err
    _restore_cuda_rng(layout, tensors, source, fix)


def _restore_cuda_rng(
    layout: RngLayout, tensors: Mapping[str, torch.Tensor], source: str, fix: str
) -> None:
    """Set the CUDA generators this process sees from the saved ones; warn when the saved
    and the present device counts differ (GPU noise then does not continue the saved run)."""
    num_saved = sum(k.startswith(layout.cuda_prefix) for k in tensors)
    try:
        states = [tensors[f"{layout.cuda_prefix}{i}"].to(torch.uint8) for i in range(num_saved)]
    except KeyError as err:
        raise StateError(f"the RNG state in {source} lacks {err}{_hint(fix)}") from err
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i, state in enumerate(states[:available]):
        torch.cuda.set_rng_state(state, i)
    never_used = layout.cuda_once_initialized and not states  # the saving process had no CUDA
    if len(states) != available and not never_used:
        warnings.warn(
            f"{source} holds {len(states)} CUDA generator states but this process sees "
            f"{available} CUDA devices: GPU sampling noise will not continue the saved run",
            RuntimeWarning,
            stacklevel=3,
        )


def write_rng_state(layout: RngLayout, directory: str | Path, rank: int) -> None:
    """Write this process's generator states as rank ``rank``'s files into ``directory``."""
    tensors, meta = capture_rng_state(layout)
    tensor_name, json_name = layout.files(rank)
    write_tensors(Path(directory) / tensor_name, tensors)
    atomic_write_json(Path(directory) / json_name, meta)


def read_rng_state(layout: RngLayout, directory: str | Path, rank: int, fix: str = "") -> None:
    """Restore the generator states :func:`write_rng_state` wrote for rank ``rank``."""
    tensor_name, json_name = layout.files(rank)
    directory = Path(directory)
    meta = read_json(directory / json_name, fix=fix)
    tensors = read_tensors(directory / tensor_name, fix=fix)
    restore_rng_state(layout, tensors, meta, f"{directory / json_name} / {tensor_name}", fix)


# ------------------------------------------------------------------------------ optimizer

PER_KEY = "per_key"  # {key: {"tensor": name} | {"value": value}}
SPLIT = "split"  # {"tensors": [key, ...], "values": {key: value}}


@dataclass(frozen=True)
class OptimizerLayout:
    """How one checkpoint kind stores a torch optimizer's ``state_dict``.

    ``tensor_name``: the safetensors name of a state tensor, a format string of ``param``
    (the parameter's index) and ``key`` (e.g. ``"state.{param}.{key}"``). ``entries``: the
    JSON form of one parameter's state, `PER_KEY` or `SPLIT`. ``header``: fields written
    first in the JSON and checked when it is read (e.g. a format marker).
    """

    tensor_name: str
    entries: str
    header: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.entries not in (PER_KEY, SPLIT):
            raise ValueError(f"OptimizerLayout.entries must be {PER_KEY!r} or {SPLIT!r}")


def optimizer_to_tensors(
    layout: OptimizerLayout, state_dict: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer ``state_dict`` into its tensors (named by ``layout.tensor_name``) and
    a JSON-ready structure: ``layout.header``, the param groups (tuples as lists) and, per
    parameter, which keys are tensors and the other values."""
    tensors: dict[str, torch.Tensor] = {}
    state = {
        str(pid): _encode_entry(layout, pid, entry, tensors)
        for pid, entry in state_dict["state"].items()
    }
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        for group in state_dict["param_groups"]
    ]
    meta = {**layout.header, "param_groups": groups, "state": state}
    json.dumps(meta)  # TypeError here if a group or state value is not JSON data
    return tensors, meta


def _encode_entry(layout: OptimizerLayout, pid, entry: dict, tensors: dict) -> dict:
    """One parameter's state in ``layout``'s JSON form; its tensors go into ``tensors``."""
    per_key, tensor_keys, values = {}, [], {}
    for key, value in entry.items():
        if isinstance(value, torch.Tensor):
            name = layout.tensor_name.format(param=pid, key=key)
            tensors[name] = value
            per_key[key] = {"tensor": name}
            tensor_keys.append(key)
        else:
            per_key[key] = {"value": value}
            values[key] = value
    return per_key if layout.entries == PER_KEY else {"tensors": tensor_keys, "values": values}


def _decode_entry(layout: OptimizerLayout, pid: int, described: dict, tensors: Mapping) -> dict:
    """Inverse of :func:`_encode_entry` (the same key order)."""
    if layout.entries == PER_KEY:
        return {
            key: tensors[spec["tensor"]] if "tensor" in spec else spec["value"]
            for key, spec in described.items()
        }
    entry = dict(described["values"])
    for key in described["tensors"]:
        entry[key] = tensors[layout.tensor_name.format(param=pid, key=key)]
    return entry


def optimizer_from_tensors(
    layout: OptimizerLayout,
    tensors: Mapping[str, torch.Tensor],
    meta: dict,
    live: torch.optim.Optimizer | dict,
    source: str,
    fix: str = "",
) -> dict:
    """Rebuild an optimizer ``state_dict`` from :func:`optimizer_to_tensors`' output, checked
    against ``live``: the optimizer it is for (its parameter groups and, for each state
    tensor, the parameter's shape are checked) or its present ``state_dict`` (groups only).
    ``live`` also supplies the value types JSON cannot keep (tuples)."""
    if isinstance(live, torch.optim.Optimizer):
        current = live.state_dict()
        shapes = [p.shape for group in live.param_groups for p in group["params"]]
    else:
        current, shapes = live, None
    if not isinstance(meta, dict):
        raise StateError(f"the optimizer state in {source} is not a JSON object{_hint(fix)}")
    for key, value in layout.header.items():
        if meta.get(key) != value:
            raise StateError(
                f"{source} is not an optimizer state of this trainer ({key} is "
                f"{meta.get(key)!r}, expected {value!r}){_hint(fix)}"
            )
    groups = _restore_groups(meta.get("param_groups"), current["param_groups"], source, fix)
    try:
        state = {
            int(pid): _decode_entry(layout, int(pid), described, tensors)
            for pid, described in meta["state"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise StateError(
            f"the optimizer state in {source} is not valid: {err!r}{_hint(fix)}"
        ) from err
    _check_state_fits(state, current, shapes, source, fix)
    return {"state": state, "param_groups": groups}


def _restore_groups(saved, now: list[dict], source: str, fix: str) -> list[dict]:
    """The saved param groups, checked to hold the parameters of ``now`` (the live groups),
    with lists turned back into tuples where the live group holds a tuple."""
    if (
        not isinstance(saved, list)
        or not all(isinstance(g, dict) for g in saved)
        or [g.get("params") for g in saved] != [g["params"] for g in now]
    ):
        raise StateError(
            f"the optimizer state in {source} is for other trainable parameters than this "
            "run's optimizer (other parameter groups: was the trainable part of the model, a "
            f"LoRA rank or target modules for instance, changed?){_hint(fix)}"
        )
    return [
        {
            k: tuple(v) if isinstance(group.get(k), tuple) and isinstance(v, list) else v
            for k, v in saved_group.items()
        }
        for saved_group, group in zip(saved, now)
    ]


def _check_state_fits(state: dict, current: dict, shapes, source: str, fix: str) -> None:
    """Every saved entry belongs to a live parameter and, where ``shapes`` is known, every
    non-scalar state tensor has its parameter's shape."""
    known = {pid for group in current["param_groups"] for pid in group["params"]}
    for pid, entry in state.items():
        if pid not in known:
            raise StateError(
                f"the optimizer state in {source} holds parameter {pid}, which this run's "
                f"optimizer does not have{_hint(fix)}"
            )
        if shapes is None:
            continue
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shapes[pid]:
                raise StateError(
                    f"the optimizer state in {source} does not fit this run's optimizer: "
                    f"{key} of parameter {pid} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(shapes[pid])}{_hint(fix)}"
                )


def load_optimizer_state(
    layout: OptimizerLayout,
    optimizer: torch.optim.Optimizer,
    tensors: Mapping[str, torch.Tensor],
    meta: dict,
    source: str,
    fix: str = "",
) -> None:
    """Load :func:`optimizer_to_tensors`' output into ``optimizer`` after the checks of
    :func:`optimizer_from_tensors`; a state torch then still refuses is a `StateError`."""
    state_dict = optimizer_from_tensors(layout, tensors, meta, optimizer, source, fix)
    try:
        optimizer.load_state_dict(state_dict)
    except (KeyError, TypeError, ValueError) as err:
        raise StateError(
            f"{source} does not fit this run's optimizer ({type(err).__name__}: {err}){_hint(fix)}"
        ) from err
