"""``hyperalign train-reward``: train HyperAlign on human alignment MOS (docs/hyperalign.md,
"Training protocol").

The paper's protocol (arXiv 2601.04614): CLIP ViT-B/16, batch 8, AdamW, 20 epochs, early
stopping (here on validation SRCC), prompt-disjoint splits (4:1 AGIQA-3K / AIGCIQA2023, 3:1
PKU-I2IQA), SRCC/PLCC on the test subset, mean ± std over repeated splits.

A run folder (``--out``) holds, per split ``split_<i>/``: ``best/`` (the checkpoint with the
best validation SRCC, ``HyperAlign.from_pretrained``-loadable), ``state/last/`` (the
resumable training state), ``logs/`` (TensorBoard), ``test/`` (metrics, predictions CSV,
scatter plot), ``run_config.json`` and ``result.json``; and ``summary.json`` / ``summary.md``
(mean ± std over splits). Re-running the same command resumes an interrupted run from its
last saved state; ``--restart`` starts over.

The training state is plain data, read back without unpickling anything (a state folder
cannot run code): ``model.safetensors`` (the trainable weights), ``optimizer.safetensors`` +
``optimizer.json`` (AdamW moments; hyper-parameters and structure), ``progress.json``
(epoch, step, best score, history, gradient-scaler state) and ``rng_<rank>.safetensors`` +
``rng_<rank>.json`` (torch, CUDA, numpy and Python random states of each process), see
``reward.train_state``. It is written into a temporary sibling folder and swapped in
(``hyperalign.common.replace_dir``) at every epoch end and every ``--checkpoint-every`` steps.

Examples (``$IQA`` stands for the folder holding the label files)::

    # one prompt-grouped split, paper settings, on a GPU machine
    accelerate launch -m hyperalign train-reward --dataset agiqa3k \\
        --labels $IQA/agiqa3k/data.csv --image-root AGIQA-3K/ --out runs/agiqa3k

    # 10 repeated splits, mean ± std
    hyperalign train-reward --dataset pku-i2iqa --labels $IQA/amff_splits/PKU-I2IQA/1 \\
        --image-root PKU-I2IQA/ --out runs/pku --splits 10

    # the ablation table (full, no entailment loss, static cone, no regressor, baseline)
    hyperalign train-reward --dataset aigciqa2023 --labels ... --image-root ... --out runs/abl \\
        --ablation all --splits 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch.utils.data import DataLoader, Sampler

from hyperalign.common import atomic_write_bytes, atomic_write_json, atomic_write_text, recover_dir

from .config import ENT_LOSSES, REGRESSOR_INPUTS, HyperAlignConfig
from .data import (
    IQADataset,
    PairDataset,
    Split,
    canonical_split,
    canonical_split_dirs,
    check_images,
    get_spec,
    load_dataset,
    prompt_split,
)
from .evaluate import add_data_arguments, evaluate_samples, format_table, make_loader
from .losses import hyperalign_loss
from .metrics import METRIC_NAMES, mean_std
from .model import HyperAlign
from .train_state import load_train_state, read_json, save_train_state

PARAM_GROUPS = ("head", "adapters", "backbone")
RANDOM_BACKBONE = "random_backbone.safetensors"  # pinned random towers (pretrained=None)


def _help(text: str, default=dataclasses.MISSING, **kwargs):
    """A dataclass field carrying its documentation (shown by ``--help``)."""
    if isinstance(default, (list, tuple, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": text}, **kwargs)
    return field(default=default, metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """How to train (the model itself is a ``HyperAlignConfig``). [ours] marks our choices."""

    epochs: int = _help("maximum number of epochs (paper: 20)", 20)
    batch_size: int = _help("prompt-image pairs per optimizer step, per process (paper: 8)", 8)
    eval_batch_size: int = _help("pairs per forward pass when scoring val/test", 32)
    lr_head: float = _help(
        "AdamW learning rate of the head: feature scales, curvature, modulation regressor or "
        "calibration scalars [ours]",
        1e-3,
    )
    lr_adapters: float = _help(
        "AdamW learning rate of the gated adapters (tuning=adapter) or LoRA weights (lora) [ours]",
        1e-4,
    )
    lr_backbone: float = _help(
        "AdamW learning rate of the CLIP towers when tuning=full [ours]", 1e-5
    )
    wd_head: float = _help(
        "AdamW weight decay of the head; 0 because its few scalars set the geometry [ours]", 0.0
    )
    wd_adapters: float = _help("AdamW weight decay of the adapters / LoRA weights [ours]", 1e-2)
    wd_backbone: float = _help("AdamW weight decay of the CLIP towers (tuning=full) [ours]", 1e-2)
    adam_betas: tuple[float, float] = _help("AdamW (beta1, beta2)", (0.9, 0.999))
    grad_clip: float = _help("clip the global gradient norm to this; 0 disables [ours]", 1.0)
    patience: int = _help(
        "early stopping: stop after this many epochs without a validation SRCC gain of more "
        "than min_delta [ours]",
        5,
    )
    min_delta: float = _help("smallest validation SRCC gain that counts as progress", 1e-4)
    val_fraction: float = _help(
        "share of the training prompts carved out (by prompt) for validation [ours]", 0.1
    )
    test_fraction: float | None = _help(
        "share of prompts held out for test; None: the dataset's (0.2 for 4:1, 0.25 for 3:1)",
        None,
    )
    canonical_splits: str | None = _help(
        "use AMFF-Net's split folders under this path (prompt-disjoint for AGIQA-3K: "
        "amff_splits/AGIQA-3K, split i = folder i+1) instead of our own prompt-grouped splits",
        None,
    )
    seed: int = _help("split i uses seed + i for both the split and the training", 0)
    num_workers: int = _help("image decoding worker processes per data loader", 4)
    mixed_precision: str = _help("accelerate mixed precision: no, fp16 or bf16", "no")
    checkpoint_every: int = _help(
        "also save the resumable state every this many optimizer steps (0: only at epoch ends)",
        500,
    )
    log_every: int = _help("log training losses every this many optimizer steps", 10)
    tensorboard: bool = _help("write TensorBoard logs to <run>/logs via accelerate", True)

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        for name in ("epochs", "batch_size", "eval_batch_size", "patience", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        self._check_optimizer_values()
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"TrainConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.test_fraction is not None and not 0 < self.test_fraction < 1:
            raise ValueError(
                f"TrainConfig.test_fraction must be in (0, 1), got {self.test_fraction}"
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(
                f"TrainConfig.mixed_precision={self.mixed_precision!r}: use no, fp16 or bf16"
            )

    def _check_optimizer_values(self) -> None:
        """Learning rates finite and > 0; weight decays, clip and min_delta finite and >= 0."""
        for g in PARAM_GROUPS:
            lr = getattr(self, f"lr_{g}")
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(
                    f"TrainConfig.lr_{g} (--lr-{g}) must be a finite number > 0, got {lr}"
                )
        for name in (*(f"wd_{g}" for g in PARAM_GROUPS), "grad_clip", "min_delta"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"TrainConfig.{name} (--{name.replace('_', '-')}) must be a finite number "
                    f">= 0, got {value}"
                )
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(
                f"TrainConfig.adam_betas must be two numbers in [0, 1), got {self.adam_betas}"
            )

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


# Fields whose change makes a saved state incompatible with the requested run.
_RESUME_KEYS = (
    "batch_size",
    "lr_head",
    "lr_adapters",
    "lr_backbone",
    "wd_head",
    "wd_adapters",
    "wd_backbone",
    "adam_betas",
    "grad_clip",
    "seed",
    "mixed_precision",
)

# Ablation rows (the paper's ablation table): name -> HyperAlignConfig overrides.
RAILS: dict[str, float] = {
    "text_min_radius": 1.5,
    "adapter_norm_cap": 1.5,
    "regressor_init_std": 0.01,
    "ent_warmup_epochs": 2.0,
}
"""The anti-collapse rails of ``HyperAlignConfig`` switched on together (the ``-rails`` rows)."""

ABLATIONS: dict[str, dict] = {
    "full": {},
    "no-entailment": {"ent_weight": 0.0},
    "static-cone": {"a_shrink": 0.0},
    "no-regressor": {"regressor": False},
    "baseline": {"ent_weight": 0.0, "regressor": False},
    "two-sided": {"ent_loss": "two-sided"},
    "membership": {"ent_loss": "membership"},
    "euclidean-two-sided": {"ent_loss": "two-sided", "regressor_input": "euclidean"},
    "euclidean-membership": {"ent_loss": "membership", "regressor_input": "euclidean"},
    "static-cone-two-sided": {"ent_loss": "two-sided", "a_shrink": 0.0},
    "static-cone-membership": {"ent_loss": "membership", "a_shrink": 0.0},
    "two-sided-rails": {"ent_loss": "two-sided", **RAILS},
    "euclidean-two-sided-rails": {"ent_loss": "two-sided", "regressor_input": "euclidean", **RAILS},
}


ZERO_SHOT_ROW = "zero-shot-cosine"
"""The ablation row that trains nothing: ``baseline`` at its initial weights (adapter gates 0,
so the features are CLIP's; ``softplus(alpha) * cos + beta``, an increasing map), which ranks
the test pairs exactly as the raw CLIP cosine does (the CLIPScore analogue)."""


# ------------------------------------------------------------------------------ pieces
def param_groups(model: HyperAlign, config: TrainConfig) -> list[dict]:
    """AdamW groups ``head`` / ``adapters`` / ``backbone`` with their lr and weight decay.

    ``adapters`` = the gated adapters and any LoRA weights; ``backbone`` = other trainable
    CLIP weights (tuning=full); ``head`` = everything else (scales, curvature, regressor).
    """
    groups: dict[str, list] = {g: [] for g in PARAM_GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("clip."):
            group = "adapters" if "lora_" in name else "backbone"
        elif name.startswith(("image_adapter.", "text_adapter.")):
            group = "adapters"
        else:
            group = "head"
        groups[group].append(p)
    return [
        {
            "name": g,
            "params": params,
            "lr": getattr(config, f"lr_{g}"),
            "weight_decay": getattr(config, f"wd_{g}"),
        }
        for g, params in groups.items()
        if params
    ]


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, ``(seed, epoch)`` -> order, independent of global RNG.

    ``skip`` drops the first indices of the current epoch (resuming mid-epoch).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g)[self.skip :].tolist())

    def __len__(self) -> int:
        return self.n - self.skip


@dataclass
class TrainState:
    """Progress of one split's training, saved as ``progress.json`` with the state."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    best_val_srcc: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0  # consecutive epochs without improvement
    stopped_early: bool = False
    running: dict = field(default_factory=dict)  # loss sums over the current epoch's steps
    history: list = field(default_factory=list)  # per-epoch dicts

    def state_dict(self) -> dict:
        """The fields as a dict (``best_val_srcc`` = -inf is written as ``null``)."""
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict, source: object = "progress") -> None:
        """Restore from :meth:`state_dict`; a missing, unknown or mistyped field is an error."""
        kinds = {
            "epoch": int,
            "step_in_epoch": int,
            "global_step": int,
            "best_val_srcc": (int, float, type(None)),
            "best_epoch": int,
            "bad_epochs": int,
            "stopped_early": bool,
            "running": dict,
            "history": list,
        }
        if not isinstance(state, dict) or set(state) != set(kinds):
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{source}: expected the fields {sorted(kinds)}, got {got}")
        for k, kind in kinds.items():
            bad_bool = kind is int and isinstance(state[k], bool)
            if not isinstance(state[k], kind) or bad_bool:
                raise ValueError(f"{source}: field {k!r} has the wrong type ({state[k]!r})")
        for k, v in state.items():
            setattr(self, k, v)
        if self.best_val_srcc is None:  # strict JSON has no -inf
            self.best_val_srcc = -math.inf


