"""Contracts shared by every dataset loader.

A *loader kind* (digits, cifar10, cifar100_coarse, stl10, imagenet_subset, folder)
is a module with three functions:

    load_split(card, root, split, download) -> Split
    class_names(card, root) -> list[str]
    expected_files(card, root) -> list[pathlib.Path]   # what `bench data` checks

`card` is the resolved `dataset` config node (a plain dict); `root` is the data
root folder.  Images are kept in memory as uint8 tensors (N, C, H, W) at the card's
image size, so augmentation can run on whole batches on the training device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import ConfigError, DatasetError
from bench.registry import Registry

LOADERS: Registry = Registry("dataset loader kind")
LOADERS.register("digits", "bench.data.digits")
LOADERS.register("cifar10", "bench.data.cifar")
LOADERS.register("cifar100_coarse", "bench.data.cifar")
LOADERS.register("stl10", "bench.data.stl10")
LOADERS.register("imagenet_subset", "bench.data.imagenet")
LOADERS.register("folder", "bench.data.folder")

#: Protocols known to the harness: which splits train and which are evaluated.
#: "splits" stands for every labelled split of the card, in card order.
PROTOCOLS = {
    "transductive": {"train": "splits", "eval": "splits"},
    "inductive": {"train": ["train"], "eval": ["test"]},
}


@dataclass
class Split:
    """One split held in memory."""

    images: Any  # torch.Tensor, uint8, (N, C, H, W), contiguous
    labels: np.ndarray  # int64 (N,), -1 where unlabelled

    def __post_init__(self) -> None:
        import torch

        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise TypeError("Split.images must be a uint8 torch tensor of shape (N, C, H, W)")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def on(self, device: str) -> Any:
        """The images on `device`, copied once per split and device: every stage of a run that trains on
        this split shares one device copy (on the CPU, the images themselves)."""
        copies = self.__dict__.setdefault("_on_device", {})
        key = str(device)
        if key not in copies:
            copies[key] = self.images.to(device)
        return copies[key]

    @staticmethod
    def concat(parts: list[Split]) -> Split:
        import torch

        if len(parts) == 1:
            return parts[0]
        return Split(torch.cat([p.images for p in parts]), np.concatenate([p.labels for p in parts]))


@dataclass
class DataBundle:
    """What a method receives: the training images and the evaluation images."""

    name: str
    card: dict
    classes: list[str]
    train: Split
    eval: Split
    protocol: dict  # {"name": ..., "train": [...], "eval": [...]}
    #: True when eval is exactly the train images in the same order (transductive
    #: without extra unlabelled data): methods may reuse training-time features.
    eval_is_train: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.card["num_classes"])

    @property
    def image_size(self) -> int:
        return int(self.card["image_size"])

    @property
    def channels(self) -> int:
        return int(self.card["channels"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.card["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(float(x) for x in self.card["std"])


def data_root(card: dict) -> Path:
    """The data root: dataset.root if set, else $BENCH_DATA, else datasets/data."""
    root = card.get("root") or os.environ.get("BENCH_DATA") or "datasets/data"
    return Path(root).expanduser()


def resolve_protocol(card: dict) -> dict:
    name = card.get("protocol", "transductive")
    splits = list(card["splits"])
    if name == "custom":
        train, evaluate = list(card["train_splits"]), list(card["eval_splits"])
    elif name in PROTOCOLS:
        spec = PROTOCOLS[name]
        train = splits if spec["train"] == "splits" else list(spec["train"])
        evaluate = splits if spec["eval"] == "splits" else list(spec["eval"])
    else:
        raise ConfigError(
            f"dataset.protocol={name!r} is not a known protocol; expected one of "
            f"{', '.join([*PROTOCOLS, 'custom'])} (custom uses dataset.train_splits and dataset.eval_splits)"
        )
    for s in train + evaluate:
        if s not in splits:
            raise ConfigError(
                f"protocol {name!r} of dataset {card['name']!r} needs split {s!r}, "
                f"but the card lists only {splits}"
            )
    return {"name": name, "train": train, "eval": evaluate}


def build_bundle(card: dict, download: bool | None = None) -> DataBundle:
    """Load the splits the card's protocol needs and assemble a DataBundle."""
    kind = LOADERS.get(card["kind"])
    root = data_root(card)
    download = bool(card.get("download", True)) if download is None else download
    protocol = resolve_protocol(card)
    cache: dict[str, Split] = {}

    def get(split: str) -> Split:
        if split not in cache:
            cache[split] = kind.load_split(card, root, split, download)
            _check_split(card, split, cache[split])
        return cache[split]

    train_parts = [get(s) for s in protocol["train"]]
    extra_train = list(card.get("extra_train_splits") or [])
    for s in extra_train:
        train_parts.append(get(s))
    train = Split.concat(train_parts)
    eval_is_train = protocol["train"] == protocol["eval"] and not extra_train
    # transductive: one Split object for both, not a second copy of the images (and methods can tell
    # by identity that features computed for training are the evaluation's features)
    evaluation = train if eval_is_train else Split.concat([get(s) for s in protocol["eval"]])
    classes = kind.class_names(card, root)
    if len(classes) != int(card["num_classes"]):
        raise DatasetError(
            f"dataset {card['name']!r}: found {len(classes)} classes under {root}, "
            f"but the card says num_classes={card['num_classes']}"
        )
    protocol["extra_train"] = extra_train
    return DataBundle(card["name"], card, classes, train, evaluation, protocol, eval_is_train)


def _check_split(card: dict, split: str, data: Split) -> None:
    c, h, w = data.images.shape[1:]
    exp = (int(card["channels"]), int(card["image_size"]), int(card["image_size"]))
    if (c, h, w) != exp:
        raise DatasetError(
            f"dataset {card['name']!r} split {split!r}: images are {c}x{h}x{w}, the card expects {exp[0]}x{exp[1]}x{exp[2]}"
        )
    if len(data) == 0:
        raise DatasetError(f"dataset {card['name']!r} split {split!r} holds no images")


def describe(card: dict) -> dict:
    """What `python -m bench data` prints: files found, images per split, classes, image size."""
    kind = LOADERS.get(card["kind"])
    root = data_root(card)
    files = [{"path": str(p), "exists": p.exists()} for p in kind.expected_files(card, root)]
    info: dict = {"dataset": card["name"], "kind": card["kind"], "root": str(root), "files": files, "splits": {}}
    problems = []
    for split in list(card["splits"]) + list(card.get("extra_train_splits") or []):
        try:
            data = kind.load_split(card, root, split, False)
            info["splits"][split] = {"images": len(data), "shape": list(data.images.shape[1:]),
                                     "labelled": int((data.labels >= 0).sum())}
        except DatasetError as exc:
            problems.append(str(exc))
    try:
        info["classes"] = kind.class_names(card, root)
    except DatasetError as exc:
        problems.append(str(exc))
    info["problems"] = problems
    return info
