"""CIFAR-10 (kind `cifar10`) and CIFAR-100 with its 20 coarse labels (kind `cifar100_coarse`).

Reads the official python batches under the data root:

    cifar-10-batches-py/   data_batch_1 .. data_batch_5 -> split train (50,000 images)
                           test_batch                   -> split test  (10,000)
                           batches.meta                 -> class names (`label_names`)
    cifar-100-python/      train -> split train (50,000), test -> split test (10,000)
                           meta  -> class names (`coarse_label_names`, 20 superclasses)

Each batch is a pickled dict with `data` (uint8, N x 3072: the red, green and blue
32x32 planes, row-major) and the labels (`labels`, or `coarse_labels` for CIFAR-100).
The pickles are read with a restricted unpickler that admits only numpy arrays and
plain containers.  Missing files are downloaded (official archive and MD5) when
dataset.download is true; see bench.data.common for when each file's MD5 is checked.
"""

from __future__ import annotations

import importlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.data.base import Split
from bench.data.common import check_md5, fetch_archive, fit_images, missing_error
from bench.errors import DatasetError

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class Release:
    title: str
    folder: str
    url: str
    archive_md5: str
    meta: tuple[str, str]  # file name, MD5
    names_key: str
    labels_key: str
    num_classes: int
    splits: dict  # split -> [(file name, MD5, official image count), ...]

    def files(self) -> list[tuple[str, str]]:
        out = [self.meta]
        for entries in self.splits.values():
            out += [(name, md5) for name, md5, _ in entries]
        return out


RELEASES = {
    "cifar10": Release(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive_md5="c58f30108f718f92721af3b95e74349a",
        meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        names_key="label_names",
        labels_key="labels",
        num_classes=10,
        splits={
            "train": [
                ("data_batch_1", "c99cafc152244af753f735de768cd75f", 10000),
                ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec", 10000),
                ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751", 10000),
                ("data_batch_4", "634d18415352ddfa80567beed471001a", 10000),
                ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb", 10000),
            ],
            "test": [("test_batch", "40351d587109b95175f43aff81a1287e", 10000)],
        },
    ),
    "cifar100_coarse": Release(
        title="CIFAR-100",
        folder="cifar-100-python",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive_md5="eb9058c3a382ffc7106e4002c42a8d85",
        meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
        names_key="coarse_label_names",
        labels_key="coarse_labels",
        num_classes=20,
        splits={
            "train": [("train", "16019d7e3df5f24257cddd939b257f8d", 50000)],
            "test": [("test", "f0ef6b0ae62326f3e7ffdfab6717acfc", 10000)],
        },
    ),
}

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Admits only the globals a pickled numpy array needs."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        module = _numpy_module(module)
        return super().find_class(module, name)


def _numpy_module(module: str) -> str:
    """numpy 2 moved numpy.core to numpy._core: map a pickled module path to the one this numpy has."""
    for prefix in ("numpy.core", "numpy._core"):
        if module == prefix or module.startswith(prefix + "."):
            rest = module[len(prefix):]
            for candidate in ("numpy._core" + rest, "numpy.core" + rest):
                try:
                    importlib.import_module(candidate)
                except ImportError:
                    continue
                return candidate
    return module


def _release(card: dict) -> Release:
    kind = card.get("kind")
    if kind not in RELEASES:
        raise DatasetError(f"bench.data.cifar serves kinds {', '.join(RELEASES)}, not {kind!r}")
    return RELEASES[kind]


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _unpickle(path: Path, what: str) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _BatchUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise DatasetError(
            f"{path}: not a readable {what} ({type(exc).__name__}: {exc}); the file is truncated or "
            f"corrupt: delete it and download it again"
        ) from exc
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict ({what}), found {type(obj).__name__}")
    return {_text(k): v for k, v in obj.items()}


def _read_batch(path: Path, md5: str, count: int, rel: Release) -> tuple[np.ndarray, np.ndarray]:
    what = f"{rel.title} python batch"
    entry = _unpickle(path, what)
    for key in ("data", rel.labels_key):
        if key not in entry:
            raise DatasetError(
                f"{path}: no {key!r} entry in the {what} (keys found: {', '.join(sorted(entry)) or 'none'})"
            )
    data = np.asarray(entry["data"])
    labels = np.asarray(entry[rel.labels_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise DatasetError(
            f"{path}: 'data' is {data.dtype} of shape {data.shape}, expected uint8 of shape (N, {PIXELS})"
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: {rel.labels_key!r} holds {labels.shape} {labels.dtype} values, "
            f"expected {len(data)} integers (one per image)"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= rel.num_classes):
        raise DatasetError(
            f"{path}: {rel.labels_key!r} has values {labels.min()}..{labels.max()}, "
            f"expected 0..{rel.num_classes - 1}"
        )
    check_md5(path, md5, full_size=len(data) == count)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _ensure(card: dict, root: Path, rel: Release, needed: list[Path], download: bool) -> None:
    missing = [p for p in needed if not p.exists()]
    if not missing:
        return
    if not download:
        raise missing_error(card["name"], missing, root,
                            f"set dataset.download=true to fetch the official {rel.title} archive")
    fetch_archive(card["name"], root, rel.url, rel.archive_md5, [root / rel.folder / n for n, _ in rel.files()])


def load_split(card: dict, root: Path, split: str, download: bool) -> Split:
    import torch

    rel = _release(card)
    if split not in rel.splits:
        raise DatasetError(
            f"dataset {card['name']!r} ({rel.title}) has splits {', '.join(rel.splits)}, not {split!r}"
        )
    folder = Path(root) / rel.folder
    entries = rel.splits[split]
    _ensure(card, Path(root), rel, [folder / name for name, _, _ in entries], download)
    parts = [_read_batch(folder / name, md5, count, rel) for name, md5, count in entries]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate([p[0] for p in parts])))
    labels = np.concatenate([p[1] for p in parts])
    images = fit_images(images, int(card["image_size"]), int(card.get("channels", 3)))
    return Split(images.contiguous(), labels)


def class_names(card: dict, root: Path) -> list[str]:
    rel = _release(card)
    name, md5 = rel.meta
    path = Path(root) / rel.folder / name
    if not path.exists():
        raise missing_error(card["name"], [path], Path(root),
                            f"set dataset.download=true to fetch the official {rel.title} archive")
    meta = _unpickle(path, f"{rel.title} meta file")
    if rel.names_key not in meta:
        raise DatasetError(
            f"{path}: no {rel.names_key!r} entry (keys found: {', '.join(sorted(meta)) or 'none'})"
        )
    names = [_text(n) for n in meta[rel.names_key]]
    if len(names) != rel.num_classes:
        raise DatasetError(f"{path}: {rel.names_key!r} lists {len(names)} names, expected {rel.num_classes}")
    check_md5(path, md5, full_size=False)  # checked only when BENCH_DATA_VERIFY=always
    return names


def expected_files(card: dict, root: Path) -> list[Path]:
    rel = _release(card)
    return [Path(root) / rel.folder / name for name, _ in rel.files()]