def _with_fingerprints(info: dict, split: Split, dataset: IQADataset) -> dict:
    """``info`` plus the SHA-256 fingerprints of the split's subsets and of the labels."""
    return {**info, "subsets_sha256": split.fingerprint(), "labels_sha256": dataset.fingerprint()}


def make_split(dataset: IQADataset, config: TrainConfig, index: int) -> tuple[Split, dict]:
    """Split ``index`` of a repeated-split run and the record that rebuilds (and checks) it."""
    seed = config.seed + index
    if config.canonical_splits:
        dirs = canonical_split_dirs(config.canonical_splits)
        if index >= len(dirs):
            raise ValueError(
                f"split {index} requested but {config.canonical_splits} has {len(dirs)} split "
                "folders; lower --splits"
            )
        split = canonical_split(dataset, dirs[index], config.val_fraction, seed)
        info = {"mode": split.mode, "dir": str(dirs[index].resolve()), "test_fraction": None}
    else:
        test_fraction = config.test_fraction or get_spec(dataset.name).test_fraction
        split = prompt_split(dataset, test_fraction, config.val_fraction, seed)
        info = {"mode": "prompt", "dir": None, "test_fraction": test_fraction}
    info.update(seed=seed, val_fraction=config.val_fraction)
    return split, _with_fingerprints(info, split, dataset)


