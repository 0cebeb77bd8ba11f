"""Offline checkpoint evaluation (``hyperalign eval-checkpoints``, rlhf.evaluation) on the tiny
offline pipeline."""

import csv
import json
import re
import warnings

import numpy as np
import pytest
import torch

from hyperalign.cli import main as cli
from rlhf.evaluation.generation import checkpoint_names
from rlhf.evaluation.prompt_sets import load_prompt_set
from rlhf.pipeline import check_lora_fits


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
        load_prompt_set("no-such-set")
    with pytest.raises(FileNotFoundError, match="DrawBench"):
        load_prompt_set("drawbench")
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
        check_lora_fits(pipe, bad)


def test_checkpoint_names_of_a_run(tmp_path):
    for sub in ("run/checkpoints/checkpoint_00008/lora", "run/lora", "other/lora"):
        (tmp_path / sub).mkdir(parents=True)
    names = checkpoint_names(
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
    items = load_prompt_set("shapes", limit=10)
    assert len(items) == 10 and {it.prompt for it in items} <= held
    assert {it.category for it in items} <= {"single", "multi", "count", "relation"}


def _gen_args(pipeline_dirs, prompts, out, *extra):
    return [
        "--pipeline", str(pipeline_dirs / "pipe"), "--prompts", str(prompts),
        "--images-per-prompt", "1", "--steps", "2", "--reward", "tiny-random",
        "--critic", "brightness", "--out", str(out), "--device", "cpu", *extra,
    ]  # fmt: skip


def test_cache_is_keyed_by_the_prompts(pipeline_dirs, tmp_path, capsys):
    """Another prompt file into the same --out regenerates (it reused the first run's images,
    scoring them against the new prompts)."""
    from PIL import Image

    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text("a photo of a cat\na photo of a dog\n")
    second.write_text("a photo of a zebra\na photo of a whale\n")
    out = tmp_path / "eval"
    assert _run(_gen_args(pipeline_dirs, first, out)) == 0
    assert "base: generated 2 images" in capsys.readouterr().err
    old_pixels = {
        r["prompt"]: np.asarray(Image.open(r["image"]))
        for r in json.loads((out / "scores.json").read_text())["records"]
    }
    assert _run(_gen_args(pipeline_dirs, second, out)) == 0
    assert "base: generated 2 images, reused 0 cached" in capsys.readouterr().err
    recs = json.loads((out / "scores.json").read_text())["records"]
    assert {r["prompt"] for r in recs} == {"a photo of a zebra", "a photo of a whale"}
    new_pixels = [np.asarray(Image.open(r["image"])) for r in recs]
    assert not any((a == b).all() for a in old_pixels.values() for b in new_pixels)
    # Only this run's images stay in the cache folder, listed in its manifest.
    manifest = json.loads((out / "images" / "base" / "manifest.json").read_text())
    assert sorted(v["prompt"] for v in manifest["images"].values()) == sorted(
        r["prompt"] for r in recs
    )
    assert len(list((out / "images" / "base").glob("*.png"))) == 2
    # Other settings (steps) regenerate too; the same ones reuse.
    assert _run(_gen_args(pipeline_dirs, second, out)) == 0
    assert "reused 2 cached" in capsys.readouterr().err
    args = _gen_args(pipeline_dirs, second, out)
    args[args.index("--steps") + 1] = "3"
    assert _run(args) == 0
    assert "base: generated 2 images, reused 0 cached" in capsys.readouterr().err


def test_truncated_lora_is_named_before_any_image_is_generated(pipeline_dirs, tmp_path):
    lora = next((pipeline_dirs / "lora_epoch1").glob("*.safetensors"))
    data = lora.read_bytes()
    bad = tmp_path / "cut_lora.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "eval"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    with pytest.raises(ValueError, match=r"cut_lora\.safetensors.*truncated"):
        _run(_gen_args(pipeline_dirs, prompts, out, "--lora", str(bad)))
    assert not list(out.rglob("*.png"))  # the base checkpoint generated nothing
    # A LoRA that does not fit the UNet is refused before generating too.
    from safetensors.torch import load_file, save_file

    state = load_file(lora)
    key = next(k for k in state if k.endswith(("lora_A.weight", "lora.down.weight")))
    state[key] = torch.zeros(state[key].shape[0], state[key].shape[1] + 3)
    save_file(state, tmp_path / "wide_lora.safetensors")
    with pytest.raises(ValueError, match=r"wide_lora\.safetensors.*does not fit"):
        _run(
            _gen_args(
                pipeline_dirs, prompts, out, "--lora", str(tmp_path / "wide_lora.safetensors")
            )
        )
    assert not list(out.rglob("*.png"))


def test_lora_with_nan_weights_is_refused(pipeline_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    from rlhf.pipeline import check_lora_file

    lora = next((pipeline_dirs / "lora_epoch1").glob("*.safetensors"))
    state = load_file(lora)
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, tmp_path / "nan_lora.safetensors")
    with pytest.raises(ValueError, match=r"nan_lora\.safetensors holds non-finite weights"):
        check_lora_file(tmp_path / "nan_lora.safetensors")
    assert check_lora_file(pipeline_dirs / "lora_epoch1") == lora
