"""``hyperalign shapes-data``: the manifest, and ``--overwrite`` replacing only its own datasets."""

from __future__ import annotations

import json

import pytest

from hyperalign.cli import main as cli
from shapes.dataset import FORMAT, MANIFEST, build_dataset, is_shapes_dataset, load_split

SMALL = ["--n-prompts", "4", "--image-size", "32"]


def shapes_data(out, *extra: str) -> int:
    return cli(["shapes-data", "--out", str(out), *SMALL, *extra])


def test_overwrite_leaves_a_folder_it_did_not_write_alone(tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\documentclass{book}")
    assert shapes_data(thesis, "--overwrite") == 2
    assert (thesis / "thesis.tex").read_text() == "\\documentclass{book}"
    assert sorted(p.name for p in thesis.iterdir()) == ["thesis.tex"]
    err = capsys.readouterr().err
    assert "not written by shapes-data" in err and "new --out" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftovers


def test_overwrite_refuses_a_dataset_that_holds_other_files(tmp_path, capsys):
    out = tmp_path / "ds"
    assert shapes_data(out, "--seed", "1") == 0
    (out / "notes.txt").write_text("mine")
    (out / "images" / "train" / "plot.pdf").write_bytes(b"%PDF")
    assert shapes_data(out, "--seed", "2", "--overwrite") == 2
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "images" / "train" / "plot.pdf").is_file()
    err = capsys.readouterr().err
    assert "images/train/plot.pdf" in err and "notes.txt" in err


def test_overwrite_replaces_its_own_dataset(tmp_path):
    out = tmp_path / "ds"
    assert shapes_data(out, "--seed", "1") == 0
    first = (out / "train.csv").read_bytes()
    assert shapes_data(out, "--seed", "2", "--overwrite") == 0
    assert (out / "train.csv").read_bytes() != first
    assert json.loads((out / MANIFEST).read_text())["config"]["seed"] == 2
    assert all(r.image.is_file() for r in load_split(out / "train.csv"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary or old copy


def test_existing_folder_without_overwrite_is_refused(tmp_path, capsys):
    out = tmp_path / "ds"
    assert shapes_data(out) == 0
    before = (out / "train.csv").read_bytes()
    assert shapes_data(out, "--seed", "5") == 2
    assert (out / "train.csv").read_bytes() == before
    assert "--overwrite" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "data.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not empty"):
        build_dataset(occupied)


def test_empty_folder_is_filled_and_a_file_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert shapes_data(empty, "--overwrite") == 0
    assert is_shapes_dataset(empty)
    meta = json.loads((empty / MANIFEST).read_text())
    assert meta["format"] == FORMAT and meta["rows"]["train"] > 0
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    assert shapes_data(a_file, "--overwrite") == 2
    assert a_file.read_text() == "keep"