def _flat(prefix: str, data: dict) -> dict:
    """Scalars only, for TensorBoard's hparams (None / tuples / dicts as strings)."""
    out = {}
    for k, v in data.items():
        if isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = json.dumps(v)
    return out


@dataclass
class _Run:
    """One split's training: what the steps below read and update."""

    config: TrainConfig
    dataset: IQADataset
    split: Split
    split_info: dict
    image_root: str | os.PathLike
    out: Path
    accelerator: Any
    model: Any = None  # prepared (possibly DDP-wrapped) HyperAlign
    optimizer: Any = None
    groups: list = field(default_factory=list)
    loader: Any = None
    sampler: EpochSampler | None = None
    val_loader: Any = None
    steps_per_epoch: int = 0
    state: TrainState = field(default_factory=TrainState)

    @property
    def state_dir(self) -> Path:
        return self.out / "state" / "last"

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def net(self) -> HyperAlign:
        """The unwrapped model."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def total_batch(self) -> int:
        return self.config.batch_size * self.accelerator.num_processes


# ------------------------------------------------------------------------------- train
def train(
    model_config: HyperAlignConfig,
    config: TrainConfig,
    dataset: IQADataset,
    split: Split,
    split_info: dict,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    cpu: bool = False,
    restart: bool = False,
    labels: str = "",
    zero_shot: bool = False,
) -> dict:
    """Train one split; returns ``result`` (best epoch, val SRCC, test metrics).

    Resumes from ``out_dir/state/last`` when present (unless ``restart``); a finished run
    (``result.json`` present) returns its stored result. ``zero_shot``: no training, the
    initial model is validated, saved as ``best`` and tested (the ``zero-shot-cosine`` row).
    """
    out = Path(out_dir)
    split_info = _with_fingerprints(split_info, split, dataset)
    accelerator = _make_accelerator(config, out, cpu)
    record = {
        "dataset": dataset.name,
        "labels": str(labels),
        "target_range": list(dataset.target_range),
        "split": {**split_info, **split.describe()},
        "model": model_config.to_dict(),
        "train": config.to_dict(),
        **({"zero_shot": True} if zero_shot else {}),
    }
    resume, finished = _open_run_folder(out, record, accelerator, restart)
    if finished is not None:
        return finished
    # Every image of every subset must be there before any training starts.
    check_images(split.train + split.val + split.test, image_root)
    run = _Run(config, dataset, split, split_info, image_root, out, accelerator)
    _build(run, model_config, labels)
    if resume:
        load_train_state(run)
        accelerator.print(
            f"resumed {out} at epoch {run.state.epoch}, step {run.state.step_in_epoch} of that "
            f"epoch (global step {run.state.global_step})"
        )
    _announce(run, model_config)
    if zero_shot:
        _validate(run)  # the untrained model becomes `best`
        run.state.epoch = 0  # no epoch was trained
    while not zero_shot and run.state.epoch < config.epochs and not run.state.stopped_early:
        _train_epoch(run)
        _validate(run)
        save_train_state(run)
    return _write_result(run, _final_test(run))


def _make_accelerator(config: TrainConfig, out: Path, cpu: bool):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    return Accelerator(
        mixed_precision=config.mixed_precision,
        cpu=cpu,
        log_with="tensorboard" if config.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )


def _open_run_folder(out: Path, record: dict, accelerator, restart: bool):
    """Set up ``out`` for this run: ``(resume, stored_result)``.

    ``restart`` first discards saved state and results. A saved state must belong to the
    same run (else an error); a finished run's ``result.json`` is returned as is.
    """
    if accelerator.is_main_process:
        if restart:
            _discard_run(out)
        recover_dir(out / "state" / "last")
    accelerator.wait_for_everyone()
    resume = (out / "state" / "last").is_dir()
    if resume:
        _check_same_run(out, record)
        if (out / "result.json").is_file():
            accelerator.print(f"{out}: finished earlier; reading result.json (--restart to redo)")
            return True, read_json(out / "result.json")
    elif accelerator.is_main_process:
        atomic_write_json(out / "run_config.json", record)
    return resume, None


def _discard_run(out: Path) -> None:
    """Delete a split folder's saved state, checkpoints and results (``--restart``)."""
    names = ("state", "best", "test", "result.json", "run_config.json", RANDOM_BACKBONE)
    for target in [out / n for n in names] + list(out.glob(".best.*")):
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def _build(run: _Run, model_config: HyperAlignConfig, labels: str) -> None:
    """Seed, then build the model, optimizer and loaders of ``run`` and prepare them."""
    from accelerate.utils import set_seed

    acc, config, dataset, split = run.accelerator, run.config, run.dataset, run.split
    set_seed(run.split_info["seed"])
    extra = dict(model_config.extra)
    extra.update(dataset=dataset.name, labels=str(labels), split=run.split_info)
    model_config = model_config.replace(target_range=dataset.target_range, extra=extra)
    model = HyperAlign(model_config, device=acc.device)
    if model_config.pretrained is None and model_config.tuning != "full":
        model = _pin_random_backbone(model, run.out, acc)
    run.groups = param_groups(model, config)
    optimizer = torch.optim.AdamW(run.groups, betas=config.adam_betas)
    train_data = PairDataset(split.train, run.image_root, model.image_size, dataset.target_range)
    run.sampler = EpochSampler(len(train_data), run.split_info["seed"])
    loader = DataLoader(
        train_data,
        batch_size=config.batch_size,
        sampler=run.sampler,
        num_workers=config.num_workers,
    )
    val_loader = make_loader(
        split.val,
        run.image_root,
        model.image_size,
        dataset.target_range,
        config.eval_batch_size,
        config.num_workers,
    )
    run.model, run.optimizer, run.loader, run.val_loader = acc.prepare(
        model, optimizer, loader, val_loader
    )
    run.steps_per_epoch = len(run.loader)


