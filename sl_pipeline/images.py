"""Image files as training data: a folder with one sub-folder per class, or a CSV of paths.

Files are decoded with Pillow one at a time into a preallocated array of ``model.in_shape``
(channels, height, width; 1 channel = greyscale, 3 = RGB), scaled to [0, 1]. When the decoded
set would exceed ``data.max_memory_mb`` the array is a memory-mapped temporary file (and so
are its train/test splits, :func:`sl_pipeline.data.take_rows`), so a large folder is streamed
through memory a batch at a time rather than held whole. An image of another size
is refused with its name and size unless ``data.resize = true``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import DataConfig
from .errors import ConfigError
from .tables import Table, check_every_class, encode_labels, is_missing, read_table, shown

EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


def image_shape(in_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(in_shape) != 3 or in_shape[0] not in (1, 3) or min(in_shape) < 1:
        raise ConfigError(
            f"model.in_shape = {list(in_shape)}: images need [channels, height, width] "
            "with 1 (greyscale) or 3 (RGB) channels"
        )
    return int(in_shape[0]), int(in_shape[1]), int(in_shape[2])


def scan_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, class index per file, class names): the ImageFolder layout ROOT/CLASS/FILE."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ConfigError(
            f"data.path = {str(root)!r} has no class sub-folders; put each class's images "
            f"in {root}/CLASS_NAME/"
        )
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(
            p
            for p in (root / name).iterdir()
            if p.is_file() and p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")
        )
        if not found:
            raise ConfigError(
                f"{root / name}: class folder {name!r} has no image files "
                f"({', '.join(sorted(EXTENSIONS))}); add images or remove the folder"
            )
        files.extend(found)
        labels.extend([index] * len(found))
    return files, labels, classes


def listed_files(path: Path, cfg: DataConfig, classes: int) -> tuple[Table, list[Path]]:
    """A CSV naming one image file per row (``data.image``), relative to the CSV's folder."""
    table = read_table(path, cfg)
    files = []
    for row, value in enumerate(table.columns[cfg.image]):
        if is_missing(value):
            raise ConfigError(f"{table.at(row, cfg.image)}: no image file named; fill it in")
        file = Path(value) if Path(value).is_absolute() else path.parent / value
        if not file.is_file():
            raise ConfigError(f"{table.at(row, cfg.image)}: no such image file {str(file)!r}")
        files.append(file)
    return table, files


def load_image_csv(
    path: Path, cfg: DataConfig, in_shape: Sequence[int], classes: int
) -> tuple[np.ndarray, np.ndarray | None, list[str] | None, list[str] | None, list[str]]:
    """(images, labels or None, class names of text labels, ids, the CSV's columns) from a
    CSV of paths."""
    table, files = listed_files(path, cfg, classes)
    y, names = None, None
    if cfg.label:
        labels, names = encode_labels(table, cfg.label, classes)
        y = np.asarray(labels, dtype=np.int64)
    x = decode_all(files, in_shape, cfg.resize, cfg.max_memory_mb)
    return x, y, names, table.ids, list(table.header)


def load_image_folder(
    root: Path, cfg: DataConfig, in_shape: Sequence[int], classes: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    files, labels, names = scan_folder(root)
    if classes and len(names) > classes:
        raise ConfigError(
            f"data.path = {str(root)!r} has {len(names)} class folders {shown(names)} but "
            f"model.classes = {classes}; set model.classes = {len(names)}"
        )
    check_every_class(names, classes, f"data.path = {str(root)!r} (class folders)")
    x = decode_all(files, in_shape, cfg.resize, cfg.max_memory_mb)
    return x, np.asarray(labels, dtype=np.int64), names


def decode_all(
    files: Sequence[Path], in_shape: Sequence[int], resize: bool, max_memory_mb: int
) -> np.ndarray:
    shape = (len(files), *image_shape(in_shape))
    nbytes = int(np.prod(shape)) * 4
    if nbytes > max_memory_mb * 2**20:
        out: np.ndarray = mapped_array(shape, np.dtype(np.float32))
    else:
        out = np.empty(shape, dtype=np.float32)
    for i, file in enumerate(files):
        out[i] = decode(file, shape[1:], resize)
    return out


def mapped_array(shape: Sequence[int], dtype: np.dtype) -> np.memmap:
    """A zeroed array in a temporary file (unlinked on close; the mapping keeps it alive as
    long as the array is). Its space is taken on disk now: a write into a mapping of a full
    disk ends the process with SIGBUS, and the failure is one line naming the folder."""
    backing = tempfile.TemporaryFile()  # noqa: SIM115 - the mapping owns it from here
    nbytes = max(1, int(np.prod(shape)) * dtype.itemsize)
    try:
        os.posix_fallocate(backing.fileno(), 0, nbytes)
    except OSError as exc:
        backing.close()
        raise ConfigError(
            f"the decoded images need {nbytes / 2**20:.1f} MiB of temporary space in "
            f"{tempfile.gettempdir()} ({exc.strerror}); free some, point TMPDIR elsewhere, or "
            "raise data.max_memory_mb to keep them in memory"
        ) from None
    return np.memmap(backing, dtype, "r+", shape=tuple(shape))


def decode(file: Path, chw: Sequence[int], resize: bool) -> np.ndarray:
    channels, height, width = chw
    try:
        with Image.open(file) as raw:
            img: Image.Image = raw.convert("L" if channels == 1 else "RGB")
            if img.size != (width, height):
                if not resize:
                    raise ConfigError(
                        f"image {str(file)!r} is {img.size[0]}x{img.size[1]} pixels but "
                        f"model.in_shape = {list(chw)} wants {width}x{height}; resize the "
                        "images or set data.resize = true"
                    )
                img = img.resize((width, height), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(
            f"image {str(file)!r} cannot be decoded ({type(exc).__name__}); "
            "replace or remove the file"
        ) from None
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)
