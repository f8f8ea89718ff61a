"""STL-10 (kind `stl10`): the binary release under <root>/stl10_binary/.

    train_X.bin, train_y.bin       -> split train     (5,000 labelled images)
    test_X.bin, test_y.bin         -> split test      (8,000 labelled images)
    unlabeled_X.bin                -> split unlabeled (100,000 images, labels -1;
                                      for training only, via dataset.extra_train_splits)
    class_names.txt                -> the 10 class names, one a line

Images are uint8, 3 x 96 x 96 each, every channel plane stored column-major, so
each plane is transposed to row-major on reading.  Labels are uint8 1..10 and
become 0..9.  Missing files are downloaded (official archive and MD5) when
dataset.download is true; see bench.data.common for when each file's MD5 is checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.data.base import Split
from bench.data.common import check_md5, fetch_archive, fit_images, missing_error
from bench.errors import DatasetError

FOLDER = "stl10_binary"
URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
ARCHIVE_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
SIDE = 96
IMAGE_BYTES = 3 * SIDE * SIDE
NUM_CLASSES = 10
CLASS_FILE = "class_names.txt"

#: split -> (images file, its MD5, labels file or None, its MD5, official image count)
SPLITS = {
    "train": ("train_X.bin", "918c2871b30a85fa023e0c44e0bee87f", "train_y.bin", "5a34089d4802c674881badbb80307741", 5000),
    "test": ("test_X.bin", "7f263ba9f9e0b06b93213547f721ac82", "test_y.bin", "36f9794fa4beb8a2c72628de14fa638e", 8000),
    "unlabeled": ("unlabeled_X.bin", "5242ba1fed5e4be9e1e742405eb56ca4", None, None, 100000),
}

_CHUNK = 5000


def _read_images(path: Path, md5: str, count: int):
    import torch
    from tqdm.auto import tqdm

    size = path.stat().st_size
    if size == 0 or size % IMAGE_BYTES:
        raise DatasetError(
            f"{path}: {size} bytes is not a whole, non-zero number of 3x{SIDE}x{SIDE} images "
            f"({IMAGE_BYTES} bytes each); the file is truncated: delete it and download it again"
        )
    n = size // IMAGE_BYTES
    check_md5(path, md5, full_size=n == count)
    raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, 3, SIDE, SIDE))
    out = torch.empty((n, 3, SIDE, SIDE), dtype=torch.uint8)
    for start in tqdm(range(0, n, _CHUNK), desc=f"reading {path.name}", unit="chunk",
                      disable=n <= 2 * _CHUNK, leave=False):
        block = np.ascontiguousarray(raw[start:start + _CHUNK].transpose(0, 1, 3, 2))
        out[start:start + len(block)] = torch.from_numpy(block)
    del raw
    return out


def _read_labels(path: Path, md5: str, n: int, images: Path, count: int) -> np.ndarray:
    labels = np.fromfile(path, dtype=np.uint8)
    if len(labels) != n:
        raise DatasetError(
            f"{path}: {len(labels)} labels for the {n} images of {images}; expected one byte per image "
            f"(one of the two files is truncated)"
        )
    check_md5(path, md5, full_size=n == count)
    if n and (labels.min() < 1 or labels.max() > NUM_CLASSES):
        raise DatasetError(f"{path}: labels run {labels.min()}..{labels.max()}, expected 1..{NUM_CLASSES}")
    return labels.astype(np.int64) - 1


def _all_files() -> list[str]:
    names = [CLASS_FILE]
    for x_file, _, y_file, _, _ in SPLITS.values():
        names += [x_file] + ([y_file] if y_file else [])
    return names


def load_split(card: dict, root: Path, split: str, download: bool) -> Split:
    if split not in SPLITS:
        raise DatasetError(f"dataset {card['name']!r} (STL-10) has splits {', '.join(SPLITS)}, not {split!r}")
    root = Path(root)
    folder = root / FOLDER
    x_file, x_md5, y_file, y_md5, count = SPLITS[split]
    needed = [folder / x_file] + ([folder / y_file] if y_file else [])
    missing = [p for p in needed if not p.exists()]
    if missing:
        if not download:
            raise missing_error(card["name"], missing, root,
                                "set dataset.download=true to fetch the official STL-10 archive (2.6 GB)")
        fetch_archive(card["name"], root, URL, ARCHIVE_MD5, [folder / n for n in _all_files()])
    images = _read_images(folder / x_file, x_md5, count)
    if y_file:
        labels = _read_labels(folder / y_file, y_md5, len(images), folder / x_file, count)
    else:
        labels = np.full(len(images), -1, dtype=np.int64)
    images = fit_images(images, int(card["image_size"]), int(card.get("channels", 3)))
    return Split(images.contiguous(), labels)


def class_names(card: dict, root: Path) -> list[str]:
    path = Path(root) / FOLDER / CLASS_FILE
    if not path.exists():
        raise missing_error(card["name"], [path], Path(root),
                            "set dataset.download=true to fetch the official STL-10 archive (2.6 GB)")
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable ({exc}); expected {NUM_CLASSES} class names, one a line") from exc
    if len(names) != NUM_CLASSES:
        raise DatasetError(f"{path}: {len(names)} class names, expected {NUM_CLASSES} (one a line)")
    return names


def expected_files(card: dict, root: Path) -> list[Path]:
    return [Path(root) / FOLDER / n for n in _all_files()]