def _announce(run: _Run, model_config: HyperAlignConfig) -> None:
    """Print the run's sizes and start the TensorBoard tracker."""
    config, split = run.config, run.split
    counts = {g["name"]: sum(p.numel() for p in g["params"]) for g in run.groups}
    run.accelerator.print(
        f"{run.dataset.name} split {split.mode} seed {run.split_info['seed']}: "
        + ", ".join(
            f"{k} {v['images']} images / {v['prompts']} prompts"
            for k, v in split.describe().items()
            if isinstance(v, dict)
        )
        + f"; total batch {run.total_batch}, {run.steps_per_epoch} steps/epoch, up to "
        f"{config.epochs} epochs; trainable parameters {counts}"
    )
    if config.tensorboard:
        run.accelerator.init_trackers(
            "tensorboard",
            config={**_flat("model/", model_config.to_dict()), **_flat("train/", config.to_dict())},
        )


def _train_epoch(run: _Run) -> None:
    """The remaining optimizer steps of the current epoch (from ``step_in_epoch`` on)."""
    from tqdm.auto import tqdm

    state, config = run.state, run.config
    run.model.train()
    run.loader.set_epoch(state.epoch)
    run.sampler.skip = state.step_in_epoch * run.total_batch
    bar = tqdm(
        run.loader,
        total=run.steps_per_epoch,
        initial=state.step_in_epoch,
        desc=f"epoch {state.epoch + 1}/{config.epochs}",
        disable=not run.accelerator.is_local_main_process,
        leave=False,
    )
    head_config = run.net.config
    params = [p for g in run.groups for p in g["params"]]
    for batch in bar:
        out = run.model(batch["pixels"], list(batch["prompt"]))
        progress = state.epoch + state.step_in_epoch / run.steps_per_epoch
        loss, parts = hyperalign_loss(out, batch["target"], head_config, progress)
        run.accelerator.backward(loss)
        if config.grad_clip > 0:
            run.accelerator.clip_grad_norm_(params, config.grad_clip)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        state.step_in_epoch += 1
        state.global_step += 1
        for k, v in parts.items():
            state.running[k] = state.running.get(k, 0.0) + v
        if state.global_step % config.log_every == 0:
            logs = {f"train/{k}": v for k, v in parts.items()}
            logs.update({f"lr/{g['name']}": g["lr"] for g in run.optimizer.param_groups})
            run.accelerator.log(logs, step=state.global_step)
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
        if config.checkpoint_every and state.global_step % config.checkpoint_every == 0:
            save_train_state(run)
    run.sampler.skip = 0


