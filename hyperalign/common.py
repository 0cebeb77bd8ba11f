"""Small helpers every package of the project uses: atomic files, images, dtypes, data paths.

One home for each of them, so that a fix (a file left half-written, an image mode that was
not handled, a dtype spelling) is made once.

- Files: :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json`
  (strict JSON: NaN and infinities become ``null``), :func:`save_png`, :func:`replace_dir`
  and :func:`recover_dir` (a recoverable directory swap).
- Images: :data:`IMAGE_SUFFIXES`, :func:`list_images`, :func:`load_image` (one decoder:
  alpha composited on a background, EXIF orientation applied).
- Precision: :func:`parse_dtype` (one vocabulary: ``fp32/float32/no``, ``fp16/float16/half``,
  ``bf16/bfloat16``).
- Data: :func:`shared_data_dir` (reference label files and prompt sets, from
  ``$HYPERALIGN_SHARED_DATA``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

# ---------------------------------------------------------------------------------- files


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    """A unique hidden temporary name next to ``path`` (same file system, so rename is atomic),
    with the permissions an ordinary ``open(path, "w")`` would give (``mkstemp`` makes 0600)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace``: a reader
    sees the old file or the whole new one, never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj):
    """``obj`` with every non-finite float (NaN, ±inf, also in numpy/torch scalars) as ``None``,
    so that strict JSON parsers (``JSON.parse``, ``jq``) accept the output."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return strict_json(obj.tolist())
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps_json(obj, indent: int | None = 2) -> str:
    """Strict JSON text (non-finite floats as ``null``; ``allow_nan=False`` enforces it)."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    """Write ``obj`` as strict JSON (see :func:`dumps_json`), atomically."""
    atomic_write_text(path, dumps_json(obj, indent) + "\n")


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Save a ``(H, W, 3)`` uint8 array as PNG, atomically."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, ".png")
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale_siblings(target: Path, kind: str) -> list[Path]:
    """``.{name}.{kind}-{pid}...`` folders next to ``target`` whose writing process is gone."""
    out = []
    prefix = f".{target.name}.{kind}-"
    if not target.parent.is_dir():
        return out
    for p in target.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        pid_text = p.name[len(prefix) :].split("-")[0]
        if not pid_text.isdigit():
            continue  # not named by this module
        pid = int(pid_text)
        if pid == os.getpid() and kind == "tmp":
            continue  # this process is still writing it
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another live process is writing it
        out.append(p)
    return out


def make_tmp_dir(target: str | os.PathLike) -> Path:
    """A fresh temporary folder next to ``target``, named so :func:`recover_dir` can clean it
    up if this process dies (``.{name}.tmp-{pid}-{random}``)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would (mkdtemp makes 0700)
    return Path(tmp)


def recover_dir(target: str | os.PathLike) -> Path:
    """Repair what an interrupted :func:`replace_dir` may have left, and return ``target``.

    A kill between the two renames of a swap leaves ``target`` missing and the previous copy
    under ``.{name}.old-{pid}``: it is moved back. Temporary folders and old copies of dead
    processes are deleted. Loaders call this before reading a directory checkpoint.
    """
    target = Path(target)
    olds = sorted(_stale_siblings(target, "old"), key=lambda p: p.stat().st_mtime)
    if not target.exists() and olds:
        os.replace(olds.pop(), target)  # the newest old copy is the last complete one
    for p in olds + _stale_siblings(target, "tmp"):
        shutil.rmtree(p, ignore_errors=True)
    return target


def replace_dir(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``target``, replacing an existing ``target``.

    The old copy is first renamed to ``.{name}.old-{pid}``; if the process dies between the
    two renames, :func:`recover_dir` (called by every loader) restores it. Leftovers of
    earlier interrupted swaps are cleaned up afterwards.
    """
    tmp, target = Path(tmp), Path(target)
    recover_dir(target)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    recover_dir(target)


# --------------------------------------------------------------------------------- images

IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
)
"""File suffixes (lower case) taken as images when a folder is listed."""

BACKGROUND = (255, 255, 255)
"""Colour that transparent pixels are composited on (white, as image viewers show them)."""


def list_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (one level, sorted) into image files; errors name the path."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image path {p} does not exist")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {list(paths)}")
    return files


def to_rgb(image, background: tuple[int, int, int] = BACKGROUND):
    """A PIL image as RGB: EXIF orientation applied, transparency composited on
    ``background`` (an alpha channel is not silently dropped)."""
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode one image file to a float tensor ``(3, H, W)`` in [0, 1] (RGB, see :func:`to_rgb`).

    Raises ``ValueError`` naming the file when it cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(to_rgb(im), dtype=np.uint8)  # (H, W, 3)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"cannot decode image {path}: {err}") from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


# ------------------------------------------------------------------------------ precision

_DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "no": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}

DTYPE_CHOICES: tuple[str, ...] = ("fp32", "fp16", "bf16")
"""The spellings shown on command lines (every alias in :func:`parse_dtype` is accepted)."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"float16"``/``"half"``, ``"bf16"``/``"bfloat16"``, ``"fp32"``/``"float32"``/
    ``"no"`` (accelerate's word for full precision) or a ``torch.dtype`` -> ``torch.dtype``;
    ``None`` stays ``None``. Unknown names raise ``ValueError`` listing the valid ones."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; valid names: {', '.join(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[key]


# ----------------------------------------------------------------------------------- data

SHARED_DATA_ENV = "HYPERALIGN_SHARED_DATA"
"""Environment variable naming the reference-data folder (label files, prompt sets, pools)."""


def shared_data_dir() -> Path:
    """The reference-data folder: ``$HYPERALIGN_SHARED_DATA``, else ``shared/data`` beside the
    repository checkout (where the project's development machines keep it). It may not
    exist; callers check and say how to point to it."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"
