"""Offline checkpoint evaluation (rlhf.checkpoint_eval) on the tiny offline pipeline."""

import csv
import json
import re
import warnings

import numpy as np
import pytest
import torch

from hyperalign.cli import main as cli
from rlhf import checkpoint_eval as ce


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """A tiny pipeline saved to disk and a LoRA for it that changes the output."""
    from peft import LoraConfig

    from rlhf.tiny import build_tiny_pipeline
    from rlhf.trainer import save_lora_diffusers

    root = tmp_path_factory.mktemp("pipes")
    pipe = build_tiny_pipeline(seed=0)
    pipe.save_pretrained(root / "pipe")
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    save_lora_diffusers(pipe.unet, root / "lora_epoch1")
    return root


def _run(args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli(["eval-checkpoints", "--debug", *args])


def test_two_checkpoints_paired_and_cached(pipeline_dirs, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [
        "--pipeline", str(pipeline_dirs / "pipe"), "--lora", str(pipeline_dirs / "lora_epoch1"),
        "--prompts", "animals", "--limit", "3", "--images-per-prompt", "2", "--steps", "2",
        "--reward", "tiny-random", "--critic", "brightness", "--batch-size", "4",
        "--out", str(out), "--device", "cpu",
    ]  # fmt: skip
    assert _run(args) == 0
    err = capsys.readouterr().err
    assert "base: generated 6 images" in err and "lora_epoch1: generated 6 images" in err
    payload = json.loads((out / "scores.json").read_text())
    recs = payload["records"]
    assert len(recs) == 12
    base = {(r["prompt_index"], r["seed"]): r for r in recs if r["checkpoint"] == "base"}
    lora = {(r["prompt_index"], r["seed"]): r for r in recs if r["checkpoint"] == "lora_epoch1"}
    assert base.keys() == lora.keys()  # same prompts and seeds for both checkpoints
    # The LoRA changes the images, and the paired difference is over matching pairs.
    diffs = [lora[k]["score_brightness"] - base[k]["score_brightness"] for k in base]
    assert any(abs(d) > 1e-4 for d in diffs)
    mean, lo, hi, n = payload["summary"]["paired"]["lora_epoch1"]["brightness"]
    assert n == 6 and mean == pytest.approx(np.mean(diffs), abs=1e-9)
    assert lo <= mean <= hi
    for ck in ("base", "lora_epoch1"):
        m, lo, hi, n = payload["summary"]["overall"][ck]["hyperalign"]
        assert lo <= m <= hi and n == 6
    for name in (
        "report.md",
        "scores.csv",
        "grid_across_checkpoints.png",
        "grid_best_worst_base.png",
    ):
        assert (out / name).is_file(), name
    assert "Paired difference" in (out / "report.md").read_text()
    # Re-scoring with another reward reuses the cached images.
    before = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert _run([*args[:-4], "--critic", "brightness", "--out", str(out), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "generated 0 images, reused 6 cached" in err
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == before


def test_score_existing_images_and_bad_files(tmp_path, capsys):
    from PIL import Image

    rows = []
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": f"prompt {i % 2}"})
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows.append({"image": "broken.png", "prompt": "prompt 0"})
    with (tmp_path / "images.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "prompt"])
        w.writeheader()
        w.writerows(rows)
    base = ["--images", str(tmp_path / "images.csv"), "--reward", "tiny-random", "--device", "cpu"]
    with pytest.raises(ValueError, match=r"broken\.png.*--skip-bad"):
        _run([*base, "--out", str(tmp_path / "o1")])
    assert _run([*base, "--skip-bad", "--critic", "brightness", "--out", str(tmp_path / "o2")]) == 0
    assert "skipping unreadable image" in capsys.readouterr().err
    recs = json.loads((tmp_path / "o2" / "scores.json").read_text())["records"]
    assert len(recs) == 4
    got = sorted(r["score_brightness"] for r in recs)
    assert got == pytest.approx([0.0, 40 / 255, 80 / 255, 120 / 255], abs=1e-5)


def test_bad_prompt_set_and_lora(pipeline_dirs, tmp_path):
    with pytest.raises(ValueError, match="animals.*parti.*drawbench.*shapes"):
        ce.load_prompt_set("no-such-set")
    with pytest.raises(FileNotFoundError, match="DrawBench"):
        ce.load_prompt_set("drawbench")
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    lora = next((pipeline_dirs / "lora_epoch1").glob("*.safetensors"))
    state = load_file(lora)
    key = next(k for k in state if k.endswith(("lora_A.weight", "lora.down.weight")))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 3)
    bad = tmp_path / "bad_lora.safetensors"
    save_file(state, bad)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dirs / "pipe")
    with pytest.raises(ValueError, match=rf"bad_lora\.safetensors.*{re.escape(key)}"):
        ce.check_lora_fits(pipe, bad)


def test_bootstrap_interval_contains_mean():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=200)
    mean, lo, hi = ce.bootstrap_ci(x)
    assert lo < mean < hi and mean == pytest.approx(x.mean())
    # Width close to the normal-theory 95 % interval.
    assert (hi - lo) == pytest.approx(2 * 1.96 * x.std() / np.sqrt(x.size), rel=0.15)


def test_checkpoint_names_of_a_run(tmp_path):
    for sub in ("run/checkpoints/checkpoint_00008/lora", "run/lora", "other/lora"):
        (tmp_path / sub).mkdir(parents=True)
    names = ce._checkpoint_names(
        [str(tmp_path / "run/checkpoints/checkpoint_00008/lora"), str(tmp_path / "run/lora"),
         str(tmp_path / "other/lora")],
        with_base=True,
    )  # fmt: skip
    assert [n for n, _ in names] == ["base", "checkpoint_00008", "run", "other"]


def test_shapes_prompt_set_is_held_out_from_the_shipped_pipeline():
    from rlhf.demo import DEFAULT_PIPELINE

    if not (DEFAULT_PIPELINE / "heldout_prompts.json").is_file():
        pytest.skip("shipped shapes pipeline not built")
    held = set(json.loads((DEFAULT_PIPELINE / "heldout_prompts.json").read_text()))
    items = ce.load_prompt_set("shapes", limit=10)
    assert len(items) == 10 and {it.prompt for it in items} <= held
    assert {it.category for it in items} <= {"single", "multi", "count", "relation"}