def _validate(run: _Run) -> None:
    """Score the validation subset, keep the best checkpoint, record the epoch, and decide
    on early stopping."""
    state, config, acc = run.state, run.config, run.accelerator
    epoch, n_steps = state.epoch, max(state.step_in_epoch, 1)
    val = evaluate_samples(
        run.model,
        run.split.val,
        run.dataset,
        run.image_root,
        None,
        accelerator=acc,
        loader=run.val_loader,
    )
    score = val["srcc"] if math.isfinite(val["srcc"]) else -math.inf  # nan: constant preds
    # The first epoch always gives a best checkpoint, whatever its score.
    improved = state.best_epoch < 0 or score > state.best_val_srcc + config.min_delta
    if improved:
        state.best_val_srcc, state.best_epoch, state.bad_epochs = score, epoch, 0
        if run.main:
            _save_best(run, epoch, val)
    else:
        state.bad_epochs += 1
    entry = {
        "epoch": epoch,
        **{f"train_{k}": v / n_steps for k, v in state.running.items()},
        **{f"val_{k}": val[k] for k in METRIC_NAMES},
    }
    state.history.append(entry)
    acc.log({f"val/{k}": val[k] for k in METRIC_NAMES}, step=state.global_step)
    best = " (best)" if improved else f" (best {state.best_val_srcc:.4f} @ {state.best_epoch + 1})"
    acc.print(
        f"epoch {epoch + 1}: "
        + (f"train loss {entry['train_loss']:.4f}, " if "train_loss" in entry else "")
        + f"val SRCC {val['srcc']:.4f} PLCC {val['plcc_logistic']:.4f}"
        + best
    )
    state.epoch += 1
    state.step_in_epoch = 0
    state.running = {}
    if state.bad_epochs >= config.patience:
        state.stopped_early = True
        acc.print(f"early stop: no val SRCC gain for {config.patience} epochs")


