"""hyperalign.state: saved training state in safetensors and JSON files (no pickle).

The RNG and optimizer round trips continue the saved streams and steps exactly, for both
checkpoint layouts (the DDPO trainer's and train-reward's); damaged, non-finite and foreign
files are refused with errors naming them; a planted pickle is never opened.
"""

import json
import os
import random
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hyperalign import state
from hyperalign.common import atomic_write_json
from reward import train_state
from rlhf import checkpointing

LAYOUTS = {"ddpo": checkpointing.RNG_LAYOUT, "train-reward": train_state.RNG_LAYOUT}
OPTIMIZER_LAYOUTS = {
    "ddpo": checkpointing.OPTIMIZER_LAYOUT,
    "train-reward": train_state.OPTIMIZER_LAYOUT,
}


def _draws() -> tuple:
    """One draw from every global generator, including the cached second Gaussians."""
    out = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(4))
    if torch.cuda.is_available():
        out += (torch.rand(4, device="cuda").cpu(),)
    return out


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b)
    )


@pytest.mark.parametrize("kind", LAYOUTS)
def test_rng_round_trip_through_files_restores_the_exact_streams(kind, tmp_path):
    layout = LAYOUTS[kind]
    if torch.cuda.is_available():
        torch.cuda.init()  # train-reward's layout saves CUDA states once CUDA is in use
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)
    np.random.randn()  # both now hold a cached second Gaussian
    state.write_rng_state(layout, tmp_path, rank=3)
    expected = _draws()
    assert _same(_draws(), _draws()) is False  # the streams moved on
    state.read_rng_state(layout, tmp_path, rank=3)
    assert _same(_draws(), expected)
    # Capturing draws nothing.
    state.read_rng_state(layout, tmp_path, rank=3)
    state.capture_rng_state(layout)
    assert _same(_draws(), expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(layout.files(3))


def test_rng_layouts_keep_their_file_and_entry_names(tmp_path):
    assert checkpointing.rng_files(1) == ("rng_state_1.safetensors", "rng_state_1.json")
    assert train_state.RNG_LAYOUT.files(1) == ("rng_1.safetensors", "rng_1.json")
    for kind, (tensor_keys, json_keys, numpy_name) in {
        "ddpo": ({"torch_cpu"}, {"python_random", "numpy_random", "num_cuda_devices"}, "kind"),
        "train-reward": ({"torch"}, {"python", "numpy"}, "name"),
    }.items():
        layout = LAYOUTS[kind]
        state.write_rng_state(layout, tmp_path, rank=0)
        tensors = load_file(str(tmp_path / layout.files(0)[0]))
        meta = json.loads((tmp_path / layout.files(0)[1]).read_text())
        assert {k for k in tensors if not k.startswith(layout.cuda_prefix)} == tensor_keys
        assert all(t.dtype == torch.uint8 for t in tensors.values())
        assert set(meta) == json_keys
        assert list(meta[layout.numpy_key]) == [
            numpy_name,
            "keys",
            "pos",
            "has_gauss",
            "cached_gaussian",
        ]
        assert set(meta[layout.python_key]) == {"version", "state", "gauss_next"}


def test_invalid_rng_state_is_named(tmp_path):
    layout = LAYOUTS["train-reward"]
    state.write_rng_state(layout, tmp_path, rank=0)
    json_path = tmp_path / "rng_0.json"
    meta = json.loads(json_path.read_text())
    del meta["numpy"]["pos"]
    atomic_write_json(json_path, meta)
    with pytest.raises(state.StateError, match=f"RNG state in {json_path} .* not valid.*again"):
        state.read_rng_state(layout, tmp_path, rank=0, fix="again")
    tensors, meta = state.capture_rng_state(layout)
    tensors = {"torch": tensors["torch"], "cuda.1": tensors["torch"][:16]}  # no "cuda.0"
    with pytest.raises(state.StateError, match=r"RNG state in src lacks 'cuda.0'"):
        state.restore_rng_state(layout, tensors, meta, "src")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a process without CUDA devices")
def test_saved_cuda_states_without_cuda_warn():
    for layout in LAYOUTS.values():
        tensors, meta = state.capture_rng_state(layout)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no CUDA saved, none present: silent
            state.restore_rng_state(layout, tensors, meta, "src")
        cuda = {f"{layout.cuda_prefix}0": torch.zeros(16, dtype=torch.uint8)}
        with pytest.warns(RuntimeWarning, match="src holds 1 CUDA generator states .* sees 0"):
            state.restore_rng_state(layout, {**tensors, **cuda}, meta, "src")


def _trained_optimizer(shapes=((3,), (2, 2), (4,)), steps=2):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    groups = [
        {"params": params[:2], "lr": 1e-2, "name": "head"},
        {"params": params[2:], "lr": 1e-3, "weight_decay": 0.1, "name": "adapters"},
    ]
    opt = torch.optim.AdamW(groups, betas=(0.8, 0.95))
    for _ in range(steps):
        _step(opt, params)
    return opt, params


def _step(opt, params):
    opt.zero_grad(set_to_none=True)
    sum(((p - 0.5) ** 3).sum() for p in params).backward()
    opt.step()


@pytest.mark.parametrize("kind", OPTIMIZER_LAYOUTS)
def test_optimizer_round_trip_gives_identical_next_steps(kind, tmp_path):
    layout = OPTIMIZER_LAYOUTS[kind]
    opt, params = _trained_optimizer()
    tensors, meta = state.optimizer_to_tensors(layout, opt.state_dict())
    state.write_tensors(tmp_path / "optimizer.safetensors", tensors)
    atomic_write_json(tmp_path / "optimizer.json", meta)

    fresh, fresh_params = _trained_optimizer(steps=0)
    with torch.no_grad():
        for p, q in zip(fresh_params, params):
            p.copy_(q)
    read = state.read_tensors(tmp_path / "optimizer.safetensors")
    state.load_optimizer_state(
        layout, fresh, read, state.read_json(tmp_path / "optimizer.json"), "src"
    )
    assert fresh.param_groups[0]["betas"] == (0.8, 0.95)  # the tuple JSON turned into a list
    for _ in range(3):
        _step(opt, params)
        _step(fresh, fresh_params)
    for p, q in zip(params, fresh_params):
        assert torch.equal(p, q)  # bit-identical
    # The state tensors are named as the layout says.
    assert set(load_file(str(tmp_path / "optimizer.safetensors"))) == {
        layout.tensor_name.format(param=i, key=k)
        for i in range(3)
        for k in ("step", "exp_avg", "exp_avg_sq")
    }


def test_optimizer_state_is_checked_against_the_live_optimizer():
    layout = OPTIMIZER_LAYOUTS["train-reward"]
    opt, _ = _trained_optimizer()
    tensors, meta = state.optimizer_to_tensors(layout, opt.state_dict())
    meta = json.loads(json.dumps(meta))
    reshaped, _ = _trained_optimizer(shapes=((3,), (4,), (4,)), steps=0)  # same count
    with pytest.raises(state.StateError, match=r"src does not fit.*parameter 1 has shape \(2, 2\)"):
        state.optimizer_from_tensors(layout, tensors, meta, reshaped, "src", "start over")
    fewer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(state.StateError, match="src is for other trainable parameters"):
        state.optimizer_from_tensors(layout, tensors, meta, fewer, "src")
    with pytest.raises(state.StateError, match="src is not an optimizer state of this trainer"):
        state.optimizer_from_tensors(layout, tensors, {**meta, "format": "x"}, opt, "src")
    with pytest.raises(state.StateError, match="optimizer state in src is not valid.*exp_avg"):
        state.optimizer_from_tensors(
            layout, {k: v for k, v in tensors.items() if k != "0.exp_avg"}, meta, opt, "src"
        )


def test_truncated_and_missing_files_are_named(tmp_path):
    path = tmp_path / "w.safetensors"
    state.write_tensors(path, {"w": torch.randn(64)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(state.StateError, match=f"cannot read {path}: it is truncated.*; redo"):
        state.read_tensors(path, fix="redo")
    bad_json = tmp_path / "m.json"
    bad_json.write_text('{"a": [1, 2')
    with pytest.raises(state.StateError, match=f"cannot read {bad_json}: it is not valid"):
        state.read_json(bad_json)
    for read, name in ((state.read_tensors, "gone.safetensors"), (state.read_json, "gone.json")):
        with pytest.raises(state.MissingStateError, match=f"{tmp_path / name} is missing; redo"):
            read(tmp_path / name, fix="redo")
    err = state.MissingStateError("x")
    assert isinstance(err, FileNotFoundError) and isinstance(err, ValueError)


def test_non_finite_tensor_is_named_when_asked(tmp_path):
    path = tmp_path / "w.safetensors"
    weights = torch.ones(5)
    weights[2] = float("nan")
    state.write_tensors(path, {"ok": torch.ones(2), "bad": weights, "ints": torch.arange(3)})
    assert torch.isnan(state.read_tensors(path)["bad"][2])  # read as is unless asked
    with pytest.raises(state.StateError, match=f"{path}: tensor 'bad' holds 1 NaN/infinite"):
        state.read_tensors(path, finite=True)


def test_reward_model_read_safetensors_keeps_its_error_kinds(tmp_path):
    from reward.model import read_safetensors

    with pytest.raises(FileNotFoundError, match="missing.safetensors is missing; copy it"):
        read_safetensors(tmp_path / "missing.safetensors", fix="copy it")
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match=f"cannot read {path}.*copy it"):
        read_safetensors(path, fix="copy it")


class _Payload:
    """Unpickling this object creates the directory ``marker`` (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_planted_pickle_is_never_read(tmp_path):
    marker = tmp_path / "code-ran"
    control = tmp_path / "control"
    torch.save(_Payload(control), tmp_path / "probe.pkl")
    torch.load(tmp_path / "probe.pkl", weights_only=False)
    assert control.is_dir()  # the payload is armed

    for name in ("optimizer.bin", "random_states_0.pkl", "scaler.pt", "state.pkl"):
        torch.save(_Payload(marker), tmp_path / name)
        with pytest.raises(state.StateError, match="refusing .* only read from .safetensors"):
            state.read_tensors(tmp_path / name)
        with pytest.raises(state.StateError, match="refusing .* only read from .json"):
            state.read_json(tmp_path / name)
    # A pickle under a state file's name is refused as a damaged file, never unpickled.
    layout = LAYOUTS["ddpo"]
    tensor_name, json_name = layout.files(0)
    state.write_rng_state(layout, tmp_path, rank=0)
    torch.save(_Payload(marker), tmp_path / tensor_name)
    with pytest.raises(state.StateError, match=f"cannot read {tmp_path / tensor_name}"):
        state.read_rng_state(layout, tmp_path, rank=0)
    torch.save(_Payload(marker), tmp_path / json_name)
    with pytest.raises(state.StateError, match=f"cannot read {tmp_path / json_name}"):
        state.read_rng_state(layout, tmp_path, rank=0)
    assert not marker.exists()
