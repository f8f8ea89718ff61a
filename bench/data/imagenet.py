"""Subsets of ILSVRC-2012 (kind `imagenet_subset`): ImageNet-10, ImageNet-Dogs and the like.

The card's `wnids` list names the classes; a class's label is its position in the
list.  The images are the ILSVRC-2012 *train* images of those classes, found in the
first of these folders that holds every wnid folder:

    <dataset.path>/train/<wnid>/*.JPEG     <dataset.path>/<wnid>/*.JPEG
    <data root>/imagenet/train/<wnid>/...  <data root>/imagenet/<wnid>/...   (no dataset.path)

Each image's shorter side is resized to dataset.image_size and the centre square is
cropped; the decoded array is cached as a .npy file under <data root>/cache/ (see
bench.data.folder.load_images).  Only the split `train` exists; the card's protocol
is transductive over it.  ImageNet cannot be downloaded automatically.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from bench.data.base import Split
from bench.data.folder import class_folder_split
from bench.errors import DatasetError


def _wnids(card: dict) -> list[str]:
    wnids = [str(w) for w in card.get("wnids") or []]
    if not wnids:
        raise DatasetError(f"dataset {card['name']!r} (kind imagenet_subset) needs dataset.wnids: the class wnids, in label order")
    dup = sorted(w for w, n in Counter(wnids).items() if n > 1)
    if dup:
        raise DatasetError(f"dataset {card['name']!r}: dataset.wnids lists {', '.join(dup)} more than once")
    if int(card.get("num_classes") or 0) != len(wnids):
        raise DatasetError(
            f"dataset {card['name']!r}: dataset.wnids lists {len(wnids)} classes but dataset.num_classes={card.get('num_classes')}"
        )
    return wnids


def _candidates(card: dict, root: Path) -> list[Path]:
    base = Path(card["path"]).expanduser() if card.get("path") else Path(root) / "imagenet"
    return [base / "train", base]


def _locate(card: dict, root: Path) -> Path:
    """The folder that holds every wnid folder; otherwise an error listing the missing ones."""
    wnids = _wnids(card)
    candidates = _candidates(card, root)
    best, best_found = candidates[0], -1
    for folder in candidates:
        found = sum((folder / w).is_dir() for w in wnids)
        if found == len(wnids):
            return folder
        if found > best_found:
            best, best_found = folder, found
    missing = [w for w in wnids if not (best / w).is_dir()]
    looked = " and ".join(str(c) for c in candidates)
    where = f"looked in {looked}" + (f"; {best} holds the other {best_found}" if best_found > 0 else "")
    raise DatasetError(
        f"dataset {card['name']!r}: {len(missing)} of its {len(wnids)} ImageNet class folders are missing: "
        f"{' '.join(missing)} ({where}). Expected the ILSVRC-2012 train "
        f"images as <folder>/train/<wnid>/*.JPEG, or a folder holding the wnid folders directly. Provide them "
        f"with dataset.path=/path/to/ILSVRC2012, or place them under <data root>/imagenet/train "
        f"(data root: {root}; set it with dataset.root=... or BENCH_DATA). ImageNet is not downloaded automatically."
    )


def load_split(card: dict, root: Path, split: str, download: bool) -> Split:
    if split != "train":
        raise DatasetError(
            f"dataset {card['name']!r} (kind imagenet_subset) has only the split 'train' "
            f"(ILSVRC-2012 train images), not {split!r}"
        )
    folder = _locate(card, Path(root))
    wnids = _wnids(card)
    return class_folder_split(
        card, root, folder, wnids, "imagenet_subset", {"wnids": wnids},
        lambda sub: f"{sub}: the class folder of {sub.name} holds no images; expected its *.JPEG files")


def class_names(card: dict, root: Path) -> list[str]:
    return _wnids(card)


def expected_files(card: dict, root: Path) -> list[Path]:
    wnids = [str(w) for w in card.get("wnids") or []]
    candidates = _candidates(card, Path(root))
    folder = next((c for c in candidates if all((c / w).is_dir() for w in wnids)), candidates[0])
    return [folder / w for w in wnids]