def _save_best(run: _Run, epoch: int, val: dict) -> None:
    """Save the current model as ``best/`` with its validation scores in ``config.extra``."""
    net = run.net
    net.config.extra = {
        **net.config.extra,
        "best_epoch": epoch,
        "val_srcc": val["srcc"],
        "val_plcc": val["plcc_logistic"],
    }
    net.save_pretrained(run.out / "best")


def _final_test(run: _Run) -> dict:
    """Metrics of the best checkpoint on the test subset (files under ``test/``)."""
    acc = run.accelerator
    acc.wait_for_everyone()
    best = HyperAlign.from_pretrained(run.out / "best", device=acc.device).eval()
    return evaluate_samples(
        best,
        run.split.test,
        run.dataset,
        run.image_root,
        run.out / "test",
        batch_size=run.config.eval_batch_size,
        num_workers=run.config.num_workers,
        accelerator=acc,
        title=f"{run.dataset.name} test ({run.split.mode}, seed {run.split_info['seed']})",
    )


def _write_result(run: _Run, test: dict) -> dict:
    """Write ``result.json``, print the test metrics and close the trackers."""
    state, acc = run.state, run.accelerator
    result = {
        "dataset": run.dataset.name,
        "split": run.split_info,
        "best_epoch": state.best_epoch,
        "best_val_srcc": state.best_val_srcc,
        "epochs_run": state.epoch,
        "stopped_early": state.stopped_early,
        "test": test,
        "history": state.history,
    }
    if run.main:
        atomic_write_json(run.out / "result.json", result)
    acc.print(
        f"{run.out}: test SRCC {test['srcc']:.4f}, PLCC {test['plcc_logistic']:.4f} "
        f"(raw {test['plcc']:.4f}), KRCC {test['krcc']:.4f}, RMSE {test['rmse']:.4f}"
    )
    for tracker in acc.trackers:  # not end_training(): that ends the process group
        tracker.finish()
    acc.wait_for_everyone()
    return result


def _pin_random_backbone(model: HyperAlign, out: Path, accelerator) -> HyperAlign:
    """Random CLIP towers (``pretrained=None``) that are not trained are not in the checkpoint.

    Save them once to ``<run>/random_backbone.safetensors`` and rebuild the model from that
    file, so ``save_pretrained`` copies it along and every checkpoint reloads the same towers.
    """
    path = out / RANDOM_BACKBONE
    if accelerator.is_main_process and not path.is_file():
        state = {k: v.detach().contiguous().cpu() for k, v in model.clip.state_dict().items()}
        atomic_write_bytes(path, save(state))
    accelerator.wait_for_everyone()
    config = model.config.replace(pretrained=RANDOM_BACKBONE)
    return HyperAlign(config, device=accelerator.device, base_dir=out)


def _check_same_run(out: Path, record: dict) -> None:
    """A saved state may only be resumed by the same run (model, data, split, optimisation)."""
    path = out / "run_config.json"
    if not path.is_file():
        raise ValueError(f"{out} holds a saved state but no run_config.json; pass --restart")
    saved = read_json(path)
    record = json.loads(json.dumps(record))  # tuples -> lists, as stored
    diffs = [k for k in ("dataset", "target_range", "split", "model") if saved.get(k) != record[k]]
    diffs += [
        f"train.{k}" for k in _RESUME_KEYS if saved.get("train", {}).get(k) != record["train"][k]
    ]
    if diffs:
        raise ValueError(
            f"{out} holds a run with different settings ({', '.join(diffs)}); pass --restart to "
            "discard it, or choose another --out"
        )


