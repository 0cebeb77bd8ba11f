"""hyperalign.common: atomic files, the recoverable directory swap, images, dtypes."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hyperalign import common


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_json_is_strict_and_readable_by_others(tmp_path):
    path = tmp_path / "m.json"
    common.atomic_write_json(
        path, {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(2)}
    )
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": None,
        "b": [1.0, None],
        "c": 2.0,
    }
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~_umask(), oct(mode)
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary left


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_replace_dir_in_one_process(tmp_path):
    target = tmp_path / "ckpt"
    for content in ("one", "two"):
        tmp = common.make_tmp_dir(target)
        (tmp / "f.txt").write_text(content)
        common.replace_dir(tmp, target)
        assert (target / "f.txt").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    target = tmp_path / "ckpt"
    pid = _dead_pid()
    old = tmp_path / f".ckpt.old-{pid}"
    old.mkdir()
    (old / "f.txt").write_text("previous")  # the swap died after renaming target away
    for k in range(20):  # and twenty killed writers left their temporary folders
        (tmp_path / f".ckpt.tmp-{pid}-{k}").mkdir()
    assert common.recover_dir(target) == target
    assert (target / "f.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_live_writers_are_left_alone(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    mine = common.make_tmp_dir(target)  # this process is still writing it
    common.recover_dir(target)
    assert mine.is_dir()


def test_load_image_composites_alpha(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red, but fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    Image.fromarray(rgba[..., :3]).save(tmp_path / "o.png")
    transparent = common.load_image(tmp_path / "t.png")
    opaque = common.load_image(tmp_path / "o.png")
    assert transparent.shape == (3, 4, 4)
    torch.testing.assert_close(transparent, torch.ones(3, 4, 4))  # the white background
    assert opaque[0].min() == 1 and opaque[1].max() == 0
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        common.load_image(tmp_path / "bad.png")


def test_parse_dtype_one_vocabulary():
    assert common.parse_dtype("fp16") is common.parse_dtype("half") is torch.float16
    assert common.parse_dtype("bfloat16") is common.parse_dtype("bf16") is torch.bfloat16
    assert common.parse_dtype("no") is common.parse_dtype("float32") is torch.float32
    assert common.parse_dtype(None) is None
    with pytest.raises(ValueError, match="valid names"):
        common.parse_dtype("fp8")


def test_list_images_names_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        common.list_images([tmp_path / "nope"])
    with pytest.raises(ValueError, match="no images"):
        common.list_images([tmp_path])
