"""Any folder of class sub-folders (kind `folder`): ``dataset=folder dataset.path=/my/images``.

    /my/images/<class>/**/<image>      classes = the sorted sub-folder names

Images of any size and mode (grayscale, RGBA, palette, CMYK, 16-bit) are converted
to RGB (or to L when dataset.channels=1; transparent pixels go on white), their
shorter side is resized to dataset.image_size and the centre square is cropped.
The decoded array is cached as a .npy file under <data root>/cache/, keyed by the
class list, the image size and the list of files (names, byte sizes, modification
times), so the second load reads one file.  Only the split `train` exists; the card's protocol is
transductive over it.

dataset.num_classes: 0 means "count the class folders" (see derive_num_classes);
any other value must match the number of folders.

The decoding and caching helpers here also serve bench.data.imagenet.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from bench.data.base import Split
from bench.data.common import IMAGE_SUFFIXES, cache_file
from bench.errors import DatasetError

log = logging.getLogger(__name__)

CACHE_VERSION = 1


# --------------------------------------------------------------------------- shared image helpers


def list_images(folder: Path) -> list[Path]:
    """Image files under `folder` (recursively, hidden entries skipped), sorted by relative path."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _to_mode(img, channels: int):
    from PIL import Image

    target = "RGB" if channels == 3 else "L"
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr.round(), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == target else img.convert(target)


def _square(img, size: int):
    from PIL import Image

    w, h = img.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 array (channels, size, size); an unreadable file raises DatasetError."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.draft(None, (size, size))  # JPEG: let the decoder downscale by a power of two
            img = ImageOps.exif_transpose(img)
            img = _square(_to_mode(img, channels), size)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"{path}: cannot read the image ({type(exc).__name__}: {exc}); "
                           f"the file is corrupt or not an image: delete or replace it") from exc
    if arr.ndim == 2:
        arr = arr[None]
    else:
        arr = arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _read_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        log.warning("ignoring the unreadable image cache %s (%s); decoding again", path, exc)
        return None
    if arr.dtype != np.uint8 or arr.shape != shape:
        log.warning("ignoring the image cache %s: it holds %s %s, expected uint8 %s; decoding again",
                    path, arr.dtype, arr.shape, shape)
        return None
    return arr


def _write_cache(path: Path, arr: np.ndarray) -> None:
    from bench.io import atomic_save

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable like any other file in a shared data root

    try:
        atomic_save(path, write)
    except OSError as exc:  # a read-only data root: the next load decodes again
        log.warning("could not write the image cache %s (%s); the next load will decode again", path, exc)


def load_images(files: list[Path], base: Path, size: int, channels: int, root: Path, kind: str,
                key: dict, desc: str):
    """Decode `files` to a uint8 tensor (N, channels, size, size), through the cache under `root`.

    The cache key is `key` plus the image size, the channels, the folder `base` and
    every file's path relative to it with its byte size and modification time.
    """
    import torch
    from tqdm.auto import tqdm

    listing = []
    for p in files:
        try:
            st = p.stat()
        except OSError as exc:
            raise DatasetError(f"{p}: cannot read the image ({exc})") from exc
        listing.append([p.relative_to(base).as_posix(), st.st_size, st.st_mtime_ns])
    full_key = {"version": CACHE_VERSION, "kind": kind, "folder": str(Path(base).resolve()), "size": size,
                "channels": channels, "files": listing, **key}
    path = cache_file(Path(root), kind, full_key)
    shape = (len(files), channels, size, size)
    cached = _read_cache(path, shape)
    if cached is not None:
        return torch.from_numpy(cached)
    out = np.empty(shape, dtype=np.uint8)
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=_workers())
    try:
        results = pool.map(lambda p: decode_image(p, size, channels), files)
        for i, arr in enumerate(tqdm(results, total=len(files), desc=desc, unit="img",
                                     disable=len(files) < 256)):
            out[i] = arr
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    _write_cache(path, out)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- the `folder` kind


def _base(card: dict) -> Path:
    raw = card.get("path") or ""
    if not raw:
        raise DatasetError(
            f"dataset {card.get('name', 'folder')!r} (kind folder) needs dataset.path=/my/images: "
            f"a folder holding one sub-folder of images per class"
        )
    base = Path(raw).expanduser()
    if not base.is_dir():
        what = "is not a folder" if base.exists() else "does not exist"
        raise DatasetError(f"dataset.path={base} {what}; expected a folder holding one sub-folder of images per class")
    return base


def _classes(base: Path) -> list[str]:
    names = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not names:
        raise DatasetError(f"{base}: holds no class sub-folders; expected one sub-folder of images per class")
    return names


def derive_num_classes(card: dict) -> int:
    """The number of class folders under dataset.path (used when the card says num_classes: 0)."""
    base = _base(card)
    n = len(_classes(base))
    if n < 2:
        raise DatasetError(f"{base}: holds only one class sub-folder; clustering needs at least two")
    return n


def load_split(card: dict, root: Path, split: str, download: bool) -> Split:
    if split != "train":
        raise DatasetError(f"dataset {card['name']!r} (kind folder) has only the split 'train', not {split!r}")
    base = _base(card)
    classes = _classes(base)
    declared = int(card.get("num_classes") or 0)
    if declared and declared != len(classes):
        shown = ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")
        raise DatasetError(
            f"{base} holds {len(classes)} class folders ({shown}), but dataset.num_classes={declared}; "
            f"set dataset.num_classes=0 to count the folders, or point dataset.path at the right folder"
        )
    return class_folder_split(
        card, root, base, classes, "folder", {"classes": classes},
        lambda folder: f"{folder}: class folder holds no images (looked for {' '.join(IMAGE_SUFFIXES)}); "
                       f"add images or remove the folder")


def class_folder_split(card: dict, root: Path, base: Path, names: list[str], kind: str, key: dict,
                       empty_error) -> Split:
    """A Split of the images under base/<name>, labelled by the position of <name> in `names`.

    A class folder without images raises DatasetError(empty_error(folder)); the decoded images are cached
    under `kind` and `key` (see load_images).
    """
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        found = list_images(base / name)
        if not found:
            raise DatasetError(empty_error(base / name))
        files += found
        labels += [label] * len(found)
    size, channels = int(card["image_size"]), int(card.get("channels", 3))
    images = load_images(files, base, size, channels, Path(root), kind, key, desc=f"decoding {card['name']}")
    return Split(images, np.asarray(labels, dtype=np.int64))


def class_names(card: dict, root: Path) -> list[str]:
    return _classes(_base(card))


def expected_files(card: dict, root: Path) -> list[Path]:
    if not card.get("path"):
        return []
    base = Path(card["path"]).expanduser()
    if not base.is_dir():
        return [base]
    return [base] + [base / c for c in sorted(d.name for d in base.iterdir()
                                                if d.is_dir() and not d.name.startswith("."))]
