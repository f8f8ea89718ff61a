"""Helpers shared by the file-based loader kinds: downloads, checksums, caches, resizing.

Checksums.  Every official file has a known MD5.  Which files are checked is set
by the environment variable ``BENCH_DATA_VERIFY``:

    auto    (default) check a file when it holds the official number of images,
            i.e. when it claims to be the full official file; smaller files in the
            same format (subsets, test fixtures) load unchecked; small metadata
            files (class names) are checked only under `always`
    always  check every file against the official MD5
    never   check nothing

A file that passed is remembered in ``.bench-md5.json`` beside it (by size and
modification time), so the hash is computed once, not on every load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from bench.errors import DatasetError

log = logging.getLogger(__name__)

VERIFY_ENV = "BENCH_DATA_VERIFY"
VERIFY_MODES = ("auto", "always", "never")
STAMP_NAME = ".bench-md5.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def verify_mode() -> str:
    mode = os.environ.get(VERIFY_ENV, "auto").strip().lower() or "auto"
    if mode not in VERIFY_MODES:
        raise DatasetError(f"{VERIFY_ENV}={mode!r} is not valid; expected one of {', '.join(VERIFY_MODES)}")
    return mode


def md5sum(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _read_stamp(folder: Path) -> dict:
    try:
        data = json.loads((folder / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_md5(path: Path, expected: str, full_size: bool) -> None:
    """Compare `path` with its official MD5 when the verify mode asks for it.

    `full_size` says whether the file holds the official number of images.
    A mismatch raises DatasetError naming the file, its MD5 and the expected one.
    """
    mode = verify_mode()
    if mode == "never" or (mode == "auto" and not full_size):
        return
    st = path.stat()
    key = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": expected}
    stamp = _read_stamp(path.parent)
    if stamp.get(path.name) == key:
        return
    actual = md5sum(path)
    if actual != expected:
        raise DatasetError(
            f"{path}: MD5 checksum {actual} does not match the official {expected} "
            f"(the file is damaged or not the official release); delete it and download it again "
            f"(dataset.download=true), or set {VERIFY_ENV}=never to load it unchecked"
        )
    stamp[path.name] = key
    from bench.io import atomic_write_json

    with contextlib.suppress(OSError):  # a read-only data folder only costs the hash next time
        atomic_write_json(path.parent / STAMP_NAME, stamp)


def missing_error(name: str, missing: list[Path], root: Path, how: str) -> DatasetError:
    shown = ", ".join(str(p) for p in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    return DatasetError(
        f"dataset {name!r}: missing file(s) {shown} under data root {root}; {how}, "
        f"or point dataset.root=/path (or BENCH_DATA) at a folder that holds them"
    )


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock, so parallel jobs do not download the same archive twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            import fcntl

            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        except (ImportError, OSError):  # no flock on this platform or file system
            pass
        yield


def fetch_archive(name: str, root: Path, url: str, md5: str, wanted: list[Path]) -> None:
    """Download and unpack the official archive into `root` unless every wanted file exists.

    The archive is unpacked into a temporary folder and each missing file is then
    renamed into place, so an interrupted run never leaves a half-written file
    under its final name.  An archive already present in `root` with the right
    MD5 is used without downloading.
    """
    if all(p.exists() for p in wanted):
        return
    root = Path(root)
    filename = url.rsplit("/", 1)[-1]
    with _lock(root / f".{filename}.lock"):
        if all(p.exists() for p in wanted):  # another job finished it while we waited
            return
        log.info("downloading %s into %s", url, root)
        from torchvision.datasets.utils import download_and_extract_archive

        staging = Path(tempfile.mkdtemp(prefix=f".{filename}.", dir=root))
        try:
            try:
                download_and_extract_archive(url, str(root), extract_root=str(staging), filename=filename,
                                             md5=md5, remove_finished=True)
            except Exception as exc:  # network errors, a bad archive, a full disk
                raise DatasetError(
                    f"dataset {name!r}: downloading {url} into {root} failed ({type(exc).__name__}: {exc}); "
                    f"place the archive {filename} (MD5 {md5}) in {root} and run again, or unpack it there "
                    f"yourself, or point dataset.root=/path (or BENCH_DATA) at a folder that holds its files"
                ) from exc
            for dst in wanted:
                src = staging / dst.relative_to(root)
                if not dst.exists() and src.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    missing = [p for p in wanted if not p.exists()]
    if missing:
        raise missing_error(name, missing, root, f"the archive {filename} did not hold them")


def fit_images(x: Any, size: int, channels: int, chunk: int = 2048) -> Any:
    """Resize a uint8 (N, C, H, W) tensor to size x size and convert it to `channels` channels.

    Returns `x` itself when nothing changes.  Resizing is bilinear with antialiasing,
    done in chunks so memory stays bounded.
    """
    import torch
    import torch.nn.functional as F

    n, c, h, w = x.shape
    if (c, h, w) == (channels, size, size):
        return x
    if c not in (1, 3) or channels not in (1, 3):
        raise DatasetError(f"cannot convert {c}-channel images to {channels} channels")
    out = torch.empty((n, channels, size, size), dtype=torch.uint8)
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for start in range(0, n, chunk):
        part = x[start:start + chunk].float()
        if c == 3 and channels == 1:
            part = (part * weights).sum(1, keepdim=True)
        elif c == 1 and channels == 3:
            part = part.expand(-1, 3, -1, -1)
        if (h, w) != (size, size):
            part = F.interpolate(part, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def cache_file(root: Path, kind: str, key: dict) -> Path:
    """Where a decoded image array for `key` is cached under the data root."""
    blob = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:20]
    return root / "cache" / kind / f"{digest}.npy"