def train_splits(
    model_config: HyperAlignConfig,
    config: TrainConfig,
    dataset: IQADataset,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    n_splits: int = 1,
    **kwargs,
) -> dict:
    """``n_splits`` repeated splits (seeds ``seed .. seed + n - 1``); mean ± std of test metrics."""
    if n_splits < 1:
        raise ValueError(f"--splits must be >= 1, got {n_splits}")
    out = Path(out_dir)
    results = []
    for i in range(n_splits):
        split, info = make_split(dataset, config, i)
        results.append(
            train(
                model_config, config, dataset, split, info, image_root, out / f"split_{i}", **kwargs
            )
        )
    tests = [r["test"] for r in results]
    summary = {
        "dataset": dataset.name,
        "splits": n_splits,
        "mean_std": {k: list(v) for k, v in mean_std(tests).items()},
        "per_split": tests,
    }
    atomic_write_json(out / "summary.json", summary)
    table = format_table(
        {**{f"split_{i}": t for i, t in enumerate(tests)}, "mean ± std": mean_std(tests)}
    )
    atomic_write_text(out / "summary.md", table + "\n")
    print(table)
    return summary


def run_ablations(
    names: Sequence[str],
    model_config: HyperAlignConfig,
    config: TrainConfig,
    dataset: IQADataset,
    image_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    n_splits: int = 1,
    **kwargs,
) -> dict:
    """Each ablation row on the same splits; a Markdown table of test mean ± std per row."""
    valid = [*ABLATIONS, ZERO_SHOT_ROW]
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ValueError(f"unknown ablation(s) {unknown}; valid: {', '.join(valid)}, all")
    out = Path(out_dir)
    rows = {}
    for name in names:
        zero_shot = name == ZERO_SHOT_ROW
        variant = model_config.replace(**ABLATIONS["baseline" if zero_shot else name])
        summary = train_splits(
            variant,
            config,
            dataset,
            image_root,
            out / name,
            n_splits,
            zero_shot=zero_shot,
            **kwargs,
        )
        rows[name] = {k: tuple(v) for k, v in summary["mean_std"].items()}
    table = format_table(rows, ("srcc", "plcc_logistic", "plcc", "krcc", "rmse"))
    atomic_write_text(out / "ablation.md", table + "\n")
    atomic_write_json(
        out / "ablation.json", {k: {m: list(v) for m, v in r.items()} for k, r in rows.items()}
    )
    print(f"\nablation on {dataset.name}, {n_splits} split(s), test mean ± std:\n{table}")
    return rows


