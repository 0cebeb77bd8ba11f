"""``hyperalign eval-checkpoints --images``: CSVs as other tools write them, pairing, reports."""

import csv
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from hyperalign.cli import main as cli
from rlhf.evaluation.ingest import records_from_images
from rlhf.evaluation.report import best_worst_names, file_stem


def _strict(text: str):
    """json.loads that refuses NaN and infinities, as JavaScript's JSON.parse does."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _run(*args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cli(["eval-checkpoints", "--debug", "--reward", "tiny-random", "--device", "cpu",
                    "--critic", "brightness", *args])  # fmt: skip


def _images(folder, n):
    """``n`` distinct small PNGs (grey levels) in ``folder``; their names."""
    names = []
    for i in range(n):
        Image.fromarray(np.full((16, 16, 3), 30 * i + 10, np.uint8)).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names


def _write_csv(path, rows, encoding="utf-8"):
    with path.open("w", newline="", encoding=encoding) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _two_identical_checkpoints(tmp_path, with_seed: bool):
    """Checkpoints A and B with the very same images: 2 prompts x 2 images each."""
    names = _images(tmp_path, 4)
    rows = []
    for ck in ("A", "B"):
        for i, name in enumerate(names):
            row = {"image": name, "prompt": f"prompt {i // 2}", "checkpoint": ck}
            if with_seed:
                row["seed"] = str(100 + i)
            rows.append(row)
    return _write_csv(tmp_path / "images.csv", rows)


def test_images_without_seeds_are_not_paired_wrongly(tmp_path, capsys):
    """Without a seed column, several images per prompt cannot be matched across checkpoints:
    no paired difference is reported (it reported B - A = +0.22 for identical images)."""
    csv_path = _two_identical_checkpoints(tmp_path, with_seed=False)
    assert _run("--images", str(csv_path), "--out", str(tmp_path / "o")) == 0
    payload = json.loads((tmp_path / "o" / "scores.json").read_text())
    assert payload["summary"]["paired"] == {}
    note = payload["summary"]["pairing_note"]
    assert "seed" in note and "'A'" in note
    assert note in capsys.readouterr().out
    assert "no paired differences" in (tmp_path / "o" / "report.md").read_text()
    for r in payload["records"]:
        assert r["seed"] is None


def test_images_with_seeds_pair_by_seed(tmp_path):
    csv_path = _two_identical_checkpoints(tmp_path, with_seed=True)
    assert _run("--images", str(csv_path), "--out", str(tmp_path / "o")) == 0
    summary = json.loads((tmp_path / "o" / "scores.json").read_text())["summary"]
    assert summary["pairing_note"] is None
    for name in ("hyperalign", "brightness"):
        mean, lo, hi, n = summary["paired"]["B"][name]
        assert n == 4 and mean == lo == hi == 0.0  # identical images: exactly no difference


def test_one_unseeded_image_per_prompt_pairs_by_prompt(tmp_path):
    names = _images(tmp_path, 2)
    rows = [
        {"image": names[0], "prompt": "p0", "checkpoint": "A"},
        {"image": names[1], "prompt": "p1", "checkpoint": "A"},
        {"image": names[1], "prompt": "p0", "checkpoint": "B"},
        {"image": names[0], "prompt": "p1", "checkpoint": "B"},
    ]
    _write_csv(tmp_path / "x.csv", rows)
    assert _run("--images", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o")) == 0
    summary = json.loads((tmp_path / "o" / "scores.json").read_text())["summary"]
    mean, lo, hi, n = summary["paired"]["B"]["brightness"]
    assert n == 2 and mean == pytest.approx(0.0, abs=1e-6) and lo < 0 < hi  # swapped images


def test_duplicate_rows_are_refused(tmp_path):
    names = _images(tmp_path, 2)
    rows = [{"image": n, "prompt": "p"} for n in names] + [{"image": names[0], "prompt": "p"}]
    _write_csv(tmp_path / "dup.csv", rows)
    with pytest.raises(ValueError, match=r"line 4 repeats the image of line 2.*counted twice"):
        records_from_images(tmp_path / "dup.csv")
    rows = [
        {"image": names[0], "prompt": "p", "seed": "7"},
        {"image": names[1], "prompt": "p", "seed": "7"},
    ]
    _write_csv(tmp_path / "same_seed.csv", rows)
    with pytest.raises(ValueError, match=r"line 3 and line 2 give checkpoint 'images' two images"):
        records_from_images(tmp_path / "same_seed.csv")
    _write_csv(tmp_path / "bad_seed.csv", [{"image": names[0], "prompt": "p", "seed": "x"}])
    with pytest.raises(ValueError, match=r"line 2: seed 'x' is not an integer"):
        records_from_images(tmp_path / "bad_seed.csv")


def test_utf8_bom_csv_is_accepted_and_latin1_is_named(tmp_path):
    names = _images(tmp_path, 2)
    rows = [{"image": n, "prompt": "un café"} for n in names]
    recs = records_from_images(_write_csv(tmp_path / "bom.csv", rows, encoding="utf-8-sig"))
    assert [r["prompt"] for r in recs] == ["un café", "un café"]
    latin = _write_csv(tmp_path / "latin.csv", rows, encoding="latin-1")
    with pytest.raises(ValueError, match=r"latin\.csv is not UTF-8"):
        records_from_images(latin)


def test_slash_in_checkpoint_name_and_strict_json(tmp_path):
    """A checkpoint named like a path gets a safe grid file name; checkpoints without shared
    prompts give an empty paired difference, written as null, not NaN."""
    names = _images(tmp_path, 2)
    rows = [
        {"image": names[0], "prompt": "p0", "checkpoint": "runs/a"},
        {"image": names[1], "prompt": "p1", "checkpoint": "runs/b"},
    ]
    _write_csv(tmp_path / "x.csv", rows)
    out = tmp_path / "o"
    assert _run("--images", str(tmp_path / "x.csv"), "--out", str(out)) == 0
    assert (out / "grid_best_worst_runs_a.png").is_file()
    assert (out / "grid_best_worst_runs_b.png").is_file()
    assert "grid_best_worst_runs_a.png" in (out / "report.md").read_text()
    payload = _strict((out / "scores.json").read_text())
    assert payload["summary"]["paired"]["runs/b"]["brightness"] == [None, None, None, 0]


def test_grid_file_names_are_safe_and_distinct():
    assert file_stem("../x/y z") == "_x_y_z"
    names = best_worst_names(["a/b", "a_b", "a b"])
    assert len(set(names.values())) == 3
    assert all("/" not in n for n in names.values())


def test_one_checkpoint_has_no_pairing_note(tmp_path):
    from rlhf.evaluation.report import pairing_problem

    recs = [
        {"checkpoint": "images", "prompt": "p", "prompt_index": 0, "seed": None},
        {"checkpoint": "images", "prompt": "p", "prompt_index": 0, "seed": None},
    ]
    assert pairing_problem(recs, ["images"]) is None
    recs += [{**r, "checkpoint": "other"} for r in recs]
    assert "several images for the same prompt" in pairing_problem(recs, ["images", "other"])
