"""``hyperalign train-reward`` on two CPU processes (accelerate.debug_launcher, gloo): every
rank writes its random states into the one state folder, and a run resumed from it ends with
the same weights and history as the uninterrupted run."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .test_data import make_subset


def _worker(labels: str, root: str, out: str) -> None:
    from accelerate.state import AcceleratorState, PartialState

    from reward.config import HyperAlignConfig
    from reward.data import load_dataset
    from reward.train import TrainConfig, train_splits

    # Forked from the pytest process: drop any single-process accelerate state it holds.
    AcceleratorState._reset_state(reset_partial_state=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    model = HyperAlignConfig(backbone="hyperalign-tiny", pretrained=None)
    dataset = load_dataset("pku-i2iqa", labels)

    def config(epochs: int) -> TrainConfig:
        return TrainConfig(
            epochs=epochs, batch_size=4, num_workers=0, tensorboard=False, lr_adapters=1e-3
        )

    train_splits(model, config(2), dataset, root, f"{out}/full", cpu=True)
    train_splits(model, config(1), dataset, root, f"{out}/resumed", cpu=True)
    state = PartialState()
    if state.is_main_process:
        run = Path(out) / "resumed" / "split_0"
        names = sorted(p.name for p in (run / "state" / "last").iterdir())
        (Path(out) / "state_files.json").write_text(json.dumps(names))
        (run / "result.json").unlink()  # unfinished again: the next call resumes
    state.wait_for_everyone()
    # Epochs may grow on resume: this call continues from the epoch-1 state.
    train_splits(model, config(2), dataset, root, f"{out}/resumed", cpu=True)


@pytest.fixture(scope="module")
def runs(shared_data, tmp_path_factory):
    from accelerate import debug_launcher

    tmp = tmp_path_factory.mktemp("ddp-reward")
    labels, root = make_subset(shared_data, tmp, "pku-i2iqa", 8, per_prompt=4)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        debug_launcher(_worker, args=(str(labels), str(root), str(tmp)), num_processes=2)
    finally:
        torch.set_num_threads(n)
    return tmp


def test_every_rank_saves_its_random_states(runs):
    names = json.loads((runs / "state_files.json").read_text())
    assert {"rng_0.json", "rng_0.safetensors", "rng_1.json", "rng_1.safetensors"} <= set(names)
    assert not [n for n in names if n.endswith((".pkl", ".bin", ".pt"))]  # no pickle
    progress = json.loads((runs / "resumed/split_0/state/last/progress.json").read_text())
    assert progress["num_processes"] == 2


def test_two_process_resume_matches_the_uninterrupted_run(runs):
    for part in ("state/last/model.safetensors", "best/model.safetensors"):
        full = load_file(str(runs / "full/split_0" / part))
        resumed = load_file(str(runs / "resumed/split_0" / part))
        assert full.keys() == resumed.keys()
        for k in full:
            assert torch.equal(full[k], resumed[k]), k
    ra = json.loads((runs / "full/split_0/result.json").read_text())
    rb = json.loads((runs / "resumed/split_0/result.json").read_text())
    assert [h["epoch"] for h in rb["history"]] == [0, 1]
    assert rb["history"] == ra["history"] and rb["test"] == ra["test"]