# ----------------------------------------------------------------------------------- CLI
EPILOG = """examples ($IQA: the folder holding the label files):
  hyperalign train-reward --dataset agiqa3k --labels $IQA/agiqa3k/data.csv \\
      --image-root /data/AGIQA-3K --out runs/agiqa3k --splits 10
  hyperalign train-reward --dataset aigciqa2023 --labels $IQA/amff_splits/AIGCIQA2023/1 \\
      --image-root /data/AIGCIQA2023 --out runs/abl --ablation all
  accelerate launch -m hyperalign train-reward ...   (same options; multi-GPU / mixed precision)

Re-running a command resumes it from <out>/split_<i>/state/last; --restart starts over.
The checkpoint to use afterwards is <out>/split_<i>/best (hyperalign score/eval-reward --model).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train-reward`` options: data, run folder, model and every ``TrainConfig`` field."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_data_arguments(parser)
    parser.add_argument("--out", required=True, help="run folder (created; resumed if present)")
    parser.add_argument(
        "--splits", type=int, default=1, help="repeated splits; reports mean ± std (default: 1)"
    )
    parser.add_argument(
        "--ablation",
        default=None,
        help=f"comma-separated ablation rows or 'all' ({ZERO_SHOT_ROW}, {', '.join(ABLATIONS)}); each row trains "
        "--splits splits into <out>/<row>/ and a table goes to <out>/ablation.md",
    )
    parser.add_argument("--restart", action="store_true", help="discard saved state and results")
    parser.add_argument("--cpu", action="store_true", help="train on CPU even if a GPU is present")

    model = parser.add_argument_group("model (HyperAlignConfig)")
    model.add_argument("--backbone", default="ViT-B-16", help="open_clip architecture or hub id")
    model.add_argument(
        "--pretrained", default="openai", help="open_clip tag or weights file; 'none' = random"
    )
    model.add_argument(
        "--tuning",
        default="adapter",
        choices=["adapter", "lora", "full", "frozen"],
        help="how the CLIP towers are trained (default: %(default)s)",
    )
    model.add_argument(
        "--model-config",
        default=None,
        help='JSON file of further HyperAlignConfig fields (e.g. {"k": 0.1, "reg_loss": "l1"})',
    )
    model.add_argument(
        "--no-entailment", action="store_true", help="ablation: entailment loss off (ent_weight 0)"
    )
    model.add_argument(
        "--static-cone",
        action="store_true",
        help="ablation: no score-dependent shrink (a_shrink 0)",
    )
    model.add_argument(
        "--no-regressor",
        action="store_true",
        help="ablation: calibrated cosine instead of the modulation regressor",
    )
    model.add_argument(
        "--ent-loss",
        choices=ENT_LOSSES,
        default=None,
        help="entailment loss form (HyperAlignConfig.ent_loss; default one-sided)",
    )
    model.add_argument(
        "--regressor-input",
        choices=REGRESSOR_INPUTS,
        default=None,
        help="what the regressor reads: cone geometry, or the Euclidean control",
    )

    train_group = parser.add_argument_group("training (TrainConfig)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata["help"] + " (default: %(default)s)"
        if f.type in ("bool", bool):
            train_group.add_argument(
                flag, default=f.default, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif f.name == "adam_betas":
            train_group.add_argument(
                flag, type=float, nargs=2, default=f.default_factory(), help=help_text
            )
        elif f.name in ("test_fraction",):
            train_group.add_argument(flag, type=float, default=f.default, help=help_text)
        elif f.name == "mixed_precision":
            train_group.add_argument(
                flag, default=f.default, choices=["no", "fp16", "bf16"], help=help_text
            )
        elif f.name == "canonical_splits":
            train_group.add_argument(flag, default=f.default, help=help_text)
        else:
            train_group.add_argument(flag, type=type(f.default), default=f.default, help=help_text)


def _read_model_config(path: str) -> dict:
    """The ``--model-config`` JSON object; errors name the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--model-config {path} does not exist") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--model-config {path} is not valid UTF-8 JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(
            f"--model-config {path} must hold a JSON object of HyperAlignConfig fields, got "
            f"{type(data).__name__}"
        )
    return data


def configs_from_args(args: argparse.Namespace) -> tuple[HyperAlignConfig, TrainConfig]:
    """The model and training configs a ``train-reward`` command line asks for."""
    overrides: dict = {}
    if args.model_config:
        overrides.update(_read_model_config(args.model_config))
    pretrained = None if str(args.pretrained).lower() == "none" else args.pretrained
    overrides.update(backbone=args.backbone, pretrained=pretrained, tuning=args.tuning)
    if args.no_entailment:
        overrides["ent_weight"] = 0.0
    if args.static_cone:
        overrides["a_shrink"] = 0.0
    if args.no_regressor:
        overrides["regressor"] = False
    for name in ("ent_loss", "regressor_input"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    model_config = HyperAlignConfig.from_dict(overrides)
    train_config = TrainConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    )
    return model_config, train_config


def run(args: argparse.Namespace) -> int:
    """Train the requested splits (or ablation rows); 0 on success."""
    model_config, train_config = configs_from_args(args)
    dataset = load_dataset(args.dataset, args.labels, args.format)
    kwargs = {"cpu": args.cpu, "restart": args.restart, "labels": str(args.labels)}
    try:
        if args.ablation:
            names = (
                [ZERO_SHOT_ROW, *ABLATIONS] if args.ablation == "all" else args.ablation.split(",")
            )
            run_ablations(
                names,
                model_config,
                train_config,
                dataset,
                args.image_root,
                args.out,
                args.splits,
                **kwargs,
            )
        else:
            train_splits(
                model_config,
                train_config,
                dataset,
                args.image_root,
                args.out,
                args.splits,
                **kwargs,
            )
    finally:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            PartialState().destroy_process_group()
    return 0


__all__ = [
    "ABLATIONS",
    "EpochSampler",
    "TrainConfig",
    "TrainState",
    "make_split",
    "param_groups",
    "run_ablations",
    "train",
    "train_splits",
]
